"""hyperback files: browse and extract a snapshot's guest files, without restoring the disk.

A disk snapshot is exported read-only over NBD (``storage.export``) and read inside libguestfs's
appliance (``guestfiles``): the host's kernel never mounts the guest's file system. A file-level
snapshot (path-level backups) is read from its catalog and archive (``storage.filesnap``).
"""
from __future__ import annotations

import argparse
import json
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from host_agent import errors
from host_agent.cli.progress import human
from host_agent.guestfiles.extract import Extracted, extract
from host_agent.guestfiles.reader import Entry, FileSystem, GuestFiles, ReaderSettings
from host_agent.storage.export import SnapshotExport
from host_agent.storage.filesnap import FileSnapshot, StoredEntry
from host_agent.storage.imagereader import ImageReader, LocalChunks
from host_agent.storage.repository import Repository

CACHE_BYTES = 16 << 20  # chunk cache of a file-level snapshot's reads


def _common(p: argparse.ArgumentParser, default: object) -> None:
    """Options accepted before and after the action (``default`` SUPPRESS after, so that a value
    given before it is not overwritten)."""
    p.add_argument("--repo", metavar="REPO", default=default, help="repository directory")
    p.add_argument("--fs", metavar="DEVICE", default=default,
                   help="the file system to read, as 'ls' without a path names it (/dev/sda1); needed "
                        "when the disk has several")
    p.add_argument("--tcg", action="store_true", default=default,
                   help="run the reader's appliance under TCG emulation at once: for hosts without "
                        "usable KVM (a nested guest), where the default tries KVM first and then falls "
                        "back to TCG")
    p.add_argument("--json", action="store_true", default=default, help="ls: print JSON for scripts")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "files", help="list, print or extract files of a snapshot, without restoring it",
        description="Read the guest file systems of SNAPSHOT (an id, a unique id prefix, or NAME@latest) "
                    "through a read-only NBD export, inside libguestfs's isolated appliance: the guest's "
                    "file system is never mounted on this host. 'ls' without a path lists the disk's file "
                    "systems.")
    _common(p, None)
    p.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id, prefix, or NAME@latest")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    ls = actions.add_parser("ls", help="list a directory (mode, size, mtime, name), or the file systems")
    ls.add_argument("path", metavar="PATH", nargs="?", help="guest path (none: list the file systems)")
    cat = actions.add_parser("cat", help="print a file to stdout")
    cat.add_argument("path", metavar="PATH", help="guest path of a file")
    get = actions.add_parser("get", help="extract files and directories with their modes, times, symlinks")
    get.add_argument("paths", metavar="PATH", nargs="+", help="guest paths; each lands as DIR/its name")
    get.add_argument("--to", required=True, type=Path, metavar="DIR",
                     help="host directory (created if missing)")
    for action in (ls, cat, get):
        _common(action, argparse.SUPPRESS)
    p.set_defaults(run=run)


@contextmanager
def _guest(args: argparse.Namespace, mount: bool) -> Iterator[GuestFiles | FileSnapshot]:
    """What to read: a file-level snapshot from its catalog (its files already left the guest's
    file system: no appliance), else the disk snapshot's export in the appliance."""
    if not args.repo:
        raise errors.UsageError("hyperback files: --repo is required (see 'hyperback files --help')")
    repo = Repository.open(args.repo)
    snapshot = repo.resolve(args.snapshot)
    if snapshot.files is not None:
        image = ImageReader(LocalChunks(Path(args.repo), snapshot.id), CACHE_BYTES)
        try:
            yield FileSnapshot(snapshot, image)
        finally:
            image.close()
        return
    with (tempfile.TemporaryDirectory(prefix="hyperback-files-") as run_dir,
          SnapshotExport(repo, snapshot.id, Path(run_dir), exit_with_parent=True) as export,
          GuestFiles(export.socket_path, ReaderSettings(tcg=True if args.tcg else None)) as guest):
        if mount:
            guest.mount(args.fs)
        yield guest


def run(args: argparse.Namespace) -> int:
    if args.action == "ls":
        return _ls(args)
    if args.action == "cat":
        return _cat(args)
    return _get(args)


def _ls(args: argparse.Namespace) -> int:
    with _guest(args, mount=args.path is not None) as guest:
        if args.path is None:
            if isinstance(guest, FileSnapshot):
                _print_stored(guest, args.json)
            else:
                _print_filesystems(guest.filesystems(), args.json)
            return 0
        entry: Entry | StoredEntry = guest.stat(args.path)
        entries: list[Entry | StoredEntry] = [*guest.listdir(args.path)] if entry.is_dir else [entry]
    _print_entries(entries, args.json)
    return 0


def _print_filesystems(found: list[FileSystem], as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"device": f.device, "type": f.kind, "label": f.label, "size": f.size}
                          for f in found]))
        return
    print(f"{'DEVICE':16}  {'TYPE':8}  {'SIZE':>10}  LABEL")
    for f in found:
        print(f"{f.device:16}  {f.kind:8}  {human(f.size):>10}  {f.label}")


def _print_stored(stored: FileSnapshot, as_json: bool) -> None:
    ref = stored.snapshot.files
    assert ref is not None
    if as_json:
        print(json.dumps(ref.to_json()))
        return
    where = f"partition {ref.partition}" if ref.partition else "the disk's file system"
    print(f"file-level snapshot of {', '.join(ref.paths)} on {where}")


def _mtime(entry: Entry | StoredEntry) -> str:
    return datetime.fromtimestamp(entry.mtime_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_entries(entries: list[Entry | StoredEntry], as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"name": e.name, "mode": e.mode, "size": e.size, "mtime_ns": e.mtime_ns,
                           "target": e.target} for e in entries]))
        return
    for e in entries:
        # repr() of names and targets: a guest's name may hold terminal escapes or newlines
        name = e.name if e.name.isprintable() else repr(e.name)
        link = "" if e.target is None else " -> " + (e.target if e.target.isprintable() else repr(e.target))
        print(f"{stat.filemode(e.mode)}  {e.size:>12}  {_mtime(e)}  {name}{link}")


def _cat(args: argparse.Namespace) -> int:
    with _guest(args, mount=True) as guest:
        if not guest.is_file(args.path):
            raise errors.GuestPathError(f"{args.path} is not a regular file in the guest: use 'ls' or 'get'")
        sys.stdout.flush()
        guest.download(args.path, sys.stdout.fileno())
    return 0


def _get(args: argparse.Namespace) -> int:
    done = Extracted()
    with _guest(args, mount=True) as guest:
        for path in args.paths:
            extract(guest, path, args.to, done)
    print(f"extracted {done.files} files ({human(done.bytes)}), {done.directories} directories and "
          f"{done.symlinks} symlinks into {args.to}"
          + (f"; skipped {len(done.skipped)} (see the warnings above)" if done.skipped else ""))
    return 0


__all__ = ["add_parser", "run"]
