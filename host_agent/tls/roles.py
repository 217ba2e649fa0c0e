"""Which role may call which method: a server interceptor in front of every handler of a TLS server,
which also refuses revoked certificates (UNAUTHENTICATED, host_agent.tls.revocation).

Each service gives a table ``{Role: methods}`` (``ALL`` for every method); a call by a role whose
entry lacks the method is refused with PERMISSION_DENIED naming the role, the identity and the method,
before the servicer sees it. Checks that depend on the request (an agent's own domains) stay in the
servicer (``host_agent.media.access``). Health and reflection are open to every authenticated peer.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, Final, TypeAlias

import grpc

from host_agent import errors
from host_agent.tls.identity import Identity, Role
from host_agent.tls.revocation import Revocations
from host_agent.tls.transport import TlsConfig, peer_identity

log = logging.getLogger(__name__)

ALL: Final = frozenset({"*"})
OPEN_SERVICES: Final = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                                  "grpc.reflection.v1.ServerReflection"})
Table = Mapping[Role, frozenset[str]]
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class _Check:
    """The decision for one method of one service."""

    def __init__(self, table: Table, full_method: str) -> None:
        service, _, self.method = full_method.lstrip("/").rpartition("/")
        self.open = service in OPEN_SERVICES
        self._table = table

    def denied(self, identity: Identity | None) -> str | None:
        """The refusal's message, or None to let the call through."""
        if self.open:
            return None
        if identity is None:  # cannot happen behind require_client_auth; refuse rather than trust
            return f"no client certificate: {self.method} needs one"
        allowed = self._table.get(identity.role, frozenset())
        if allowed is ALL or self.method in allowed:
            return None
        return f"role {identity.role.value} ({identity.name}) may not call {self.method}"


def _identity(context: Any) -> tuple[Identity | None, str | None]:
    try:
        return peer_identity(context), None
    except errors.UsageError as e:
        return None, str(e)


def _verdict(check: _Check, context: Any,
             revocations: Revocations | None) -> tuple[grpc.StatusCode, str] | None:
    """The status and message refusing the call, or None to let it through: a revoked certificate
    first (UNAUTHENTICATED, whatever the method), then the role."""
    identity, bad = _identity(context)
    pem = context.auth_context().get("x509_pem_cert")
    if revocations is not None and pem:
        revoked = revocations.refusal(pem if isinstance(pem, bytes) else next(iter(pem)),
                                      identity.uri() if identity else context.peer())
        if revoked:
            return grpc.StatusCode.UNAUTHENTICATED, revoked
    denied = bad or check.denied(identity)
    return (grpc.StatusCode.PERMISSION_DENIED, denied) if denied else None


def revocations_of(tls: TlsConfig) -> Revocations | None:
    """The server's revocation list, if ``tls`` names one (TlsError now if it is unusable)."""
    return Revocations(tls.crl, tls.ca) if tls.crl is not None and tls.ca is not None else None


def _replace(handler: _Handler, wrap: Callable[[Any], Any]) -> _Handler:
    """``handler`` with its behavior wrapped by ``wrap``, of the same streaming kind."""
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
             ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for attr, make in kinds:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return make(wrap(behavior), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


class RoleInterceptor(grpc.ServerInterceptor):
    """Role and revocation checks for a threaded server (the media service)."""

    def __init__(self, table: Table, tls: TlsConfig) -> None:
        self._table = table
        self._revocations = revocations_of(tls)

    def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], _Handler | None],
            details: grpc.HandlerCallDetails) -> _Handler | None:
        handler = continuation(details)
        if handler is None:
            return None
        check = _Check(self._table, details.method)

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                refused = _verdict(check, context, self._revocations)
                if refused:
                    log.warning("refused %s from %s: %s", check.method, context.peer(), refused[1])
                    context.abort(*refused)
                return behavior(request, context)
            return guarded
        return _replace(handler, wrap)


class AioRoleInterceptor(grpc.aio.ServerInterceptor):
    """Role and revocation checks for an asyncio server (the operator API, the optimizer)."""

    def __init__(self, table: Table, tls: TlsConfig) -> None:
        self._table = table
        self._revocations = revocations_of(tls)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
            details: grpc.HandlerCallDetails) -> _Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        check = _Check(self._table, details.method)

        async def refuse(context: Any) -> None:
            refused = _verdict(check, context, self._revocations)
            if refused:
                log.warning("refused %s from %s: %s", check.method, context.peer(), refused[1])
                await context.abort(*refused)

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if handler.response_streaming:
                async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                    await refuse(context)
                    async for item in _aiter(behavior(request, context)):
                        yield item
                return streaming

            async def unary(request: Any, context: Any) -> Any:
                await refuse(context)
                answer = behavior(request, context)
                return await answer if isinstance(answer, Awaitable) else answer
            return unary
        return _replace(handler, wrap)


async def _aiter(items: AsyncIterator[Any] | Iterator[Any]) -> AsyncIterator[Any]:
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


__all__ = ["ALL", "AioRoleInterceptor", "RoleInterceptor", "Table", "revocations_of"]
