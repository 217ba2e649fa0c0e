"""A durable record of accepted instructions and their results.

An instruction is written to ``pending/`` before the guest hears "accepted";
its result is written to ``results/`` before the pending file goes. After a
crash or restart the agent re-queues every pending instruction as it was (its
placement, the guest's request id with its JSON type, who asked: a guest or an
operator), and a guest that lost its connection asks for its job's status and
gets the stored result. Results are kept for ``KEEP_RESULTS`` seconds.

A pending file is ``{"instruction": {...}, "origin": "guest"|"operator"|"schedule", "domain_name": ...,
"schedule": ...}``; files written before origins were kept hold the instruction alone, and replay as
a guest's.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from host_agent.agent.jobs import Origin
from host_agent.model import DiskRef, Instruction, InstructionKind, PathSelection, Placement, Policy

log = logging.getLogger(__name__)

KEEP_RESULTS = 7 * 24 * 3600.0
JOB_ID = re.compile(r"[0-9a-f]{16}")  # instruction ids are host-made; anything else is refused unread


def new_job_id() -> str:
    return os.urandom(8).hex()


def _write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


@dataclass(frozen=True)
class Pending:
    """An accepted instruction without a result yet, and who asked for it."""

    instruction: Instruction
    origin: Origin = Origin.GUEST
    domain_name: str = ""
    schedule: str = ""


def instruction_to_json(i: Instruction) -> dict[str, Any]:
    return asdict(i)


def instruction_from_json(doc: dict[str, Any]) -> Instruction:
    disks = tuple(DiskRef(**{**d, "backing_chain": tuple(d["backing_chain"])}) for d in doc["disks"])
    return Instruction(doc["id"], doc["domain_uuid"], doc["request_id"], InstructionKind(doc["kind"]), disks,
                       doc["destination"], Policy(doc["policy"]), doc["snapshot"], doc["received_at"],
                       Placement(doc.get("placement", Placement.AUTO)),
                       PathSelection(doc["paths"]["partition"], tuple(doc["paths"]["paths"]))
                       if doc.get("paths") else None)


def pending_from_json(doc: dict[str, Any]) -> Pending:
    if "instruction" not in doc:  # written before origins were kept
        return Pending(instruction_from_json(doc))
    return Pending(instruction_from_json(doc["instruction"]), Origin[doc["origin"].upper()],
                   str(doc["domain_name"]), str(doc.get("schedule", "")))


class Journal:
    def __init__(self, directory: Path) -> None:
        self.pending_dir = directory / "pending"
        self.results_dir = directory / "results"
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.results_dir.mkdir(parents=True, exist_ok=True)

    def add(self, instruction: Instruction, origin: Origin = Origin.GUEST, domain_name: str = "",
            schedule: str = "") -> None:
        _write(self.pending_dir / f"{instruction.id}.json", {
            "instruction": instruction_to_json(instruction), "origin": origin.name.lower(),
            "domain_name": domain_name, "schedule": schedule})

    def finish(self, instruction: Instruction, result: dict[str, Any]) -> None:
        doc = {"domain_uuid": instruction.domain_uuid, "request_id": instruction.request_id,
               "finished_at": time.time(), **result}
        _write(self.results_dir / f"{instruction.id}.json", doc)
        (self.pending_dir / f"{instruction.id}.json").unlink(missing_ok=True)

    def pending(self) -> list[Pending]:
        """Every instruction accepted and not finished, oldest first."""
        out = []
        for path in sorted(self.pending_dir.glob("*.json")):
            try:
                out.append(pending_from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                log.error("unreadable pending instruction %s (%s); moved aside", path.name, e)
                path.rename(path.with_suffix(".broken"))
        return sorted(out, key=lambda p: p.instruction.received_at)

    def result(self, domain_uuid: str, job: str) -> dict[str, Any] | None:
        """The stored result of a job, only for the domain that asked for it."""
        if not JOB_ID.fullmatch(job):
            return None
        path = self.results_dir / f"{job}.json"
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return doc if doc.get("domain_uuid") == domain_uuid else None

    def is_pending(self, domain_uuid: str, job: str) -> bool:
        if not JOB_ID.fullmatch(job):
            return False
        path = self.pending_dir / f"{job}.json"
        try:
            return pending_from_json(json.loads(path.read_text())).instruction.domain_uuid == domain_uuid
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

    def expire(self, now: float | None = None) -> None:
        cutoff = (now or time.time()) - KEEP_RESULTS
        for path in self.results_dir.glob("*.json"):
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
