"""hyperback check: check the references between snapshots, index and packs."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from host_agent.storage.repository import Repository


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check", help="check references",
        description="Check that every chunk a snapshot needs is indexed and every indexed pack exists "
                    "(fast: reads trees, not data; 'verify' reads the data). Exit 4 on a problem.")
    p.add_argument("--repo", required=True, metavar="REPO", help="repository directory")
    p.add_argument("--json", action="store_true", help="print one JSON report")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = Repository.open(args.repo).check()
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}))
        return 0 if report.ok else 4
    for bad in report.missing:
        print(f"MISSING chunk {bad.id} used by {', '.join(bad.snapshots)}")
    for sid in report.unreadable_snapshots:
        print(f"UNREADABLE snapshot {sid}: its tree cannot be read whole")
    for name in report.packs_without_file:
        print(f"MISSING pack file {name} (its index exists)")
    print(f"checked {report.snapshots} snapshot(s), {report.chunks_referenced} referenced blob(s): "
          f"{'ok' if report.ok else 'PROBLEMS FOUND'}")
    return 0 if report.ok else 4
