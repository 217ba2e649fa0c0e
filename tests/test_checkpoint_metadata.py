"""Checkpoint records carried in the domain's <metadata> (checkpoint_metadata): what is written reads
back, what anyone else wrote there is checked before use, and libvirt keeps them. libvirt here is its
real ``test:///default`` driver (in-memory domains, real metadata handling); the moves between hosts
are in tests/test_checkpoint_travel_vm.py."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host_agent import hypervisor
from host_agent.agent import checkpoint_metadata as cm
from host_agent.agent.checkpoint_record import CheckpointRecords, tracked_bitmaps

XML = ("<domaincheckpoint><name>hyperback-1</name><parent><name>hyperback-0</name></parent>"
       "<creationTime>1765152000</creationTime><disks>"
       "<disk name='vda' checkpoint='bitmap' bitmap='hyperback-1'/><disk name='vdb' checkpoint='no'/>"
       "</disks></domaincheckpoint>")


def entry(name: str = "hyperback-2", created: str = "1765152001", disk: str = "<disk name='vda' "
          "checkpoint='bitmap' bitmap='hyperback-2'/>") -> str:
    return f"<checkpoint name='{name}' created='{created}'>{disk}</checkpoint>"


@pytest.fixture
def domain() -> Iterator[Any]:
    conn = hypervisor.connect("test:///default")
    try:
        dom = conn.lookupByName("test")
        cm.write(dom, {})
        yield dom
    finally:
        conn.close()


def test_a_record_reads_back_as_the_checkpoint_libvirt_described() -> None:
    record = cm.from_checkpoint_xml(XML)
    assert cm.parse(cm.render({record.name: record})) == {"hyperback-1": record}
    again = record.checkpoint_xml()
    assert tracked_bitmaps(again) == tracked_bitmaps(XML) == {"vda": "hyperback-1"}
    assert "<parent><name>hyperback-0</name></parent>" in again and "vdb" in again


@pytest.mark.parametrize("bad", [
    entry(name="../etc"), entry(name="x y"), entry(created="soon"),
    entry(disk="<disk name='vda\"/&gt;' checkpoint='bitmap' bitmap='b'/>"),
    entry(disk="<disk name='vda' checkpoint='bitmap' bitmap='a/b'/>"),
    entry(disk="<disk name='vda' checkpoint='maybe'/>"),
    entry(disk="<disk name='vda' checkpoint='no'/><disk name='vda' checkpoint='no'/>"),
    entry(disk=""), entry(disk="<disk name='vda' checkpoint='no'/>" * (cm.MAX_DISKS + 1))])
def test_an_entry_someone_else_wrote_badly_is_skipped_and_the_good_ones_kept(bad: str) -> None:
    found = cm.parse(f"<checkpoints>{bad}{entry(name='hyperback-3')}</checkpoints>")
    assert list(found) == ["hyperback-3"]


@pytest.mark.parametrize("text", ["<checkpoints>", "not xml", "<c>" + " " * cm.MAX_TEXT + "</c>"])
def test_metadata_that_is_damaged_or_too_long_is_ignored(text: str) -> None:
    assert cm.parse(text) == {}


def test_only_the_newest_records_are_kept_past_the_limit() -> None:
    many = {f"cp-{i:03}": cm.Record(f"cp-{i:03}", 1000 + i, "", (("vda", "bitmap", f"cp-{i:03}"),))
            for i in range(cm.MAX_RECORDS + 5)}
    kept = cm.parse(cm.render(many))
    assert len(kept) == cm.MAX_RECORDS and min(kept) == "cp-005"


def test_libvirt_keeps_the_records_in_the_domain_and_forgets_them(domain: Any) -> None:
    assert cm.read(domain) == {}
    cm.save(domain, XML)
    cm.save(domain, XML.replace("hyperback-1", "hyperback-2"))
    assert sorted(cm.read(domain)) == ["hyperback-1", "hyperback-2"]
    assert cm.NS in domain.XMLDesc(0)
    cm.forget(domain, {"hyperback-1", "unknown"})
    assert sorted(cm.read(domain)) == ["hyperback-2"]
    cm.forget(domain, {"hyperback-2"})
    assert cm.read(domain) == {} and cm.NS not in domain.XMLDesc(0)


def test_a_host_without_a_record_file_finds_the_one_the_domain_carries(domain: Any, tmp_path: Path) -> None:
    cm.save(domain, XML)
    carried = CheckpointRecords(tmp_path / "here")
    found = carried.find(domain, "hyperback-1")
    assert found is not None and tracked_bitmaps(found) == {"vda": "hyperback-1"}
    assert CheckpointRecords(tmp_path / "here", in_domain=False).find(domain, "hyperback-1") is None
    carried.drop(domain, {"hyperback-1"})
    assert cm.read(domain) == {} and carried.find(domain, "hyperback-1") is None
