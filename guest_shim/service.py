"""``hyperback-shim install-service``: run ``serve`` under systemd whenever the host's port is there.

Three files, written under ``--root`` (default ``/``)::

    /etc/systemd/system/hyperback-shim.service   serve, bound to the port's device unit
    /etc/udev/rules.d/90-hyperback-shim.rules    the port appearing wants the service
    /etc/hyperback/fsfreeze-hook.d/              the freeze hook folder (created empty, 0755)

The udev rule tags the virtio-serial port named ``org.hyperback.agent.0`` for systemd and adds
the service to its ``SYSTEMD_WANTS``; the service ``BindsTo=`` the port's device unit
(``dev-virtio\\x2dports-org.hyperback.agent.0.device``, from udev's /dev/virtio-ports/ link), so it
starts when the port appears (at boot, or when the channel is hot-plugged) and stops when it goes.

``ExecStart`` names the shim that runs the command, by absolute path, wherever it was installed:
the zipapp (``/usr/bin/python3 /path/hyperback-shim.pyz serve``), the console script of a wheel
(``/opt/venv/bin/hyperback-shim serve``), or, for ``python3 -m guest_shim``, the interpreter and
the module.  Stdlib only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipimport
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError, ShimError

UNIT_NAME = "hyperback-shim.service"
RULE_NAME = "90-hyperback-shim.rules"
UNIT_DIR = "etc/systemd/system"
RULE_DIR = "etc/udev/rules.d"

_UNIT = """\
# Written by `hyperback-shim install-service`; the udev rule {rule} starts it.
[Unit]
Description=hyperback guest shim: backup requests to the host, freeze and thaw
BindsTo={device}
After={device}

[Service]
Type=simple
ExecStart={exec_start}
Restart=on-failure
RestartSec=2s
# serve thaws and ends its freeze hooks on SIGTERM; what is left is killed after the timeout
KillMode=mixed
TimeoutStopSec=30s
"""

_RULE = """\
# Written by `hyperback-shim install-service`: the host's channel appearing starts the shim.
SUBSYSTEM=="virtio-ports", ATTR{{name}}=="{port}", TAG+="systemd", ENV{{SYSTEMD_WANTS}}+="{unit}"
"""

_SAFE_ARG = re.compile(r"[A-Za-z0-9_./:@+=,-]+")
_ESCAPE_KEEP = re.compile(r"[A-Za-z0-9:_.]")


def escape_path(path: str) -> str:
    """``systemd-escape --path``: the unit name of a path, without the suffix."""
    trimmed = "/".join(p for p in path.split("/") if p)
    if not trimmed:
        return "-"
    out = []
    for i, ch in enumerate(trimmed):
        if ch == "/":
            out.append("-")
        elif _ESCAPE_KEEP.fullmatch(ch) and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def device_unit(port_name: str) -> str:
    """The systemd device unit of the port ``port_name`` (udev links it in /dev/virtio-ports/)."""
    return escape_path(f"/dev/virtio-ports/{port_name}") + ".device"


def _quote(arg: str) -> str:
    """One ExecStart word: systemd expands ``%`` specifiers and ``$`` variables, so double them."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if _SAFE_ARG.fullmatch(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def shim_command(argv0: str | None = None, executable: str | None = None) -> tuple[str, ...]:
    """How to run this very shim again, by absolute paths: the zipapp it runs from, the console
    script it was started as, a ``hyperback-shim`` on PATH, or ``python -m guest_shim``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    python = os.path.abspath(executable or sys.executable or "/usr/bin/python3")
    loader = globals().get("__loader__")
    if isinstance(loader, zipimport.zipimporter):
        return (python, os.path.abspath(loader.archive))
    script = os.path.abspath(argv0) if argv0 else ""
    if os.path.basename(script) == "hyperback-shim" and os.access(script, os.X_OK):
        return (script,)
    found = shutil.which("hyperback-shim")
    if found:
        return (os.path.abspath(found),)
    return (python, "-m", "guest_shim")


def render_unit(command: Sequence[str], port_name: str) -> str:
    if not command or not os.path.isabs(command[0]):
        raise ConfigError(f"the shim's command must start with an absolute path: {list(command)!r}")
    exec_start = " ".join(_quote(a) for a in (*command, "serve"))
    return _UNIT.format(rule=RULE_NAME, device=device_unit(port_name), exec_start=exec_start)


def render_rule(port_name: str) -> str:
    return _RULE.format(port=port_name, unit=UNIT_NAME)


@dataclass(frozen=True)
class Installed:
    unit: str
    rule: str
    hook_dir: str
    exec_start: tuple[str, ...]
    started: bool

    def to_dict(self) -> dict[str, object]:
        return {"unit": self.unit, "rule": self.rule, "hook_dir": self.hook_dir,
                "exec_start": list(self.exec_start), "started": self.started}


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(partial, 0o644)
    os.replace(partial, path)


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def install(*, root: str = "/", port_name: str, hook_dir: str, command: Sequence[str] | None = None,
            start: bool = True) -> Installed:
    """Write the unit and the rule under ``root`` and create the hook folder.  With ``root`` ``/``
    and ``start``, reload systemd and udev and replay the port's ``add`` event, so that udev starts
    the service now if the port is there (install-service never starts it itself)."""
    command = tuple(command or shim_command())
    unit = _under(root, f"{UNIT_DIR}/{UNIT_NAME}")
    rule = _under(root, f"{RULE_DIR}/{RULE_NAME}")
    hooks = _under(root, hook_dir)
    try:
        _write(unit, render_unit(command, port_name))
        _write(rule, render_rule(port_name))
        os.makedirs(hooks, mode=0o755, exist_ok=True)
    except OSError as e:
        raise ShimError(f"cannot install the service under {root}: {e.strerror}: {e.filename}") from e
    started = False
    if start and os.path.realpath(root) == "/" and os.path.isdir("/run/systemd/system"):
        for cmd in (["systemctl", "daemon-reload"], ["udevadm", "control", "--reload"],
                    ["udevadm", "trigger", "--action=add", "--subsystem-match=virtio-ports",
                     f"--attr-match=name={port_name}"]):
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise ShimError(f"{' '.join(cmd)}: {e}") from e
            if proc.returncode != 0:
                raise ShimError(f"{' '.join(cmd)} failed: {' '.join(proc.stderr.split())}")
        started = True
    return Installed(unit, rule, hooks, command, started)
