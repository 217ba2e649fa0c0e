"""hyperback copy: copy snapshots into another repository, sending only the chunks it lacks."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from host_agent import errors
from host_agent.cli.options import add_threads
from host_agent.cli.progress import Bar, bar_for, human
from host_agent.config import load
from host_agent.media.copies import MEDIA_SCHEME, MediaTarget
from host_agent.storage.repository import Repository
from host_agent.storage.transfer import CopySummary, CopyTarget, LocalTarget, copy_snapshots, select


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "copy", help="copy snapshots into another repository (an offsite copy)",
        description="Copy snapshots from one repository into another: each snapshot keeps its id and "
                    "document, and only the chunks the target lacks are sent, each checked against its "
                    "hash on the way (a damaged one is reported and its snapshot left out, exit 4). "
                    "Snapshots already in the target are skipped, so a copy that was interrupted is "
                    "resumed by running it again. A disk snapshot's stored domain definition goes with "
                    "it. Without a selection every snapshot is copied.",
        epilog=f"REPO is a directory, or {MEDIA_SCHEME}HOST:PORT/DESTINATION for a repository behind "
               "a media service (hyperback-media) on another host. Both must have the same chunk size.")
    p.add_argument("--from", dest="source", required=True, metavar="REPO", help="repository to copy from")
    p.add_argument("--to", dest="target", required=True, metavar="REPO", help="repository to copy into")
    p.add_argument("--name", metavar="NAME", help="only snapshots of this source name")
    p.add_argument("--latest", action="store_true",
                   help="only the latest snapshot of each name (of --name's, if given)")
    add_threads(p, "threads reading the source")
    p.add_argument("--json", action="store_true", help="print one JSON summary for scripts")
    p.add_argument("snapshots", nargs="*", metavar="SNAPSHOT", help="snapshot id, prefix, or NAME@latest")
    p.set_defaults(run=run)


@contextmanager
def _target(spec: str) -> Iterator[CopyTarget]:
    if spec.startswith(MEDIA_SCHEME):
        with MediaTarget.connect(spec, load().tls) as remote:  # the agent config's [tls], if any
            yield remote
        return
    with LocalTarget(Repository.open(spec)).session() as local:
        yield local


def run(args: argparse.Namespace) -> int:
    if args.source.startswith(MEDIA_SCHEME):
        raise errors.UsageError("--from must be a repository on this host (a directory); copy from a "
                                "media service's repository on the host that holds it")
    started = time.monotonic()
    source = Repository.open(args.source)
    snaps = select(source, args.snapshots, args.name, args.latest)
    bar = bar_for("copy", args.json)
    try:
        with _target(args.target) as target:
            summary = copy_snapshots(source, target, snaps, _reporter(bar, args.json), bar, args.threads)
    finally:
        if bar:
            bar.close()
    summary.seconds = round(time.monotonic() - started, 3)
    if args.json:
        print(json.dumps(summary.to_json()))
    else:
        _print_summary(summary)
    return 0 if summary.ok else errors.IntegrityError.exit_code


def _reporter(bar: Bar | None, quiet: bool) -> Callable[[str], None]:
    """Each snapshot's outcome on stderr, as progress (the JSON summary says it all for scripts)."""
    def report(line: str) -> None:
        if not quiet:
            print(("\r\x1b[K" if bar else "") + line, file=sys.stderr)  # over the bar, which comes back
    return report


def _print_summary(s: CopySummary) -> None:
    print(f"{len(s.copied)} snapshot(s) copied, {len(s.skipped)} skipped (already there), "
          f"{len(s.failed)} failed; sent {s.chunks_sent} chunk(s), {human(s.bytes_sent)}; "
          f"{s.chunks_present} chunk(s), {human(s.bytes_present)} already present; {s.seconds:.2f}s")
