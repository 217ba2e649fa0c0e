"""hyperback check: check the references between snapshots, index and packs; with --repair, rebuild
the indexes that can be rebuilt from the packs."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from host_agent import errors
from host_agent.storage.repository import Repository


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check", help="check references (and repair indexes)",
        description="Check that every chunk a snapshot needs is indexed and every indexed pack exists "
                    "(fast: reads trees, not data; 'verify' reads the data). Exit 4 on a problem. "
                    "--repair rebuilds missing or damaged index files from their packs' records, cuts "
                    "an index down to the records a truncated pack still holds, drops the index of a "
                    "missing pack, and names the chunks still lost with the snapshots using them: a "
                    "later backup of the same source stores them again. Only index files change, "
                    "only with --yes, and never while another process works on the repository.")
    p.add_argument("--repo", required=True, metavar="REPO", help="repository directory")
    p.add_argument("--repair", action="store_true", help="say what a repair would do (a dry run)")
    p.add_argument("--yes", action="store_true", help="with --repair: do it")
    p.add_argument("--json", action="store_true", help="print one JSON report")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.yes and not args.repair:
        raise errors.UsageError("--yes goes with --repair: 'hyperback check --repair --yes'")
    if args.repair:
        return _repair(Repository.open(args.repo), args.yes, args.json)
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
    if not report.ok:
        print(f"'hyperback check --repo {args.repo} --repair' tells what can be repaired")
    return 0 if report.ok else 4


def _repair(repo: Repository, apply: bool, as_json: bool) -> int:
    from host_agent.storage.repair import repair

    report = repair(repo, apply)
    code = 4 if report.damaged_snapshots else 0
    if as_json:
        print(json.dumps({**asdict(report), "damaged_snapshots": list(report.damaged_snapshots)}))
        return code
    verb = {"rebuild": "rebuilt", "trim": "cut down", "drop": "deleted"} if apply else \
        {"rebuild": "would rebuild", "trim": "would cut down", "drop": "would delete"}
    for fix in report.fixes:
        removed = f", {len(fix.removed)} unreadable entries removed" if fix.removed else ""
        print(f"{verb[fix.action]} index {fix.pack} ({fix.reason}): {fix.entries} entries{removed}")
    for bad in report.lost:
        print(f"LOST chunk {bad.id} used by {', '.join(bad.snapshots)}")
    for sid in report.unreadable_snapshots:
        print(f"UNREADABLE snapshot {sid}: its tree cannot be read whole")
    after = "after it" if apply else "after the repair"
    if report.damaged_snapshots:
        print(f"{after}, {len(report.damaged_snapshots)} of {report.snapshots} snapshot(s) lack data: "
              f"{', '.join(report.damaged_snapshots)}; a backup of the same source re-supplies it")
    else:
        print(f"{after}, every one of {report.snapshots} snapshot(s) is whole")
    if report.fixes and not apply:
        print(f"nothing was changed: 'hyperback check --repo {repo.path} --repair --yes' does it")
    return code
