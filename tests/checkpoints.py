"""Hold a real process at an exact step of its work: fanotify permission events (Linux, root).

A test that kills or interrupts a process "at a moment" must not guess when the
moment comes: a fast machine is past it before a poll sees it, a loaded one has
not reached it when a timer fires. The kernel can tell instead. With fanotify
permission events, every thread that opens a file in a watched directory (or
reads a watched file) stops inside that system call until a listener answers;
the listener sees which file it is. So a test lets the process through each
step of its write order until the one it wants, and there the thread waits,
with nothing after that step done, for as long as the test needs: to send
SIGKILL, or to deliver a Ctrl-C while the copy provably still has work to do.
Every other thread of the process that reaches a watched step meanwhile waits
too. Nothing in the process is changed: real files, real system calls, real
signals; the process runs at full speed between steps.

    with Checkpoints(repo) as cps:
        cps.watch_opens(repo / "index")
        proc = start_cli("backup", ...)
        cps.hold_at(proc, opened("index", after=opened("tmp/*.idx")))
        proc.kill()          # killed right after its first index file was published

Needs CAP_SYS_ADMIN and a kernel with CONFIG_FANOTIFY_ACCESS_PERMISSIONS (Debian's
kernels have it); :class:`Unavailable` says which is missing.
"""
from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import select
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

_FAN_CLOEXEC = 0x1
_FAN_NONBLOCK = 0x2
_FAN_CLASS_CONTENT = 0x4
_FAN_MARK_ADD = 0x1
_FAN_OPEN_PERM = 0x10000
_FAN_ACCESS_PERM = 0x20000
_FAN_EVENT_ON_CHILD = 0x08000000
_FAN_ONDIR = 0x40000000
_FAN_ALLOW = 0x1
_EVENT = struct.Struct("IBBHQii")  # struct fanotify_event_metadata
_RESPONSE = struct.Struct("iI")  # struct fanotify_response

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]


class Unavailable(Exception):
    """This process cannot use fanotify permission events; the message says why."""


class Step(NamedTuple):
    """One checkpoint a process reached: ``open`` or ``read`` of a path relative to the root
    (a path outside the root is given whole)."""

    kind: str
    path: str


Moment = Callable[[Step], bool]
"""Called with each step in turn, its thread waiting meanwhile; True at the moment to hold.
A moment counts what it has seen: use one for one process."""


def opened(pattern: str, nth: int = 1, after: Moment | None = None) -> Moment:
    """The ``nth`` open of a path matching ``pattern`` (fnmatch; ``*`` does not stop at ``/``),
    counting only the opens that come after the moment ``after``, if given."""
    count = 0
    armed = after is None

    def moment(step: Step) -> bool:
        nonlocal count, armed
        if not armed:
            assert after is not None
            armed = after(step)
        elif step.kind == "open" and fnmatch.fnmatchcase(step.path, pattern):
            count += 1
            return count == nth
        return False
    return moment


def reads(nth: int) -> Moment:
    """The ``nth`` read system call on a watched file."""
    count = 0

    def moment(step: Step) -> bool:
        nonlocal count
        count += step.kind == "read"
        return count == nth and step.kind == "read"
    return moment


class Checkpoints:
    """A fanotify group that holds one process at the steps it watches (a context manager)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.steps: list[Step] = []
        # Non-blocking: an event poll() announced is gone again when its thread was killed meanwhile.
        fd = _libc.fanotify_init(_FAN_CLOEXEC | _FAN_NONBLOCK | _FAN_CLASS_CONTENT,
                                 os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE)
        if fd < 0:
            err = ctypes.get_errno()
            if err == errno.EPERM:
                raise Unavailable("fanotify permission events need root (CAP_SYS_ADMIN)")
            raise Unavailable(f"fanotify_init failed ({os.strerror(err)}): the kernel needs "
                              "CONFIG_FANOTIFY and CONFIG_FANOTIFY_ACCESS_PERMISSIONS")
        self._fd = fd
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._decided = threading.Event()
        self._held: list[int] = []
        self._failure: BaseException | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._moment: Moment = lambda step: False

    def _mark(self, path: Path, mask: int) -> None:
        if _libc.fanotify_mark(self._fd, _FAN_MARK_ADD, mask, -1, os.fsencode(path)) < 0:
            err = ctypes.get_errno()
            raise Unavailable(f"cannot watch {path}: {os.strerror(err)}")

    def watch_opens(self, *directories: Path) -> None:
        """Stop at every open of these directories and of the files and directories in them."""
        for d in directories:
            self._mark(d, _FAN_OPEN_PERM | _FAN_ONDIR | _FAN_EVENT_ON_CHILD)

    def watch_reads(self, *files: Path) -> None:
        """Stop at every read system call on these files."""
        for f in files:
            self._mark(f, _FAN_ACCESS_PERM)

    def hold_at(self, proc: subprocess.Popen[str], moment: Moment, timeout: float = 120) -> list[Step]:
        """Let ``proc`` through its watched steps until ``moment`` holds; from then on every thread
        of it that reaches a watched step waits there until :meth:`release`. Return the steps.

        Waits for one of two things that will happen: the moment, or the process ending (then
        AssertionError). ``timeout`` only keeps a hung process from hanging the test.
        """
        self.start(proc, moment)
        return self.wait_held(timeout)

    def start(self, proc: subprocess.Popen[str], moment: Moment) -> None:
        """Begin answering for ``proc`` (the first half of :meth:`hold_at`). Every group watching a
        file must answer before a thread may open it, so when several Checkpoints watch the same
        files, start them all before waiting on any."""
        assert self._thread is None, "one hold per Checkpoints"
        self._proc, self._moment = proc, moment
        pidfd = os.pidfd_open(proc.pid)
        self._thread = threading.Thread(target=self._serve, args=(pidfd,), name="checkpoints", daemon=True)
        self._thread.start()

    def wait_held(self, timeout: float = 120) -> list[Step]:
        """The second half of :meth:`hold_at`."""
        proc = self._proc
        assert proc is not None, "start() first"
        if not self._decided.wait(timeout):
            raise AssertionError(f"process {proc.pid} neither reached the moment nor ended in {timeout} s")
        if self._failure is not None:
            raise AssertionError("the checkpoint listener failed") from self._failure
        if not self._held:
            raise AssertionError(f"the process ended (status {proc.wait()}) before the moment; "
                                 f"its last steps: {self.steps[-8:]}")
        return list(self.steps)

    def release(self) -> None:
        """Let every waiting thread go on, and watch nothing any more."""
        if self._fd < 0:
            return
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
        os.close(self._fd)  # the kernel allows whatever is still waiting
        for fd in (*self._held, self._stop_r, self._stop_w):
            os.close(fd)
        self._held.clear()
        self._fd = -1

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---------- the listener thread ----------

    def _serve(self, pidfd: int) -> None:
        poller = select.poll()
        for fd in (self._fd, pidfd, self._stop_r):
            poller.register(fd, select.POLLIN)
        try:
            while True:
                for fd, _ in poller.poll():
                    if fd == self._stop_r:
                        return
                    if fd == pidfd:
                        poller.unregister(pidfd)  # ended: hold_at looks whether it was held first
                        self._decided.set()
                    else:
                        try:
                            buf = os.read(self._fd, 64 * 1024)
                        except BlockingIOError:
                            continue
                        self._events(buf)
        except BaseException as e:  # handed to hold_at; release() then lets every thread go
            self._failure = e
            self._decided.set()
        finally:
            os.close(pidfd)

    def _events(self, buf: bytes) -> None:
        off = 0
        while off < len(buf):
            length, _, _, _, mask, fd, pid = _EVENT.unpack_from(buf, off)
            off += length
            target = pid == self._proc.pid if self._proc is not None else False
            if not target or self._held:
                # Ours (a test reading the repository meanwhile), a stranger's, or a thread
                # arriving after the moment: only the last must wait.
                if target:
                    self._held.append(fd)
                    continue
                self._allow(fd)
                continue
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            rel = str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)
            step = Step("read" if mask & _FAN_ACCESS_PERM else "open", rel)
            self.steps.append(step)
            if self._moment(step):
                self._held.append(fd)
                self._decided.set()
            else:
                self._allow(fd)

    def _allow(self, fd: int) -> None:
        try:
            os.write(self._fd, _RESPONSE.pack(fd, _FAN_ALLOW))
        except OSError as e:  # the thread is gone (its process was killed)
            if e.errno != errno.ENOENT:
                raise
        finally:
            os.close(fd)


def signal_handled(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has taken signal ``signum`` and its main thread has run the handler:
    the signal is pending neither for the process nor for its main thread, and that thread is
    asleep again (it wakes to take the signal and sleeps once it has handled it).

    For a signal sent to a process whose main thread was asleep, as a Python program's is while
    its native workers run."""
    bit = 1 << (signum - 1)
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True  # gone: it has handled it, one way or another
    pending = {k: int(v, 16) for k, v in (line.split(":\t") for line in status.splitlines()
                                           if line.startswith(("SigPnd:", "ShdPnd:")))}
    return not (pending["SigPnd"] | pending["ShdPnd"]) & bit and state == "S"
