"""Point-in-time views of running domains, and changed-block tracking between them.

The VM tests boot real guests (tests/vmlab, libvirt 9.0 + QEMU 7.2 under TCG) that write to their
disk while views are taken: the view's image holds still, the domain ends on its original image
with no overlay file or block job left, a checkpoint reports exactly the extents written since it,
and a raw disk is tracked by a bitmap that lives as long as its QEMU process, falling back to
comparison when that bitmap is gone. Deselect them with -m "not vm".

The other tests read dirty bitmaps from qemu-nbd exports and rewrite domain XML, with no VM.
"""
from __future__ import annotations

import glob
import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped]
import pytest
from conftest import MIB, lab_or_fail, sha256_file

from host_agent import errors
from host_agent.agent import checkpoints, overlays, views
from host_agent.lab import Disk, Lab, Vm, VmLabError
from host_agent.model import ChangeDetection, DiskRef, Policy
from host_agent.storage import qcow2
from host_agent.storage.extents import Extent
from host_agent.storage.repository import Repository

KIB = 1024
GUEST_CTL_ROOT = Path("/var/tmp")  # the guest sees the host's root over 9p, but not its /tmp
LAB_WAIT = 600.0                    # how long to wait for another engineer's VM to finish


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


# ---------- reading dirty bitmaps over NBD (qemu-nbd, no VM) ----------

@pytest.fixture
def bitmap_export(tmp_path: Path) -> Iterator[Path]:
    """A qcow2 image with bitmap b1 (dirty where written after it was added), exported by
    qemu-nbd on a unix socket; yields the socket path."""
    if shutil.which("qemu-nbd") is None:
        pytest.fail("needs qemu-nbd (Debian: qemu-utils; .ci/setup installs it)")
    image = tmp_path / "bm.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", str(image))  # before the bitmap: clean
    run("qemu-img", "bitmap", "--add", str(image), "b1")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 64k", "-c", "write -P 3 3M 4k",
        "-c", "write -P 4 4M 192k", str(image))
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-B", "b1", "-x", "disk",
                             f"--socket={sock}", str(image)])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


EXPECTED_DIRTY = [(MIB, 64 * KIB), (3 * MIB, 64 * KIB), (4 * MIB, 192 * KIB)]


@pytest.mark.skipif(shutil.which("nbdinfo") is None, reason="needs nbdinfo (Debian: libnbd-bin)")
def test_dirty_extents_read_with_nbdinfo(bitmap_export: Path) -> None:
    extents = checkpoints.read_dirty_extents(str(bitmap_export), "disk", "qemu:dirty-bitmap:b1")
    assert extents == EXPECTED_DIRTY


def test_dirty_extents_read_with_qemu_img_when_nbdinfo_is_missing(
        bitmap_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoints, "NBDINFO", "nbdinfo-not-installed")
    extents = checkpoints.read_dirty_extents(str(bitmap_export), "disk", "qemu:dirty-bitmap:b1")
    assert extents == EXPECTED_DIRTY


def test_an_unknown_bitmap_is_a_view_error(bitmap_export: Path) -> None:
    with pytest.raises(errors.ViewError, match="nope"):
        checkpoints.read_dirty_extents(str(bitmap_export), "disk", "qemu:dirty-bitmap:nope")


# ---------- labels and definitions (no VM) ----------

def test_checkpoint_names_are_hyperbacks_own_and_unique() -> None:
    names = {checkpoints.new_checkpoint_name() for _ in range(100)}
    assert len(names) == 100 and all(n.startswith(checkpoints.CHECKPOINT_PREFIX) for n in names)


def test_a_definition_on_an_overlay_is_pointed_back_at_the_image_below() -> None:
    disk = ET.fromstring(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/srv/d.raw.hb-overlay-0123456789ab'/>"
        "<backingStore type='file'><format type='raw'/><source file='/srv/d.raw'/>"
        "<backingStore type='file'><format type='qcow2'/><source file='/srv/base.qcow2'/></backingStore>"
        "</backingStore><target dev='vda' bus='virtio'/></disk>")
    assert overlays.pop_top_layer(disk, "/srv/d.raw.hb-overlay-0123456789ab")
    assert disk.find("source").get("file") == "/srv/d.raw"  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert disk.find("backingStore/source").get("file") == "/srv/base.qcow2"  # type: ignore[union-attr]
    assert disk.find("backingStore/backingStore") is None
    assert not overlays.pop_top_layer(disk, "/srv/d.raw.hb-overlay-0123456789ab")  # not on it any more


def test_a_definition_on_the_overlay_of_a_block_device_is_pointed_back_at_the_device() -> None:
    # the overlay (in overlay_dir) is a file; the disk below it a block device: type='block', dev=
    disk = ET.fromstring(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/var/lib/hyperback/overlays/lv0.hb-overlay-0123456789ab'/>"
        "<backingStore type='block'><format type='raw'/><source dev='/dev/vg/lv0'/></backingStore>"
        "<target dev='vda' bus='virtio'/></disk>")
    assert overlays.pop_top_layer(disk, "/var/lib/hyperback/overlays/lv0.hb-overlay-0123456789ab")
    assert disk.get("type") == "block"
    assert disk.find("source").attrib == {"dev": "/dev/vg/lv0"}  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "raw"  # type: ignore[union-attr]


# ---------- real VMs ----------

class Guest:
    """A vmlab guest that writes to /dev/vda in the background (if ``noise``) and runs numbered
    scripts the host drops into a folder it can see, reporting each on its console."""

    def __init__(self, lab: Lab, name: str, disks: list[Disk], noise: bool, persistent: bool = False) -> None:
        self.ctl = Path(GUEST_CTL_ROOT) / f"hyperback-test-views-{os.getpid()}-{random.getrandbits(32):08x}"
        self.ctl.mkdir()
        self.n = 0
        noise_loop = ("(i=0; while true; do dd if=/dev/urandom of=/dev/vda bs=64k count=1 "
                      "seek=$((i % 256)) oflag=direct 2>/dev/null; i=$((i+1)); sleep 0.05; done) &\n"
                      if noise else "")
        go = f"{self.ctl}/go-$n"
        command = (f"{noise_loop}n=1\nwhile true; do\n"
                   f"  if [ -f {go} ]; then sh {go}; echo HB-DONE-$n; n=$((n+1)); fi\n"
                   "  sleep 0.1\ndone\n")
        self.vm = start_vm_waiting(lab, name, disks, command, persistent)

    def start(self, script: str) -> int:
        self.n += 1
        tmp = self.ctl / f".go-{self.n}"
        tmp.write_text(script)
        tmp.rename(self.ctl / f"go-{self.n}")
        return self.n

    def wait(self, n: int) -> None:
        self.vm.wait_for_console(rf"HB-DONE-{n}\b", timeout=60)

    def run(self, script: str) -> None:
        self.wait(self.start(script))

    def write(self, offset: int, data: bytes, wait: bool = True) -> int:
        """Write ``data`` at ``offset`` of /dev/vda with O_DIRECT (so it reaches QEMU at once)."""
        assert offset % 4096 == 0 and len(data) % 4096 == 0
        pattern = self.ctl / f"pattern-{self.n + 1}"
        pattern.write_bytes(data)
        n = self.start(f"dd if={pattern} of=/dev/vda bs=4k seek={offset // 4096} count={len(data) // 4096} "
                       "oflag=direct conv=notrunc 2>/dev/null\n")
        if wait:
            self.wait(n)
        return n

    def close(self) -> None:
        shutil.rmtree(self.ctl, ignore_errors=True)


def start_vm_waiting(lab: Lab, name: str, disks: list[Disk], command: str, persistent: bool) -> Vm:
    """Start a guest; while another vmlab user's guest runs (one at a time), wait and retry."""
    deadline = time.monotonic() + LAB_WAIT
    while True:
        try:
            return lab.start_vm(name, disks=disks, command=command, channels=(), persistent=persistent,
                                timeout=120)
        except VmLabError as e:
            if "already running" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(5)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with lab_or_fail(tmp_path / "lab") as the_lab:
        yield the_lab


def disk_ref(vm: Vm, path: Path, fmt: str, serial: str, target: str = "vda") -> DiskRef:
    return DiskRef(vm.domain.UUIDString(), vm.name, serial, target, str(path), fmt,
                   qcow2.image_info(path, fmt).virtual_size)


def source_of(dom: Any, flags: int = 0) -> tuple[str | None, str | None]:
    disk = ET.fromstring(dom.XMLDesc(flags)).find("./devices/disk")
    assert disk is not None
    src, driver = disk.find("source"), disk.find("driver")
    return (src.get("file") if src is not None else None, driver.get("type") if driver is not None else None)


def overlays_of(image: Path) -> list[str]:
    return glob.glob(f"{glob.escape(str(image))}.hb-*")


def assert_back_on(dom: Any, image: Path, fmt: str) -> None:
    """The domain runs on its original image: no overlay in its XML or on disk, no block job."""
    assert dom.isActive()
    assert source_of(dom) == (str(image), fmt)
    assert dom.blockJobInfo("vda", 0) == {}
    assert overlays_of(image) == []
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def high(changes: tuple[Extent, ...] | None, start: int = 32 * MIB) -> list[Extent]:
    """The changed extents in the half of the disk only the test's known writes touch."""
    assert changes is not None
    return [e for e in changes if e[0] >= start]


def converted_digest(image: Path, tmp: Path) -> str:
    raw = tmp / "converted.raw"
    run("qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw))
    try:
        return sha256_file(raw)
    finally:
        raw.unlink()


def restored(repo: Repository, snapshot_id: str, tmp: Path) -> bytes:
    target = tmp / "restored.raw"
    repo.restore(snapshot_id, target, overwrite=True)
    return target.read_bytes()


@pytest.mark.vm
def test_views_of_a_qcow2_disk_under_writes(lab: Lab, tmp_path: Path, repo: Repository) -> None:
    """Stable image while the guest writes; original image afterwards; checkpoints report exactly
    the known writes since them (also writes made into the overlay); failures leave nothing."""
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 20M 4M", "-c", "write -P 0x5b 60M 1M", str(base))
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(image))
    base_digest = sha256_file(base)
    guest = Guest(lab, "views-qcow2", [Disk(image, "vda", "qcow2", "hb-views-1")], noise=True)
    try:
        dom = guest.vm.domain
        ref = disk_ref(guest.vm, image, "qcow2", "hb-views-1")
        hooks: list[str] = []
        cs = repo.config.chunk_size

        def pit(**kw: Any) -> views.PointInTime:
            return views.point_in_time(dom.connect(), dom, [ref], chunk_size=cs, timeout=30,
                                       freeze=lambda: hooks.append("freeze"),
                                       thaw=lambda: hooks.append("thaw"), **kw)

        # View 1: the first, so no changes to report; the image holds still while the guest writes.
        with pit() as v1:
            view = v1["hb-views-1"]
            assert hooks == ["freeze", "thaw"] and v1.frozen_seconds < 5
            assert view.change_detection == ChangeDetection.COMPARISON and view.changes is None
            assert "no earlier checkpoint" in view.reason
            assert v1.checkpoint is not None and view.checkpoint == v1.checkpoint
            assert view.image == str(image) and view.size == 64 * MIB and view.layout is not None
            assert view.layout.label == str(image)  # the checkpoint travels in a field of its own
            (overlay,) = overlays_of(image)
            overlay_size = os.stat(overlay).st_size
            first = sha256_file(image)
            time.sleep(2)
            assert sha256_file(image) == first  # stable: the guest writes into the overlay
            assert os.stat(overlay).st_size > overlay_size, "the guest did not write during the view"
            snap1 = repo.backup(view.source, ref.snapshot_name, checkpoint=view.checkpoint).snapshot
            assert snap1.checkpoint == v1.checkpoint and snap1.source == str(image)
            assert hashlib.sha256(restored(repo, snap1.id, tmp_path)).hexdigest() == \
                converted_digest(image, tmp_path)
        assert_back_on(dom, image, "qcow2")
        assert sha256_file(base) == base_digest  # committed into the disk's image, not the shared base

        # Known writes between view 1 and view 2, in the half of the disk the noise does not touch.
        p1, p2, p3 = os.urandom(64 * KIB), os.urandom(128 * KIB), os.urandom(4 * KIB)
        guest.write(40 * MIB, p1)
        guest.write(44 * MIB + 64 * KIB, p2)
        guest.write(47 * MIB + 4 * KIB, p3)  # within one 64 KiB bitmap granule

        with pit(since=v1.checkpoint) as v2:
            view = v2["hb-views-1"]
            assert view.change_detection == ChangeDetection.DIRTY_BITMAP and view.reason == ""
            assert high(view.changes) == [(40 * MIB, 64 * KIB), (44 * MIB + 64 * KIB, 128 * KIB),
                                          (47 * MIB, 64 * KIB)]
            assert view.changes is not None and view.changes[0][0] < 16 * MIB  # and the noise
            result = repo.backup(view.source, ref.snapshot_name, Policy.INCREMENTAL,
                                 changes=view.changes, base=snap1)
            assert result.snapshot.change_detection is ChangeDetection.CHANGE_LIST
            assert result.snapshot.stats.bytes_read <= sum(n for _, n in view.changes)
            data = restored(repo, result.snapshot.id, tmp_path)
            assert hashlib.sha256(data).hexdigest() == converted_digest(image, tmp_path)
            assert data[40 * MIB:40 * MIB + len(p1)] == p1
            assert data[44 * MIB + 64 * KIB:][:len(p2)] == p2 and data[47 * MIB + 4 * KIB:][:len(p3)] == p3
            q = os.urandom(64 * KIB)
            guest.write(52 * MIB, q)  # into the overlay, during the view
        assert_back_on(dom, image, "qcow2")

        with pit(since=v2.checkpoint) as v3:  # incremental: only what came after view 2's checkpoint
            assert high(v3["hb-views-1"].changes) == [(52 * MIB, 64 * KIB)]
        with pit(since=v1.checkpoint, checkpoint=False) as v4:  # differential: all since view 1's
            assert v4.checkpoint is None and v4["hb-views-1"].checkpoint is None
            assert high(v4["hb-views-1"].changes) == [(40 * MIB, 64 * KIB), (44 * MIB + 64 * KIB, 128 * KIB),
                                                      (47 * MIB, 64 * KIB), (52 * MIB, 64 * KIB)]
        assert checkpoints.list_checkpoints(dom) == [v1.checkpoint, v2.checkpoint, v3.checkpoint]
        assert checkpoints.prune_checkpoints(dom, {v3.checkpoint}) == [v1.checkpoint, v2.checkpoint]
        assert checkpoints.list_checkpoints(dom) == [v3.checkpoint]

        # A checkpoint that is gone: comparison, saying why.
        with pit(since=v1.checkpoint, checkpoint=False) as v5:
            assert v5["hb-views-1"].change_detection == ChangeDetection.COMPARISON
            assert f"no checkpoint {v1.checkpoint}" in v5["hb-views-1"].reason

        # A guest that cannot freeze: nothing taken, thawed anyway, its new checkpoint deleted.
        hooks.clear()

        def refuse() -> None:
            hooks.append("freeze")
            raise OSError("FIFREEZE: device busy")

        refused = views.point_in_time(dom.connect(), dom, [ref], chunk_size=cs, freeze=refuse,
                                      thaw=lambda: hooks.append("thaw"), since=v3.checkpoint)
        with pytest.raises(errors.FreezeFailed, match="device busy"), refused:
            pytest.fail("the view must not be entered")
        assert hooks == ["freeze", "thaw"]
        assert_back_on(dom, image, "qcow2")
        assert checkpoints.list_checkpoints(dom) == [v3.checkpoint]

        # A backup that fails inside the view: merged back, its checkpoint deleted.
        with pytest.raises(RuntimeError, match="copier died"), pit(since=v3.checkpoint):
            raise RuntimeError("copier died")
        assert_back_on(dom, image, "qcow2")
        assert checkpoints.list_checkpoints(dom) == [v3.checkpoint]

        # An agent that died inside a view leaves the domain on an overlay: the next agent's start
        # (recover_all over every domain of the host) undoes it.
        crashed = pit(since=v3.checkpoint)
        crashed.__enter__()
        crashed._lock.release()  # what the dead process would have released
        assert len(overlays_of(image)) == 1 and source_of(dom)[0] != str(image)
        done = overlays.recover_all(dom.connect())
        assert len(done) == 1 and done[0].startswith(f"{dom.name()}: merged") and str(image) in done[0]
        assert_back_on(dom, image, "qcow2")
        assert overlays.recover_all(dom.connect()) == []
        checkpoints.prune_checkpoints(dom, set())
    finally:
        guest.close()


@pytest.mark.vm
def test_checkpoints_list_in_the_order_they_were_made_even_within_one_second(lab: Lab,
                                                                             tmp_path: Path) -> None:
    """creationTime has one-second resolution and names end in random hex: neither orders them."""
    image = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    guest = Guest(lab, "views-order", [Disk(image, "vda", "qcow2", "hb-views-order")], noise=False)
    try:
        dom = guest.vm.domain
        made = [f"{checkpoints.CHECKPOINT_PREFIX}20990101T000000Z-{suffix}"
                for suffix in ("ff", "80", "00", "c0")]
        for name in made:
            disks = "<disks><disk name='vda' checkpoint='bitmap'/></disks>"
            dom.checkpointCreateXML(f"<domaincheckpoint><name>{name}</name>{disks}</domaincheckpoint>", 0)
        assert checkpoints.list_checkpoints(dom) == made
        checkpoints.delete_checkpoint(dom, made[1])
        assert checkpoints.list_checkpoints(dom) == [made[0], made[2], made[3]]
    finally:
        guest.close()


@pytest.mark.vm
def test_a_raw_disk_is_tracked_while_qemu_runs_and_survives_a_destroyed_domain(
        lab: Lab, tmp_path: Path) -> None:
    """Raw disks: a non-persistent bitmap (comparison, with a reason, when it is gone), beside a
    qcow2 disk of the same domain tracked by a checkpoint;
    a full overlay storage pauses the guest and the view resumes it; a domain destroyed during a view
    keeps what it wrote. A persistent domain, whose definition follows the overlay."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(32 * MIB)
    other = tmp_path / "other.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(other), "16M")
    # Small storage for an overlay, mounted before the guest starts: QEMU runs in a mount namespace
    # of its own that does not see mounts made later (seen: "Could not open ...: No such file").
    small = tmp_path / "small-storage"
    small.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small))
    try:
        disks = [Disk(image, "vda", "raw", "hb-views-2"), Disk(other, "vdb", "qcow2", "hb-views-3")]
        guest = Guest(lab, "views-raw", disks, noise=False, persistent=True)
    except BaseException:
        run("umount", str(small))
        raise
    try:
        dom = guest.vm.domain
        ref = disk_ref(guest.vm, image, "raw", "hb-views-2")
        ref_b = disk_ref(guest.vm, other, "qcow2", "hb-views-3", "vdb")
        with views.point_in_time(dom.connect(), dom, [ref], chunk_size=32 * KIB, since="hyperback-x") as v:
            view = v["hb-views-2"]
            # a bitmap for this QEMU's lifetime from now on; none named hyperback-x to go by
            assert v.checkpoint is not None and view.checkpoint == v.checkpoint
            assert view.change_detection == ChangeDetection.COMPARISON and view.changes is None
            assert "the dirty bitmap hyperback-x is gone" in view.reason
            assert view.source == str(image) and view.layout is None and view.size == 32 * MIB
            assert overlays_of(other) == []  # vdb is not in this view
            # libvirt moves the persistent definition onto the overlay too, for the view's length
            assert source_of(dom, libvirt.VIR_DOMAIN_XML_INACTIVE)[0] != str(image)
        assert_back_on(dom, image, "raw")
        assert source_of(dom, libvirt.VIR_DOMAIN_XML_INACTIVE) == (str(image), "raw")

        # Both disks in one view: the libvirt checkpoint tracks vdb only; vda has a volatile bitmap
        # of the same name.
        with views.point_in_time(dom.connect(), dom, [ref, ref_b], chunk_size=32 * KIB) as v1:
            assert v1.checkpoint is not None
            assert [d.checkpoint for d in v1] == [v1.checkpoint, v1.checkpoint]
        cp_xml = dom.checkpointLookupByName(v1.checkpoint).getXMLDesc(0)
        cp_disks = ET.fromstring(cp_xml).iterfind("./disks/disk")
        tracked = {(d.get("name"), d.get("checkpoint")) for d in cp_disks}
        assert tracked == {("vda", "no"), ("vdb", "bitmap")}
        guest.write(MIB, os.urandom(64 * KIB))  # to vda only
        with views.point_in_time(dom.connect(), dom, [ref, ref_b], chunk_size=32 * KIB,
                                 since={"hb-views-2": v1.checkpoint, "hb-views-3": v1.checkpoint}) as v2:
            assert v2["hb-views-2"].change_detection == ChangeDetection.DIRTY_BITMAP
            assert v2["hb-views-2"].changes == ((MIB, 64 * KIB),)
            assert v2["hb-views-3"].change_detection == ChangeDetection.DIRTY_BITMAP
            assert v2["hb-views-3"].changes == ()  # nothing written to vdb
        assert source_of(dom)[0] == str(image) and overlays_of(other) == []
        # A persistent domain with checkpoints cannot be undefined: keep none.
        checkpoints.prune_checkpoints(dom, set())

        # The overlay's storage fills up: QEMU pauses the guest on ENOSPC; the view merges back
        # and resumes it, and the write QEMU held back lands in the original image.
        blocked = os.urandom(2 * MIB)
        with views.point_in_time(dom.connect(), dom, [ref], chunk_size=32 * KIB, overlay_dir=str(small)):
            n = guest.write(4 * MIB, blocked, wait=False)
            deadline = time.monotonic() + 30
            while dom.state() != [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR]:
                assert time.monotonic() < deadline, f"not paused on ENOSPC: {dom.state()}"
                time.sleep(0.1)
        assert_back_on(dom, image, "raw")
        guest.wait(n)
        with open(image, "rb") as f:
            f.seek(4 * MIB)
            assert f.read(len(blocked)) == blocked
        assert os.listdir(small) == []

        # The domain is destroyed during a view: what the guest wrote into the overlay is merged
        # into the raw image offline, and the definition points at the raw image again.
        data = os.urandom(256 * KIB)
        doomed = views.point_in_time(dom.connect(), dom, [ref], chunk_size=32 * KIB)
        with pytest.raises(errors.DomainGone, match="merged the overlays of vda offline"), doomed:
            guest.write(8 * MIB, data)
            dom.destroy()
        assert overlays_of(image) == []
        with open(image, "rb") as f:
            f.seek(8 * MIB)
            assert f.read(len(data)) == data
        assert not dom.isActive()
        assert source_of(dom, libvirt.VIR_DOMAIN_XML_INACTIVE) == (str(image), "raw")
        assert overlays.recover(dom) == []
    finally:
        guest.close()
        lab.close()  # before the unmount: the domain's QEMU must let go of the small storage
        run("umount", str(small))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
