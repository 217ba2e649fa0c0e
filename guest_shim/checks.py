"""The host's ``check`` requests: "are you there", or "run this health check" (boot verification).

A ``check`` without a command is answered at once: the shim is alive and talks to the host.  A
``check`` with a command runs it only if this guest opted in by listing that exact command in
``check_commands`` (shim.conf): the host is trusted with data, not with running programs in the
guest, so it can pick among the commands the guest's administrator allowed and nothing else.  The
command runs without a shell, in a thread (the serve loop must keep answering freeze and thaw),
killed at its timeout; the reply carries its exit status and the end of its output, made wire
text.  One check runs at a time.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

from .protocol import (
    MAX_CHECK_OUTPUT,
    Check,
    Checked,
    ErrorCode,
    ErrorMessage,
    Message,
    clean_text,
)

log = logging.getLogger(__name__)

READ_LIMIT = 1 << 20  # bytes of a command's output read; the rest is discarded unread


class Checker:
    """Answers ``check``.  ``allowed``: the commands (argv) the host may ask for.  A command's
    reply comes later, through :meth:`take_notices` (``notify`` wakes the owner of the port)."""

    def __init__(self, allowed: Sequence[tuple[str, ...]] = (),
                 notify: Callable[[], None] | None = None) -> None:
        self.allowed = {tuple(c) for c in allowed}
        self.notify = notify
        self._lock = threading.Lock()
        self._notices: list[Message] = []
        self._running = False

    def handle(self, msg: Check) -> Checked | ErrorMessage | None:
        """The reply now, or None when the command's reply will come as a notice."""
        if msg.command is None:
            return Checked(msg.id, True)
        if msg.command not in self.allowed:
            return ErrorMessage(
                msg.id,
                ErrorCode.UNSUPPORTED,
                clean_text(
                    f"this guest does not run {' '.join(msg.command)!r} for the host: list it in "
                    "check_commands of /etc/hyperback/shim.conf to allow it"
                ),
            )
        with self._lock:
            if self._running:
                return ErrorMessage(msg.id, ErrorCode.BUSY, "another check is running", retry_after=1.0)
            self._running = True
        threading.Thread(target=self._run, args=(msg,), name="check", daemon=True).start()
        return None

    def take_notices(self) -> list[Message]:
        with self._lock:
            notices, self._notices = self._notices, []
            return notices

    def _run(self, msg: Check) -> None:
        assert msg.command is not None
        started = time.monotonic()
        try:
            reply = _run_command(msg, started)
        except Exception as e:  # the host always gets an answer
            log.exception("check %s failed", msg.command)
            reply = Checked(msg.id, False, None, clean_text(f"cannot run the check: {e}"), _since(started))
        with self._lock:
            self._notices.append(reply)
            self._running = False
        if self.notify is not None:
            self.notify()


def _run_command(msg: Check, started: float) -> Checked:
    assert msg.command is not None
    try:
        proc = subprocess.Popen(
            list(msg.command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    except OSError as e:
        return Checked(msg.id, False, None, clean_text(f"cannot start {msg.command[0]}: {e.strerror}"), 0.0)
    assert proc.stdout is not None
    out = bytearray()
    timer = threading.Timer(msg.timeout, proc.kill)
    timer.start()
    try:
        while chunk := proc.stdout.read(65536):
            if len(out) < READ_LIMIT:
                out += chunk[: READ_LIMIT - len(out)]
        status = proc.wait()
    finally:
        timer.cancel()
        proc.stdout.close()
    killed = status < 0 and time.monotonic() - started >= msg.timeout
    text = output_text(bytes(out))
    if killed:
        text = clean_text(f"killed after {msg.timeout:g} s; {text}", MAX_CHECK_OUTPUT)
    status_out = None if killed else max(-255, min(255, status))
    return Checked(msg.id, status == 0, status_out, text, _since(started))


def output_text(data: bytes) -> str:
    """The end of a command's output as wire text: lines joined by " | ", at most
    ``MAX_CHECK_OUTPUT`` characters (the end matters most: where it failed)."""
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    text = clean_text(" | ".join(lines), 10 * MAX_CHECK_OUTPUT)
    if len(text) > MAX_CHECK_OUTPUT:
        text = "..." + text[-(MAX_CHECK_OUTPUT - 3):]
    return text


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
