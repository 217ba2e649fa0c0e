"""hyperback units install: the services' systemd units, written with this installation's paths and
checked by systemd itself (``systemd-analyze verify``, which needs no systemd running as PID 1)."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from cli_helpers import run

from host_agent.cli import units_cmd
from host_agent.errors import EnvironmentProblem

UNITS = ["hyperback-agent.service", "hyperback-media.service", "hyperback-optimizer.service"]
SYSTEM_UNIT_DIRS = [Path(p) for p in ("/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system",
                                      "/usr/lib/systemd/system")]


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(path)
    return parser


def verify(units: list[Path], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify, with a stand-in for each unit outside hyperback that this host lacks
    (a lab host runs libvirtd without its unit). systemd reports a bad setting as a warning and
    still exits 0, so a unit passes only with exit 0 and nothing said."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package (.ci/setup does)")
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name in ("libvirtd.service",):
        if not any((d / name).exists() for d in SYSTEM_UNIT_DIRS):
            (stubs / name).write_text(f"[Unit]\nDescription=stand-in for {name}\n"
                                      f"[Service]\nExecStart=/bin/true\n")
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{stubs}:"}  # the trailing ':' keeps the default paths
    return subprocess.run([analyze, "verify", "--man=no", *map(str, units)], capture_output=True, text=True,
                          env=env, timeout=60)


def test_the_units_are_written_with_absolute_paths_of_this_installation(tmp_path: Path) -> None:
    out = run("units", "install", "--dir", tmp_path / "units").stdout
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == UNITS
    assert out.count(": written") == 3
    for name in UNITS:
        service = unit(tmp_path / "units" / name)["Service"]
        assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")
        assert int(service["WatchdogSec"]) > 0
        for key in ("ExecStart", "ExecStartPre"):
            if key in service:
                command = Path(service[key].split()[0])
                assert command.is_absolute() and os.access(command, os.X_OK), service[key]
                assert command == units_cmd.command_path(name.removesuffix(".service"))
        assert "@" not in (tmp_path / "units" / name).read_text()
    again = run("units", "install", "--dir", tmp_path / "units").stdout
    assert again.count(": unchanged") == 3


def test_a_dry_run_prints_the_units_and_writes_nothing(tmp_path: Path) -> None:
    out = run("units", "install", "--dir", tmp_path / "units", "--dry-run").stdout
    assert not (tmp_path / "units").exists()
    assert all(f"# {tmp_path / 'units' / name}" in out for name in UNITS)


def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    run("units", "install", "--dir", tmp_path / "units")
    done = verify(sorted((tmp_path / "units").iterdir()), tmp_path)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.parametrize(("line", "broken"), [
    ("Type=notify", "Type=notfy"),                          # warned about, exit 0
    ("WatchdogSec=30", "WatchdogSec=soon"),                 # warned about, exit 0
    ("ExecStart=/", "ExecStart=/nonexistent/"),             # exit 1
])
def test_a_broken_unit_fails_the_check(tmp_path: Path, line: str, broken: str) -> None:
    run("units", "install", "--dir", tmp_path / "units")
    path = tmp_path / "units" / "hyperback-optimizer.service"
    text = path.read_text()
    assert line in text
    path.write_text(text.replace(line, broken, 1))
    done = verify([path], tmp_path)
    assert (done.returncode, done.stdout + done.stderr) != (0, "")


def test_a_missing_command_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvironmentProblem, match="hyperback-agent is not installed"):
        units_cmd.render("ExecStart=@hyperback-agent@\n")
