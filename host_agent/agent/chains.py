"""Checkpoint chains: the hypervisor checkpoints each destination's next backup of a domain starts from.

Every destination keeps a chain of snapshots per disk, and the next incremental to it starts at
the checkpoint recorded with its latest snapshot of the disk (a differential: with its latest full
one). So one domain backed up to two destinations needs the checkpoints of both chains; pruning
with only the destination just written in mind deletes the other's, and every backup to it turns
into a full read. Asking every destination what it needs at prune time is no answer: a USB disk
may be unplugged, a media host down, and a destination that cannot answer must not lose its chain.

So the agent keeps its own record, one file per domain, ``<state_dir>/chains/<domain uuid>.json``::

    {"version": 1, "destinations": {"default": {"hb-0123": ["hyperback-2026...-a1b2c3"]}, ...}}

After each successful backup of a domain's disk to destination D, :meth:`ChainRecord.update`
replaces D's entry with what D's repository now needs (per disk serial: the checkpoints of the
latest snapshot and of the latest full one), drops the entries of destinations no longer
configured, and returns every checkpoint a remaining entry names: the set to keep.

Where a chain ends, its checkpoints go at the domain's next backup to any destination:

* a destination removed from the configuration: its entry is dropped;
* a full backup to D (the chain restarts): D's entry names the new checkpoint (and no longer the
  old full's, once no differential can start from it);
* snapshots forgotten in D (``hyperback prune``): D's entry is recomputed from D's repository at
  the next backup to D (until then the old checkpoints are kept: a cost, never a wrong backup).
  If the snapshot forgotten was the one the chain went on from, the next backup starts from an
  older one whose checkpoint is gone: it compares, and :meth:`ChainRecord.forgotten_base` says why.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path

from host_agent import errors
from host_agent.model import Fallback, FallbackNote

log = logging.getLogger(__name__)

VERSION = 1

Needs = dict[str, list[str]]
"""Per disk serial, the checkpoints one destination's chain needs."""


class ChainRecord:
    """The agent's record of every destination's checkpoint needs, per domain."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "chains"

    def _file(self, domain_uuid: str) -> Path:
        return self.dir / f"{domain_uuid}.json"

    def needs(self, domain_uuid: str) -> dict[str, Needs]:
        """Per destination, what its chains need; empty when nothing is recorded (or the record
        is unreadable: then the destination just written is all that is known)."""
        try:
            doc = json.loads(self._file(domain_uuid).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring the unreadable chain record of %s: %s", domain_uuid, e)
            return {}
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            log.warning("ignoring the chain record of %s: not version %d", domain_uuid, VERSION)
            return {}
        out: dict[str, Needs] = {}
        for destination, disks in dict(doc.get("destinations", {})).items():
            out[str(destination)] = {str(s): [str(c) for c in cps] for s, cps in dict(disks).items()}
        return out

    def update(self, domain_uuid: str, destination: str, needs: Mapping[str, Collection[str]],
               configured: Collection[str]) -> set[str]:
        """Record what ``destination`` needs now, forget destinations not ``configured``; return the
        checkpoints any recorded destination still needs."""
        record = {d: n for d, n in self.needs(domain_uuid).items() if d in configured}
        for gone in set(self.needs(domain_uuid)) - set(record):
            log.info("destination %s is no longer configured: its checkpoint chain of %s ends", gone,
                     domain_uuid)
        record[destination] = {serial: sorted(cps) for serial, cps in needs.items() if cps}
        self._write(domain_uuid, record)
        return {cp for disks in record.values() for cps in disks.values() for cp in cps}

    def forgotten_base(self, domain_uuid: str, destination: str, serial: str, since: str,
                       present: Collection[str | None]) -> FallbackNote | None:
        """Why ``since`` is gone, if it is because a snapshot of the chain was forgotten: the record
        names checkpoints of ``destination``'s chain of the disk that no snapshot ``present`` there
        holds any more, and ``since`` (an older snapshot's) is not among them."""
        recorded = self.needs(domain_uuid).get(destination, {}).get(serial, [])
        lost = sorted(set(recorded) - set(present))
        if not lost or since in recorded:
            return None
        return FallbackNote(Fallback.BASE_PRUNED, (
            f"the snapshot of checkpoint {lost[-1]} was forgotten in {destination} (hyperback forget or "
            f"prune): this backup goes on from an older snapshot, whose checkpoint {since} was pruned "
            "then, so every chunk is compared with that snapshot"))

    def _write(self, domain_uuid: str, record: Mapping[str, Needs]) -> None:
        doc = json.dumps({"version": VERSION, "destinations": record}, indent=1, sort_keys=True)
        target = self._file(domain_uuid)
        tmp = target.with_suffix(".tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(doc)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            tmp.replace(target)
        except OSError as e:
            raise errors.EnvironmentProblem(f"cannot write the checkpoint chain record {target}: "
                                            f"{e.strerror}; check that {self.dir} is writable") from e
