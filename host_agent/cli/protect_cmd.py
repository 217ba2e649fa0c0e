"""hyperback protect / unprotect: keep snapshots from being forgotten, by hand or by retention.

One module for both subcommands: they set the one flag of one record (docs/repository-format.md,
5.5), and each is the other's undo."""
from __future__ import annotations

import argparse
import json

from host_agent.cli.options import add_snapshot_specs, chosen_snapshots
from host_agent.cli.tag_cmd import describe
from host_agent.storage.annotations import Annotations, edit
from host_agent.storage.repository import Repository


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, protect in (("protect", True), ("unprotect", False)):
        p = sub.add_parser(
            name, help="protect snapshots from forget and prune" if protect else "lift a protection",
            description=("Protect each SNAPSHOT: 'hyperback forget' refuses it, and prune and "
                         "schedules' retention keep it (and the domain definition it names), "
                         "whatever their rules say. 'hyperback unprotect' lifts it."
                         if protect else
                         "Lift the protection of each SNAPSHOT: forget and prune treat it like any "
                         "other again."))
        p.add_argument("--repo", required=True, metavar="REPO", help="repository directory")
        p.add_argument("--json", action="store_true", help="print a JSON array of the snapshot ids")
        add_snapshot_specs(p)
        p.set_defaults(run=run, protect=protect)


def run(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    notes = Annotations(repo.path)
    chosen = chosen_snapshots(repo, args.snapshots)
    for snap in chosen:
        record = notes.get(snap)
        if record.protected != args.protect:
            record = edit(record, protected=args.protect)
            notes.write(record)
        if not args.json:
            print(describe(snap, record))
    if args.json:
        print(json.dumps([s.id for s in chosen]))
    return 0
