"""Hostile messages at the media service and the operator API over mutual TLS (hypothesis-generated):
from an agent, an operator, a monitor and a client without a certificate. Each service answers each
message with a status code, never an unhandled exception, keeps serving, and never hands an agent
another host's snapshot."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from system_helpers import MIB, write_random_image
from tls_helpers import Pki, make_pki

from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent._proto.hyperback.v1 import operator_pb2 as opb
from host_agent.agent.destinations import Destinations
from host_agent.agent.domains import Domains
from host_agent.agent.guests import Guests
from host_agent.agent.intake import Intake
from host_agent.agent.jobs import Jobs
from host_agent.agent.operator import AgentParts, OperatorServer, start_operator_server
from host_agent.agent.schedules import Scheduler
from host_agent.config import TlsConfig, load
from host_agent.media import server as media
from host_agent.media.client import RemoteRepository
from host_agent.storage.repository import Repository
from host_agent.tls.identity import Role
from host_agent.tls.transport import channel_credentials

SERVICE = pb.DESCRIPTOR.services_by_name["Media"]
OPERATOR = opb.DESCRIPTOR.services_by_name["Operator"]
VM_B = "0b0b0b0b-0000-4000-8000-00000000000b"
# a bug shows as UNKNOWN (an exception the servicer did not turn into a status)
ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ABORTED,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED}


class Lab:
    """A TLS media service holding one snapshot of host B's domain, written by B's agent."""

    def __init__(self, root: Path) -> None:
        self.pki: Pki = make_pki(root / "pki")
        self.repo = Repository.init(root / "repo")
        self.server = media.start({"main": self.repo.path}, "127.0.0.1:0", "hostm", lease=5.0,
                                  tls=self.pki.tls(Role.OPERATOR, "media"))
        spool = root / "spool"
        spool.mkdir()
        image = write_random_image(root / "b.img", 2 * MIB, seed=3)
        with RemoteRepository(self.server.address, "main", spool_dir=spool,
                              tls=self.pki.tls(Role.AGENT, "hostb")) as b:
            self.secret = b.backup(image, f"{VM_B}/vda").snapshot
        self.agent_a = self.pki.tls(Role.AGENT, "hosta")
        self.operator = self.pki.tls(Role.OPERATOR, "alice")

    def close(self) -> None:
        self.server.stop(grace=0)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    made = Lab(tmp_path_factory.mktemp("fuzz"))
    yield made
    made.close()


def _value(field: FieldDescriptor, lab_secret: str) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=80), st.sampled_from(
            ["main", "", lab_secret, lab_secret[:4], f"{VM_B}/vda", f"{VM_B}/vda@latest", "../../etc/passwd",
             "x" * 5000, "00" * 16, "\x00"]))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=300)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if field.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-5, 20)
    return st.integers(-(2**31), 2**31 - 1)


def messages(cls: type[Message], secret: str) -> st.SearchStrategy[bytes]:
    """Serialized messages of ``cls`` with hostile values in their scalar fields, or random bytes."""
    scalars = [f for f in cls.DESCRIPTOR.fields
               if f.type != FieldDescriptor.TYPE_MESSAGE and not f.is_repeated]

    def build(values: dict[str, Any]) -> bytes:
        msg = cls()
        for name, value in values.items():
            setattr(msg, name, value)
        return msg.SerializeToString()
    structured = st.fixed_dictionaries({}, optional={f.name: _value(f, secret) for f in scalars}).map(build)
    return st.one_of(structured, st.binary(max_size=200))


def parses(method: str, request: bytes, service: ServiceDescriptor = SERVICE) -> bool:
    """Whether ``request`` is a message of the method's type at all (gRPC itself answers INTERNAL if not)."""
    try:
        _request_type(service, method).FromString(request)
    except DecodeError:
        return False
    return True


def expected(method: str, request: bytes, code: grpc.StatusCode,
             service: ServiceDescriptor = SERVICE) -> bool:
    """An answer the service gives on purpose; or gRPC's own refusal of bytes that are no message of
    the method's type (INTERNAL from the threaded server, UNKNOWN from the asyncio one)."""
    undecodable = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
    return code in ANSWERS or (code in undecodable and not parses(method, request, service))


def call(chan: grpc.Channel, method: str, request: bytes,
         service: ServiceDescriptor = SERVICE) -> tuple[grpc.StatusCode, list[bytes]]:
    """The status and the raw answers of one call."""
    spec = service.methods_by_name[method]
    path = f"/{service.full_name}/{method}"
    try:
        if spec.client_streaming:
            answer = chan.stream_unary(path)(iter([request]), timeout=10)
            return grpc.StatusCode.OK, [answer]
        if spec.server_streaming:
            return grpc.StatusCode.OK, list(chan.unary_stream(path)(request, timeout=10))
        return grpc.StatusCode.OK, [chan.unary_unary(path)(request, timeout=10)]
    except grpc.RpcError as e:
        return e.code(), []  # type: ignore[attr-defined]


def _request_type(service: ServiceDescriptor, method: str) -> type[Message]:
    module = pb if service is SERVICE else opb
    return getattr(module, service.methods_by_name[method].input_type.name)  # type: ignore[no-any-return]


def hostile(secret: str, service: ServiceDescriptor = SERVICE) -> st.SearchStrategy[tuple[str, bytes]]:
    return st.sampled_from(sorted(service.methods_by_name)).flatmap(
        lambda m: st.tuples(st.just(m), messages(_request_type(service, m), secret)))


def _secure(lab: Lab, tls: TlsConfig) -> grpc.Channel:
    return grpc.secure_channel(lab.server.address, channel_credentials(tls))


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_an_agent_gets_a_status_for_every_hostile_message_and_never_another_hosts_snapshot(
        lab: Lab, data: st.DataObject) -> None:
    method, request = data.draw(hostile(lab.secret.id))
    with _secure(lab, lab.agent_a) as chan:
        code, answers = call(chan, method, request)
        assert expected(method, request, code), (method, request, code)
        leaked = b"".join(answers)
        assert lab.secret.id.encode() not in leaked and VM_B.encode() not in leaked, (method, request)
        assert call(chan, "Describe", b"")[0] is grpc.StatusCode.OK


@FUZZ
@given(data=st.data())
def test_an_operator_gets_a_status_for_every_hostile_message(lab: Lab, data: st.DataObject) -> None:
    method, request = data.draw(hostile(lab.secret.id))
    with _secure(lab, lab.operator) as chan:
        code, _ = call(chan, method, request)
        assert expected(method, request, code), (method, request, code)
        assert call(chan, "Describe", b"")[0] is grpc.StatusCode.OK


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_client_without_a_certificate_gets_nothing_for_any_message(lab: Lab, data: st.DataObject) -> None:
    method, request = data.draw(hostile(lab.secret.id))
    with grpc.secure_channel(lab.server.address, grpc.ssl_channel_credentials(
            lab.operator.ca.read_bytes() if lab.operator.ca else None)) as chan:
        code, answers = call(chan, method, request)
    assert code is grpc.StatusCode.UNAVAILABLE and answers == []
    with _secure(lab, lab.operator) as chan:
        assert call(chan, "Describe", b"")[0] is grpc.StatusCode.OK


# --------------------------------------------------------------------------- the operator API

class OperatorLab:
    """A TLS operator API over real parts where they are cheap (libvirt's test driver, a repository,
    the job table, a scheduler without schedules), served from an event loop of its own."""

    def __init__(self, root: Path) -> None:
        self.pki: Pki = make_pki(root / "pki")
        Repository.init(root / "repo")
        repo = root / "repo"
        (root / "agent.toml").write_text(f'host_name = "hosta"\n[repositories]\ndefault = "{repo}"\n')
        config = load(root / "agent.toml", env={})
        domains, jobs, destinations = Domains("test:///default"), Jobs(), Destinations(config)
        scheduler = Scheduler([], "default", domains, cast(Intake, None), cast(Guests, None), jobs,
                              destinations, root)
        parts = AgentParts(domains, cast(Guests, None), destinations, cast(Intake, None), jobs, scheduler)
        self.domains = domains
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="operator-lab", daemon=True)
        self.thread.start()
        self.server: OperatorServer = asyncio.run_coroutine_threadsafe(start_operator_server(
            parts, "127.0.0.1:0", self.pki.tls(Role.AGENT, "hosta")), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()
        self.domains.close()  # test:///default keeps its domains while any connection to it is open


@pytest.fixture(scope="module")
def operator_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorLab]:
    made = OperatorLab(tmp_path_factory.mktemp("operator-fuzz"))
    yield made
    made.close()


@FUZZ
@given(data=st.data())
def test_the_operator_api_gives_a_monitor_and_another_agent_a_status_for_every_hostile_message(
        operator_lab: OperatorLab, data: st.DataObject) -> None:
    method, request = data.draw(hostile("0123456789abcdef", OPERATOR))
    caller = data.draw(st.sampled_from([Role.MONITOR, Role.AGENT]))
    tls = operator_lab.pki.tls(caller, "hostb")
    with grpc.secure_channel(operator_lab.server.address, channel_credentials(tls)) as chan:
        code, _ = call(chan, method, request, OPERATOR)
        assert expected(method, request, code, OPERATOR), (caller, method, request, code)
        assert call(chan, "ListJobs", b"", OPERATOR)[0] is grpc.StatusCode.OK


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_operator_api_gives_a_client_without_a_certificate_nothing(
        operator_lab: OperatorLab, data: st.DataObject) -> None:
    method, request = data.draw(hostile("0123456789abcdef", OPERATOR))
    no_certificate = grpc.ssl_channel_credentials((operator_lab.pki.ca / "ca.pem").read_bytes())
    with grpc.secure_channel(operator_lab.server.address, no_certificate) as chan:
        code, answers = call(chan, method, request, OPERATOR)
    assert code is grpc.StatusCode.UNAVAILABLE and answers == []
