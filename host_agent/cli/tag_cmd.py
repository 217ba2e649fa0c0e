"""hyperback tag: show or change a snapshot's labels and note."""
from __future__ import annotations

import argparse
import json

from host_agent.cli.options import add_snapshot_specs, chosen_snapshots
from host_agent.storage.annotations import Annotation, Annotations, edit
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import Snapshot


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "tag", help="label snapshots and note why they matter",
        description="Add and remove labels of each SNAPSHOT, or set its note; with no change, show "
                    "them. A label is 1-64 letters, digits, '.', '_', ':' or '-' (at most 32 per "
                    "snapshot); 'hyperback list --label L' finds them; a note is one line of at most "
                    "1024 characters ('' clears it). 'hyperback backup --label' labels a new snapshot.")
    p.add_argument("--repo", required=True, metavar="REPO", help="repository directory")
    p.add_argument("--add", action="append", default=[], metavar="LABEL", help="add a label (repeatable)")
    p.add_argument("--remove", action="append", default=[], metavar="LABEL",
                   help="remove a label (repeatable)")
    p.add_argument("--note", metavar="TEXT", help="set the note ('' clears it)")
    p.add_argument("--json", action="store_true", help="print a JSON array of the annotations")
    add_snapshot_specs(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    notes = Annotations(repo.path)
    changing = bool(args.add or args.remove or args.note is not None)
    chosen = chosen_snapshots(repo, args.snapshots)
    # every change is checked before any is written: a bad label changes nothing
    edited = [(s, edit(notes.get(s), args.add, args.remove, args.note)) for s in chosen]
    if changing:
        for _, record in edited:
            notes.write(record)
    if args.json:
        print(json.dumps([_json(record) for _, record in edited]))
        return 0
    for snap, record in edited:
        print(describe(snap, record))
    return 0


def describe(snap: Snapshot, record: Annotation) -> str:
    labels = ", ".join(record.labels) or "none"
    protected = "; protected" if record.protected else ""
    note = f"; note: {record.note}" if record.note else ""
    return f"{snap.id} {snap.name}: labels {labels}{protected}{note}"


def _json(record: Annotation) -> dict[str, object]:
    return {"snapshot": record.snapshot, "labels": list(record.labels), "note": record.note,
            "protected": record.protected}
