"""hyperback init REPO: create an empty repository."""
from __future__ import annotations

import argparse

from host_agent.storage.repository import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL, Repository


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init", help="create a repository",
                       description="Create a repository in a new or empty directory (local disk, "
                                   "USB mount, NFS).")
    p.add_argument("repo", metavar="REPO", help="directory to create the repository in")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
                   help=f"fixed chunk size, a power of two (default {DEFAULT_CHUNK_SIZE}; see "
                        "docs/repository-format.md for why)")
    p.add_argument("--compression-level", type=int, default=DEFAULT_COMPRESSION_LEVEL, metavar="N",
                   help="zstd level for new chunks: -7 (fastest) to 19 (smallest), not 0 "
                        f"(default {DEFAULT_COMPRESSION_LEVEL})")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    repo = Repository.init(args.repo, args.chunk_size, args.compression_level)
    print(f"created repository {repo.path} (id {repo.config.repo_id}, chunk size {repo.config.chunk_size})")
    return 0
