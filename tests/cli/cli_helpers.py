"""Running the real ``hyperback`` command as a user would."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from host_agent.storage.repository import Repository

HYPERBACK = [sys.executable, "-m", "host_agent.cli"]


def run(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*HYPERBACK, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"hyperback {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def run_json(*args: object) -> Any:
    return json.loads(run(*args, "--json").stdout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """A user mistake: the given exit code, one line on stderr, no traceback."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hyperback: ")
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0]


NODE = """<node><domain type="test"><name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory>
  <os><type>hvm</type></os><devices>
  <disk type='file' device='disk'><source file='/var/tmp/{name}.img'/><target dev='vda' bus='virtio'/>
  <serial>data</serial></disk>
  <channel type='unix'><target type='virtio' name='org.hyperback.agent.0'/></channel>
  </devices></domain></node>"""


@contextlib.contextmanager
def agent_with_a_missed_schedule(root: Path) -> Iterator[str]:
    """A real ``hyperback-agent`` process whose libvirt is libvirt's own test driver with one domain,
    ``web-1``, and whose nightly schedule missed a run while it was down: it fires at start, and its
    job waits in the driver (which flushes once an hour). Yields the operator API's address."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "node.xml").write_text(NODE.format(name="web-1", uuid=WEB_1))
    Repository.init(root / "repo")
    (root / "state").mkdir()
    long_ago = time.time() - 30 * 86400
    (root / "state" / "schedules.json").write_text(
        json.dumps({"nightly": {"armed": long_ago, "last_run": long_ago}}))
    address = f"unix:{root}/agent.sock"
    (root / "agent.toml").write_text(f"""
libvirt_uri = "test://{root}/node.xml"
state_dir = "{root}/state"
run_dir = "{root}/run"
optimizer = "unix:{root}/optimizer.sock"
operator_listen = "{address}"
metrics_listen = "127.0.0.1:0"
interval = 3600.0
send_load = false
[repositories]
default = "{root}/repo"
[[schedules]]
name = "nightly"
calendar = "30 1 * * *"
match = "web-*"
keep_last = 3
""")
    with open(root / "agent.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "host_agent.agent.daemon", "--config",
                                 str(root / "agent.toml"), "--with-optimizer", "-v"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not run("job", "list", "--agent", address, "--json", check=False).stdout.strip("[]\n"):
            assert proc.poll() is None, (root / "agent.log").read_text()
            assert time.monotonic() < deadline, (root / "agent.log").read_text()
        yield address
    finally:
        proc.terminate()
        proc.wait(30)


WEB_1 = "6f1cd1a2-0000-4000-8000-000000000001"
