"""One optimizer for a fleet: merge across hosts, and the state that makes it survive a restart.

The same data
    A host sends, with its batch, the backing images of its disks that lie on shared storage
    (``HostContext.shared_images``: path, inode, size, mtime) and the repository each destination is
    (``HostContext.repositories``: its ``repo_id``). Two hosts' images are the same data for one
    repository when the key ``(repo_id, path, inode, size, mtime_ns)`` is equal: destination names are
    each host's own, and an image rewritten in place, or another file at the same path, differs.

Claims
    The first host whose plan reads such an image as a base unit *claims* it: the optimizer keeps
    ``key -> (host, unit id)`` for ``window`` seconds of its own clock (hosts' clocks are never
    compared with it, nor with each other). So that another host can build on it, an image a host
    identifies counts as shared for the merge policy even when one disk of the batch is built on it.
    Within the window, another host's disks built on the same key get no base unit: the merge policy
    sees a stored base (``base/<16 hex>`` names the path, so it is the same name in the repository),
    and the disk unit's reason names the host and unit that read it. A host's own earlier claim is
    replaced by its new batch (a batch re-sent after a lost answer reads the base again).

Trust
    A host names only its own data: every image it identifies lies in the backing chain of one of the
    batch's disks (else ``MalformedBatch``), and it builds on another host's claim only when it
    reports the identical key itself, so no host makes another host's plan refer to data that host
    did not see. The host name is the client certificate's where there is one (the service checks).
    A claim whose host never reads the base costs a full read, never a wrong backup: the executor
    looks the stored base up by name when the disk unit runs and reads the whole disk without it.

State
    Claims are all the optimizer keeps between batches (deferred work lives in the agents' drivers).
    :class:`FleetState` holds them in sqlite3 (``STATE_FILE`` under ``--state-dir``), one
    transaction per batch, and reloads them at start; without a state dir they live in memory. A
    state file it cannot read (corrupt, or ``user_version`` newer than ``STATE_VERSION``) is moved
    aside to ``STATE_FILE.unreadable`` with one log line, and the optimizer starts empty.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from host_agent.errors import MalformedBatch, OptimizerConfigError
from host_agent.model import Instruction, InstructionKind, Plan, UnitKind, WorkUnit, base_name, normalize_path
from host_agent.planning.chain import (
    DEFAULT_MAX_BATCH,
    HostContext,
    ImageIdentity,
    Planner,
    PlanningPolicy,
    PlanResult,
    add_reason,
)

log = logging.getLogger(__name__)

STATE_FILE: Final = "optimizer.sqlite3"
STATE_VERSION: Final = 1
DEFAULT_WINDOW: Final = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    repo_id TEXT NOT NULL, path TEXT NOT NULL, inode INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, host TEXT NOT NULL, unit_id TEXT NOT NULL, claimed_at REAL NOT NULL,
    PRIMARY KEY (repo_id, path, inode, size, mtime_ns))
"""


@dataclass(frozen=True)
class ClaimKey:
    repo_id: str
    image: ImageIdentity


@dataclass(frozen=True)
class Claim:
    host: str
    unit_id: str
    claimed_at: float  # the optimizer's time.time()


class FleetState:
    """The claims, in sqlite3: a file under the state dir, or memory (``path`` None)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        where = ":memory:" if self.path is None else self.path
        try:
            return self._prepare(sqlite3.connect(where, isolation_level=None, check_same_thread=False))
        except (sqlite3.DatabaseError, _NewerState) as e:
            assert self.path is not None  # a new database in memory is always readable
            aside = self.path.with_name(self.path.name + ".unreadable")
            log.error("optimizer state %s cannot be read (%s): moved to %s, starting with no claims",
                      self.path, e, aside)
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm", "-journal"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            return self._prepare(sqlite3.connect(self.path, isolation_level=None, check_same_thread=False))

    @staticmethod
    def _prepare(db: sqlite3.Connection) -> sqlite3.Connection:
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > STATE_VERSION:
                raise _NewerState(f"state version {version}, written by a newer optimizer; this one "
                                  f"knows version {STATE_VERSION}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
            db.execute(f"PRAGMA user_version={STATE_VERSION}")
            db.execute("SELECT count(*) FROM claims").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    @classmethod
    def in_dir(cls, state_dir: Path | None) -> FleetState:
        if state_dir is None:
            return cls()
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            return cls(state_dir / STATE_FILE)
        except OSError as e:
            raise OptimizerConfigError(f"--state-dir {state_dir}: {e.strerror or e}") from e

    def claims(self, keys: Iterable[ClaimKey], since: float) -> dict[ClaimKey, Claim]:
        """The claims of ``keys`` made at or after ``since``."""
        found: dict[ClaimKey, Claim] = {}
        for key in keys:
            i = key.image
            row = self._db.execute(
                "SELECT host, unit_id, claimed_at FROM claims WHERE repo_id=? AND path=? AND inode=? "
                "AND size=? AND mtime_ns=? AND claimed_at>=?",
                (key.repo_id, i.path, i.inode, i.size, i.mtime_ns, since)).fetchone()
            if row is not None:
                found[key] = Claim(*row)
        return found

    def claim(self, claims: Mapping[ClaimKey, Claim], expired_before: float) -> None:
        """Record ``claims`` (replacing earlier ones of their keys) and forget the expired, atomically."""
        rows = [(k.repo_id, k.image.path, k.image.inode, k.image.size, k.image.mtime_ns, c.host, c.unit_id,
                 c.claimed_at) for k, c in claims.items()]
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("DELETE FROM claims WHERE claimed_at<?", (expired_before,))

    def close(self) -> None:
        self._db.close()


class _NewerState(Exception):
    """The state file's version is newer than this optimizer's: read as unreadable."""


def claim_keys(batch: Sequence[Instruction], context: HostContext) -> dict[tuple[str, str], ClaimKey]:
    """``(destination, image) -> key`` for the batch's backups onto images the host identified;
    MalformedBatch if the host identifies an image none of its batch's disks is built on."""
    images = {normalize_path(p) for i in batch for d in i.disks for p in d.backing_chain}
    if strangers := sorted(set(context.shared_images) - images):
        raise MalformedBatch(f"shared image(s) {', '.join(strangers)}: no disk of the batch is built on "
                             f"them; a host identifies only its own disks' backing images")
    built_on = {(i.destination, normalize_path(p)) for i in batch if i.kind is InstructionKind.BACKUP
                for d in i.disks for p in d.backing_chain}
    return {(d, image): ClaimKey(context.repositories[d], context.shared_images[image])
            for d, image in built_on if d in context.repositories and image in context.shared_images}


class FleetPlanner(Planner):
    """A :class:`Planner` that merges across hosts through the claims of ``state``."""

    def __init__(self, chain: Sequence[PlanningPolicy], max_batch: int = DEFAULT_MAX_BATCH,
                 state: FleetState | None = None, window: float = DEFAULT_WINDOW,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(chain, max_batch)
        self.state = state or FleetState()
        self.window, self.clock = window, clock

    def plan(self, batch: Sequence[Instruction], context: HostContext) -> PlanResult:
        keys = claim_keys(batch, context)
        if not context.host_name:  # a claim needs a host to name; an unnamed one merges within its batch
            keys = {}
        now = self.clock()
        found = self.state.claims(set(keys.values()), now - self.window)
        others = {di: found[k] for di, k in keys.items() if k in found and found[k].host != context.host_name}
        mine = frozenset(keys) - set(others)
        known = context.known_bases | {(d, base_name(image)) for d, image in others}
        result = super().plan(batch, replace(context, known_bases=known, fleet_shared=mine))
        read = {keys[(u.destination, normalize_path(u.source))]: Claim(context.host_name, u.id, now)
                for u in result.plan.units
                if u.kind is UnitKind.BACKUP_BASE and (u.destination, normalize_path(u.source)) in mine}
        if read or found:
            self.state.claim(read, now - self.window)
        return replace(result, plan=_refer(result.plan, others)) if others else result


def _refer(plan: Plan, others: Mapping[tuple[str, str], Claim]) -> Plan:
    """Name, in the reason of each disk unit built on another host's claim, who reads the base."""
    def referred(unit: WorkUnit) -> WorkUnit:
        if unit.kind is not UnitKind.BACKUP_DISK or unit.disk is None:
            return unit
        chain = (normalize_path(p) for p in unit.disk.backing_chain)
        claim = next((others[(unit.destination, i)] for i in chain if (unit.destination, i) in others), None)
        if claim is None:
            return unit
        return replace(unit, reason=add_reason(
            unit, f"host {claim.host} reads that base on shared storage (its unit {claim.unit_id})"))

    units = tuple(referred(u) for u in plan.units)
    count = sum(a is not b for a, b in zip(units, plan.units, strict=True))
    return replace(plan, units=units, notes=(*plan.notes, f"fleet: {count} disk(s) build on bases that "
                                                         f"other hosts read"))
