"""The command line's way to the host agent: its operator gRPC API (``proto/hyperback/v1/operator.proto``).

The address is ``--agent``, else the ``operator_listen`` of the agent's config (the same file and
``HYPERBACK_*`` variables the agent reads), so on the agent's host no option is needed. What the
agent answers with a status code becomes the error of the tree that says the same thing.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import grpc

from host_agent import errors
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as pb_grpc
from host_agent.config import load
from host_agent.tls.transport import channel, tls_failure

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
TIMEOUT = 30.0


def add_agent_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", metavar="ADDRESS",
                   help="the agent's operator API: unix:/PATH or HOST:PORT (default: operator_listen of "
                        "/etc/hyperback/agent.toml, unix:/run/hyperback/agent.sock)")


@contextmanager
def operator(args: argparse.Namespace) -> Iterator[tuple[pb_grpc.OperatorStub, str]]:
    """A stub for the agent's operator API, and its address."""
    settings = load()
    address = args.agent or settings.operator_listen
    with channel(address, settings.tls) as chan:  # [tls] of the config: this host's certificate
        yield pb_grpc.OperatorStub(chan), address


def call(method: Callable[..., _Resp], request: _Req, address: str) -> _Resp:
    """One call; its failure as an error of the tree, in one line."""
    try:
        return method(request, timeout=TIMEOUT)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        handshake = tls_failure(code, details, f"the agent at {address}", _cert())
        if handshake is not None:
            raise handshake from None
        if code is grpc.StatusCode.PERMISSION_DENIED:
            raise errors.AccessDenied(f"the agent at {address} refused: {details}") from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise errors.EnvironmentProblem(
                f"the agent at {address} does not answer ({details}); is hyperback-agent running? "
                "(systemctl status hyperback-agent)") from None
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION):
            raise errors.UsageError(details) from None
        raise errors.HyperbackError(f"the agent at {address} failed: {code.name}: {details}") from None


def _cert() -> Path | None:
    """This host's certificate if the config names one (how a refused handshake is explained)."""
    tls = load().tls
    return tls.cert if tls.enabled else None


def when(t: float) -> str:
    """A time for people ("-" for never)."""
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"
