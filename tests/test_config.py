"""The agent's configuration file: every key of every table known, every value of its knob's type,
and a mistake told in one line that names the file and the key (``hyperback-agent --check-config``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from host_agent.agent import daemon
from host_agent.config import Limits, TlsConfig, load
from host_agent.errors import UsageError

BIN = Path(sys.executable).parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_a_valid_file_sets_its_knobs_with_their_types(tmp_path: Path) -> None:
    config = load(write(tmp_path, """
interval = 5                    # an integer is a fine number of seconds
policies = ["merge", "timing"]
[repositories]
default = "/srv/backup/repo"
[limits]
pending_per_vm = 3
[policy_options.timing]
window = "22:00-06:00"
cpu_pressure = 40
"""), env={})
    assert config.interval == 5.0 and isinstance(config.interval, float)
    assert config.policies == ("merge", "timing")
    assert config.repositories == {"default": Path("/srv/backup/repo")}
    assert config.limits == Limits(pending_per_vm=3)
    assert config.policy_options == {"timing": {"window": "22:00-06:00", "cpu_pressure": "40"}}


@pytest.mark.parametrize(("text", "names"), [
    ("intervall = 5", "unknown setting 'intervall'"),
    ("interval = \"ten\"", "interval: expected a number, got 'ten'"),
    ("batch_size = 2.5", "batch_size: expected an integer, got 2.5"),
    ("send_load = \"no\"", "send_load: expected true or false, got 'no'"),
    ("policies = \"merge\"", "policies: expected a list of strings, got 'merge'"),
    ("state_dir = 5", "state_dir: expected a path (string), got 5"),
    ("[limits]\nrequests_per_minut = 3", "limits: unknown setting 'requests_per_minut'"),
    ("[limits]\npending_per_vm = \"20\"", "limits.pending_per_vm: expected an integer, got '20'"),
    ("limits = 3", "limits: expected a table"),
    ("[repositories]\ndefault = 7", "repositories.default: expected a path (string), got 7"),
    ("[repositories]\nBad = \"/x\"", "repositories.Bad: names must match"),
    ("[policy_options]\ntiming = 3", "policy_options.timing: expected a table"),
    ("[policy_options.timing]\nwindow = [1]", "policy_options.timing.window: expected a string or a number"),
    ("host_name = \"a\"\n[hosts.a]\nlibvirt_uri = \"qemu:///system\"\nagent = \"x:1\"\nlan_ip = 10",
     "hosts.a.lan_ip: expected a string, got 10"),
    ("host_name = \"a\"\n[hosts.a]\nlibvirt_uri = \"q\"\nagent = \"x:1\"\nlan_ip = \"1\"\nlanip = \"2\"",
     "hosts.a: unknown setting(s) lanip"),
    ("[[schedules]]\nname = \"nightly\"\ncalendar = \"at night\"\nmatch = \"*\"",
     "schedule 'nightly': calendar 'at night' is not a cron expression"),
], ids=["unknown-key", "number-as-text", "integer-as-float", "bool-as-text", "list-as-text", "path-as-number",
        "unknown-limit", "limit-as-text", "limits-not-a-table", "repository-as-number", "repository-name",
        "policy-options-not-tables", "policy-option-list", "inventory-number", "inventory-unknown-key",
        "schedule-calendar"])
def test_a_mistake_is_one_line_naming_the_file_and_the_key(tmp_path: Path, text: str, names: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as caught:
        load(path, env={})
    message = str(caught.value)
    assert message.startswith(f"config {path}: ") and names in message and "\n" not in message


def test_check_config_prints_one_line_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, f'[repositories]\ndefault = "{tmp_path}/repo"\n')
    assert daemon.main(["--check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"config {path} is valid: " in out and "destinations default" in out


def test_check_config_names_the_bad_key_and_exits_2(tmp_path: Path) -> None:
    """As an operator runs it: the installed command, one line on stderr, nothing started."""
    path = write(tmp_path, "[limits]\nrequests_per_minute = 30\nburst = 5\n")
    done = subprocess.run([str(BIN / "hyperback-agent"), "--check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"hyperback-agent: error: config {path}: limits: unknown setting 'burst' "
                           f"(settings: requests_per_minute, pending_per_vm, max_disks_per_request, "
                           f"snapshot_disks_per_vm)\n")


def test_check_config_knows_the_installed_policies(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, 'policies = ["merge", "mrege"]\n')
    assert daemon.main(["--check-config", "--config", str(path)]) == 2
    assert f"config {path}: policies: no policy named 'mrege'" in capsys.readouterr().err


def test_verify_schedules_and_boot_checks(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(
        'boot_timeout = 240\nverify_dir = "/srv/verify"\n'
        '[boot_checks]\nweb1 = ["systemctl", "is-system-running"]\n'
        '[[schedules]]\nname = "proof"\ncalendar = "0 4 * * 0"\nmatch = "web-*"\nkind = "verify"\n')
    config = load(tmp_path / "agent.toml", env={})
    assert config.schedules[0].kind == "verify" and config.boot_timeout == 240.0
    assert config.boot_checks == {"web1": ("systemctl", "is-system-running")}
    for bad, words in (('kind = "reboot"', "kind must be one of backup, verify"),
                       ('kind = "verify"\nkeep_last = 3', "keep_last is a backup schedule's setting")):
        schedule = f'[[schedules]]\nname = "x"\ncalendar = "@daily"\nmatch = "*"\n{bad}\n'
        (tmp_path / "bad.toml").write_text(schedule)
        with pytest.raises(UsageError, match=words):
            load(tmp_path / "bad.toml", env={})
    (tmp_path / "bad.toml").write_text('[boot_checks]\nweb1 = "systemctl is-system-running"\n')
    with pytest.raises(UsageError, match="boot_checks.web1: expected the command's words"):
        load(tmp_path / "bad.toml", env={})


def test_the_tls_table_sets_the_certificates_and_takes_all_three_or_none(tmp_path: Path) -> None:
    config = load(write(tmp_path, '[tls]\nca = "/etc/hyperback/ca.pem"\ncert = "/etc/hyperback/a.pem"\n'
                                  'key = "/etc/hyperback/a.key"\ncrl = "/etc/hyperback/crl.pem"\n'), env={})
    assert config.tls == TlsConfig(Path("/etc/hyperback/ca.pem"), Path("/etc/hyperback/a.pem"),
                                   Path("/etc/hyperback/a.key"), crl=Path("/etc/hyperback/crl.pem"))
    assert load(write(tmp_path, ""), env={}).tls == TlsConfig()
    assert not TlsConfig().allow_plaintext  # plain TCP off loopback only when set
    assert load(write(tmp_path, "[tls]\nallow_plaintext = true"), env={}).tls.allow_plaintext
    for text, names in (('[tls]\nca = "/x"', "tls: ca, cert and key go together"),
                        ('[tls]\ncrl = "/x"', "tls: crl needs ca, cert and key"),
                        ('[tls]\ncafile = "/x"', "tls: unknown setting 'cafile'"),
                        ("[tls]\nallow_plaintext = 1", "tls.allow_plaintext: expected true or false")):
        with pytest.raises(UsageError, match=names):
            load(write(tmp_path, text), env={})
