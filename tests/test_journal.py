"""The journal keeps accepted instructions across restarts and never leaks across VMs."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from host_agent.agent.jobs import Origin
from host_agent.agent.journal import Journal, new_job_id
from host_agent.model import DiskRef, Instruction, InstructionKind, Placement, Policy


def instruction(domain: str = "dom-a") -> Instruction:
    disk = DiskRef(domain, "vm-a", "disk1", "vda", "/images/a.qcow2", "qcow2", 1 << 20,
                   ("/images/base.qcow2",))
    return Instruction(new_job_id(), domain, "req-1", InstructionKind.BACKUP, (disk,), "default",
                       Policy.INCREMENTAL, received_at=1.0)


def test_pending_instructions_survive_a_restart(tmp_path: Path) -> None:
    first = instruction()
    Journal(tmp_path).add(first)
    assert [p.instruction for p in Journal(tmp_path).pending()] == [first]


def test_a_finished_instruction_leaves_a_result_only_its_domain_can_read(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    job = instruction()
    journal.add(job)
    journal.finish(job, {"ok": True})
    assert journal.pending() == []
    assert journal.result("dom-a", job.id)["ok"] is True  # type: ignore[index]
    assert journal.result("dom-b", job.id) is None


def test_hostile_job_ids_are_never_used_as_paths(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    (tmp_path / "secret.json").write_text('{"domain_uuid": "dom-a", "ok": true}')
    for job in ("../secret", "../../secret", "/etc/passwd", "", "x" * 1000):
        assert journal.result("dom-a", job) is None
        assert not journal.is_pending("dom-a", job)


def test_a_replayed_instruction_is_the_one_accepted_placement_origin_and_request_id_type_included(
        tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    forced = replace(instruction(), request_id="op-7", placement=Placement.STREAM)
    numeric, textual = replace(instruction(), request_id=42), replace(instruction(), request_id="42")
    journal.add(forced, Origin.OPERATOR, "vm-a")
    journal.add(numeric, Origin.GUEST, "vm-a")
    journal.add(textual, Origin.GUEST, "vm-a")
    replayed = {p.instruction.id: p for p in Journal(tmp_path).pending()}
    assert replayed[forced.id].instruction == forced and replayed[forced.id].origin is Origin.OPERATOR
    assert replayed[forced.id].domain_name == "vm-a"
    assert replayed[numeric.id].instruction.request_id == 42
    assert replayed[textual.id].instruction.request_id == "42"
    assert replayed[numeric.id].origin is Origin.GUEST


def test_a_pending_file_from_before_origins_were_kept_replays_as_a_guests(tmp_path: Path) -> None:
    old = instruction()
    journal = Journal(tmp_path)
    doc = {**{k: v for k, v in old.__dict__.items() if k != "placement"},
           "disks": [d.__dict__ for d in old.disks], "kind": "backup", "policy": "incremental"}
    (journal.pending_dir / f"{old.id}.json").write_text(json.dumps(doc))
    (pending,) = journal.pending()
    assert pending.instruction == old and pending.origin is Origin.GUEST
    assert journal.is_pending("dom-a", old.id) and not journal.is_pending("dom-b", old.id)
