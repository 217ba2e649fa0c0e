"""hyperback export: prints the URI and size, serves until SIGINT or SIGTERM, then leaves nothing behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import HYPERBACK, assert_one_line_error, run
from conftest import MIB, sha256_file, write_image

from host_agent.media import server as media
from host_agent.storage.repository import Repository


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Path, Path]:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", 4 * MIB, 3)
    run("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", image)
    return tmp_path / "r", image


@pytest.fixture
def served(tmp_path: Path, backed_up: tuple[Path, Path]) -> Iterator[media.MediaServer]:
    srv = media.start({"main": backed_up[0]}, "127.0.0.1:0", "hostb")
    yield srv
    srv.stop(grace=0)


def start_export(*args: object) -> tuple[subprocess.Popen[str], dict[str, object]]:
    """``hyperback export ARGS --json`` started, and what it printed once it serves."""
    proc = subprocess.Popen([*HYPERBACK, "export", *map(str, args), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once the export answers NBD; empty if it failed
    if not line:
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"export exited {proc.returncode}: {err}")
    announced: dict[str, object] = json.loads(line)
    return proc, announced


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGINT])
def test_export_serves_the_snapshot_until_a_signal_and_leaves_nothing(
        tmp_path: Path, backed_up: tuple[Path, Path], stop_with: signal.Signals) -> None:
    repo, image = backed_up
    sock = tmp_path / "vm1.sock"
    proc, announced = start_export("--repo", repo, "--socket", sock, "vm1/vda@latest")
    try:
        assert announced["uri"] == f"nbd+unix:///?socket={sock}"
        assert announced["size"] == 4 * MIB
        subprocess.run(["nbdcopy", str(announced["uri"]), str(tmp_path / "copy.img")], check=True, timeout=60)
        assert sha256_file(tmp_path / "copy.img") == sha256_file(image)
        (nbdkit,) = Repository.open(repo).locks()  # the export's reader lock names nbdkit's pid
    finally:
        os.kill(proc.pid, stop_with)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped on" in err
    assert process_gone(nbdkit.pid)
    assert not sock.exists()
    assert Repository.open(repo).locks() == []


def test_export_of_a_destination_behind_a_media_service(
        tmp_path: Path, backed_up: tuple[Path, Path], served: media.MediaServer) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f"""
host_name = "hosta"
[hosts.hosta]
libvirt_uri = "qemu:///system"
agent = "127.0.0.1:7400"
lan_ip = "127.0.0.1"
[hosts.hostb]
libvirt_uri = "qemu:///system"
agent = "127.0.0.1:7401"
lan_ip = "127.0.0.1"
[media.main]
host = "hostb"
service = "{served.address}"
path = "/srv/backup/main"
""")
    proc, announced = start_export("--config", config, "--destination", "main", "vm1/vda@latest")
    try:
        subprocess.run(["nbdcopy", str(announced["uri"]), str(tmp_path / "copy.img")], check=True, timeout=60)
        assert sha256_file(tmp_path / "copy.img") == sha256_file(backed_up[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_export_mistakes_are_one_line(tmp_path: Path, backed_up: tuple[Path, Path]) -> None:
    repo, _ = backed_up
    assert run("export", "--help").stdout.startswith("usage: hyperback export")
    assert_one_line_error(run("export", "vm1/vda@latest", check=False), 2, "--repo")
    assert_one_line_error(run("export", "--repo", repo, "nope@latest", check=False), 2, "no snapshot")
    assert_one_line_error(run("export", "--repo", tmp_path / "none", "vm1/vda@latest", check=False), 2)
    assert_one_line_error(run("export", "--repo", repo, "--cache", "0", "vm1/vda@latest", check=False),
                          2, "--cache")
    (tmp_path / "file").write_text("")
    assert_one_line_error(run("export", "--repo", repo, "--socket", tmp_path / "file", "vm1/vda@latest",
                              check=False), 2, "not a socket")
    config = tmp_path / "agent.toml"
    config.write_text(f'[repositories]\ndefault = "{repo}"\n')
    assert_one_line_error(run("export", "--config", config, "--destination", "elsewhere", "vm1/vda@latest",
                              check=False), 2, "no destination named 'elsewhere'")
