"""What an operator says about a snapshot after the fact: its labels, a note, and whether it is
protected from forgetting (docs/repository-format.md, section 5.5).

The snapshot document is the commit record and is never rewritten, so these live beside it, in
``annotations/ID``. Labels given at backup are in the document itself (its ``labels`` field); a
record, once written, replaces them whole. Repositories from before this existed have no
``annotations/`` folder: every snapshot then has its document's labels, no note, no protection.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from host_agent import errors
from host_agent.storage.files import fsync_dir, write_atomic
from host_agent.storage.snapshot import FORMAT_VERSION, SNAPSHOT_ID, Snapshot

log = logging.getLogger(__name__)

FOLDER = "annotations"
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
MAX_LABELS = 32
MAX_NOTE = 1024
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def check_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """The labels, sorted and without repeats, or UsageError naming the first bad one."""
    out = sorted(set(labels))
    for label in out:
        if not LABEL.fullmatch(label):
            raise errors.UsageError(
                f"label {label!r} must be 1-64 letters, digits, '.', '_', ':' or '-', starting with a "
                "letter or digit (e.g. before-upgrade, keep:legal)")
    if len(out) > MAX_LABELS:
        raise errors.UsageError(f"a snapshot has at most {MAX_LABELS} labels, not {len(out)}: "
                                "remove some with 'hyperback tag --remove'")
    return tuple(out)


def check_note(note: str) -> str:
    if len(note) > MAX_NOTE or _CONTROL.search(note):
        raise errors.UsageError(f"a note is one line of at most {MAX_NOTE} characters, without control "
                                f"characters (this one has {len(note)})")
    return note


@dataclass(frozen=True)
class Annotation:
    snapshot: str
    labels: tuple[str, ...] = ()
    note: str = ""
    protected: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "snapshot": self.snapshot, "labels": list(self.labels),
                "note": self.note, "protected": self.protected,
                "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Annotation:
        """Raises KeyError, ValueError, TypeError or UsageError on a malformed record."""
        if not SNAPSHOT_ID.fullmatch(doc["snapshot"]) or not isinstance(doc["protected"], bool):
            raise ValueError("not an annotation record")
        return cls(doc["snapshot"], check_labels(map(str, doc["labels"])), check_note(str(doc["note"])),
                   doc["protected"])

    @classmethod
    def of(cls, snap: Snapshot) -> Annotation:
        """What a snapshot without a record is: its document's labels, no note, not protected."""
        return cls(snap.id, snap.labels)


class Annotations:
    """The ``annotations/`` folder of the repository at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / FOLDER

    def all(self) -> dict[str, Annotation]:
        """Every readable record, by snapshot id (records of forgotten snapshots included)."""
        out: dict[str, Annotation] = {}
        if not self.folder.is_dir():
            return out
        for path in self.folder.iterdir():
            if SNAPSHOT_ID.fullmatch(path.name):
                record = self._read(path)
                if record is not None:
                    out[path.name] = record
        return out

    def get(self, snap: Snapshot) -> Annotation:
        """The snapshot's annotation now (its document's labels if it has no record)."""
        record = self._read(self.folder / snap.id)
        return record if record is not None else Annotation.of(snap)

    def protected_ids(self) -> set[str]:
        """The snapshots whose record protects them (retention counts them as kept)."""
        if not self.folder.is_dir():
            return set()
        return {path.name for path in self.folder.iterdir()
                if SNAPSHOT_ID.fullmatch(path.name) and self._protects(path)}

    def protected(self, snapshot_id: str) -> bool:
        """Read just before a document is deleted (section 5.5): whether it must not be."""
        return self._protects(self.folder / snapshot_id)

    @staticmethod
    def _protects(path: Path) -> bool:
        """Protection fails closed: a record that exists but cannot be read protects its snapshot."""
        try:
            record = Annotation.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, errors.UsageError) as e:
            log.warning("annotation record %s cannot be read (%s): its snapshot counts as protected until "
                        "the record is fixed or removed", path, e)
            return True
        return record.protected or record.snapshot != path.name

    def _read(self, path: Path) -> Annotation | None:
        try:
            record = Annotation.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, errors.UsageError) as e:
            log.warning("ignoring unreadable annotation record %s: %s", path, e)
            return None
        return record if record.snapshot == path.name else None

    def write(self, record: Annotation) -> None:
        """Keep ``record`` as the snapshot's annotation; the snapshot must exist."""
        if not (self.root / "snapshots" / record.snapshot).exists():
            raise errors.SnapshotNotFound(f"no snapshot {record.snapshot} in {self.root} (forgotten "
                                          "meanwhile?)")
        if not self.folder.is_dir():  # repositories from before annotations lack it
            try:
                self.folder.mkdir(exist_ok=True)
                fsync_dir(self.root)
            except OSError as e:
                raise errors.RepositoryIOError(f"cannot create {self.folder}: {e.strerror}") from e
        write_atomic(self.folder / record.snapshot, json.dumps(record.to_json(), indent=1).encode(),
                     self.root / "tmp")

    def remove(self, snapshot_ids: Sequence[str]) -> None:
        """Delete the records of forgotten snapshots (after their documents)."""
        if not self.folder.is_dir():
            return
        for sid in snapshot_ids:
            (self.folder / sid).unlink(missing_ok=True)
        fsync_dir(self.folder)


def edit(record: Annotation, add: Iterable[str] = (), remove: Iterable[str] = (),
         note: str | None = None, protected: bool | None = None) -> Annotation:
    """``record`` with labels added and removed, and the note and protection replaced if given."""
    add, remove = check_labels(add), set(remove)
    labels = check_labels([*(label for label in record.labels if label not in remove), *add])
    return Annotation(record.snapshot, labels, record.note if note is None else check_note(note),
                      record.protected if protected is None else protected)
