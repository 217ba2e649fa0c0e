"""hyperback list: the snapshots in a repository, with the verdict of their latest boot
verification (``hyperback verify-boot``)."""
from __future__ import annotations

import argparse
import json

from host_agent.cli.progress import human
from host_agent.storage.repository import Repository
from host_agent.storage.verification import Verification


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("list", help="list snapshots",
                       description="List snapshots, oldest first. BOOT is the latest boot verification "
                                   "(hyperback verify-boot): passed, failed, or - for never.")
    p.add_argument("--repo", required=True, metavar="REPO", help="repository directory")
    p.add_argument("--name", metavar="NAME", help="only snapshots of this source name")
    p.add_argument("--json", action="store_true", help="print a JSON array for scripts")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo)
    snaps = repo.snapshots(args.name)
    verified = repo.verifications()
    if args.json:
        print(json.dumps([{**s.to_json(), "verification": _json(verified.get(s.id))} for s in snaps]))
        return 0
    print(f"{'ID':16}  {'TIME (UTC)':19}  {'POLICY':12}  {'SIZE':>10}  {'NEW':>10}  {'BOOT':6}  NAME")
    for s in snaps:
        record = verified.get(s.id)
        print(f"{s.id:16}  {s.time:%Y-%m-%d %H:%M:%S}  {s.policy.value:12}  {human(s.size):>10}  "
              f"{human(s.stats.bytes_new):>10}  {record.result if record else '-':6}  {s.name}")
    return 0


def _json(record: Verification | None) -> dict[str, object] | None:
    return None if record is None else record.to_json()
