"""Real certificates for tests: a cluster CA, a stranger's CA, and one certificate per identity."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from host_agent.media import server as media
from host_agent.media.client import RemoteRepository
from host_agent.storage.repository import Repository
from host_agent.tls import certs
from host_agent.tls.identity import Identity, Role
from host_agent.tls.transport import TlsConfig

# Seconds within which a TLS refusal must come: one handshake takes milliseconds, gRPC's retry loop
# (what a refusal looked like before) about 3 s; the margin is for a loaded machine.
QUICK = 2.0


@dataclass(frozen=True)
class Pki:
    root: Path
    ca: Path          # the cluster CA's directory
    stranger: Path    # another CA's directory

    def tls(self, role: Role, name: str, *, ca: Path | None = None, ips: tuple[str, ...] = ("127.0.0.1",),
            days: int = 30, not_before: dt.datetime | None = None) -> TlsConfig:
        """A certificate for ``role``/``name`` issued by ``ca`` (default: the cluster's), as a TlsConfig
        that trusts the cluster's CA."""
        issuer = ca or self.ca
        out = self.root / f"{issuer.name}-{role.value}-{name}-{days}"
        issued = certs.issue(issuer, Identity(role, name), out, ips=ips, days=days, not_before=not_before)
        return TlsConfig(self.ca / certs.CA_CERT, issued.cert, issued.key)

    def expired(self, role: Role, name: str) -> TlsConfig:
        long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
        return self.tls(role, name, days=1, not_before=long_ago)


def make_pki(root: Path) -> Pki:
    certs.init_ca(root / "ca", "test cluster CA")
    certs.init_ca(root / "stranger", "stranger CA")
    return Pki(root, root / "ca", root / "stranger")


@contextmanager
def tls_media_service(repo: Repository, pki: Pki) -> Iterator[media.MediaServer]:
    """A media service on 127.0.0.1 serving ``repo`` as destination "main", behind the cluster's TLS."""
    srv = media.start({"main": repo.path}, "127.0.0.1:0", "hostm", lease=5.0,
                      tls=pki.tls(Role.OPERATOR, "media-hostm"))
    try:
        yield srv
    finally:
        srv.stop(grace=0)


def media_client(server: media.MediaServer, tls: TlsConfig, tmp_path: Path) -> RemoteRepository:
    """A client of ``server``'s destination "main" with ``tls``'s certificate, spooling in ``tmp_path``."""
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    return RemoteRepository(server.address, "main", timeout=30, spool_dir=spool, tls=tls)


def hyperback_as(pki: Pki, role: Role, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `hyperback` run with the certificate of ``role``/``name``: a config file whose [tls]
    names it (what the CLI uses for media:// repositories), as HYPERBACK_CONFIG for this test."""
    tls = pki.tls(role, name)
    path = pki.root / f"{role.value}-{name}.toml"
    path.write_text(f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n')
    monkeypatch.setenv("HYPERBACK_CONFIG", str(path))
