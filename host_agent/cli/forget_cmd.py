"""hyperback forget: forget chosen snapshots (never a protected one)."""
from __future__ import annotations

import argparse
import json

from host_agent import errors
from host_agent.cli.options import add_snapshot_specs, chosen_snapshots
from host_agent.config import load
from host_agent.media.copies import MEDIA_SCHEME, MediaTarget
from host_agent.storage.annotations import Annotations
from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import Snapshot


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "forget", help="forget snapshots",
        description="Forget each SNAPSHOT (an id, a unique id prefix of 4+ characters, or NAME@latest): "
                    "its document goes, so it no longer lists or restores. A protected snapshot is "
                    "refused ('hyperback unprotect' first), and then nothing is forgotten. The space "
                    "its data alone used is freed by the next garbage collection ('hyperback prune', "
                    "or a schedule's retention), safely while backups run.")
    p.add_argument("--repo", required=True, metavar="REPO",
                   help=f"repository directory, or {MEDIA_SCHEME}HOST:PORT/DESTINATION through a media "
                        "service (with an operator's certificate in the config's [tls]: docs/tls.md)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be forgotten")
    p.add_argument("--json", action="store_true", help="print one JSON result")
    add_snapshot_specs(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.repo.startswith(MEDIA_SCHEME):
        with MediaTarget.connect(args.repo, load().tls) as target:
            chosen = chosen_snapshots(target.remote, args.snapshots)
            if not args.dry_run:  # the service refuses a protected one, and then forgets nothing
                target.remote.forget([s.id for s in chosen])
    else:
        repo = Repository.open(args.repo)
        chosen = chosen_snapshots(repo, args.snapshots)
        _refuse_protected(repo, chosen)
        if not args.dry_run:
            repo.forget([s.id for s in chosen])
    if args.json:
        print(json.dumps({"forgotten": [s.id for s in chosen], "dry_run": args.dry_run}))
        return 0
    verb = "would forget" if args.dry_run else "forgot"
    for s in chosen:
        print(f"{verb} {s.id} {s.name} {s.time:%Y-%m-%d %H:%M:%S}")
    if not args.dry_run:
        print(f"the space their data alone used is freed by the next 'hyperback prune --repo {args.repo}'")
    return 0


def _refuse_protected(repo: Repository, chosen: list[Snapshot]) -> None:
    notes = Annotations(repo.path)
    protected = [s.id for s in chosen if notes.protected(s.id)]
    if protected:
        raise errors.UsageError(
            f"snapshot(s) {', '.join(protected)} protected, nothing forgotten; 'hyperback unprotect "
            f"--repo {repo.path} {' '.join(protected)}' first if they really must go")
