"""hyperback list: the snapshots in a repository, chosen by name, time, label or policy, with their
labels, protection and the verdict of their latest boot verification (``hyperback verify-boot``)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from host_agent.cli.progress import human
from host_agent.model import Policy
from host_agent.storage.annotations import Annotation, Annotations
from host_agent.storage.repository import Repository
from host_agent.storage.selection import SnapshotFilter, parse_time
from host_agent.storage.snapshot import Snapshot
from host_agent.storage.verification import Verification


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "list", help="list snapshots",
        description="List snapshots, oldest first; every filter given must hold. PROT says whether "
                    "a snapshot is protected (hyperback protect), LABELS its labels (hyperback tag), "
                    "BOOT its latest boot verification (hyperback verify-boot): passed, failed, or - "
                    "for never; after NAME, '(compared: REASON)' when a backup with a base could not "
                    "read a dirty bitmap and compared every chunk (the snapshot's fallback).",
        epilog="--json prints an array, one object per snapshot: the fields of its snapshot document "
               "(docs/repository-format.md, 5.1) with 'labels' its labels now, plus 'note' (string), "
               "'protected' (bool) and 'verification' (the record of 5.4, or null). Fields may be "
               "added, never removed or changed in meaning.")
    p.add_argument("--repo", required=True, metavar="REPO", help="repository directory")
    p.add_argument("--name", metavar="NAME", help="only snapshots of this source name")
    p.add_argument("--since", metavar="WHEN", help="only snapshots taken at or after WHEN (UTC date or "
                                                   "date and time: 2026-12-01, 2026-12-01T13:30)")
    p.add_argument("--until", metavar="WHEN", help="only snapshots taken at or before WHEN (a bare date: "
                                                   "to the end of that day)")
    p.add_argument("--label", action="append", default=[], metavar="LABEL",
                   help="only snapshots with this label (repeatable: with all of them)")
    p.add_argument("--policy", choices=[x.value for x in Policy], help="only snapshots made so")
    p.add_argument("--json", action="store_true", help="print a JSON array for scripts (shape below)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    chosen = SnapshotFilter(args.name, parse_time(args.since) if args.since else None,
                            parse_time(args.until, end_of_day=True) if args.until else None,
                            tuple(args.label), Policy(args.policy) if args.policy else None)
    repo = Repository.open(args.repo)
    records = Annotations(repo.path).all()
    rows = [(s, records.get(s.id) or Annotation.of(s)) for s in repo.snapshots(args.name)]
    rows = [(s, note) for s, note in rows if chosen.matches(s, note)]
    verified = repo.verifications()
    if args.json:
        print(json.dumps([as_json(s, note, verified.get(s.id)) for s, note in rows]))
        return 0
    print(f"{'ID':16}  {'TIME (UTC)':19}  {'POLICY':12}  {'SIZE':>10}  {'NEW':>10}  {'PROT':4}  "
          f"{'LABELS':16}  {'BOOT':6}  NAME")
    for s, note in rows:
        record = verified.get(s.id)
        print(f"{s.id:16}  {s.time:%Y-%m-%d %H:%M:%S}  {s.policy.value:12}  {human(s.size):>10}  "
              f"{human(s.stats.bytes_new):>10}  {'yes' if note.protected else '-':4}  "
              f"{','.join(note.labels) or '-':16}  {record.result if record else '-':6}  {s.name}"
              + (f"  (compared: {s.fallback.reason})" if s.fallback else ""))
    return 0


def as_json(snap: Snapshot, note: Annotation, record: Verification | None) -> dict[str, Any]:
    """One snapshot as ``list --json`` prints it (the stable shape its --help states)."""
    return {**snap.to_json(), "labels": list(note.labels), "note": note.note, "protected": note.protected,
            "verification": None if record is None else record.to_json()}
