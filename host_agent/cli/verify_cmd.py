"""hyperback verify: re-read and re-hash stored chunks."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from host_agent.cli.progress import human
from host_agent.storage.repository import Repository


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify", help="re-read and re-hash stored chunks",
        description="Read every stored chunk (or a sample), decompress and re-hash it; name each bad "
                    "chunk and the snapshots that use it. Exit 4 if any is bad.")
    p.add_argument("--repo", required=True, metavar="REPO", help="repository directory")
    p.add_argument("--sample", type=float, default=100.0, metavar="PCT",
                   help="percentage of chunks to check, chosen by id (default 100)")
    p.add_argument("--json", action="store_true", help="print one JSON report")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = Repository.open(args.repo).verify(args.sample)
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}))
    else:
        for bad in report.bad:
            used = ", ".join(bad.snapshots) or "no snapshot"
            print(f"BAD chunk {bad.id} {'possibly ' if bad.possibly else ''}used by {used}")
        for sid in report.unreadable_snapshots:
            print(f"DAMAGED snapshot {sid}: its map cannot be read whole, so it may use any bad chunk")
        print(f"verified {human(report.bytes_checked)} ({report.sample_percent:g}% sample) in "
              f"{report.seconds:.2f}s: {report.bad_total} bad chunk(s)")
    return 0 if report.ok else 4
