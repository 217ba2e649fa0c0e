"""hyperback's checkpoint records and the bitmap checks, without a VM (the real-VM tests are in
tests/test_checkpoint_record_vm.py and tests/test_checkpoint_migration_vm.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from host_agent.agent.checkpoint_record import (
    Bitmap,
    CheckpointRecords,
    bitmap_problem,
    file_id,
    tracked_bitmaps,
)
from host_agent.errors import ViewError

UUID = "0b6c1bb2-7a3e-4c69-9d2f-5d0f6d1e2a11"
XML = ("<domaincheckpoint><name>hyperback-1</name><parent><name>hyperback-0</name></parent><disks>"
       "<disk name='vda' checkpoint='bitmap' bitmap='hyperback-1'/><disk name='vdb' checkpoint='no'/>"
       "<disk name='vdc' checkpoint='bitmap'/></disks></domaincheckpoint>")


def test_records_are_kept_per_domain_and_forgotten(tmp_path: Path) -> None:
    records = CheckpointRecords(tmp_path)
    assert records.names(UUID) == [] and records.load(UUID, "hyperback-1") is None
    records.save(UUID, "hyperback-1", XML)
    records.save(UUID, "hyperback-2", XML)
    assert records.names(UUID) == ["hyperback-1", "hyperback-2"]
    assert records.load(UUID, "hyperback-1") == XML
    assert (tmp_path / "checkpoints" / UUID / "hyperback-1.xml").is_file()
    assert records.names("11111111-7a3e-4c69-9d2f-5d0f6d1e2a11") == []
    records.forget(UUID, "hyperback-1")
    records.forget(UUID, "hyperback-1")  # twice: nothing to do
    assert records.names(UUID) == ["hyperback-2"]
    assert not list((tmp_path / "checkpoints" / UUID).glob(".*"))  # no temporary file left


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 300])
def test_a_name_that_is_no_plain_file_name_is_refused(tmp_path: Path, name: str) -> None:
    records = CheckpointRecords(tmp_path)
    with pytest.raises(ViewError, match="cannot name a checkpoint record"):
        records.save(UUID, name, XML)
    assert records.load(name, "hyperback-1") is None and records.load(UUID, name) is None


def test_the_bitmap_of_each_tracked_disk_defaults_to_the_checkpoint_name() -> None:
    assert tracked_bitmaps(XML) == {"vda": "hyperback-1", "vdc": "hyperback-1"}


def test_only_a_present_persistent_recording_consistent_bitmap_is_trusted() -> None:
    sound = Bitmap("cp", recording=True, persistent=True, inconsistent=False)
    assert bitmap_problem({"cp": sound}, "cp", "vda", "cp") == ""
    assert "missing on vda" in bitmap_problem({}, "cp", "vda", "cp")
    assert "missing on vda" in bitmap_problem(None, "cp", "vda", "cp")
    broken = Bitmap("cp", recording=True, persistent=True, inconsistent=True)
    assert "inconsistent" in bitmap_problem({"cp": broken}, "cp", "vda", "cp")
    disabled = Bitmap("cp", recording=False, persistent=True, inconsistent=False)
    assert "not a persistent, recording bitmap" in bitmap_problem({"cp": disabled}, "cp", "vda", "cp")


def test_the_image_files_a_checkpoint_tracked_are_recorded_and_a_restore_onto_the_path_is_another_file(
        tmp_path: Path) -> None:
    records = CheckpointRecords(tmp_path / "state")
    image = tmp_path / "vda.qcow2"
    image.write_bytes(b"old")
    records.save(UUID, "hyperback-1", XML)
    before = file_id(str(image))
    assert before is not None
    records.save_images(UUID, "hyperback-1", {"vda": before})
    assert records.images(UUID, "hyperback-1") == {"vda": before}
    assert records.names(UUID) == ["hyperback-1"]  # the identities are no record of their own
    new = tmp_path / ".vda.qcow2.restoring"  # how a restore writes: beside, then renamed over it
    new.write_bytes(b"older content")
    new.replace(image)
    assert file_id(str(image)) != before
    records.forget(UUID, "hyperback-1")
    assert records.images(UUID, "hyperback-1") == {}
    assert not list((tmp_path / "state" / "checkpoints" / UUID).iterdir())
