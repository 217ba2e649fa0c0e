"""hyperback init REPO: create an empty repository, encrypted if asked."""
from __future__ import annotations

import argparse
from pathlib import Path

from host_agent.storage import keys
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
    p.add_argument("--encryption", choices=("none", *keys.MODES), default="none",
                   help="encrypt and authenticate everything stored: keys wrapped by a passphrase (from "
                        f"--passphrase-file or {keys.ENV_PASSPHRASE}) in the repository, or kept in a new "
                        "key file (--keyfile) outside it (default none; docs/repository-format.md, "
                        "section 11)")
    p.add_argument("--passphrase-file", type=Path, metavar="FILE", help="file holding the passphrase")
    p.add_argument("--keyfile", type=Path, metavar="FILE",
                   help="where to write the new key file (keyfile mode)")
    p.set_defaults(run=run)


def secret_of(passphrase_file: Path | None) -> keys.Secret | None:
    """The secret a command was given: its --passphrase-file, else the environment's."""
    if passphrase_file is not None:
        return keys.Secret(passphrase=keys.read_passphrase_file(passphrase_file))
    return keys.secret_from_environment()


def run(args: argparse.Namespace) -> int:
    encryption = None if args.encryption == "none" else args.encryption
    repo = Repository.init(args.repo, args.chunk_size, args.compression_level, encryption,
                           secret_of(args.passphrase_file), args.keyfile)
    how = f", encrypted ({encryption})" if encryption else ""
    print(f"created repository {repo.path} (id {repo.config.repo_id}, "
          f"chunk size {repo.config.chunk_size}{how})")
    return 0
