"""hyperback backup: an image file or block device as a snapshot (a qcow2 image as its guest sees it)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from host_agent.cli.options import add_threads
from host_agent.cli.progress import bar_for, human
from host_agent.model import Policy
from host_agent.storage.extents import parse_change_file
from host_agent.storage.guestview import FORMATS
from host_agent.storage.imagebackup import backup_image
from host_agent.storage.repository import Repository


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "backup", help="back up an image or block device",
        description="Back up SOURCE (an image file or a block device) as a new snapshot of NAME. "
                    "A qcow2 image is backed up as the disk its guest sees, what 'qemu-img convert -O "
                    "raw' gives: backing chain resolved, compressed clusters decompressed, zero clusters "
                    "and holes never read; with --format qcow2 it gets a dirty bitmap (hyperback-cli-...) "
                    "so that the next incremental reads only what was written since. A qcow2 only "
                    "detected by its magic bytes gets no bitmap and is refused if it names a backing or "
                    "data file (a guest can write such a header into its raw disk): give --format. "
                    "no one may write the image while it is read (back a running VM's disk up through "
                    "the agent). "
                    "full reads everything; incremental stores what changed since the latest snapshot "
                    "of NAME, differential since the latest full one; an image file whose size, mtime, "
                    "ctime and inode are those the base recorded is not read at all.")
    p.add_argument("--repo", required=True, metavar="REPO", help="repository directory")
    p.add_argument("--name", required=True, metavar="NAME", help="source name, e.g. vm1/vda")
    p.add_argument("--policy", choices=[x.value for x in Policy], default=Policy.FULL.value,
                   help="default: full")
    p.add_argument("--changes", type=Path, metavar="FILE",
                   help="changed extents since the base snapshot, one 'OFFSET LENGTH' (bytes) per line; "
                        "only these are read (without it, everything is read and compared, unless a "
                        "qcow2 image's bitmap tells or the image file is unchanged since the base)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="how to read SOURCE (default: detected): raw stores a qcow2 file's own bytes, "
                        "qcow2 the disk its guest sees")
    p.add_argument("--scratch", metavar="DIR", default=None,
                   help="where qemu-img decompresses compressed qcow2 clusters (default: $TMPDIR or /tmp)")
    p.add_argument("--label", action="append", default=[], metavar="LABEL",
                   help="label the snapshot (repeatable; 'hyperback tag' changes labels later)")
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print one JSON result for scripts")
    p.add_argument("source", metavar="SOURCE", help="image file or block device")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    changes = parse_change_file(args.changes) if args.changes else None
    bar = bar_for(f"backup {args.name}", args.json)
    try:
        done = backup_image(repo, args.source, args.name, Policy(args.policy), changes, args.format, bar,
                            args.threads, args.scratch, labels=args.label)
    finally:
        if bar:
            bar.close()
    if args.json:
        print(json.dumps(done.to_json()))
        return 0
    s = done.result.snapshot
    st = s.stats
    for note in done.notes:
        print(f"note: {note}")
    print(f"snapshot {s.id} of {s.name} ({done.format}, {s.policy.value}, "
          f"change detection: {done.detection.value})")
    print(f"  size {human(s.size)}, read {human(st.bytes_read)}, changed {human(st.bytes_changed)}, "
          f"new {human(st.bytes_new)}, stored {human(st.bytes_stored)} in {st.seconds:.2f}s")
    return 0
