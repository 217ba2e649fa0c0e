"""Encrypted repositories (docs/repository-format.md, section 11): nothing stored in clear, every
byte authenticated, the native data path equal to a plain reader built from the document alone."""
from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from system_helpers import HYPERBACK, MIB, assert_one_line_error, files_in, write_random_image

from host_agent import errors
from host_agent.agent.destinations import Destinations
from host_agent.config import load
from host_agent.storage import copier, keys
from host_agent.storage.copier import BLOB_DATA, BLOB_TREE, NativeRepository, Progress
from host_agent.storage.gc import collect_garbage
from host_agent.storage.packfile import INDEX_ENTRY, RECORD_HEADER, IndexEntry, read_index
from host_agent.storage.repair import repair
from host_agent.storage.repository import Repository

PASSPHRASE = b"correct horse battery staple"
CHUNK = 4096
NONCE, TAG = 12, 16
_zstd = ctypes.CDLL("libzstd.so.1")
_zstd.ZSTD_decompress.restype = ctypes.c_size_t
_zstd.ZSTD_decompress.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
_zstd.ZSTD_isError.argtypes = [ctypes.c_size_t]


def zstd_decompress(frame: bytes, raw_len: int) -> bytes:
    out = ctypes.create_string_buffer(raw_len)
    n = _zstd.ZSTD_decompress(out, raw_len, frame, len(frame))
    assert not _zstd.ZSTD_isError(n) and n == raw_len
    return out.raw


def open_record(pack: bytes, entry: IndexEntry, key: bytes) -> bytes:
    """A record's raw bytes, read as section 11 says: header as AAD, nonce | ciphertext | tag, then zstd."""
    header = pack[entry.offset:entry.offset + RECORD_HEADER.size]
    payload = pack[entry.offset + RECORD_HEADER.size:entry.offset + entry.record_len]
    clear = AESGCM(key).decrypt(payload[:NONCE], payload[NONCE:], header)
    return zstd_decompress(clear, entry.raw_len) if entry.compressed else clear


def encrypted_repo(path: Path) -> Repository:
    return Repository.init(path, encryption=keys.PASSPHRASE, secret=keys.Secret(passphrase=PASSPHRASE))


def unlocked(path: Path) -> Repository:
    return Repository.open(path, keys.Secret(passphrase=PASSPHRASE))


def pack_of(repo: Repository, name: str) -> Path:
    return repo.path / "packs" / name[:2] / name


def entries(repo: Repository, blob_type: int) -> list[tuple[str, IndexEntry]]:
    return [(name, e) for name in repo.pack_names() for e in read_index(repo.path / "index" / name)
            if e.type == blob_type]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


def cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HYPERBACK_")} | (env or {})
    return subprocess.run([str(HYPERBACK), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=full, check=False)


# ---------- the native path against a plain reference (house rule 3) ----------

blocks = st.one_of(st.just(bytes(CHUNK)), st.binary(min_size=CHUNK, max_size=CHUNK),
                   st.binary(min_size=1, max_size=64).map(lambda b: (b * (CHUNK // len(b) + 1))[:CHUNK]))


@settings(max_examples=25, deadline=None)
@given(st.lists(blocks, min_size=1, max_size=16), st.integers(0, CHUNK - 1), st.integers(1, 3))
def test_native_encrypted_records_and_ids_equal_a_plain_aesgcm_and_hmac_reader_on_random_input(
        tmp_path_factory: pytest.TempPathFactory, chunks: list[bytes], tail: int, threads: int) -> None:
    root = tmp_path_factory.mktemp("enc")
    for sub in ("packs", "index", "tmp"):
        (root / sub).mkdir()
    data = b"".join(chunks) + os.urandom(tail)
    (root / "src").write_bytes(data)
    secret = keys.RepoKeys.generate()
    fd = os.open(root / "src", os.O_RDONLY)
    try:
        with NativeRepository(str(root), os.urandom(16), CHUNK, 1 << 20, 1, secret) as native:
            ids, _ = native.backup_segment(fd, 0, len(data), bytes(-(-len(data) // CHUNK)), None, threads,
                                           Progress(), "src")
            page_id, _ = native.store_blob(ids[:64 * 32], BLOB_TREE)
            native.flush()
    finally:
        os.close(fd)
    pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    assert ids == b"".join(hmac.digest(secret.id_key, p, "sha256") if any(p) else bytes(32) for p in pieces)
    assert page_id == hmac.digest(secret.id_key, ids[:64 * 32], "sha256")
    want = {hmac.digest(secret.id_key, p, "sha256"): p for p in pieces if any(p)} | {page_id: ids[:64 * 32]}
    seen = {}
    for name in os.listdir(root / "index"):
        pack = (root / "packs" / name[:2] / name).read_bytes()
        for entry in read_index(root / "index" / name):
            seen[entry.id] = open_record(pack, entry, secret.aead_key)
            assert entry.compressed or entry.stored_len == NONCE + entry.raw_len + TAG
    assert seen == want


# ---------- nothing in clear ----------

def test_a_known_plaintext_backed_up_encrypted_is_in_no_file_of_the_repository_nor_its_sha256_ids(
        tmp_path: Path) -> None:
    pattern = random.Random(11).randbytes(MIB)
    image = tmp_path / "vm1.img"
    image.write_bytes(b"\0" * MIB + pattern + b"boot sector text " * 4096)
    windows = [pattern[at:at + 64] for at in (0, 4099, 300_001, MIB - 64)]
    ids = [hashlib.sha256(pattern[at:at + 32 * 1024]).digest() for at in range(0, MIB, 32 * 1024)]
    clear, sealed = Repository.init(tmp_path / "clear"), encrypted_repo(tmp_path / "sealed")
    for repo in (clear, sealed):
        repo.backup(image, "vm1/vda")
        with open(image, "r+b") as f:  # an incremental too: its tree pages and new chunks
            f.seek(MIB + 5000)
            f.write(b"changed" * 100)
        repo.backup(image, "vm1/vda")
        image.write_bytes(b"\0" * MIB + pattern + b"boot sector text " * 4096)

    def found(repo: Repository) -> set[str]:
        """Every file of the repository holding a window of the pattern or a SHA-256 id of it."""
        files = [p for p in repo.path.rglob("*") if p.is_file()]
        assert {p.relative_to(repo.path).parts[0] for p in files} >= {"packs", "index", "snapshots", "config"}
        return {str(p.relative_to(repo.path)) for p in files for w in windows + ids if w in p.read_bytes()}

    hits = found(clear)
    assert any(h.startswith("packs/") for h in hits) and any(h.startswith("index/") for h in hits), \
        "the scan must find the pattern and its ids in an unencrypted repository, or it proves nothing"
    assert found(sealed) == set()


# ---------- tampering ----------

@pytest.fixture
def sealed_backup(tmp_path: Path) -> tuple[Repository, Path, str]:
    repo = encrypted_repo(tmp_path / "repo")
    image = write_random_image(tmp_path / "vm1.img", 4 * MIB, seed=5, hole_every=3, block=256 * 1024)
    snap = repo.backup(image, "vm1/vda").snapshot
    return unlocked(repo.path), image, snap.id


def assert_tamper_found(repo: Repository, snap_id: str, bad: IndexEntry, out: Path) -> None:
    report = repo.verify()
    assert [b.id for b in report.bad] == [bad.id.hex()] and snap_id in report.bad[0].snapshots
    out.mkdir()
    with pytest.raises(errors.CorruptChunk) as exc:
        unlocked(repo.path).restore(snap_id, out / "vm1.img")
    assert exc.value.chunk_id == bad.id.hex()
    proc = cli("restore", "--repo", repo.path, snap_id, out / "vm1.img",
               env={keys.ENV_PASSPHRASE: PASSPHRASE.decode()})
    assert bad.id.hex() in assert_one_line_error(proc, 4)
    assert files_in(out) == set(), "a refused restore left partial output"


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_one_flipped_byte_in_an_encrypted_data_record_is_reported_by_verify_and_refused_by_restore(
        sealed_backup: tuple[Repository, Path, str], tmp_path: Path, where: str) -> None:
    repo, _, snap_id = sealed_backup
    name, entry = max(entries(repo, BLOB_DATA), key=lambda ne: ne[1].stored_len)
    start = entry.offset + RECORD_HEADER.size
    at = {"nonce": start + 3, "ciphertext": start + entry.stored_len // 2,
          "tag": start + entry.stored_len - 2}[where]
    flip_byte(pack_of(repo, name), at)
    assert_tamper_found(repo, snap_id, entry, tmp_path / "out")


def test_one_flipped_byte_in_an_encrypted_tree_page_is_reported_by_verify_and_refused_by_restore(
        sealed_backup: tuple[Repository, Path, str], tmp_path: Path) -> None:
    repo, _, snap_id = sealed_backup
    name, entry = entries(repo, BLOB_TREE)[0]
    flip_byte(pack_of(repo, name), entry.offset + RECORD_HEADER.size + entry.stored_len // 2)
    report = repo.verify()
    assert [b.id for b in report.bad] == [entry.id.hex()]
    (tmp_path / "out").mkdir()
    with pytest.raises(errors.CorruptChunk):
        unlocked(repo.path).restore(snap_id, tmp_path / "out" / "vm1.img")
    proc = cli("restore", "--repo", repo.path, snap_id, tmp_path / "out" / "vm1.img",
               env={keys.ENV_PASSPHRASE: PASSPHRASE.decode()})
    assert_one_line_error(proc, 4)
    assert files_in(tmp_path / "out") == set()


def test_a_record_header_changed_together_with_its_index_entry_still_fails_authentication(
        sealed_backup: tuple[Repository, Path, str], tmp_path: Path) -> None:
    """The header is the AAD: a data record relabelled a tree page, in the pack and in a rewritten
    (checksummed) index alike, so that every check but the tag agrees, is refused."""
    repo, _, snap_id = sealed_backup
    name, entry = entries(repo, BLOB_DATA)[0]
    flip_byte(pack_of(repo, name), entry.offset + 32)  # type 0 -> 0x40
    listed = read_index(repo.path / "index" / name)
    copier.publish_index(repo.path, name, b"".join(
        INDEX_ENTRY.pack(e.id, e.type ^ 0x40 if e.id == entry.id else e.type, int(e.compressed), 0, e.offset,
                         e.stored_len, e.raw_len) for e in listed))
    assert_tamper_found(repo, snap_id, entry, tmp_path / "out")


def test_one_flipped_byte_in_the_key_file_is_a_clear_damaged_key_error_not_a_wrong_passphrase(
        sealed_backup: tuple[Repository, Path, str], tmp_path: Path) -> None:
    repo, _, snap_id = sealed_backup
    key = repo.path / keys.KEY_FILE
    flip_byte(key, key.read_bytes().index(b'"wrapped"') + 20)
    with pytest.raises(errors.DamagedKey):
        unlocked(repo.path).verify()
    env = {keys.ENV_PASSPHRASE: PASSPHRASE.decode()}
    assert "damaged" in assert_one_line_error(cli("verify", "--repo", repo.path, env=env), 4)
    proc = cli("restore", "--repo", repo.path, snap_id, tmp_path / "out.img", env=env)
    assert "damaged" in assert_one_line_error(proc, 4)
    assert not (tmp_path / "out.img").exists()


# ---------- passphrases, key files, the CLI ----------

def test_wrong_or_missing_passphrase_is_one_clear_line_and_the_right_one_round_trips_bit_identically(
        tmp_path: Path) -> None:
    repo, image = tmp_path / "repo", write_random_image(tmp_path / "vm1.img", 3 * MIB, seed=9, hole_every=2)
    (tmp_path / "pass").write_bytes(PASSPHRASE + b"\n")
    proc = cli("init", repo, "--encryption", "passphrase", "--passphrase-file", tmp_path / "pass")
    assert proc.returncode == 0 and "encrypted (passphrase)" in proc.stdout, proc.stderr
    good = {keys.ENV_PASSPHRASE_FILE: str(tmp_path / "pass")}

    assert "encrypted" in assert_one_line_error(cli("backup", "--repo", repo, "--name", "vm1/vda", image), 2)
    wrong = cli("backup", "--repo", repo, "--name", "vm1/vda", image, env={keys.ENV_PASSPHRASE: "guess"})
    assert "wrong passphrase" in assert_one_line_error(wrong, 2)
    assert not list((repo / "snapshots").iterdir())

    assert cli("backup", "--repo", repo, "--name", "vm1/vda", image, env=good).returncode == 0
    first = image.read_bytes()
    with open(image, "r+b") as f:
        f.seek(MIB + 12345)
        f.write(os.urandom(70_000))
    proc = cli("backup", "--repo", repo, "--name", "vm1/vda", image, "--policy", "incremental", env=good)
    assert proc.returncode == 0, proc.stderr
    snaps = [s.id for s in Repository.open(repo).snapshots("vm1/vda")]
    for sid, want in zip(snaps, (first, image.read_bytes()), strict=True):
        out = tmp_path / f"{sid}.img"
        assert cli("restore", "--repo", repo, sid, out, env=good).returncode == 0
        assert out.read_bytes() == want
    assert cli("verify", "--repo", repo, env=good).returncode == 0


def test_a_keyfile_repository_opens_with_its_own_key_file_only(tmp_path: Path) -> None:
    key, other = tmp_path / "repo.key", tmp_path / "other.key"
    image = write_random_image(tmp_path / "vm1.img", MIB, seed=3)
    assert cli("init", tmp_path / "repo", "--encryption", "keyfile", "--keyfile", key).returncode == 0
    assert cli("init", tmp_path / "other", "--encryption", "keyfile", "--keyfile", other).returncode == 0
    assert not (tmp_path / "repo" / "keys").exists(), "a key-file repository keeps no key inside"
    assert cli("backup", "--repo", tmp_path / "repo", "--name", "vm1/vda", image,
               env={keys.ENV_KEYFILE: str(key)}).returncode == 0
    proc = cli("restore", "--repo", tmp_path / "repo", "vm1/vda@latest", tmp_path / "out",
               env={keys.ENV_KEYFILE: str(other)})
    assert "belongs to repository" in assert_one_line_error(proc, 2)
    assert cli("restore", "--repo", tmp_path / "repo", "vm1/vda@latest", tmp_path / "out",
               env={keys.ENV_KEYFILE: str(key)}).returncode == 0
    assert (tmp_path / "out").read_bytes() == image.read_bytes()
    kept = key.read_bytes()
    assert_one_line_error(cli("init", tmp_path / "third", "--encryption", "keyfile", "--keyfile", key), 3)
    assert key.read_bytes() == kept, "a new repository overwrote another's key file"
    assert json.loads(kept)["format"] == "hyperback-keyfile"


def test_garbage_collection_rewrites_an_encrypted_pack_sealed_and_the_kept_snapshot_restores(
        tmp_path: Path) -> None:
    repo = encrypted_repo(tmp_path / "repo")
    pattern = random.Random(4).randbytes(2 * MIB)
    image = tmp_path / "vm1.img"
    image.write_bytes(pattern)
    first = repo.backup(image, "vm1/vda").snapshot
    with open(image, "r+b") as f:
        f.write(os.urandom(MIB))  # the first half changes: half of the first pack becomes garbage
    repo.backup(image, "vm1/vda")
    repo.forget([first.id])
    result = collect_garbage(unlocked(repo.path), repack_threshold=0.1)
    assert result.packs_repacked >= 1 and result.blobs_copied > 0
    assert unlocked(repo.path).verify().ok
    unlocked(repo.path).restore("vm1/vda@latest", tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()
    windows = [pattern[at:at + 64] for at in (MIB + 7, MIB + 500_000, 2 * MIB - 64)]
    assert not [p for p in repo.path.rglob("*") if p.is_file() and any(w in p.read_bytes() for w in windows)]


def test_a_deleted_index_of_an_encrypted_repository_is_rebuilt_from_its_sealed_pack(
        sealed_backup: tuple[Repository, Path, str], tmp_path: Path) -> None:
    repo, image, snap_id = sealed_backup
    name = max(repo.pack_names(), key=lambda n: pack_of(repo, n).stat().st_size)
    before = (repo.path / "index" / name).read_bytes()
    (repo.path / "index" / name).unlink()
    report = repair(unlocked(repo.path), apply=True)
    assert [(f.pack, f.action) for f in report.fixes] == [(name, "rebuild")] and report.lost == ()
    assert (repo.path / "index" / name).read_bytes() == before
    unlocked(repo.path).restore(snap_id, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()


def test_an_unencrypted_repository_keeps_format_1_and_a_copy_to_or_from_an_encrypted_one_is_refused(
        tmp_path: Path) -> None:
    clear = Repository.init(tmp_path / "clear")
    doc = json.loads((clear.path / "config").read_text())
    assert doc["version"] == 1 and doc["hash"] == "sha256" and "encryption" not in doc
    encrypted_repo(tmp_path / "sealed")
    proc = cli("copy", "--from", tmp_path / "clear", "--to", tmp_path / "sealed", "--latest",
               env={keys.ENV_PASSPHRASE: PASSPHRASE.decode()})
    assert "encrypted" in assert_one_line_error(proc, 2)


def test_an_agent_destination_is_unlocked_by_the_passphrase_file_its_configuration_names(
        tmp_path: Path) -> None:
    encrypted_repo(tmp_path / "usb")
    (tmp_path / "usb.pass").write_bytes(PASSPHRASE + b"\n")
    config = tmp_path / "agent.toml"
    config.write_text(f'default_destination = "usb"\n[repositories]\nusb = "{tmp_path / "usb"}"\n'
                      f'[passphrase_files]\nusb = "{tmp_path / "usb.pass"}"\n')
    repo = Destinations(load(config, env={})).repository("usb")
    assert isinstance(repo, Repository)
    image = write_random_image(tmp_path / "vm1.img", MIB, seed=8)
    repo.backup(image, "vm1/vda")
    unlocked(repo.path).restore("vm1/vda@latest", tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()

    config.write_text(config.read_text() + 'elsewhere = "/nowhere"\n')
    with pytest.raises(errors.UsageError, match="passphrase_files names elsewhere, not in repositories"):
        load(config, env={})
