"""hyperback restore-vm: bring a whole VM back from a backup run, as a new domain or in place."""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from host_agent import config, errors, hypervisor
from host_agent.agent.destinations import AnyRepository, Destinations
from host_agent.agent.instant import Phase
from host_agent.cli.instant_restore_cmd import follow_copy, serve_until_stopped
from host_agent.cli.progress import Bar, bar_for
from host_agent.restore import vm as restore_vm
from host_agent.storage.repository import ProgressFn, Repository

DEFAULT_RUN_DIR = Path("/var/lib/hyperback/instant")
NAME = "restore-vm"  # the module's name without its hyphen would be another command
DESCRIPTION = """\
Restore the VM a backup run saved: its definition (domain XML, NVRAM, TPM state, stored with
every backup) and the disk snapshots taken with it. SNAPSHOT-OR-JOB names the run: a snapshot id
(or prefix, or NAME@latest) of any of its disks or of its definition, or the id of the backup job
that made it.

--as NAME defines a new domain: new UUID, new MAC addresses, its disks restored into --to DIR as
NAME-DEV.img (raw) or NAME-DEV.qcow2, NVRAM and TPM state copied; a name libvirt knows is refused.
Writable disks the run did not back up are left out of the new domain (it must not share them).

--as NAME --instant starts the new domain at once, its disk served from the snapshot under a local
overlay, while the disk is copied to --to DIR behind it; the domain is then pivoted onto the copy
(instant recovery). One-disk runs only. The command stays until the pivot.

--in-place replaces the disks of the domain the run came from (same UUID, name, MACs): each disk is
restored beside its image and renamed over it. The domain must be shut off (or give --stop). Its
hyperback checkpoints are dropped: the next backup reads every disk once.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(NAME, help="restore a whole VM (definition and disks)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", metavar="REPO", help="repository directory")
    where.add_argument("--destination", metavar="NAME",
                       help="a destination of the agent config (local, or behind a media service)")
    p.add_argument("--config", metavar="PATH", type=Path, default=None,
                   help="agent config (default /etc/hyperback/agent.toml or $HYPERBACK_CONFIG)")
    p.add_argument("--connect", metavar="URI", default=None,
                   help="libvirt URI (default: the agent config's libvirt_uri, qemu:///system)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--as", dest="new_name", metavar="NAME", help="define a new domain of this name")
    how.add_argument("--in-place", action="store_true",
                     help="replace the disks of the domain the run came from (needs "
                          "--yes-i-want-to-replace-the-disks)")
    p.add_argument("--to", metavar="DIR", type=Path, default=None,
                   help="--as: directory of the new images and files (default: the current directory)")
    p.add_argument("--format", choices=restore_vm.FORMATS, default="raw",
                   help="--as: image format of the restored disks (default raw; in place keeps each "
                        "disk's format)")
    p.add_argument("--yes-i-want-to-replace-the-disks", dest="confirmed", action="store_true",
                   help="--in-place: confirm that the domain's current disks are to be overwritten")
    p.add_argument("--stop", action="store_true",
                   help="--in-place: shut a running domain down first (ACPI) and wait for it")
    p.add_argument("--stop-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="--stop: how long to wait for the shutdown (default 120)")
    p.add_argument("--start", action="store_true", help="start the domain once restored")
    p.add_argument("--instant", action="store_true",
                   help="--as: start the domain at once on the snapshot and copy its disk behind it "
                        "(one-disk runs)")
    p.add_argument("--bandwidth", type=int, default=0, metavar="BYTES",
                   help="--instant: cap the copy at BYTES per second (default: none)")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, metavar="DIR",
                   help="--instant: where the overlay and the export's socket live until the pivot "
                        "(default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON result for scripts")
    p.add_argument("spec", metavar="SNAPSHOT-OR-JOB", help="a snapshot of the run, or its backup job id")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _check(args)
    with _repository(args) as repo:
        found = restore_vm.find_run(repo, args.spec)
        uri = args.connect or config.load(args.config).libvirt_uri
        conn = hypervisor.connect(uri)
        bars: list[Bar] = []
        try:
            progress_for = _progress(args.json, bars)
            if args.instant:
                return _instant(args, conn, repo, found)
            if args.in_place:
                result = restore_vm.restore_in_place(
                    conn, repo, found, stop=args.stop, start=args.start, stop_timeout=args.stop_timeout,
                    progress_for=progress_for)
            else:
                to_dir = (args.to or Path.cwd()).absolute()
                result = restore_vm.restore_as(conn, repo, found, args.new_name, to_dir, args.format,
                                               progress_for=progress_for, start=args.start)
        finally:
            for bar in bars:
                bar.close()
            with contextlib.suppress(errors.HypervisorError):
                conn.close()
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    what = "replaced the disks of" if args.in_place else "defined"
    print(f"{what} {result.name} ({result.uuid}) from run {result.run} in {result.seconds:.2f}s"
          f"{', started' if result.started else ''}")
    for disk in result.disks:
        print(f"  {disk['dev']}: {disk['path']} ({disk['format']}) from snapshot {disk['snapshot']}")
    for path in result.files:
        print(f"  file: {path}")
    if result.dropped:
        print(f"  left out (not in the backup): {', '.join(result.dropped)}")
    return 0


def _check(args: argparse.Namespace) -> None:
    """Options that belong to the other mode are mistakes, said before anything is read."""
    if args.in_place:
        if not args.confirmed:
            raise errors.UsageError("--in-place overwrites the domain's disks: add "
                                    "--yes-i-want-to-replace-the-disks to confirm")
        if args.to is not None or args.format != "raw":
            raise errors.UsageError("--to and --format go with --as; in place each disk keeps its image "
                                    "and format")
    elif args.stop or args.confirmed:
        raise errors.UsageError("--stop and --yes-i-want-to-replace-the-disks go with --in-place")
    if args.in_place and args.instant:
        raise errors.UsageError("--instant goes with --as: in place, the domain's own disks are replaced")
    if not args.instant and (args.bandwidth or args.run_dir != DEFAULT_RUN_DIR):
        raise errors.UsageError("--bandwidth and --run-dir go with --instant")
    if args.bandwidth < 0:
        raise errors.UsageError("--bandwidth is bytes per second, 0 or more")


def _instant(args: argparse.Namespace, conn: hypervisor.Guarded, repo: AnyRepository,
             found: restore_vm.Run) -> int:
    """--as NAME --instant: the domain runs on the snapshot, then on its copy in --to after the pivot."""
    to_dir = (args.to or Path.cwd()).absolute()
    recovery, result = restore_vm.restore_instant(conn, repo, found, args.new_name, to_dir,
                                                  args.run_dir / args.new_name, args.format, args.bandwidth)
    running = time.monotonic() - recovery.started_at
    path = result.disks[0]["path"]
    if not args.json:
        print(f"{result.name} ({result.uuid}) runs on snapshot {result.disks[0]['snapshot']} after "
              f"{running:.1f} s; copying to {path}")
    status = follow_copy(recovery, args.json)
    doc = {**result.to_json(), "phase": str(status.phase), "message": status.message,
           "running_after_seconds": round(running, 3)}
    if status.phase is Phase.PIVOTED:
        print(json.dumps(doc) if args.json else f"{result.name} {status.message}")
        return 0
    print(json.dumps(doc) if args.json else f"hyperback: error: {status.message}")
    serve_until_stopped(recovery, result.name)
    return errors.EnvironmentProblem.exit_code


@contextlib.contextmanager
def _repository(args: argparse.Namespace) -> Iterator[AnyRepository]:
    if args.repo is not None:
        yield Repository.open(args.repo)
        return
    agent_config = config.load(args.config)
    if args.destination not in agent_config.destinations:
        raise errors.UsageError(f"destination {args.destination!r} is not in the agent config; it has "
                                f"{', '.join(sorted(agent_config.destinations))}")
    repo = Destinations(agent_config).repository(args.destination)
    try:
        yield repo
    finally:
        close = getattr(repo, "close", None)
        if close is not None:
            close()


def _progress(quiet: bool, bars: list[Bar]) -> restore_vm.ProgressFor:
    def progress_for(label: str) -> ProgressFn | None:
        if bars:
            bars[-1].close()  # the previous step's line is finished
            bars.clear()
        bar = bar_for(label, quiet)
        if bar is not None:
            bars.append(bar)
        return bar
    return progress_for
