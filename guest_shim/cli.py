"""``hyperback-shim``: ask the host for backups and restores from inside the VM.

::

    hyperback-shim backup [SERIAL ...] [--all] [-d DEST] [-p POLICY] [--no-quiesce] [--timeout S]
    hyperback-shim restore SERIAL [-s SNAPSHOT] [--mode new-disk|in-place] [-d DEST]
    hyperback-shim status JOB
    hyperback-shim list [SERIAL] [-d DEST]
    hyperback-shim see SNAPSHOT --disk SERIAL [--mount DIR] [--partition N] [-d DEST]
    hyperback-shim release SERIAL
    hyperback-shim serve [--socket PATH] [--port NAME|PATH] [--group GROUP]
    hyperback-shim install-service [--root DIR] [--port NAME] [--no-start]

Common options (before or after the command): ``--json`` (one JSON object on stdout),
``-c/--config FILE``, ``-v`` (progress and steps), ``--debug`` (wire traces, tracebacks).

Exit codes (``EXIT_CODES``; each ShimError class carries its own ``exit_code``):

====  =========================================================================
0     success
1     the job ran and failed (Failed)
2     usage or configuration error (bad option, bad serial, bad config file)
3     the host rejected the request (Rejected: rate-limited, unknown-disk, ...)
4     the host is not reachable (HostNotConnected: no port, port busy, host agent not
      connected, went away; a started job may still finish: ask ``status JOB``)
5     timed out waiting for the host (TimedOut)
6     protocol error (the host or serve spoke something unexpected)
7     another shim error (e.g. a file system could not be frozen)
70    internal error (a bug; rerun with --debug for the traceback)
130   interrupted (SIGINT); 143: terminated (SIGTERM)
====  =========================================================================

Errors are one line on stderr, never a traceback (except with --debug for internal errors).
The host's commands use other codes for 1, 3 and 4: docs/exit-codes.md says why.
No argparse Namespace leaves this module: options become frozen dataclasses here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

from . import client as client_mod
from .config import DEFAULT_HOOK_DIR, ShimConfig, check_port_spec, load_config, parse_policy
from .errors import ConfigError, ShimError
from .port import UNIX_PREFIX
from .protocol import ALL, LATEST, Policy, RestoreMode, SnapshotInfo, clean_text

log = logging.getLogger(__name__)

PROG = "hyperback-shim"
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_CODES = {
    0: "success",
    1: "the job failed",
    2: "usage or configuration error",
    3: "rejected by the host",
    4: "host not reachable",
    5: "timed out",
    6: "protocol error",
    7: "other shim error",
    70: "internal error",
    130: "interrupted",
    143: "terminated",
}


class _UsageError(Exception):
    pass


class _Terminated(BaseException):
    """Raised by the SIGTERM handler so that ``finally`` blocks (thaw!) run."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see {self.prog} --help)")


# --- options, parsed once ---------------------------------------------------------------------


@dataclass(frozen=True)
class Common:
    json: bool = False
    config: str | None = None
    verbose: bool = False
    debug: bool = False


@dataclass(frozen=True)
class BackupOptions:
    targets: str | tuple[str, ...] | None
    destination: str | None
    policy: Policy | None
    quiesce: bool | None
    timeout: float | None
    paths: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RestorePathsOptions:
    paths: tuple[str, ...]
    to: str
    snapshot: str
    destination: str | None
    timeout: float | None


@dataclass(frozen=True)
class RestoreOptions:
    target: str
    snapshot: str
    mode: RestoreMode
    destination: str | None
    timeout: float | None


@dataclass(frozen=True)
class StatusOptions:
    job: str


@dataclass(frozen=True)
class ListOptions:
    target: str | None
    destination: str | None


@dataclass(frozen=True)
class SeeOptions:
    snapshot: str
    disk: str
    mount: str | None
    partition: int | None
    destination: str | None
    timeout: float | None


@dataclass(frozen=True)
class ReleaseOptions:
    serial: str


@dataclass(frozen=True)
class ServeOptions:
    socket: str | None
    port: str | None
    group: str | None


@dataclass(frozen=True)
class InstallServiceOptions:
    root: str
    port: str | None
    start: bool


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object"
    )
    common.add_argument(
        "-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
        help="configuration file (default $HYPERBACK_SHIM_CONFIG or /etc/hyperback/shim.conf)",
    )
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="say more")
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="wire traces and tracebacks"
    )

    codes = "\n".join(f"  {code:<4} {what}" for code, what in EXIT_CODES.items())
    parser = _Parser(
        prog=PROG,
        parents=[common],
        description="Ask the host for backups and restores of this VM's disks. Only the request "
        "leaves the VM, over its virtio-serial channel; the host reads the disks itself.",
        epilog=f"exit codes:\n{codes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {client_mod.SHIM_VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("backup", parents=[common], help="back up disks, or paths, of this VM",
                       description="Back up disks of this VM (by serial), or with --paths only those "
                       "paths of one file system (a file-level snapshot), and wait for the result.")
    p.add_argument(
        "targets", nargs="*", metavar="SERIAL", help="disk serials (default: from the config, else all)"
    )
    p.add_argument("--all", action="store_true", help="every disk of this VM")
    p.add_argument("--paths", nargs="+", metavar="PATH",
                   help="only these files and folders (all on one file system of a disk with a serial); "
                        "always stored whole, unchanged files deduplicated")
    p.add_argument("-d", "--destination", metavar="NAME", help="a destination the host knows")
    p.add_argument("-p", "--policy", choices=[x.value for x in Policy], help="default: from the config")
    p.add_argument("--no-quiesce", dest="quiesce", action="store_false", default=None,
                   help="do not freeze file systems for the backup")
    p.add_argument("--timeout", type=_positive, metavar="SECONDS", help="give up after this long")

    p = sub.add_parser("restore", parents=[common], help="restore a disk into a new disk",
                       description="Restore a disk from a snapshot. new-disk (default): the host "
                       "attaches the restored image as an additional disk. in-place is refused "
                       "while the VM runs: shut it down and run `hyperback restore` on the host.")
    p.add_argument("target", metavar="SERIAL", help="the disk to restore")
    p.add_argument("-s", "--snapshot", default=LATEST, metavar="ID", help="snapshot id (default: latest)")
    p.add_argument("--mode", choices=[x.value for x in RestoreMode], default=RestoreMode.NEW_DISK.value)
    p.add_argument("-d", "--destination", metavar="NAME", help="the destination holding the snapshot")
    p.add_argument("--timeout", type=_positive, metavar="SECONDS", help="give up after this long")

    p = sub.add_parser("restore-paths", parents=[common], help="restore paths from a backup of paths",
                       description="Restore files and folders from a backup of paths (`backup --paths`) "
                       "of their file system, below a folder, each at its path in this VM (--to / "
                       "puts them back in place, replacing what is there). The host attaches the "
                       "snapshot read-only for the call; nothing else crosses the VM's boundary.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders, as this VM names them")
    p.add_argument("--to", required=True, metavar="DIR", help="write below this folder")
    p.add_argument("-s", "--snapshot", default=LATEST, metavar="ID",
                   help="a snapshot of paths (from `list`; default: the latest of their file system)")
    p.add_argument("-d", "--destination", metavar="NAME", help="the destination holding the snapshot")
    p.add_argument("--timeout", type=_positive, metavar="SECONDS", help="give up after this long")

    p = sub.add_parser("status", parents=[common], help="show a job's state")
    p.add_argument("job", metavar="JOB", help="the job id printed by backup or restore")

    p = sub.add_parser("list", parents=[common], help="list this VM's snapshots")
    p.add_argument("target", nargs="?", metavar="SERIAL", help="only this disk")
    p.add_argument("-d", "--destination", metavar="NAME", help="only this destination")

    p = sub.add_parser("see", parents=[common], help="see a snapshot of a disk as a read-only disk",
                       description="Have the host attach a snapshot of one of this VM's disks as a "
                       "read-only disk (no restore first), and with --mount mount it read-only. "
                       "Give it back with `release SERIAL`; the host also takes it back after its "
                       "time limit and when the VM stops.")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id (from `list`) or latest")
    p.add_argument("--disk", required=True, metavar="SERIAL", help="the disk the snapshot is of")
    p.add_argument("--mount", metavar="DIR", help="mount its file system read-only here")
    p.add_argument("--partition", type=int, metavar="N", help="the partition to mount (if several)")
    p.add_argument("-d", "--destination", metavar="NAME", help="the destination holding the snapshot")
    p.add_argument("--timeout", type=_positive, metavar="SECONDS", help="give up after this long")

    p = sub.add_parser("release", parents=[common], help="give a seen snapshot's disk back",
                       description="Unmount the file systems of a seen snapshot's disk and have the "
                       "host unplug it.")
    p.add_argument("serial", metavar="SERIAL", help="the disk's serial, as `see` printed it")

    p = sub.add_parser("serve", parents=[common], help="own the port and serve local applications",
                       description="Own the virtio-serial port and serve local applications over a "
                       "unix socket; answer the host's freeze/thaw. Runs until SIGTERM/SIGINT.")
    p.add_argument("--socket", metavar="PATH", help="socket path (default from the config)")
    p.add_argument("--port", metavar="NAME|PATH", help="port name or device (default from the config)")
    p.add_argument("--group", metavar="GROUP", help="group that may use the socket")

    p = sub.add_parser("install-service", parents=[common],
                       help="run serve under systemd when the port appears",
                       description="Write the systemd unit of `serve` (ExecStart: this shim, by absolute "
                       "path) and the udev rule that starts it when the host's virtio-serial port "
                       "appears; create the freeze hook folder. Without --root, reload systemd and udev "
                       "so that the service starts now if the port is there.")
    p.add_argument("--root", default="/", metavar="DIR", help="install into this root (default /)")
    p.add_argument("--port", metavar="NAME", help="the port's name (default from the config)")
    p.add_argument("--no-start", dest="start", action="store_false", help="only write the files")
    return parser


def _options(args: argparse.Namespace) -> tuple[Common, str, Any]:
    common = Common(
        json=getattr(args, "json", False),
        config=getattr(args, "config", None),
        verbose=getattr(args, "verbose", False),
        debug=getattr(args, "debug", False),
    )
    cmd = args.command
    opts: Any
    if cmd == "backup":
        if args.all and args.targets:
            raise _UsageError("give disk serials or --all, not both")
        if args.paths and (args.all or args.targets):
            raise _UsageError("give --paths alone: the disk is the one that holds them")
        targets: str | tuple[str, ...] | None = ALL if args.all else (tuple(args.targets) or None)
        policy = parse_policy(args.policy) if args.policy else None
        paths = tuple(args.paths) if args.paths else None
        opts = BackupOptions(targets, args.destination, policy, args.quiesce, args.timeout, paths)
    elif cmd == "restore-paths":
        opts = RestorePathsOptions(tuple(args.paths), args.to, args.snapshot, args.destination, args.timeout)
    elif cmd == "restore":
        mode = RestoreMode(args.mode)
        opts = RestoreOptions(args.target, args.snapshot, mode, args.destination, args.timeout)
    elif cmd == "status":
        opts = StatusOptions(args.job)
    elif cmd == "list":
        opts = ListOptions(args.target, args.destination)
    elif cmd == "see":
        opts = SeeOptions(
            args.snapshot, args.disk, args.mount, args.partition, args.destination, args.timeout
        )
    elif cmd == "release":
        opts = ReleaseOptions(args.serial)
    elif cmd == "install-service":
        opts = InstallServiceOptions(args.root, args.port, args.start)
    else:
        opts = ServeOptions(args.socket, args.port, args.group)
    return common, cmd, opts


# --- output -----------------------------------------------------------------------------------


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _print_result(result: client_mod.JobResult) -> None:
    how = "quiesced" if result.quiesced else "not quiesced"
    state = "done" if result.ok else "FAILED"
    extra = f", {how}" if result.op.value == "backup" else ""
    took = f"{result.seconds:.1f} s"
    print(f"job {result.job}: {result.op.value} {state} in {took}, {_size(result.bytes)}{extra}")
    for d in result.disks:
        if d.new_serial:
            source = d.snapshot or "?"
            print(f"  {d.serial} -> new disk {d.new_serial} from snapshot {source} ({_size(d.bytes)})")
        else:
            cd = d.change_detection.value if d.change_detection else "-"
            print(f"  {d.serial}  snapshot {d.snapshot or '-'}  {_size(d.bytes)}  {cd}")
    if result.error is not None:
        print(f"  error: {result.error.code.value}: {result.error.message}")


def _print_status(st: client_mod.JobStatus) -> None:
    if st.result is not None:
        _print_result(st.result)
        return
    pct = f" {100 * st.done / st.total:.0f}%" if st.total else ""
    print(f"job {st.job}: {st.state}{pct} ({_size(st.done)} of {_size(st.total) if st.total else '?'})")


def _print_snapshots(snaps: client_mod.SnapshotList) -> None:
    rows = [("ID", "DISK", "CREATED (UTC)", "POLICY", "READ", "DESTINATION")]
    for s in snaps:
        kind = s.policy.value if s.partition is None else f"paths (partition {s.partition})"
        rows.append((s.id, s.serial, _utc(s), kind, _size(s.bytes), s.destination))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    if snaps.truncated:
        print("(more snapshots exist than the host could list)")


def _utc(s: SnapshotInfo) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.created))


def _emit_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, sort_keys=False))


def _fail(common: Common, code: int, message: str, kind: str, exc: BaseException | None = None) -> int:
    """One line on stderr; with --json also {"ok": false, "exit", "error": {...}} on stdout."""
    line = clean_text(" ".join(message.split()), 2000)
    print(f"{PROG}: error: {line}", file=sys.stderr)
    if common.json:
        err: dict[str, Any] = {"type": kind, "message": line}
        wire_code = getattr(exc, "code", None)
        if isinstance(wire_code, str):
            err["code"] = wire_code
        out: dict[str, Any] = {"ok": False, "exit": code, "error": err}
        job = getattr(exc, "job", None)
        if isinstance(job, str):
            out["job"] = job
        _emit_json(out)
    return code


def _output(common: Common, data: dict[str, Any], show: Any) -> int:
    if common.json:
        _emit_json({"ok": True, **data})
    else:
        show()
    return EXIT_OK


# --- commands ---------------------------------------------------------------------------------


def _progress_logger(status: client_mod.JobStatus) -> None:
    pct = f"{100 * status.done / status.total:.0f}%" if status.total else f"{_size(status.done)}"
    log.info("job %s: %s %s", status.job, status.state, pct)


def _run(common: Common, cmd: str, opts: Any, config: ShimConfig) -> int:
    if isinstance(opts, BackupOptions) and opts.paths is not None:
        from . import paths as paths_mod

        result = paths_mod.backup_paths(opts.paths, opts.destination, quiesce=opts.quiesce,
                                        timeout=opts.timeout, on_progress=_progress_logger, config=config)
        return _output(common, result.to_dict(), lambda: _print_result(result))
    if isinstance(opts, RestorePathsOptions):
        return _restore_paths(common, opts, config)
    if isinstance(opts, BackupOptions):
        result = client_mod.backup(
            opts.targets, opts.destination, opts.policy, quiesce=opts.quiesce, timeout=opts.timeout,
            on_progress=_progress_logger, config=config,
        )
        return _output(common, result.to_dict(), lambda: _print_result(result))
    if isinstance(opts, RestoreOptions):
        result = client_mod.restore(
            opts.target, opts.snapshot, mode=opts.mode, destination=opts.destination, timeout=opts.timeout,
            on_progress=_progress_logger, config=config,
        )
        return _output(common, result.to_dict(), lambda: _print_result(result))
    if isinstance(opts, StatusOptions):
        st = client_mod.status(opts.job, config=config)
        return _output(common, st.to_dict(), lambda: _print_status(st))
    if isinstance(opts, ListOptions):
        snaps = client_mod.list_snapshots(opts.target, destination=opts.destination, config=config)
        return _output(common, snaps.to_dict(), lambda: _print_snapshots(snaps))
    if isinstance(opts, SeeOptions):
        return _see(common, opts, config)
    if isinstance(opts, ReleaseOptions):
        return _release(common, opts, config)
    if isinstance(opts, InstallServiceOptions):
        return _install_service(common, opts, config)
    assert isinstance(opts, ServeOptions)
    return _serve(opts, config)


SEE_DISK_WAIT = 60.0  # seconds for the hot-plugged disk to appear (PCI hotplug under emulation is slow)


def _see(common: Common, opts: SeeOptions, config: ShimConfig) -> int:
    from . import seen as seen_mod

    if opts.mount is not None and not opts.mount.startswith("/"):
        raise ConfigError(f"--mount {opts.mount!r} is not an absolute path")
    got = client_mod.see(opts.disk, opts.snapshot, destination=opts.destination, timeout=opts.timeout,
                         config=config)
    try:
        name = seen_mod.wait_for_disk(got.serial, time.monotonic() + SEE_DISK_WAIT, sys_root=config.sysfs)
        device = f"/dev/{name}"
        if opts.mount is not None:
            device = seen_mod.filesystem_device(name, opts.partition, sys_root=config.sysfs)
            seen_mod.mount_readonly(device, opts.mount)
    except ShimError:
        with contextlib.suppress(ShimError):  # nothing of it is in use: give it back at once
            client_mod.release(got.serial, config=config)
        raise
    got = dataclasses.replace(got, device=device, mount=opts.mount)

    def show() -> None:
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(got.expires))
        where = f", mounted read-only on {got.mount}" if got.mount else ""
        print(f"snapshot {got.snapshot} of disk {got.disk}: {device} (serial {got.serial}, "
              f"{_size(got.bytes)}, read-only){where}")
        print(f"give it back with `{PROG} release {got.serial}`; the host takes it back at {until}")

    return _output(common, got.to_dict(), show)


def _restore_paths(common: Common, opts: RestorePathsOptions, config: ShimConfig) -> int:
    from . import paths as paths_mod

    done = paths_mod.restore_paths(opts.paths, opts.to, opts.snapshot, destination=opts.destination,
                                   timeout=opts.timeout, config=config)

    def show() -> None:
        print(f"restored {done.files} file(s), {done.directories} folder(s), {done.links} link(s), "
              f"{_size(done.bytes)} below {opts.to}")
        for line in done.skipped:
            print(f"  skipped {line}")
        for line in done.in_the_way:
            print(f"  NOT restored: {line}")

    if not done.in_the_way:
        return _output(common, done.to_dict(), show)
    if not common.json:
        show()
    return _fail(common, 1, f"{len(done.in_the_way)} entries were not restored: something else is where "
                 "they go (listed above); move it, or restore elsewhere", "RestoreError")


def _release(common: Common, opts: ReleaseOptions, config: ShimConfig) -> int:
    from . import seen as seen_mod

    unmounted = seen_mod.unmount_disk(opts.serial, sys_root=config.sysfs)
    client_mod.release(opts.serial, config=config)

    def show() -> None:
        what = f" (unmounted {', '.join(unmounted)})" if unmounted else ""
        print(f"released {opts.serial}{what}")

    return _output(common, {"serial": opts.serial, "unmounted": unmounted}, show)


def _install_service(common: Common, opts: InstallServiceOptions, config: ShimConfig) -> int:
    from . import service

    port = opts.port or config.port
    if opts.port:
        check_port_spec(opts.port, "--port")
    if "/" in port or port.startswith(UNIX_PREFIX):
        raise ConfigError(f"install-service needs a port name (as the host names the channel), not {port!r}")
    if not opts.root.startswith("/"):
        raise ConfigError(f"--root {opts.root!r} is not an absolute path")
    hook_dir = config.fsfreeze_hook_dir or DEFAULT_HOOK_DIR
    done = service.install(root=opts.root, port_name=port, hook_dir=hook_dir, start=opts.start)

    def show() -> None:
        print(f"wrote {done.unit} (ExecStart: {' '.join(done.exec_start)} serve)")
        print(f"wrote {done.rule} (port {port})")
        print(f"freeze hooks: {done.hook_dir}")
        if done.started:
            print("systemd and udev reloaded: the service runs while the port is there")

    return _output(common, done.to_dict(), show)


def _serve(opts: ServeOptions, config: ShimConfig) -> int:
    from .serve import Server

    changes: dict[str, str] = {}
    if opts.socket:
        if not opts.socket.startswith("/"):
            raise ConfigError(f"--socket {opts.socket!r} is not an absolute path")
        changes["socket"] = opts.socket
    if opts.port:
        changes["port"] = check_port_spec(opts.port, "--port")
    if opts.group:
        changes["socket_group"] = opts.group
    config = dataclasses.replace(config, **changes)  # type: ignore[arg-type]
    server = Server(config)
    stops = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stops
        stops += 1
        log.info("signal %d: stopping", signum)
        server.stop()
        if stops > 1:
            raise _Terminated()

    with _handling_signals(on_signal, signal.SIGTERM, signal.SIGINT):
        server.serve_forever()
    return EXIT_OK


def _setup_logging(common: Common, cmd: str) -> None:
    level = logging.DEBUG if common.debug else logging.INFO if common.verbose else logging.WARNING
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s" if cmd == "serve" else f"{PROG}: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("guest_shim")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


@contextlib.contextmanager
def _handling_signals(handler: Any, *signums: signal.Signals) -> Iterator[None]:
    """Install ``handler`` for ``signums`` and put the previous handlers back on exit.

    main() is also called in-process (by tools and tests): a handler left behind would outlive
    the command, and a process forked later would run it, raising in code that never expected it.
    """
    previous = {sig: signal.signal(sig, handler) for sig in signums}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    common = Common()
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help and --version
            return e.code if isinstance(e.code, int) else EXIT_OK
        common, cmd, opts = _options(args)
        _setup_logging(common, cmd)
        config = load_config(common.config)
        if cmd == "serve":  # serve handles its own signals
            return _run(common, cmd, opts, config)
        with _handling_signals(_on_sigterm, signal.SIGTERM):
            return _run(common, cmd, opts, config)
    except _UsageError as e:
        return _fail(common, EXIT_USAGE, str(e), "UsageError")
    except ShimError as e:
        return _fail(common, e.exit_code, str(e), type(e).__name__, e)
    except KeyboardInterrupt:
        return _fail(common, EXIT_INTERRUPTED, "interrupted", "Interrupted")
    except _Terminated:
        return _fail(common, EXIT_TERMINATED, "terminated", "Terminated")
    except BrokenPipeError:
        return EXIT_OK  # stdout closed early (| head)
    except Exception as e:
        if common.debug:
            raise
        message = f"internal error: {type(e).__name__}: {e} (rerun with --debug)"
        return _fail(common, EXIT_INTERNAL, message, "InternalError")
if __name__ == "__main__":
    raise SystemExit(main())
