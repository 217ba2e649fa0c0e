"""fsfreeze hooks: let applications (databases) flush before the freeze and resume after the thaw.

Like qemu-guest-agent's ``--fsfreeze-hook``: the executable files of one folder (default
``/etc/hyperback/fsfreeze-hook.d/``, ``fsfreeze_hook_dir`` in the shim's config, empty for none)
run in name order with the argument ``freeze`` before the file systems are frozen, and in the
reverse order with ``thaw`` after they were thawed.  Rules:

* A hook runs directly (``execve``), never through a shell, with ``/`` as its working directory,
  stdin from /dev/null, stdout and stderr into the shim's log, and a small environment
  (``PATH``, ``LANG=C``, ``HYPERBACK_JOB``, ``HYPERBACK_HOOK_PHASE``), in a process group of its
  own.
* Names starting with ``.`` or ending with ``~`` are ignored (rename a hook to disable it).  Any
  other entry must be a regular file (a symlink to one is followed), executable, owned by root or
  by the shim's user, and not group- or world-writable; the folder itself must not be writable by
  others.  An entry that breaks a rule is **refused**: it is not run, and the freeze fails saying
  which file and why, since a backup that claims to be quiesced without its database hook would
  be a lie.
* Each phase is bounded by the freeze watchdog's bound, ``min(timeout, max_freeze_seconds)``:
  the ``freeze`` hooks and the freeze itself share it from the moment the host's ``freeze``
  arrived (the watchdog thaws at its end, as without hooks); each ``thaw`` hook gets it anew,
  after the thaw.  A hook still running at its bound is cut off (SIGKILL to its process group).
* A ``freeze`` hook that fails, is refused or is cut off ends the freeze before anything was
  frozen: the hooks that already ran get ``thaw`` (in reverse), and the host is answered
  ``error`` ``freeze-failed`` with the hook's name and what happened (the host continues
  crash-consistent, ``quiesced: false`` in the backup's result, and logs the message).  A
  ``thaw`` hook that fails or is cut off is logged; the file systems are already thawed and the
  other thaw hooks still run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import FreezeError

log = logging.getLogger(__name__)

FREEZE = "freeze"
THAW = "thaw"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_OUTPUT_LOGGED = 2000  # characters of a hook's output that reach the log


class HookError(FreezeError):
    """A freeze hook was refused, failed or was cut off; the message names it."""


@dataclass(frozen=True)
class HookRun:
    """What one hook did: ``ok`` (exit 0), else ``problem`` says what went wrong."""

    path: str
    phase: str
    ok: bool
    problem: str
    seconds: float

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith("~")


def _refusal(path: str, st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & stat.S_IWOTH:
        return "world-writable"
    if st.st_mode & stat.S_IWGRP:
        return "group-writable"
    if not st.st_mode & stat.S_IXUSR or not os.access(path, os.X_OK):
        return "not executable"
    return None


def find_hooks(folder: str | None) -> list[str]:
    """The hooks of ``folder`` in name order; a missing folder (or None) has none.

    Raises HookError for a folder others may write to, or an entry that breaks the rules.
    """
    if not folder:
        return []
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise HookError(f"fsfreeze hook folder {folder}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise HookError(f"fsfreeze hook folder {folder} is not a folder")
    if st.st_mode & (stat.S_IWOTH | stat.S_IWGRP) or st.st_uid not in (0, os.geteuid()):
        raise HookError(f"fsfreeze hook folder {folder} refused: others may write to it")
    hooks = []
    refused = []
    for name in sorted(os.listdir(folder)):
        if _ignored(name):
            continue
        path = os.path.join(folder, name)
        try:
            problem = _refusal(path, os.stat(path))
        except OSError as e:
            problem = e.strerror or "cannot stat"
        if problem is None:
            hooks.append(path)
        else:
            log.error("fsfreeze hook %s refused: %s", path, problem)
            refused.append(f"{name} ({problem})")
    if refused:
        raise HookError(f"fsfreeze hook refused: {', '.join(refused)} in {folder}")
    return hooks


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_hook(path: str, phase: str, deadline: float, job: str) -> HookRun:
    """Run one hook with ``phase`` until it ends or ``deadline`` (monotonic) passes; never raises
    for the hook's own failure.  A signal that interrupts the wait (SIGTERM of the shim) still
    kills the hook's process group before it propagates."""
    env = {"PATH": _PATH, "LANG": "C", "HYPERBACK_JOB": job, "HYPERBACK_HOOK_PHASE": phase}
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen([path, phase], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd="/", env=env, close_fds=True,
                                start_new_session=True)
    except OSError as e:
        return HookRun(path, phase, False, f"cannot run: {e.strerror}", 0.0)
    output = b""
    try:
        try:
            output, _ = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            took = time.monotonic() - t0
            problem = f"cut off after {took:.1f} s (the freeze watchdog's bound)"
            return HookRun(path, phase, False, problem, took)
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    took = time.monotonic() - t0
    text = output.decode("utf-8", "replace").strip()
    if text:
        log.info("fsfreeze hook %s %s said: %s", os.path.basename(path), phase, text[-_OUTPUT_LOGGED:])
    if proc.returncode == 0:
        return HookRun(path, phase, True, "", took)
    problem = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited {proc.returncode}"
    last = text.splitlines()[-1][:200] if text else ""
    return HookRun(path, phase, False, f"{problem}: {last}" if last else problem, took)


def run_freeze_hooks(hooks: Sequence[str], deadline: float, job: str, bound: float) -> list[str]:
    """Run ``hooks`` with ``freeze`` in order until ``deadline``; the ones that ran.  On a failure,
    the ones that ran get ``thaw`` (in reverse, for at most ``bound`` seconds) and HookError says
    which hook failed and how."""
    ran: list[str] = []
    for path in hooks:
        result = run_hook(path, FREEZE, deadline, job)
        if not result.ok:
            log.error("fsfreeze hook %s freeze failed: %s", path, result.problem)
            run_thaw_hooks(ran, bound, job)
            raise HookError(f"fsfreeze hook {result.name} freeze {result.problem}; nothing was frozen")
        log.info("fsfreeze hook %s freeze done in %.2f s", result.name, result.seconds)
        ran.append(path)
    return ran


def run_thaw_hooks(ran: Sequence[str], bound: float, job: str) -> list[HookRun]:
    """Run the hooks that ran for ``freeze`` with ``thaw``, in reverse order, each for at most
    ``bound`` seconds; every one of them runs (a failure is logged), so that one stuck hook does
    not keep the others' applications waiting."""
    results = []
    for path in reversed(ran):
        result = run_hook(path, THAW, time.monotonic() + bound, job)
        if result.ok:
            log.info("fsfreeze hook %s thaw done in %.2f s", result.name, result.seconds)
        else:
            log.error("fsfreeze hook %s thaw failed: %s (the file systems are thawed)", path, result.problem)
        results.append(result)
    return results
