"""install-service: the unit and udev rule that run ``serve`` while the host's port is there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guest_shim.cli import main
from guest_shim.service import device_unit, escape_path, render_rule, render_unit, shim_command


@pytest.mark.parametrize("path", ["/dev/virtio-ports/org.hyperback.agent.0", "/dev/virtio-ports/a b-c",
                                  "/srv/.hidden/x\\y", "/"])
def test_unit_names_are_escaped_as_systemd_escape_does(path: str) -> None:
    if shutil.which("systemd-escape") is None:
        pytest.skip("systemd-escape is not installed")
    expected = subprocess.run(["systemd-escape", "--path", path], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert escape_path(path) == expected


def test_the_unit_is_bound_to_the_ports_device_and_the_rule_wants_it() -> None:
    unit = render_unit(("/opt/hb shim/bin/hyperback-shim",), "org.hyperback.agent.0")
    device = "dev-virtio\\x2dports-org.hyperback.agent.0.device"
    assert f"BindsTo={device}\n" in unit and f"After={device}\n" in unit
    assert 'ExecStart="/opt/hb shim/bin/hyperback-shim" serve\n' in unit
    assert device_unit("org.hyperback.agent.0") == device
    assert render_rule("org.hyperback.agent.0").splitlines()[-1] == (
        'SUBSYSTEM=="virtio-ports", ATTR{name}=="org.hyperback.agent.0", TAG+="systemd", '
        'ENV{SYSTEMD_WANTS}+="hyperback-shim.service"')


def test_percent_and_dollar_are_not_expanded_by_systemd() -> None:
    unit = render_unit(("/opt/50%/$x/hyperback-shim",), "p")
    assert 'ExecStart="/opt/50%%/$$x/hyperback-shim" serve' in unit


def test_the_command_is_the_running_shim_by_absolute_path(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "hyperback-shim"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert shim_command(str(script), "/usr/bin/python3") == (str(script),)


def test_install_service_writes_under_root_and_the_unit_verifies(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-service", "--root", str(tmp_path), "--no-start"]) == 0
    unit = tmp_path / "etc/systemd/system/hyperback-shim.service"
    assert (tmp_path / "etc/udev/rules.d/90-hyperback-shim.rules").exists()
    assert (tmp_path / "etc/hyperback/fsfreeze-hook.d").is_dir()
    exec_start = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    assert exec_start.split("=", 1)[1].split()[0].startswith("/")  # run as `python -m guest_shim` here
    assert "wrote" in capsys.readouterr().out
    assert_verifies(unit)


def test_install_service_refuses_a_port_path(tmp_path: Path) -> None:
    assert main(["install-service", "--root", str(tmp_path), "--port", "/dev/vport1p1"]) == 2


def assert_verifies(unit: Path) -> None:
    """``systemd-analyze verify`` passes and says nothing (it exits 0 even for keys it ignores)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=60, cwd=unit.parent)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), sys.executable
