"""The journal keeps accepted instructions across restarts and never leaks across VMs."""
from __future__ import annotations

from pathlib import Path

from host_agent.agent.journal import Journal, new_job_id
from host_agent.model import DiskRef, Instruction, InstructionKind, Policy


def instruction(domain: str = "dom-a") -> Instruction:
    disk = DiskRef(domain, "vm-a", "disk1", "vda", "/images/a.qcow2", "qcow2", 1 << 20,
                   ("/images/base.qcow2",))
    return Instruction(new_job_id(), domain, "req-1", InstructionKind.BACKUP, (disk,), "default",
                       Policy.INCREMENTAL, received_at=1.0)


def test_pending_instructions_survive_a_restart(tmp_path: Path) -> None:
    first = instruction()
    Journal(tmp_path).add(first)
    assert Journal(tmp_path).pending() == [first]


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
