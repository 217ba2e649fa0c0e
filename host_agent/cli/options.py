"""Options several commands share, declared once."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from host_agent.storage.repository import Repository
from host_agent.storage.snapshot import Snapshot

if TYPE_CHECKING:  # a type only: most commands never load the media client
    from host_agent.media.client import RemoteRepository


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def add_threads(p: argparse.ArgumentParser, what: str = "worker threads") -> None:
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help=f"{what} (default: cores)")


def add_snapshot_specs(p: argparse.ArgumentParser) -> None:
    p.add_argument("snapshots", nargs="+", metavar="SNAPSHOT", help="snapshot id, prefix, or NAME@latest")


def chosen_snapshots(repo: Repository | RemoteRepository, specs: Sequence[str]) -> list[Snapshot]:
    """The snapshots ``specs`` name, each once, in the order first named."""
    return list({s.id: s for s in map(repo.resolve, specs)}.values())
