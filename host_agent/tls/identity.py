"""Who a certificate speaks for: a role and a name, in one SAN URI (docs/tls.md, "Identity")::

    hyperback://role/agent/host/NAME        a host agent; NAME is its inventory host name
    hyperback://role/operator/name/NAME     a person or tool allowed everything
    hyperback://role/monitor/name/NAME      status, lists and metrics only

A certificate carries exactly one such URI; one with none, or two, names nobody and is refused.
"""
from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from typing import Final

from cryptography import x509

from host_agent import errors

SCHEME: Final = "hyperback"
_URI = re.compile(r"hyperback://role/(agent|operator|monitor)/(host|name)/([A-Za-z0-9][A-Za-z0-9._-]{0,63})")


class Role(enum.Enum):
    AGENT = "agent"
    OPERATOR = "operator"
    MONITOR = "monitor"


@dataclass(frozen=True)
class Identity:
    role: Role
    name: str  # the host name for an agent

    def uri(self) -> str:
        kind = "host" if self.role is Role.AGENT else "name"
        return f"{SCHEME}://role/{self.role.value}/{kind}/{self.name}"

    def __str__(self) -> str:
        return f"{self.role.value} {self.name}"


def parse_uri(uri: str) -> Identity | None:
    """The identity a URI names; None if it is not a hyperback identity URI."""
    m = _URI.fullmatch(uri)
    if m is None:
        return None
    role = Role(m.group(1))
    if (m.group(2) == "host") != (role is Role.AGENT):
        return None  # an agent is named by its host, the others by a name: never mixed
    return Identity(role, m.group(3))


def from_certificate(cert: x509.Certificate) -> Identity:
    """The one identity in ``cert``'s SAN URIs; UsageError if it has none, or several."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    found = {i for i in (parse_uri(u) for u in uris) if i}
    if len(found) != 1:
        raise errors.UsageError(f"certificate {cert.subject.rfc4514_string()!r} carries {len(found)} "
                                f"hyperback identities (hyperback://role/...); it needs exactly one: issue "
                                f"it with 'hyperback certs issue'")
    return found.pop()


@functools.lru_cache(maxsize=256)
def from_pem(pem: bytes) -> Identity:
    """The identity of a PEM certificate (a peer's, as gRPC hands it over); cached, as every call
    of a connection hands over the same bytes."""
    return from_certificate(x509.load_pem_x509_certificate(pem))


__all__ = ["SCHEME", "Identity", "Role", "from_certificate", "from_pem", "parse_uri"]
