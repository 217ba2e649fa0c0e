"""Real certificates for tests: a cluster CA, a stranger's CA, and one certificate per identity."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

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
