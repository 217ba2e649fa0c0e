"""The media service behind mutual TLS: real certificates made in the test, real gRPC on 127.0.0.1.

A client without a certificate, with one from another CA, or with an expired one is refused at once
with a TlsError (never retried); an agent reads and writes only its own host's domains; a monitor
only lists; an operator does everything; renewed certificates are used without a restart.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from system_helpers import MIB, sha256_file, write_random_image
from tls_helpers import QUICK, Pki, make_pki

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent._proto.hyperback.v1 import media_pb2_grpc as pb_grpc
from host_agent.media import server as media
from host_agent.media.access import OWNERS
from host_agent.media.client import RemoteRepository
from host_agent.media.codec import remote_error
from host_agent.model import Policy
from host_agent.storage.repository import Repository
from host_agent.tls import certs
from host_agent.tls.identity import Identity, Role
from host_agent.tls.transport import NO_TLS, TlsConfig

SIZE = 4 * MIB
VM_A = "0a0a0a0a-0000-4000-8000-00000000000a"
VM_B = "0b0b0b0b-0000-4000-8000-00000000000b"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def server(repo: Repository, pki: Pki) -> Iterator[media.MediaServer]:
    srv = media.start({"main": repo.path}, "127.0.0.1:0", "hostm", lease=5.0,
                      tls=pki.tls(Role.OPERATOR, "media-hostm"))
    yield srv
    srv.stop(grace=0)


def client(server: media.MediaServer, tls: TlsConfig, tmp_path: Path) -> RemoteRepository:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    return RemoteRepository(server.address, "main", timeout=10, spool_dir=spool, tls=tls)


def raw_describe(server: media.MediaServer, credentials: grpc.ChannelCredentials) -> errors.HyperbackError:
    """What a client that skips every local check gets: the server's own refusal, converted."""
    with grpc.secure_channel(server.address, credentials) as channel, pytest.raises(grpc.RpcError) as exc:
        pb_grpc.MediaStub(channel).Describe(pb.DescribeRequest(), timeout=10)
    return remote_error(exc.value, server.address, TlsConfig(Path("ca"), Path("cert.pem"), Path("key")))


def timed(fn: object) -> tuple[BaseException, float]:
    started = time.monotonic()
    try:
        fn()  # type: ignore[operator]
    except BaseException as e:  # noqa: BLE001 - returned to the test to check
        return e, time.monotonic() - started
    raise AssertionError("no error")


# ---------- who gets in ----------

def test_a_client_without_a_certificate_is_refused_quickly_with_a_tls_error(
        server: media.MediaServer, pki: Pki, tmp_path: Path) -> None:
    ca = (pki.ca / certs.CA_CERT).read_bytes()
    started = time.monotonic()
    error = raw_describe(server, grpc.ssl_channel_credentials(ca))
    assert time.monotonic() - started < QUICK
    assert isinstance(error, errors.TlsError) and "refused this end's certificate" in str(error)
    plain, _ = timed(lambda: client(server, NO_TLS, tmp_path))
    assert isinstance(plain, errors.TlsError) and "requires TLS" in str(plain)
    assert not isinstance(plain, errors.RemoteError)  # nothing up the stack retries it


def test_a_certificate_from_another_ca_is_refused_by_the_client_and_by_the_server(
        server: media.MediaServer, pki: Pki, tmp_path: Path) -> None:
    stranger = pki.tls(Role.OPERATOR, "mallory", ca=pki.stranger)
    error, seconds = timed(lambda: client(server, stranger, tmp_path))
    assert isinstance(error, errors.TlsError) and "not issued by the CA" in str(error) and seconds < QUICK
    assert stranger.cert is not None and stranger.key is not None
    started = time.monotonic()
    refused = raw_describe(server, grpc.ssl_channel_credentials(
        (pki.ca / certs.CA_CERT).read_bytes(), stranger.key.read_bytes(), stranger.cert.read_bytes()))
    assert isinstance(refused, errors.TlsError) and time.monotonic() - started < QUICK


def test_an_expired_certificate_is_refused_by_the_client_and_by_the_server(
        server: media.MediaServer, pki: Pki, tmp_path: Path) -> None:
    expired = pki.expired(Role.OPERATOR, "old")
    error, seconds = timed(lambda: client(server, expired, tmp_path))
    assert isinstance(error, errors.TlsError) and "expired on" in str(error) and seconds < QUICK
    assert expired.cert is not None and expired.key is not None
    started = time.monotonic()
    refused = raw_describe(server, grpc.ssl_channel_credentials(
        (pki.ca / certs.CA_CERT).read_bytes(), expired.key.read_bytes(), expired.cert.read_bytes()))
    assert isinstance(refused, errors.TlsError) and time.monotonic() - started < QUICK


def test_a_client_that_does_not_trust_the_servers_ca_fails_the_handshake(
        server: media.MediaServer, pki: Pki, tmp_path: Path) -> None:
    mine = pki.tls(Role.OPERATOR, "ops")
    assert mine.cert is not None
    shutil.copy(pki.stranger / certs.CA_CERT, tmp_path / "trusted.pem")
    # trusts only the stranger CA, and (to pass its own check) holds a certificate of that CA
    stranger = pki.tls(Role.OPERATOR, "ops2", ca=pki.stranger)
    wrong = TlsConfig(tmp_path / "trusted.pem", stranger.cert, stranger.key)
    error, seconds = timed(lambda: client(server, wrong, tmp_path))
    assert isinstance(error, errors.TlsError) and "handshake" in str(error) and seconds < QUICK


# ---------- roles ----------

def backed_up(remote: RemoteRepository, tmp_path: Path, name: str, seed: int) -> str:
    image = write_random_image(tmp_path / f"{seed}.img", SIZE, seed=seed)
    return remote.backup(image, name).snapshot.id


def test_an_agent_reads_and_writes_only_its_own_hosts_domains(
        server: media.MediaServer, repo: Repository, pki: Pki, tmp_path: Path) -> None:
    with client(server, pki.tls(Role.AGENT, "hosta"), tmp_path) as a, \
            client(server, pki.tls(Role.AGENT, "hostb"), tmp_path) as b:
        snap_a = backed_up(a, tmp_path, f"{VM_A}/vda", 1)
        snap_b = backed_up(b, tmp_path, f"{VM_B}/vda", 2)
        assert (repo.path / OWNERS / VM_B).read_text().strip() == "hostb"
        assert [s.id for s in a.snapshots()] == [snap_a]
        assert [s.id for s in b.snapshots()] == [snap_b]
        for attempt in (lambda: a.resolve(snap_b), lambda: a.resolve(f"{VM_B}/vda@latest"),
                        lambda: a.restore(snap_b, tmp_path / "stolen.img"),
                        lambda: a.base_for(f"{VM_B}/vda", Policy.INCREMENTAL),
                        lambda: backed_up(a, tmp_path, f"{VM_B}/vda", 3)):
            with pytest.raises(errors.AccessDenied, match=f"role agent \\(hosta\\).*domain {VM_B}.*hostb"):
                attempt()
        assert not (tmp_path / "stolen.img").exists()
        # a session of B's cannot be touched by A (Abort would throw B's upload away)
        with grpc.secure_channel(server.address, _credentials(pki.tls(Role.AGENT, "hostb"))) as channel:
            opened = pb_grpc.MediaStub(channel).OpenBackup(pb.OpenBackupRequest(
                destination="main", name=f"{VM_B}/vdb", policy=1))
        with pytest.raises(errors.AccessDenied, match="Abort"):
            a.unary(a.stub.Abort, pb.SessionRequest(session_id=opened.session_id))
        b.restore(snap_b, tmp_path / "mine.img")
        assert sha256_file(tmp_path / "mine.img") == sha256_file(tmp_path / "2.img")
    assert [s.id for s in repo.snapshots()] == sorted([snap_a, snap_b], key=[snap_a, snap_b].index)


def test_an_agent_may_not_take_over_a_domain_written_before_tls(
        server: media.MediaServer, repo: Repository, pki: Pki, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "old.img", SIZE, seed=5)
    old = repo.backup(image, f"{VM_A}/vda").snapshot  # local: no owner recorded
    with client(server, pki.tls(Role.AGENT, "hosta"), tmp_path) as a:
        assert a.snapshots() == []
        with pytest.raises(errors.AccessDenied, match="no host's"):
            a.resolve(old.id)
        with pytest.raises(errors.AccessDenied, match="OpenBackup"):
            backed_up(a, tmp_path, f"{VM_A}/vda", 6)
        (repo.path / OWNERS).mkdir(exist_ok=True)
        (repo.path / OWNERS / VM_A).write_text("hosta\n")  # what an operator does to hand it over
        assert a.resolve(old.id).id == old.id


def test_a_monitor_lists_but_cannot_back_up_or_restore(
        server: media.MediaServer, repo: Repository, pki: Pki, tmp_path: Path) -> None:
    image = write_random_image(tmp_path / "m.img", SIZE, seed=7)
    snap = repo.backup(image, f"{VM_A}/vda").snapshot
    with client(server, pki.tls(Role.MONITOR, "prometheus"), tmp_path) as monitor:
        assert [s.id for s in monitor.snapshots()] == [snap.id]
        with pytest.raises(errors.AccessDenied, match=r"role monitor \(prometheus\) may not call OpenBackup"):
            monitor.backup(image, f"{VM_A}/vda")
        with pytest.raises(errors.AccessDenied, match="may not call Restore"):
            monitor.restore(snap.id, tmp_path / "out.img")
        assert monitor.resolve(f"{VM_A}/vda@latest").id == snap.id  # a list of one
        with pytest.raises(errors.AccessDenied, match="may not call ReadChunks"):
            request = pb.ReadChunksRequest(destination="main", snapshot_id=snap.id, count=1)
            list(monitor.stream(monitor.stub.ReadChunks(request)))
    assert [s.id for s in repo.snapshots()] == [snap.id]


def test_an_operator_reads_every_hosts_domains(
        server: media.MediaServer, pki: Pki, tmp_path: Path) -> None:
    with client(server, pki.tls(Role.AGENT, "hostb"), tmp_path) as b:
        snap_b = backed_up(b, tmp_path, f"{VM_B}/vda", 8)
    with client(server, pki.tls(Role.OPERATOR, "alice"), tmp_path) as ops:
        assert [s.id for s in ops.snapshots()] == [snap_b]
        ops.restore(snap_b, tmp_path / "ops.img")
        assert sha256_file(tmp_path / "ops.img") == sha256_file(tmp_path / "8.img")
        assert backed_up(ops, tmp_path, f"{VM_B}/vda", 9)


# ---------- certificates reloaded, plain TCP refused ----------

def test_renewed_certificates_are_used_without_a_restart(repo: Repository, pki: Pki, tmp_path: Path) -> None:
    served = pki.tls(Role.OPERATOR, "media-hostm")
    live = TlsConfig(tmp_path / "live-ca.pem", tmp_path / "live.pem", tmp_path / "live.key")
    for src, dst in ((served.ca, live.ca), (served.cert, live.cert), (served.key, live.key)):
        shutil.copy(src, dst)  # type: ignore[arg-type]
    srv = media.start({"main": repo.path}, "127.0.0.1:0", "hostm", tls=live)
    try:
        old_client = pki.tls(Role.OPERATOR, "alice")
        client(srv, old_client, tmp_path).close()
        # the cluster moves to a new CA: new files, same paths, no restart
        new_ca = certs.init_ca(tmp_path / "new-ca", "renewed CA")
        renewed = certs.issue(tmp_path / "new-ca", served_identity(), tmp_path / "renewed", ips=["127.0.0.1"])
        for src, dst in ((new_ca.cert, live.ca), (renewed.cert, live.cert), (renewed.key, live.key)):
            shutil.copy(src, tmp_path / "staged")
            (tmp_path / "staged").replace(dst)  # type: ignore[arg-type]
        new_issue = certs.issue(tmp_path / "new-ca", certs_identity("alice"), tmp_path / "alice-new")
        new_client = TlsConfig(new_ca.cert, new_issue.cert, new_issue.key)
        with client(srv, new_client, tmp_path) as fresh:
            assert fresh.host_name == "hostm"
        with pytest.raises(errors.TlsError):
            client(srv, old_client, tmp_path)  # the old CA's certificates are no longer accepted
    finally:
        srv.stop(grace=0)


def test_plain_tcp_off_loopback_is_refused_unless_allow_plaintext_is_set(repo: Repository) -> None:
    with pytest.raises(errors.UsageError, match="plain TCP is refused off loopback.*allow_plaintext"):
        media.start({"main": repo.path}, "0.0.0.0:0", "hostm", tls=NO_TLS)
    with pytest.raises(errors.UsageError, match="plain TCP is refused"):
        RemoteRepository("192.0.2.1:7420", "main", tls=NO_TLS)
    for address in ("127.0.0.1:0", "0.0.0.0:0"):  # loopback always; elsewhere when set explicitly
        served = media.start({"main": repo.path}, address, "hostm", tls=TlsConfig(allow_plaintext=True))
        served.stop(grace=0)


def _credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    assert tls.ca and tls.cert and tls.key
    return grpc.ssl_channel_credentials(tls.ca.read_bytes(), tls.key.read_bytes(), tls.cert.read_bytes())


def served_identity() -> Identity:
    return Identity(Role.OPERATOR, "media-hostm")


def certs_identity(name: str) -> Identity:
    return Identity(Role.OPERATOR, name)
