"""Boot verification records (docs/repository-format.md, 5.4): kept beside the snapshot, the
latest one wins, the console's end is kept, old repositories read as never verified, forgetting a
snapshot forgets its record, and a damaged record is ignored, not fatal."""
from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import MIB, write_image

from host_agent import errors
from host_agent.storage.repository import Repository
from host_agent.storage.verification import MAX_CONSOLE, CheckOutcome, Verification


def snapshot(tmp_path: Path) -> tuple[Repository, str]:
    repo = Repository.init(tmp_path / "r")
    image = write_image(tmp_path / "d.img", MIB, 1)
    return repo, repo.backup(image, "vm/vda").snapshot.id


def record(sid: str, passed: bool, reason: str = "", check: CheckOutcome | None = None) -> Verification:
    return Verification(sid, datetime.now(UTC), passed, reason, 30.5, "host1", check)


def test_a_record_and_the_end_of_its_console_are_kept_and_the_latest_wins(tmp_path: Path) -> None:
    repo, sid = snapshot(tmp_path)
    repo.record_verification(record(sid, False, "no answer"), b"first boot\n")
    check = CheckOutcome(("systemctl", "is-system-running"), 0, "running")
    console = b"x" * MAX_CONSOLE + b"login:\n"
    repo.record_verification(record(sid, True, "the shim answered", check), console)
    got = repo.verifications()[sid]
    assert (got.passed, got.reason, got.check) == (True, "the shim answered", check)
    assert (got.console_bytes, got.console_kept) == (len(console), MAX_CONSOLE)
    assert repo.console_text(sid) == console[-MAX_CONSOLE:]


def test_an_old_repository_without_the_folder_reads_as_never_verified(tmp_path: Path) -> None:
    repo, sid = snapshot(tmp_path)
    assert not (repo.path / "verifications").exists()
    assert repo.verifications() == {} and repo.console_text(sid) is None
    repo.record_verification(record(sid, True), b"")
    assert (repo.path / "verifications").is_dir() and repo.verifications()[sid].passed


def test_forgetting_a_snapshot_forgets_its_record(tmp_path: Path) -> None:
    repo, sid = snapshot(tmp_path)
    repo.record_verification(record(sid, False, "panic"), b"Kernel panic\n")
    repo.forget([sid])
    assert list((repo.path / "verifications").iterdir()) == []
    with pytest.raises(errors.SnapshotNotFound):
        repo.record_verification(record(sid, True), b"")


def test_damaged_or_foreign_records_are_ignored(tmp_path: Path) -> None:
    repo, sid = snapshot(tmp_path)
    repo.record_verification(record(sid, True), b"")
    shutil.copy(repo.path / "verifications" / sid, repo.path / "verifications" / "0123456789abcdef")
    (repo.path / "verifications" / "fedcba9876543210").write_text("{not json")
    doc = json.loads((repo.path / "verifications" / sid).read_text())
    assert doc["result"] == "passed" and doc["version"] == 1
    assert list(repo.verifications()) == [sid]  # the copy names another snapshot than its file
