"""hyperback shim build: the guest shim's wheel and zipapp install and run on their own.

"On their own" is checked the strict way: the installed shim runs under ``python -I -S`` (no user
site, no site-packages, no environment), with only the install folder or the zipapp on its path,
and the modules it loaded include nothing of host_agent, grpc or libvirt.
"""
from __future__ import annotations

import ast
import base64
import csv
import hashlib
import io
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run

from guest_shim.client import SHIM_VERSION

HOST_ONLY = ("host_agent", "grpc", "libvirt", "google", "cffi", "pyroute2")

# Runs a file (a console script, a zipapp) or a module with only TARGET on sys.path, then prints
# which host-only modules were loaded.
DRIVER = """\
import runpy, sys
target, kind, what, *argv = sys.argv[1:]
sys.path.insert(0, target)
sys.argv = [what, *argv]
code = 0
try:
    if kind == "module":
        runpy.run_module(what, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(what, run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 0
host = sorted(m for m in sys.modules if m.split(".")[0] in {host})
print("LOADED-FROM", sys.modules["guest_shim"].__file__)
print("HOST-MODULES", host)
sys.exit(code)
""".replace("{host}", repr(set(HOST_ONLY)))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("shim-dist")
    proc = run("shim", "build", "--out", out)
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) == 1, proc.stdout
    assert str(wheels[0]) in proc.stdout and str(out / "hyperback-shim.pyz") in proc.stdout
    return {"wheel": wheels[0], "pyz": out / "hyperback-shim.pyz"}


def isolated(target: Path, kind: str, what: str | Path, *argv: str,
             cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-S", "-c", DRIVER, str(target), kind, str(what), *argv],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def assert_alone(proc: subprocess.CompletedProcess[str], inside: Path) -> None:
    assert "HOST-MODULES []" in proc.stdout, proc.stdout
    assert f"LOADED-FROM {inside}" in proc.stdout, proc.stdout


def test_the_wheel_is_hyperback_shim_at_the_projects_version_with_no_dependencies(
        built: dict[str, Path]) -> None:
    version = metadata.version("hyperback")
    assert built["wheel"].name == f"hyperback_shim-{version}-py3-none-any.whl"
    assert version == SHIM_VERSION  # hello.shim says what the package says
    with zipfile.ZipFile(built["wheel"]) as whl:
        meta = whl.read(f"hyperback_shim-{version}.dist-info/METADATA").decode()
        entry_points = whl.read(f"hyperback_shim-{version}.dist-info/entry_points.txt").decode()
        names = whl.namelist()
    headers = [line.partition(": ") for line in meta.split("\n\n")[0].splitlines()]
    fields = {k: v for k, _, v in headers}
    assert fields["Name"] == "hyperback-shim"
    assert fields["Version"] == version
    assert fields["Requires-Python"] == ">=3.9"
    assert not [k for k, _, _ in headers if k == "Requires-Dist"]
    assert "hyperback-shim = guest_shim.cli:main" in entry_points
    packages = {n.split("/")[0] for n in names}
    assert packages == {"guest_shim", f"hyperback_shim-{version}.dist-info"}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_wheels_record_lists_every_file_with_its_hash_and_size(built: dict[str, Path]) -> None:
    with zipfile.ZipFile(built["wheel"]) as whl:
        record_name = next(n for n in whl.namelist() if n.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(io.StringIO(whl.read(record_name).decode())))
        assert {r[0] for r in rows} == set(whl.namelist())
        for path, digest, size in rows:
            if path == record_name:
                assert (digest, size) == ("", "")
                continue
            data = whl.read(path)
            algorithm, _, value = digest.partition("=")
            assert algorithm == "sha256", path
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert value == expected, path
            assert int(size) == len(data), path


def test_the_wheel_installs_into_an_empty_folder_and_runs_without_the_host_project(
        built: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                    "--disable-pip-version-check", "--target", str(target), str(built["wheel"])],
                   check=True, capture_output=True, timeout=120)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == [
        "bin", "guest_shim"]

    proc = isolated(target, "module", "guest_shim", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: hyperback-shim" in proc.stdout
    assert_alone(proc, target / "guest_shim")

    script = target / "bin" / "hyperback-shim"
    assert script.read_text().startswith("#!")
    proc = isolated(target, "file", script, "--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"hyperback-shim {SHIM_VERSION}" in proc.stdout
    assert_alone(proc, target / "guest_shim")


def test_the_zipapp_runs_under_python3_isolated_and_keeps_the_exit_code(
        built: dict[str, Path], tmp_path: Path) -> None:
    pyz = built["pyz"]
    assert pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    proc = subprocess.run(["python3", "-I", str(pyz), "--help"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: hyperback-shim" in proc.stdout
    # a guest command in a machine without the port: exit 4 (host not reachable), one line
    config = tmp_path / "shim.conf"
    config.write_text("[shim]\nport = org.hyperback.nowhere.0\nsocket = /nonexistent/shim.sock\n"
                      "connect_timeout = 0.1\n")
    proc = subprocess.run(["python3", "-I", str(pyz), "-c", str(config), "status", "j1"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith("hyperback-shim: error: ") and len(proc.stderr.splitlines()) == 1

    proc = isolated(pyz, "file", pyz, "--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_alone(proc, pyz / "guest_shim")


def test_an_unwritable_output_folder_is_one_line_and_exit_3(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert_one_line_error(run("shim", "build", "--out", tmp_path / "file" / "dist", check=False),
                          3, "cannot create")


def exec_start(root: Path) -> str:
    unit = (root / "etc/systemd/system/hyperback-shim.service").read_text()
    return next(line for line in unit.splitlines() if line.startswith("ExecStart=")).split("=", 1)[1]


def verify(root: Path) -> None:
    """``systemd-analyze verify`` (no systemd needed as PID 1) passes and says nothing: it exits 0
    even for keys it ignores, and checks that ExecStart's program exists."""
    unit = root / "etc/systemd/system/hyperback-shim.service"
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=60, cwd=root)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_the_installed_wheel_and_the_zipapp_write_units_that_name_themselves(
        built: dict[str, Path], tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    target = tmp_path / "opt"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                    "--disable-pip-version-check", "--target", str(target), str(built["wheel"])],
                   check=True, capture_output=True, timeout=120)
    script = target / "bin" / "hyperback-shim"
    wheel_root = tmp_path / "wheel-root"
    proc = isolated(target, "file", script, "install-service", "--root", str(wheel_root), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert exec_start(wheel_root) == f"{script} serve"
    verify(wheel_root)

    pyz_root = tmp_path / "pyz-root"
    python3 = shutil.which("python3")
    assert python3
    proc = subprocess.run([python3, "-I", str(built["pyz"]), "install-service", "--root", str(pyz_root)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ran_with = subprocess.run([python3, "-I", "-c", "import sys; print(sys.executable)"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert exec_start(pyz_root) == f"{ran_with} {built['pyz']} serve"
    verify(pyz_root)


def test_every_module_of_the_wheel_is_python_3_9_syntax(built: dict[str, Path]) -> None:
    """Requires-Python says 3.9: nothing newer than its grammar (match, except*, ...) may be in it."""
    with zipfile.ZipFile(built["wheel"]) as whl:
        modules = [n for n in whl.namelist() if n.endswith(".py")]
        for name in modules:
            ast.parse(whl.read(name), name, feature_version=(3, 9))
    assert "guest_shim/hooks.py" in modules and "guest_shim/service.py" in modules
