"""hyperback backup: back up an image file or block device as a snapshot."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from host_agent.cli.progress import bar_for, human
from host_agent.model import Policy
from host_agent.storage.extents import parse_change_file
from host_agent.storage.repository import Repository


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "backup", help="back up an image or block device",
        description="Back up SOURCE (a raw image file or a block device) as a new snapshot of NAME. "
                    "full reads everything; incremental stores what changed since the latest snapshot "
                    "of NAME, differential since the latest full one. Holes are never read.")
    p.add_argument("--repo", required=True, metavar="REPO", help="repository directory")
    p.add_argument("--name", required=True, metavar="NAME", help="source name, e.g. vm1/vda")
    p.add_argument("--policy", choices=[x.value for x in Policy], default=Policy.FULL.value,
                   help="default: full")
    p.add_argument("--changes", type=Path, metavar="FILE",
                   help="changed extents since the base snapshot, one 'OFFSET LENGTH' (bytes) per line; "
                        "only these are read (without it, everything is read and compared)")
    p.add_argument("--label", action="append", default=[], metavar="LABEL",
                   help="label the snapshot (repeatable; 'hyperback tag' changes labels later)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="worker threads (default: cores)")
    p.add_argument("--json", action="store_true", help="print one JSON result for scripts")
    p.add_argument("source", metavar="SOURCE", help="image file or block device")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    changes = parse_change_file(args.changes) if args.changes else None
    bar = bar_for(f"backup {args.name}", args.json)
    try:
        result = repo.backup(args.source, args.name, Policy(args.policy), changes, bar, args.threads,
                             labels=args.label)
    finally:
        if bar:
            bar.close()
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    s = result.snapshot
    st = s.stats
    for note in result.notes:
        print(f"note: {note}")
    print(f"snapshot {s.id} of {s.name} ({s.policy.value}, change detection: {s.change_detection.value})")
    print(f"  size {human(s.size)}, read {human(st.bytes_read)}, changed {human(st.bytes_changed)}, "
          f"new {human(st.bytes_new)}, stored {human(st.bytes_stored)} in {st.seconds:.2f}s")
    return 0
