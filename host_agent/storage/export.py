"""A snapshot served read-only as a block device over NBD, straight from its repository::

    with SnapshotExport(repo, "vm1/vda@latest", Path("/run/hyperback/exports/x")) as export:
        subprocess.run(["nbdcopy", export.uri, "/dev/null"])   # or qemu, qemu-img, nbdfuse, guestfish

The server is nbdkit with its Python plugin (``host_agent.storage.nbd_plugin``), listening on a unix
socket in ``run_dir``; it reads the snapshot chunk by chunk through a bounded cache
(``host_agent.storage.imagereader``), answers all-zero chunks without reading them and reports them as
holes, and holds a reader lock on the repository while it runs. Nothing is restored first, so an
export of any size is ready as soon as the repository's index is loaded.

The repository says how the plugin's process opens it again: ``repository.export_params()`` gives
the opener (``MODULE:FUNCTION``, called in the plugin as ``FUNCTION(params, snapshot_id)`` to make a
``ChunkSource``) and its parameters. A local repository's opener is ``imagereader.open_local``; one
behind a media service names the media client's, so this module never imports a higher wing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import site
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol

from host_agent import errors
from host_agent.storage.snapshot import Snapshot

log = logging.getLogger(__name__)

PLUGIN: Final = Path(__file__).with_name("nbd_plugin.py")
NBDKIT: Final = "nbdkit"
START_TIMEOUT: Final = 120.0  # seconds for nbdkit to load a repository's index and listen
STOP_TIMEOUT: Final = 10.0  # seconds nbdkit gets to end its connections after SIGTERM
NBD_GREETING: Final = b"NBDMAGIC" + b"IHAVEOPT"  # what a newstyle NBD server says first
POLL: Final = 0.02


class Exportable(Protocol):
    """A repository an export can serve (``Repository``, ``RemoteRepository``)."""

    def resolve(self, spec: str) -> Snapshot: ...

    def export_params(self) -> dict[str, str]: ...


def _pythonpath() -> str:
    """The directories the plugin's interpreter needs: this project's, then this interpreter's site
    directories (the venv's packages: cffi, grpc, protobuf)."""
    project = Path(__file__).resolve().parents[2]
    dirs = [str(project), *site.getsitepackages()]
    user = site.getusersitepackages()
    if site.ENABLE_USER_SITE and os.path.isdir(user):
        dirs.append(user)
    return ":".join(dirs)


class SnapshotExport:
    """Serves one snapshot read-only over NBD (nbdkit + its Python plugin) on a unix socket."""

    def __init__(self, repository: Exportable, spec: str, run_dir: Path,
                 cache_bytes: int = 64 << 20, socket_path: Path | None = None,
                 exit_with_parent: bool = False) -> None:
        self.repository = repository
        self.snapshot: Snapshot = repository.resolve(spec)  # a wrong name fails here, before a process
        self.size: int = self.snapshot.size
        self.run_dir = Path(run_dir)
        self.cache_bytes = cache_bytes
        self.socket_path: Path = socket_path or self.run_dir / f"{self.snapshot.id}.sock"
        self.uri: str = f"nbd+unix:///?socket={self.socket_path}"
        self._pidfile = self.run_dir / f"{self.snapshot.id}.pid"
        self._error = self.run_dir / f"{self.snapshot.id}.error"
        self._log = self.run_dir / f"{self.snapshot.id}.log"
        # nbdkit ends when the *thread* that started it ends (PR_SET_PDEATHSIG): only for a caller
        # whose starting thread lives as long as the export (the CLI's main thread)
        self._exit_with_parent = exit_with_parent
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SnapshotExport:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __str__(self) -> str:
        return f"export of snapshot {self.snapshot.id} ({self.snapshot.name}) at {self.uri}"

    def _command(self) -> list[str]:
        params = {**self.repository.export_params(), "snapshot": self.snapshot.id,
                  "cache": str(self.cache_bytes), "error": str(self._error)}
        return [NBDKIT, "--foreground", "--readonly", "--unix", str(self.socket_path),
                "--pidfile", str(self._pidfile),
                *(["--exit-with-parent"] if self._exit_with_parent else []),
                "python", str(PLUGIN), f"pythonpath={_pythonpath()}",
                *(f"{k}={v}" for k, v in params.items())]

    def start(self) -> None:
        """Start nbdkit; return once the export answers NBD. Raises the error that stopped it."""
        if self._process is not None:
            raise errors.UsageError(f"{self} is already started")
        if len(os.fsencode(self.socket_path)) > 107:
            raise errors.UsageError(f"socket path {self.socket_path} is longer than a unix socket allows "
                                    "(107 bytes): give a shorter run directory or --socket")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._claim_socket_path()
            for stale in (self._pidfile, self._error):
                stale.unlink(missing_ok=True)
            with open(self._log, "wb") as logfile:
                self._process = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL,
                                                 stdout=logfile, stderr=logfile, start_new_session=True)
        except FileNotFoundError as e:
            raise errors.EnvironmentProblem(f"cannot run {NBDKIT} ({e.strerror}): install the nbdkit and "
                                            "nbdkit-plugin-python packages") from e
        except OSError as e:
            raise errors.EnvironmentProblem(f"cannot start an export in {self.run_dir}: {e}") from e
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("%s: serving %d bytes (pid %d)", self, self.size, self._process.pid)

    def _claim_socket_path(self) -> None:
        """Remove a socket nobody listens on (left by a killed export); refuse anything else there."""
        path = self.socket_path
        if not path.exists() and not path.is_symlink():
            return
        if not path.is_socket():
            raise errors.UsageError(f"{path} exists and is not a socket: give another socket path")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink(missing_ok=True)
                return
        raise errors.UsageError(f"{path} is in use by another server: give another socket path")

    def _wait_ready(self) -> None:
        """Wait until nbdkit has written its pid file (it does so once it listens), then check that
        the socket greets as an NBD server."""
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not self._pidfile.exists():
            if self._process.poll() is not None:
                raise self._failure()
            if time.monotonic() > deadline:
                raise errors.EnvironmentProblem(f"nbdkit did not listen within {START_TIMEOUT:.0f}s; "
                                                f"see {self._log}")
            time.sleep(POLL)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(START_TIMEOUT)
            try:
                probe.connect(str(self.socket_path))
                greeting = probe.recv(len(NBD_GREETING), socket.MSG_WAITALL)
            except OSError as e:
                raise errors.EnvironmentProblem(f"the export's socket {self.socket_path} does not answer: "
                                                f"{e}; see {self._log}") from e
        if greeting != NBD_GREETING:
            raise errors.EnvironmentProblem(f"{self.socket_path} does not speak NBD; see {self._log}")

    def _failure(self) -> errors.HyperbackError:
        """The error that stopped nbdkit: the plugin's own (same class), or nbdkit's last words."""
        try:
            kind, _, message = self._error.read_text().strip().partition("\t")
        except FileNotFoundError:
            kind, message = "", ""
        cls = getattr(errors, kind, None)
        if isinstance(cls, type) and issubclass(cls, errors.HyperbackError) and message:
            return cls(message)
        try:
            lines = [ln for ln in self._log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        last = lines[-1] if lines else f"exit status {self._process.returncode if self._process else '?'}"
        return errors.EnvironmentProblem(f"nbdkit stopped before serving snapshot {self.snapshot.id}: {last}")

    def stop(self) -> None:
        """Stop serving (connections are closed); idempotent. No process or socket is left."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s: nbdkit ignored SIGTERM for %.0fs; killing it", self, STOP_TIMEOUT)
                process.kill()
                process.wait()
        elif process is not None:
            process.wait()
        for path in (self.socket_path, self._pidfile, self._error):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if process is not None and process.returncode in (0, -signal.SIGTERM):
            with contextlib.suppress(FileNotFoundError):
                self._log.unlink()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


__all__ = ["Exportable", "SnapshotExport"]
