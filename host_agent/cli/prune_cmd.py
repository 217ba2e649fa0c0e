"""hyperback prune: forget snapshots by a retention policy, then collect garbage."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from host_agent import errors
from host_agent.cli.progress import human
from host_agent.config import load
from host_agent.media.copies import MEDIA_SCHEME, MediaTarget
from host_agent.storage.repository import REPACK_THRESHOLD, Repository
from host_agent.storage.retention import KeepPolicy
from host_agent.storage.snapshot import Snapshot


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "prune", help="remove old snapshots and unreferenced data",
        description="Keep the snapshots any --keep rule selects (per source name) and the protected ones "
                    "(hyperback protect), forget the rest, "
                    "then delete data no snapshot uses. Safe while backups run: data they may use "
                    "waits for the next prune.")
    p.add_argument("--repo", required=True, metavar="REPO",
                   help=f"repository directory, or {MEDIA_SCHEME}HOST:PORT/DESTINATION through a media "
                        "service (with an operator's certificate in the config's [tls]: docs/tls.md)")
    p.add_argument("--keep-last", type=int, default=0, metavar="N", help="keep the N newest")
    p.add_argument("--keep-daily", type=int, default=0, metavar="N", help="newest of each of N days")
    p.add_argument("--keep-weekly", type=int, default=0, metavar="N", help="newest of each of N weeks")
    p.add_argument("--keep-monthly", type=int, default=0, metavar="N", help="newest of each of N months")
    p.add_argument("--repack-threshold", type=float, default=REPACK_THRESHOLD, metavar="FRACTION",
                   help=f"rewrite a pack once this fraction of it is garbage (default {REPACK_THRESHOLD})")
    p.add_argument("--dry-run", action="store_true", help="only say what would be forgotten")
    p.add_argument("--json", action="store_true", help="print one JSON result")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    policy = KeepPolicy(args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly)
    keep, remove, gc = (_remote if args.repo.startswith(MEDIA_SCHEME) else _local)(args, policy)
    out = {"kept": [s.id for s in keep], "removed": [s.id for s in remove], "dry_run": args.dry_run, "gc": gc}
    if args.json:
        print(json.dumps(out))
        return 0
    for s in remove:
        print(f"{'would remove' if args.dry_run else 'removed'} {s.id} {s.name} {s.time:%Y-%m-%d %H:%M:%S}")
    print(f"kept {len(keep)} snapshot(s), {'would remove' if args.dry_run else 'removed'} {len(remove)}")
    if gc is not None and "packs_deleted" in gc:
        print(f"deleted {gc['packs_deleted']} pack(s) ({gc['packs_repacked']} rewritten, "
              f"{gc['blobs_copied']} blobs copied), freed {human(gc['bytes_freed'])}; {gc['packs_waiting']} "
              "pack(s) wait for running backups")
    elif gc is not None:
        print(f"freed {human(gc['bytes_freed'])} on the media host")
    return 0


_Outcome = tuple[list[Snapshot], list[Snapshot], dict[str, int] | None]


def _local(args: argparse.Namespace, policy: KeepPolicy) -> _Outcome:
    from host_agent.storage.pruning import prune

    pruned = prune(Repository.open(args.repo), policy, repack_threshold=args.repack_threshold,
                   dry_run=args.dry_run)
    return pruned.keep, pruned.remove, asdict(pruned.gc) if pruned.gc is not None else None


def _remote(args: argparse.Namespace, policy: KeepPolicy) -> _Outcome:
    """Through the media service: an operator's certificate in the config's [tls] (docs/tls.md)."""
    if args.repack_threshold != REPACK_THRESHOLD:
        raise errors.UsageError("--repack-threshold applies to a repository on this host; the media "
                                "service collects with its default")
    with MediaTarget.connect(args.repo, load().tls) as target:
        pruned = target.remote.prune(policy, args.dry_run)
    return pruned.keep, pruned.remove, None if args.dry_run else {"bytes_freed": pruned.bytes_freed}
