"""hyperback restore: write a snapshot back to a file or block device."""
from __future__ import annotations

import argparse
import json

from host_agent.cli.options import add_threads
from host_agent.cli.progress import bar_for, human
from host_agent.storage.qcow2restore import restore_qcow2, target_format
from host_agent.storage.repository import Repository


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "restore", help="restore a snapshot",
        description="Restore SNAPSHOT (an id, a unique id prefix, or NAME@latest) to TARGET, bit-identical. "
                    "Every chunk is verified before it is written; a file target appears only once "
                    "complete, with zero chunks left as holes. A TARGET ending in .qcow2 gets a sparse qcow2 "
                    "image (only data clusters allocated), any other a raw image; --format overrides.")
    p.add_argument("--repo", required=True, metavar="REPO", help="repository directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing file, or write over a block device")
    p.add_argument("--format", choices=("raw", "qcow2"), default=None,
                   help="raw, or qcow2 (a file, streamed through nbdcopy and qemu-nbd; needs qemu-utils, "
                        "libnbd-bin, nbdkit and nbdkit-plugin-python). Default: qcow2 if TARGET ends in "
                        ".qcow2, else raw")
    add_threads(p)
    p.add_argument("--no-sync", action="store_true",
                   help="return before the data reaches stable storage (faster; a crash may lose the "
                        "restored data, as with restic and borg, which never sync)")
    p.add_argument("--json", action="store_true", help="print one JSON result for scripts")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id, prefix, or NAME@latest")
    p.add_argument("target", metavar="TARGET", help="file (created) or block device")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    bar = bar_for("restore", args.json)
    try:
        if target_format(args.target, args.format) == "qcow2":
            result = restore_qcow2(repo, args.snapshot, args.target, args.overwrite, bar, args.threads,
                                   sync=not args.no_sync)
        else:
            result = repo.restore(args.snapshot, args.target, args.overwrite, bar, args.threads,
                                  sync=not args.no_sync)
    finally:
        if bar:
            bar.close()
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        snap = result.snapshot
        print(f"restored snapshot {snap.id} ({snap.name}, {human(snap.size)}) to {result.target} "
              f"in {result.seconds:.2f}s, every chunk verified")
    return 0
