"""An encrypted repository served by the media service, encrypted at the source (docs/media-protocol.md,
section 5): the service runs as its own process with no passphrase or key file anywhere, behind mutual
TLS on 127.0.0.1; the client holds the passphrase, seals what it uploads and opens what it reads.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from system_helpers import MIB, sha256_file
from tls_helpers import Pki, make_pki

from host_agent import errors
from host_agent._proto.hyperback.v1 import media_pb2 as pb
from host_agent._proto.hyperback.v1 import media_pb2_grpc as pb_grpc
from host_agent._proto.hyperback.v1 import optimizer_pb2 as opb
from host_agent.media.client import RemoteRepository
from host_agent.media.codec import remote_error
from host_agent.media.uploads import PackScanner
from host_agent.model import Policy
from host_agent.storage import keys
from host_agent.storage.copier import BLOB_DATA
from host_agent.storage.packfile import PACK_HEADER, PACK_MAGIC, RECORD_HEADER, read_index
from host_agent.storage.packfile import VERSION as PACK_VERSION
from host_agent.storage.repository import Repository
from host_agent.tls.identity import Role
from host_agent.tls.transport import TlsConfig, channel

MEDIA = Path(sys.executable).with_name("hyperback-media")
PASSPHRASE = b"correct horse battery staple"
VM = "0c0c0c0c-0000-4000-8000-00000000000c"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def sealed_repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "media", 4096, encryption=keys.PASSPHRASE,
                           secret=keys.Secret(passphrase=PASSPHRASE))


@pytest.fixture
def served(sealed_repo: Repository, pki: Pki) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """hyperback-media serving the encrypted repository, started without any HYPERBACK_* variable."""
    tls = pki.tls(Role.OPERATOR, "media-hostm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERBACK_")}
    with subprocess.Popen([str(MEDIA), "--listen", "127.0.0.1:0", "--repo", f"main={sealed_repo.path}",
                           "--host-name", "hostm", "--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert),
                           "--tls-key", str(tls.key)], stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert "serving main on 127.0.0.1:" in line, line + proc.stderr.read()
            yield line.split(" on ")[-1].split()[0], proc
        finally:
            proc.kill()
            proc.wait()


def client(address: str, pki: Pki, tmp_path: Path, passphrase: bytes | None = PASSPHRASE,
           tls: TlsConfig | None = None) -> RemoteRepository:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    secret = keys.Secret(passphrase=passphrase) if passphrase is not None else None
    return RemoteRepository(address, "main", timeout=30, spool_dir=spool,
                            tls=tls or pki.tls(Role.OPERATOR, "admin"), secret=secret)


def image_with(path: Path, pattern: bytes) -> Path:
    path.write_bytes(random.Random(3).randbytes(MIB) + pattern + bytes(MIB))
    return path


def all_bytes(root: Path) -> Iterator[tuple[Path, bytes]]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path, path.read_bytes()


def test_an_encrypted_backup_and_incremental_restore_bit_identical_through_a_service_without_the_key(
        served: tuple[str, subprocess.Popen[str]], sealed_repo: Repository, pki: Pki, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    address, proc = served
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith(b"HYPERBACK_")], "the service must run without a key"
    for var in (keys.ENV_PASSPHRASE, keys.ENV_PASSPHRASE_FILE, keys.ENV_KEYFILE):
        monkeypatch.delenv(var, raising=False)  # the client's secret is the one it is given
    pattern = random.Random(7).randbytes(MIB)
    image = image_with(tmp_path / "vm.img", pattern)
    with client(address, pki, tmp_path) as remote:
        assert remote.config.encryption == keys.PASSPHRASE
        full = remote.backup(image, f"{VM}/vda").snapshot
        with open(image, "r+b") as f:
            f.seek(MIB + 4096 * 3)
            f.write(b"changed by the guest " * 200)
        incr = remote.backup(image, f"{VM}/vda", Policy.INCREMENTAL).snapshot
        assert incr.parent == full.id and 0 < incr.stats.bytes_new < MIB
        remote.restore(incr.id, tmp_path / "incr.img")
        remote.restore(full.id, tmp_path / "full.img")
    assert sha256_file(tmp_path / "incr.img") == sha256_file(image)
    assert (tmp_path / "full.img").read_bytes() == image_with(tmp_path / "again.img", pattern).read_bytes()
    windows = [pattern[at:at + 48] for at in (0, 5000, 300_001, MIB - 48)]
    for path, data in all_bytes(sealed_repo.path):
        assert not any(w in data for w in windows), f"plaintext in {path}"
    # and the key holder reads it locally, every record's tag and id checked
    local = Repository.open(sealed_repo.path, keys.Secret(passphrase=PASSPHRASE))
    report = local.verify()
    assert report.bad_total == 0 and not report.unreadable_snapshots and report.bytes_checked > MIB


def test_a_flipped_byte_in_a_pack_on_the_media_host_is_refused_by_the_clients_restore(
        served: tuple[str, subprocess.Popen[str]], sealed_repo: Repository, pki: Pki, tmp_path: Path) -> None:
    address, _ = served
    image = image_with(tmp_path / "vm.img", random.Random(8).randbytes(MIB))
    with client(address, pki, tmp_path) as remote:
        snap = remote.backup(image, f"{VM}/vda").snapshot
        name, entry = next((n, e) for n in sealed_repo.pack_names()
                           for e in read_index(sealed_repo.path / "index" / n) if e.type == BLOB_DATA)
        pack = sealed_repo.path / "packs" / name[:2] / name
        data = bytearray(pack.read_bytes())
        data[entry.offset + entry.record_len - 20] ^= 0x01  # in the ciphertext, before the tag
        pack.write_bytes(bytes(data))
        with pytest.raises(errors.CorruptChunk, match=entry.id.hex()):
            remote.restore(snap.id, tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()


def test_a_client_without_the_passphrase_gets_one_clear_line_and_opens_no_session(
        served: tuple[str, subprocess.Popen[str]], sealed_repo: Repository, pki: Pki, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    address, _ = served
    for var in (keys.ENV_PASSPHRASE, keys.ENV_PASSPHRASE_FILE, keys.ENV_KEYFILE):
        monkeypatch.delenv(var, raising=False)
    image = image_with(tmp_path / "vm.img", b"x" * 4096)
    with client(address, pki, tmp_path, passphrase=None) as remote, \
            pytest.raises(errors.KeyMissing) as missing:
        remote.backup(image, f"{VM}/vda")
    assert "\n" not in str(missing.value) and keys.ENV_PASSPHRASE in str(missing.value)
    with client(address, pki, tmp_path, passphrase=b"wrong") as remote, \
            pytest.raises(errors.WrongKey) as wrong:
        remote.backup(image, f"{VM}/vda")
    assert "\n" not in str(wrong.value)
    assert list((sealed_repo.path / "locks").iterdir()) == [] and sealed_repo.pack_names() == []


def raw_call(address: str, tls: TlsConfig, call: str, request: object,
             stream: bool = False) -> errors.HyperbackError:
    """What a client that skips every local check gets from the service."""
    with channel(address, tls, ()) as ch, pytest.raises(grpc.RpcError) as exc:
        answer = getattr(pb_grpc.MediaStub(ch), call)(request, timeout=30)
        if stream:
            list(answer)
    return remote_error(exc.value, address, tls)


def test_a_client_that_does_not_seal_cannot_write_and_the_service_does_not_open_records(
        served: tuple[str, subprocess.Popen[str]], pki: Pki, tmp_path: Path) -> None:
    address, _ = served
    tls = pki.tls(Role.OPERATOR, "admin")
    refused = raw_call(address, tls, "OpenBackup", pb.OpenBackupRequest(
        destination="main", name=f"{VM}/vda", policy=opb.POLICY_FULL))
    assert isinstance(refused, errors.RepositoryError) and "upgrade the client" in str(refused)
    image = image_with(tmp_path / "vm.img", random.Random(9).randbytes(MIB))
    with client(address, pki, tmp_path) as remote:
        snap = remote.backup(image, f"{VM}/vda").snapshot
    restore = raw_call(address, tls, "Restore", pb.RestoreRequest(destination="main", spec=snap.id),
                       stream=True)
    assert isinstance(restore, errors.RepositoryError) and "holds no key" in str(restore)


def test_the_upload_check_refuses_an_unsealed_record_for_an_encrypted_destination_by_its_length() -> None:
    """A record of a client that does not seal (an uncompressed payload exactly its raw length) has no
    room for a nonce and a tag: the check of a sealed pack refuses it before anything is published."""
    writer = bytes(16)
    name = "ab" * 16
    head = PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, bytes.fromhex(name), writer)
    plain = RECORD_HEADER.pack(b"\x01" * 32, BLOB_DATA, 0, 0, 4096, 4096) + bytes(4096)
    sealed = RECORD_HEADER.pack(b"\x02" * 32, BLOB_DATA, 0, 0, 4096, 4096 + 28) + bytes(4096 + 28)
    PackScanner(name, writer, 4096, sealed=False).feed(head + plain)
    PackScanner(name, writer, 4096, sealed=True).feed(head + sealed)
    with pytest.raises(errors.CorruptChunk, match="bad lengths"):
        PackScanner(name, writer, 4096, sealed=True).feed(head + plain)


def test_a_monitor_may_not_fetch_the_key_document_or_sealed_records(
        served: tuple[str, subprocess.Popen[str]], pki: Pki) -> None:
    address, _ = served
    tls = pki.tls(Role.MONITOR, "grafana")
    key = raw_call(address, tls, "KeyDocument", pb.KeyDocumentRequest(destination="main"))
    assert isinstance(key, errors.AccessDenied)


def test_an_agent_restores_its_own_domain_and_may_not_fetch_the_records_of_another_hosts_snapshot(
        served: tuple[str, subprocess.Popen[str]], pki: Pki, tmp_path: Path) -> None:
    address, _ = served
    other = "0d0d0d0d-0000-4000-8000-00000000000d"
    tls_a, tls_b = pki.tls(Role.AGENT, "hosta"), pki.tls(Role.AGENT, "hostb")
    image = image_with(tmp_path / "vm.img", random.Random(10).randbytes(MIB))
    with client(address, pki, tmp_path, tls=tls_a) as a, client(address, pki, tmp_path, tls=tls_b) as b:
        mine = a.backup(image, f"{VM}/vda").snapshot
        theirs = b.backup(image, f"{other}/vda").snapshot
        a.restore(mine.id, tmp_path / "mine.img")
        assert (tmp_path / "mine.img").read_bytes() == image.read_bytes()
    assert theirs.tree.root is not None
    stolen = raw_call(address, tls_a, "ReadRecords", pb.ReadRecordsRequest(
        destination="main", snapshot_id=theirs.id, ids=theirs.tree.root), stream=True)
    assert isinstance(stolen, errors.AccessDenied) and "hostb" in str(stolen)
