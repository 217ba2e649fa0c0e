"""hyperback key export REPO FILE: a copy of an encrypted repository's wrapped key, for safe keeping."""
from __future__ import annotations

import argparse
from pathlib import Path

from host_agent import errors
from host_agent.cli.init_cmd import secret_of
from host_agent.storage import keys
from host_agent.storage.repository import Repository


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("key", help="an encrypted repository's key",
                       description="Keep a copy of an encrypted repository's key: without it (and its "
                                   "passphrase) nothing in the repository can be read.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="write the wrapped key to a file",
                                description="Write keys/repokey (the keys wrapped by the passphrase) to "
                                            "FILE, after checking that the passphrase opens it.")
    export.add_argument("repo", metavar="REPO")
    export.add_argument("file", metavar="FILE", type=Path, help="a new file")
    export.add_argument("--passphrase-file", type=Path, metavar="FILE", help="file holding the passphrase")
    export.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    repo = Repository.open(args.repo, secret_of(args.passphrase_file))
    if repo.config.encryption != keys.PASSPHRASE:
        why = "its key file is the copy to keep" if repo.config.encryption else "it is not encrypted"
        raise errors.UsageError(f"{repo.path} has no wrapped key to export: {why}")
    repo.keys()  # an export nobody can open is worse than none: the passphrase must open it now
    try:
        with open(args.file, "xb") as f:
            f.write((repo.path / keys.KEY_FILE).read_bytes())
    except OSError as e:
        raise errors.UsageError(f"cannot write {args.file}: {e.strerror}") from e
    print(f"wrote the key of {repo.path} to {args.file}; keep it apart from the repository")
    return 0
