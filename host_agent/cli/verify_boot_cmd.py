"""hyperback verify-boot: prove a snapshot boots, by booting it in a sandbox (not ``verify``, which
re-reads stored chunks)."""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
from pathlib import Path

from host_agent import errors
from host_agent.agent import bootverify
from host_agent.storage.repository import Repository

DEFAULT_WORK_DIR = Path("/var/tmp/hyperback-verify")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify-boot", help="boot a snapshot in a sandbox and record whether it came up",
        description="Boot SNAPSHOT (a VM disk's: an id, a unique id prefix or NAME@latest) in a sandbox: "
                    "a transient domain made from the VM's definition, with no network interface, "
                    "on a throwaway overlay over the snapshot exported read-only over NBD. It passes "
                    "when the guest's shim answers (and the --check command, if given, exits 0 in "
                    "the guest); the verdict and the console text are recorded on the snapshot "
                    "(hyperback list shows them). Exit 0 passed, 4 failed. 'hyperback verify' is "
                    "another thing: it re-reads the stored chunks.")
    p.add_argument("--repo", required=True, metavar="REPO", help="repository directory")
    p.add_argument("--domain-xml", type=Path, metavar="FILE",
                   help="the VM's domain XML (default: the one stored with the snapshot's backup, else "
                        "the domain's current definition in libvirt)")
    p.add_argument("--check", metavar="COMMAND",
                   help="a command the guest's shim runs once it answered (shell words, no shell); "
                        "the guest must list it in check_commands of its shim.conf")
    p.add_argument("--timeout", type=float, default=bootverify.DEFAULT_BOOT_TIMEOUT, metavar="SECONDS",
                   help=f"seconds for the shim to answer (default {bootverify.DEFAULT_BOOT_TIMEOUT:g})")
    p.add_argument("--libvirt", default="qemu:///system", metavar="URI",
                   help="libvirt URI (default %(default)s)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, metavar="DIR",
                   help="where the overlay, sockets and console log live while it runs "
                        "(default %(default)s); removed after")
    p.add_argument("--console", action="store_true", help="print the console text after the verdict")
    p.add_argument("--json", action="store_true", help="print the verification record as JSON")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id, prefix, or NAME@latest")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise errors.UsageError("--timeout must be more than 0 seconds")
    repo = Repository.open(args.repo)
    snapshot = repo.resolve(args.snapshot)
    bootverify.split_name(snapshot)
    conn = bootverify.connect(args.libvirt)
    try:
        chosen = bootverify.Chosen(_definition(args.domain_xml), f"--domain-xml {args.domain_xml}") \
            if args.domain_xml else bootverify.definition_for(conn, repo, snapshot)
        check = tuple(shlex.split(args.check)) if args.check else None
        spec = bootverify.spec_for(snapshot, chosen.xml, check, args.timeout, chosen.source)
        record = asyncio.run(bootverify.verify_boot(repo, snapshot.id, spec, conn, args.work_dir))
    finally:
        conn.close()
    if args.json:
        print(json.dumps(record.to_json()))
    else:
        print(f"snapshot {snapshot.id} ({snapshot.name}) {record.result.upper()} boot verification in "
              f"{record.seconds:.1f}s: {record.reason}")
    if args.console:
        print((repo.console_text(snapshot.id) or b"").decode("utf-8", "replace"), end="")
    return 0 if record.passed else errors.IntegrityError.exit_code


def _definition(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise errors.UsageError(f"cannot read --domain-xml {path}: {e.strerror}") from e
