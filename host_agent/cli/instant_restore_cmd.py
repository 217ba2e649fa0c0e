"""hyperback instant-restore: start a VM from a snapshot at once; its disk is copied back behind it.

The work is ``host_agent.agent.instant``'s; this module only reads the arguments and shows the
progress, either running the recovery itself (``--repo``) or asking the agent (its operator API).
"""
from __future__ import annotations

import argparse
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import grpc

from host_agent import errors, hypervisor
from host_agent._proto.hyperback.v1 import operator_pb2 as pb
from host_agent.agent.instant import (
    FORMATS,
    InstantRecovery,
    Phase,
    Request,
    Status,
    instant_restore,
    new_identity,
)
from host_agent.cli.agentapi import add_agent_argument, call, operator
from host_agent.cli.progress import bar_for, human
from host_agent.storage.repository import Repository

WATCH_TIMEOUT = 7 * 24 * 3600.0  # a copy of many TiB at a low cap: the watch is not what limits it


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "instant-restore", help="run a VM from a snapshot at once, copying its disk back behind it",
        description="Start domain NAME (the definition of --xml, with a new UUID and new MAC addresses) "
                    "with its disk DEV served from SNAPSHOT over NBD under a local copy-on-write overlay: "
                    "it runs within seconds whatever the disk's size. QEMU then copies the disk to PATH "
                    "in the background and the domain is pivoted onto it; the export stops. If the copy "
                    "fails the VM keeps running on the overlay, and the command says what to do. "
                    "With --repo this command runs the recovery and must stay until the pivot; without, "
                    "the agent runs it as a job ('hyperback job list').",
        epilog="Exit codes: 0 the domain runs on PATH; 2 bad arguments, snapshot or definition; 3 the "
               "copy failed (the VM runs on the overlay) or the system refused.")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id, prefix, or NAME@latest")
    p.add_argument("--as", dest="name", required=True, metavar="NAME", help="the new domain's name")
    p.add_argument("--to", dest="target", required=True, metavar="PATH",
                   help="where the disk is copied to (a file that must not exist)")
    p.add_argument("--format", choices=FORMATS, default="raw", help="the target's format (default raw)")
    p.add_argument("--xml", required=True, metavar="FILE", type=Path,
                   help="the domain definition to start (e.g. 'virsh dumpxml' of the original)")
    p.add_argument("--disk", metavar="DEV", help="the disk the snapshot becomes (default: the first disk)")
    p.add_argument("--bandwidth", type=int, default=0, metavar="BYTES",
                   help="cap the copy at BYTES per second (default: none)")
    p.add_argument("--transient", action="store_true", help="do not define the domain, only start it")
    p.add_argument("--repo", metavar="REPO", help="run the recovery here, from this repository")
    p.add_argument("--connect", default="qemu:///system", metavar="URI", help="libvirt URI (with --repo)")
    p.add_argument("--run-dir", type=Path, default=Path("/var/lib/hyperback/instant"), metavar="DIR",
                   help="where the overlay and the export's socket live (with --repo)")
    p.add_argument("--destination", default="", help="the agent's destination holding SNAPSHOT (default: its "
                                                     "default destination; without --repo)")
    p.add_argument("--json", action="store_true", help="print one JSON result for scripts")
    add_agent_argument(p)
    p.set_defaults(run=run)


def _definition(args: argparse.Namespace) -> tuple[str, str]:
    """The new domain's XML and the disk it recovers, from --xml, --as and --disk."""
    try:
        text = args.xml.read_text()
        root = ET.fromstring(text)
    except OSError as e:
        raise errors.UsageError(f"cannot read {args.xml}: {e.strerror}") from e
    except ET.ParseError as e:
        raise errors.UsageError(f"{args.xml} is not a domain definition: {e}") from e
    disk = args.disk
    if disk is None:
        targets = [d.find("target") for d in root.iterfind("./devices/disk")
                   if d.get("device", "disk") == "disk"]
        disk = next((t.get("dev") for t in targets if t is not None and t.get("dev")), None)
        if disk is None:
            raise errors.UsageError(f"{args.xml} has no disk: the snapshot needs one to become (--disk)")
    return new_identity(text, args.name), disk


def run(args: argparse.Namespace) -> int:
    if args.bandwidth < 0:
        raise errors.UsageError("--bandwidth is bytes per second, 0 or more")
    target = Path(args.target).absolute()
    if target.exists():
        raise errors.UsageError(f"{target} exists: choose another --to or remove it first")
    xml, disk = _definition(args)
    request = Request(xml, disk, target, args.format, args.bandwidth, persistent=not args.transient)
    return _run_here(args, request) if args.repo else _run_by_agent(args, request)


def _report(args: argparse.Namespace, result: dict[str, Any], line: str) -> None:
    print(json.dumps(result) if args.json else line)


def _run_here(args: argparse.Namespace, request: Request) -> int:
    repo = Repository.open(args.repo)
    run_dir = args.run_dir / args.name
    recovery = instant_restore(hypervisor.connect(args.connect), repo, args.snapshot, request, run_dir)
    started = time.monotonic() - recovery.started_at
    if not args.json:
        print(f"{args.name} runs on snapshot {args.snapshot} after {started:.1f} s; "
              f"copying to {request.target}")
    status = follow_copy(recovery, args.json)
    result = {"domain": args.name, "phase": str(status.phase), "target": str(request.target),
              "running_after_seconds": round(started, 3), "message": status.message}
    if status.phase is Phase.PIVOTED:
        _report(args, result, f"{args.name} {status.message}")
        return 0
    _report(args, result, f"hyperback: error: {status.message}")
    serve_until_stopped(recovery, args.name)
    return errors.EnvironmentProblem.exit_code


def follow_copy(recovery: InstantRecovery, as_json: bool) -> Status:
    """Follow the background copy to its pivot or failure, with a progress bar on a terminal."""
    bar = bar_for("copy", as_json)

    def show(status: Status) -> None:
        if bar is not None and status.bytes_total:
            bar(status.bytes_done, status.bytes_total)
    try:
        return recovery.finish(show)
    finally:
        if bar is not None:
            bar.close()


def serve_until_stopped(recovery: InstantRecovery, name: str) -> None:
    """A failed copy: the domain reads its disk through this process's export until it stops."""
    print(f"hyperback: {name} runs on the overlay: this command serves its disk until the domain stops "
          "(Ctrl-C stops the export, and the VM loses its disk)")
    try:
        while recovery.domain_running():
            time.sleep(1.0)
    finally:
        recovery.close()


def _run_by_agent(args: argparse.Namespace, request: Request) -> int:
    with operator(args) as (stub, address):
        job = call(stub.InstantRestore, pb.InstantRestoreRequest(
            snapshot=args.snapshot, destination=args.destination, domain_xml=request.domain_xml,
            disk=request.disk, target=str(request.target), format=request.fmt, bandwidth=request.bandwidth,
            transient=args.transient), address).job
        if not args.json:
            print(f"job {job.id}: instant recovery of {args.snapshot} as {args.name}")
        bar = bar_for("copy", args.json)
        last = None
        try:
            for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=WATCH_TIMEOUT):
                last = event
                if bar is not None and event.progress.bytes_total:
                    bar(event.progress.bytes_done, event.progress.bytes_total)
        except grpc.RpcError as e:
            raise errors.EnvironmentProblem(
                f"lost the agent at {address} while watching job {job.id} ({e.code().name}); the job goes "
                f"on: 'hyperback job list' shows it") from None
        finally:
            if bar is not None:
                bar.close()
    if last is None:
        raise errors.HyperbackError(f"the agent at {address} ended the watch of job {job.id} "
                                    "without an event")
    ok = last.state == pb.JOB_STATE_SUCCEEDED
    result = {"job": job.id, "domain": args.name, "state": pb.JobState.Name(last.state),
              "message": last.message}
    if ok:
        _report(args, result, f"{args.name} {last.message} ({human(last.progress.bytes_total)} copied)")
        return 0
    _report(args, result, f"hyperback: error: job {job.id}: {last.message}")
    return errors.EnvironmentProblem.exit_code
