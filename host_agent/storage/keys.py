"""The keys of an encrypted repository: made, wrapped, unwrapped (docs/repository-format.md, section 11).

An encrypted repository has two random 32-byte keys: the AEAD key seals every blob (AES-256-GCM, in
the native copier) and the id key makes chunk ids (HMAC-SHA256), so that ids reveal nothing about
content. They are kept either in ``keys/repokey`` wrapped by a key derived from a passphrase with
Argon2id, or in a key file outside the repository. Everything here is ``cryptography``'s; the
native side gets the two keys and nothing else.

What unlocks a repository comes from the caller (``Secret``) or, for the CLI and the agent, from
the environment (``secret_from_environment``): the variables are documented once, in
docs/repository-format.md section 11.4.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host_agent import errors

KEY_LEN = 32
NONCE_LEN = 12
SALT_LEN = 16
KEY_FILE = "keys/repokey"  # relative to the repository's root
PASSPHRASE = "passphrase"
KEYFILE = "keyfile"
MODES = (PASSPHRASE, KEYFILE)
# RFC 9106's second recommended setting: 64 MiB, 3 passes, 4 lanes (0.2 s here)
DEFAULT_KDF = {"name": "argon2id", "iterations": 3, "lanes": 4, "memory_kib": 65536}
ENV_PASSPHRASE = "HYPERBACK_PASSPHRASE"
ENV_PASSPHRASE_FILE = "HYPERBACK_PASSPHRASE_FILE"
ENV_KEYFILE = "HYPERBACK_KEYFILE"


@dataclass(frozen=True)
class RepoKeys:
    """The AEAD key and the id key; never printed."""

    aead_key: bytes = field(repr=False)
    id_key: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> RepoKeys:
        return cls(os.urandom(KEY_LEN), os.urandom(KEY_LEN))


@dataclass(frozen=True)
class Secret:
    """What unlocks an encrypted repository: its passphrase, or the path of its key file."""

    passphrase: bytes | None = field(default=None, repr=False)
    keyfile: Path | None = None


def read_passphrase_file(path: str | os.PathLike[str]) -> bytes:
    """A passphrase kept in a file: its bytes without the final newline."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise errors.UsageError(f"cannot read the passphrase file {path}: {e.strerror}") from e
    data = data.removesuffix(b"\n")
    if not data:
        raise errors.UsageError(f"the passphrase file {path} is empty")
    return data


def secret_from_environment(env: Mapping[str, str] = os.environ) -> Secret | None:
    """The secret the environment gives (HYPERBACK_PASSPHRASE, HYPERBACK_PASSPHRASE_FILE or
    HYPERBACK_KEYFILE), or None."""
    if env.get(ENV_PASSPHRASE):
        return Secret(passphrase=env[ENV_PASSPHRASE].encode())
    if env.get(ENV_PASSPHRASE_FILE):
        return Secret(passphrase=read_passphrase_file(env[ENV_PASSPHRASE_FILE]))
    if env.get(ENV_KEYFILE):
        return Secret(keyfile=Path(env[ENV_KEYFILE]))
    return None


def _checksum(doc: Mapping[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _seal_doc(doc: dict[str, Any]) -> bytes:
    doc["checksum"] = _checksum(doc)
    return json.dumps(doc, indent=1).encode() + b"\n"


def _wrap_aad(repo_id: str) -> bytes:
    # a key document only opens for the repository it was made for
    return b"hyperback-key " + repo_id.encode()


def _kek(passphrase: bytes, salt: bytes, kdf: Mapping[str, Any]) -> bytes:
    # imported here: the nbdkit plugin runs this package under the system's Python, whose
    # cryptography may predate Argon2id; only unlocking a passphrase needs it
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    except ImportError as e:
        raise errors.EnvironmentProblem(f"this Python's cryptography lacks Argon2id, which unlocks an "
                                        f"encrypted repository's passphrase: use cryptography 45 or later "
                                        f"({e})") from e
    return Argon2id(salt=salt, length=KEY_LEN, iterations=int(kdf["iterations"]), lanes=int(kdf["lanes"]),
                    memory_cost=int(kdf["memory_kib"])).derive(passphrase)


def wrap(keys: RepoKeys, repo_id: str, passphrase: bytes, kdf: Mapping[str, Any] = DEFAULT_KDF) -> bytes:
    """The key document (``keys/repokey``) holding ``keys`` wrapped by ``passphrase``."""
    # cryptography is imported where a key is wrapped or opened: every repository command imports
    # this module, and importing cryptography would be most of an unencrypted call's start-up
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt, nonce = os.urandom(SALT_LEN), os.urandom(NONCE_LEN)
    kek = _kek(passphrase, salt, kdf)
    wrapped = AESGCM(kek).encrypt(nonce, keys.aead_key + keys.id_key, _wrap_aad(repo_id))
    return _seal_doc({"format": "hyperback-key", "version": 1, "repo_id": repo_id,
                      "kdf": {**kdf, "salt": salt.hex()}, "cipher": "aes-256-gcm", "nonce": nonce.hex(),
                      "wrapped": wrapped.hex()})


def keyfile_document(keys: RepoKeys, repo_id: str) -> bytes:
    """A key file: the keys in clear, for a secret kept outside the repository."""
    return _seal_doc({"format": "hyperback-keyfile", "version": 1, "repo_id": repo_id,
                      "aead_key": keys.aead_key.hex(), "id_key": keys.id_key.hex()})


def _load(document: bytes, kind: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(document)
        if not isinstance(doc, dict) or doc.get("checksum") != _checksum(doc):
            raise ValueError("checksum mismatch")
    except ValueError as e:
        raise errors.DamagedKey(f"the key {where} is damaged ({e}): restore it from the copy "
                                "'hyperback key export' made") from e
    if doc.get("format") != kind or doc.get("version") != 1:
        raise errors.WrongKey(f"{where} is not a {kind} document of version 1")
    return doc


def _check_repo(doc: Mapping[str, Any], repo_id: str, where: str) -> None:
    if doc.get("repo_id") != repo_id:
        raise errors.WrongKey(f"{where} belongs to repository {doc.get('repo_id')}, not to {repo_id}")


def _split(raw: bytes, where: str) -> RepoKeys:
    if len(raw) != 2 * KEY_LEN:
        raise errors.DamagedKey(f"the key {where} holds {len(raw)} bytes of keys, not {2 * KEY_LEN}")
    return RepoKeys(raw[:KEY_LEN], raw[KEY_LEN:])


def unwrap(document: bytes, repo_id: str, passphrase: bytes, where: str) -> RepoKeys:
    """The keys in a key document; WrongKey if the passphrase does not open it."""
    from cryptography.exceptions import InvalidTag  # imported here as in wrap()
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    doc = _load(document, "hyperback-key", where)
    _check_repo(doc, repo_id, where)
    try:
        kdf = doc["kdf"]
        if kdf.get("name") != "argon2id" or doc.get("cipher") != "aes-256-gcm":
            raise errors.UnsupportedFormat(f"{where} uses {kdf.get('name')}/{doc.get('cipher')}, which this "
                                           "hyperback does not know; upgrade hyperback")
        kek = _kek(passphrase, bytes.fromhex(kdf["salt"]), kdf)
        nonce, wrapped = bytes.fromhex(doc["nonce"]), bytes.fromhex(doc["wrapped"])
        raw = AESGCM(kek).decrypt(nonce, wrapped, _wrap_aad(repo_id))
    except InvalidTag:
        raise errors.WrongKey(f"wrong passphrase for the repository whose key is {where}") from None
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise errors.DamagedKey(f"the key {where} lacks a valid field ({e})") from e
    return _split(raw, where)


def read_keyfile(document: bytes, repo_id: str, where: str) -> RepoKeys:
    """The keys in a key file made by ``keyfile_document``."""
    doc = _load(document, "hyperback-keyfile", where)
    _check_repo(doc, repo_id, where)
    try:
        return _split(bytes.fromhex(doc["aead_key"]) + bytes.fromhex(doc["id_key"]), where)
    except (KeyError, ValueError, TypeError) as e:
        raise errors.DamagedKey(f"the key file {where} lacks a valid field ({e})") from e


def unlock(root: Path, repo_id: str, mode: str, secret: Secret | None) -> RepoKeys:
    """The keys of the encrypted repository at ``root`` (config's ``encryption.mode`` is ``mode``)."""
    path = root / KEY_FILE
    return unlock_with(f"repository {root}", repo_id, mode, secret, lambda: (_read(path), str(path)))


def unlock_with(what: str, repo_id: str, mode: str, secret: Secret | None,
                key_document: Callable[[], tuple[bytes, str]]) -> RepoKeys:
    """The keys of ``what`` (e.g. "repository PATH"), with ``key_document()`` giving its wrapped
    key document and where it came from (a media client asks the service for it)."""
    if secret is None:
        hint = (f"{ENV_KEYFILE}=PATH" if mode == KEYFILE
                else f"{ENV_PASSPHRASE} or {ENV_PASSPHRASE_FILE}=PATH")
        raise errors.KeyMissing(f"{what} is encrypted ({mode}): set {hint}")
    if mode == KEYFILE:
        if secret.keyfile is None:
            raise errors.KeyMissing(f"{what} is encrypted with a key file: set {ENV_KEYFILE}=PATH")
        return read_keyfile(_read(secret.keyfile), repo_id, f"file {secret.keyfile}")
    if secret.passphrase is None:
        raise errors.KeyMissing(f"{what} is encrypted with a passphrase: set {ENV_PASSPHRASE} "
                                f"or {ENV_PASSPHRASE_FILE}=PATH")
    document, where = key_document()
    return unwrap(document, repo_id, secret.passphrase, where)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise errors.KeyMissing(f"the key {path} does not exist: restore it from the copy "
                                "'hyperback key export' made") from None
    except OSError as e:
        raise errors.RepositoryIOError(f"cannot read the key {path}: {e.strerror}") from e


ENCRYPTED_VERSION = 2  # the repository format version of an encrypted repository's config


def config_document(doc: dict[str, Any]) -> dict[str, Any]:
    """The ``config`` document of a repository whose fields are ``doc``: its ``encryption`` (a mode
    or None) becomes the section of an encrypted repository, or goes (an unencrypted one has none)."""
    mode = doc.pop("encryption")
    if mode is not None:
        doc.update({"hash": "hmac-sha256",
                    "encryption": {"mode": mode, "cipher": "aes-256-gcm", "id": "hmac-sha256"}})
    return doc


def mode_of(doc: Mapping[str, Any], where: str) -> str | None:
    """The encryption mode a ``config`` document records, or None for an unencrypted repository."""
    section = doc.get("encryption")
    if section is None and doc.get("version") != ENCRYPTED_VERSION:
        return None
    if not isinstance(section, dict) or section.get("mode") not in MODES or \
            section.get("cipher") != "aes-256-gcm" or section.get("id") != "hmac-sha256":
        raise errors.UnsupportedFormat(f"{where} names an encryption this hyperback does not know "
                                       f"({section!r}); upgrade hyperback")
    return str(section["mode"])


def create(root: Path, repo_id: str, mode: str, secret: Secret | None, keyfile: Path | None) -> None:
    """Make a new repository's keys and store them: wrapped in ``keys/repokey`` (passphrase), or in
    the new file ``keyfile`` outside the repository."""
    keys = RepoKeys.generate()
    try:
        if mode == KEYFILE:
            if keyfile is None:
                raise errors.UsageError("--encryption keyfile needs --keyfile PATH, where to write the key")
            with open(keyfile, "xb") as f:  # never overwrite the key of another repository
                f.write(keyfile_document(keys, repo_id))
            return
        if secret is None or secret.passphrase is None:
            raise errors.UsageError(f"--encryption passphrase needs a passphrase: --passphrase-file PATH or "
                                    f"{ENV_PASSPHRASE}")
        (root / KEY_FILE).parent.mkdir(exist_ok=True)
        with open(root / KEY_FILE, "xb") as f:
            f.write(wrap(keys, repo_id, secret.passphrase))
            os.fsync(f.fileno())
    except OSError as e:
        raise errors.RepositoryIOError(f"cannot write the new key: {e}") from e
