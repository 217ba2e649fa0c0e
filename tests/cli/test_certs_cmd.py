from __future__ import annotations

import json
import stat
from pathlib import Path

from cli_helpers import assert_one_line_error, run
from cryptography import x509

from host_agent.tls.certs import check_signed
from host_agent.tls.identity import Identity, Role, from_certificate


def test_init_ca_then_issue_an_agent_certificate_that_names_its_host(tmp_path: Path) -> None:
    run("certs", "init-ca", tmp_path / "ca")
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    out = json.loads(run("certs", "issue", "--ca", tmp_path / "ca", "--role", "agent", "--name", "hosta",
                         "--ip", "10.77.0.1", "--dns", "hosta.lan", "--out", tmp_path / "o", "--json").stdout)
    assert out["identity"] == "hyperback://role/agent/host/hosta"
    cert = x509.load_pem_x509_certificate(Path(out["cert"]).read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.pem").read_bytes())
    assert from_certificate(cert) == Identity(Role.AGENT, "hosta")
    assert check_signed(cert, ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hosta.lan"]
    assert stat.S_IMODE(Path(out["key"]).stat().st_mode) == 0o600


def test_certs_mistakes_are_one_line(tmp_path: Path) -> None:
    run("certs", "init-ca", tmp_path / "ca")
    assert_one_line_error(run("certs", "init-ca", tmp_path / "ca", check=False), 2, "holds a CA already")
    issue = ("certs", "issue", "--ca")
    assert_one_line_error(run(*issue, tmp_path / "none", "--role", "monitor", "--name", "m", check=False), 2,
                          "cannot read the CA")
    assert_one_line_error(run(*issue, tmp_path / "ca", "--role", "operator", "--name", "a/b", check=False), 2,
                          "--name")
    assert_one_line_error(run(*issue, tmp_path / "ca", "--role", "root", "--name", "x", check=False), 2,
                          "--role")
