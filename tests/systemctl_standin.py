"""``systemctl`` for tests/test_deploy_vm.py, on a machine whose PID 1 is not systemd.

It does for hyperback's units what systemd does, and nothing more:

* ``daemon-reload``: nothing (units are read when started).
* ``enable --now UNIT...``: for each unit in the order given, read ``/etc/systemd/system/UNIT.service``;
  make its ``RuntimeDirectory=`` (under /run) and ``StateDirectory=`` (under /var/lib); run its
  ``ExecStartPre=`` (a failure fails the start, as in systemd); start ``ExecStart=`` in a session of
  its own, with ``NOTIFY_SOCKET`` for ``Type=notify``, and return once it sent ``READY=1`` (or fail
  with its log if it exits first).
* ``status UNIT``: whether the unit's main process runs.

Main PIDs are appended to ``$HB_STANDIN_PIDS`` (the test stops them), logs go to
``$HB_STANDIN_LOGS/UNIT.log``.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UNITS = Path("/etc/systemd/system")
READY_TIMEOUT = 180.0


def service_section(unit: str) -> dict[str, list[str]]:
    path = UNITS / (unit if unit.endswith(".service") else f"{unit}.service")
    section, out = "", {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def pids_of(unit: str) -> list[int]:
    path = Path(os.environ["HB_STANDIN_PIDS"])
    lines = path.read_text().splitlines() if path.exists() else []
    return [int(pid) for name, pid in (line.split() for line in lines) if name == unit]


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def start(unit: str) -> None:
    service = service_section(unit)
    for name in service.get("RuntimeDirectory", []):
        Path("/run", name).mkdir(parents=True, exist_ok=True)
    for name in service.get("StateDirectory", []):
        Path("/var/lib", name).mkdir(parents=True, exist_ok=True)
    for pre in service.get("ExecStartPre", []):
        subprocess.run(shlex.split(pre), check=True)
    (command,) = service["ExecStart"]
    log = Path(os.environ["HB_STANDIN_LOGS"]) / f"{unit}.log"
    notify = service.get("Type", ["simple"])[-1] == "notify"
    with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        env = dict(os.environ)
        if notify:
            sock.bind(f"{tmp}/notify")
            env["NOTIFY_SOCKET"] = f"{tmp}/notify"
        with open(log, "ab") as out:
            proc = subprocess.Popen(shlex.split(command), stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        with open(os.environ["HB_STANDIN_PIDS"], "a") as pids:
            pids.write(f"{unit} {proc.pid}\n")
        if notify:
            wait_ready(sock, proc, unit, log)


def wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes], unit: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{unit}: exited with {proc.returncode} before READY=1:\n{log.read_text()[-3000:]}")
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            continue
        if "READY=1" in message.splitlines():
            return
    sys.exit(f"{unit}: no READY=1 within {READY_TIMEOUT:.0f} s:\n{log.read_text()[-3000:]}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["daemon-reload"]:
        return 0
    if argv[:2] == ["enable", "--now"]:
        for unit in argv[2:]:
            start(unit)
        return 0
    if argv[:1] == ["status"]:
        alive = [pid for unit in argv[1:] for pid in pids_of(unit) if running(pid)]
        print("active (running)" if alive else "inactive (dead)")
        return 0 if alive else 3
    sys.exit(f"systemctl stand-in: {' '.join(argv)} is not something the deploy guide does")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
