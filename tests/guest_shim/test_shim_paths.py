"""Path-level backups inside the guest: a guest path named as the host names it (disk serial,
partition, path in the file system's own root), and paths restored from a file-level snapshot's
archive read off a disk, bit-identical with modes and nanosecond times, never through a link and
never outside the target folder. The sysfs tree and mountinfo are stand-ins; the archive is the one
the host writes (``host_agent.storage.filesnap.spool``), catalog and all."""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from guestfs_images import HostTree, guest_tree, snapshot_of_tree

from guest_shim.errors import InvalidArgument, RestoreError
from guest_shim.paths import FileSystemPaths, locate, restore_archive
from host_agent.storage.filesnap import spool


def sysfs_partition(sys_root: Path, disk: str, partition: int, dev: str, serial: str | None) -> None:
    """/sys/block/DISK[/DISKn] and the /sys/dev/block/MAJ:MIN link the kernel gives it."""
    node = sys_root / "devices" / "virtio1" / "block" / disk
    if partition:
        node = node / f"{disk}{partition}"
    node.mkdir(parents=True)
    if partition:
        (node / "partition").write_text(f"{partition}\n")
    (sys_root / "block").mkdir(exist_ok=True)
    if not (sys_root / "block" / disk).exists():
        (sys_root / "block" / disk).symlink_to(sys_root / "devices" / "virtio1" / "block" / disk)
    if serial is not None:
        (sys_root / "devices" / "virtio1" / "block" / disk / "serial").write_text(f"{serial}\n")
    (sys_root / "dev" / "block").mkdir(parents=True, exist_ok=True)
    (sys_root / "dev" / "block" / dev).symlink_to(node)


def mountinfo(path: Path, *mounts: tuple[str, str, str]) -> Path:
    lines = [f"{20 + n} 1 {dev} {root} {point} rw,relatime shared:1 - ext4 /dev/x rw"
             for n, (dev, root, point) in enumerate(mounts)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_guest_path_is_named_by_disk_serial_partition_and_path_in_its_file_system(tmp_path: Path) -> None:
    sys_root, data = tmp_path / "sys", tmp_path / "data"
    (data / "usr" / "lib").mkdir(parents=True)
    (data / "etc").mkdir()
    (data / "etc" / "app.conf").write_text("x\n")
    (tmp_path / "link").symlink_to(data / "usr")
    sysfs_partition(sys_root, "vdb", 2, "254:18", "hb-data")
    info = mountinfo(tmp_path / "mountinfo", ("0:1", "/", "/"), ("254:18", "/", str(data)))

    where = locate([f"{data}/usr/lib", f"{tmp_path}/link/lib", f"{data}/etc/app.conf"],
                   sys_root=str(sys_root), mountinfo=str(info))

    assert where == FileSystemPaths("hb-data", 2, str(data), "/", ("/usr/lib", "/etc/app.conf"))


def test_a_bind_mount_names_paths_from_the_file_systems_root(tmp_path: Path) -> None:
    sys_root, data = tmp_path / "sys", tmp_path / "srv"
    (data / "www").mkdir(parents=True)
    sysfs_partition(sys_root, "vda", 0, "254:0", "hb-root")
    info = mountinfo(tmp_path / "mountinfo", ("254:0", "/var/lib/srv", str(data)))

    where = locate([f"{data}/www"], sys_root=str(sys_root), mountinfo=str(info))

    assert (where.partition, where.paths) == (0, ("/var/lib/srv/www",))
    assert where.guest_path("/var/lib/srv/www/index.html") == f"{data}/www/index.html"
    assert where.guest_path("/etc/passwd") is None


def test_paths_the_host_cannot_read_are_refused_before_anything_is_sent(tmp_path: Path) -> None:
    sys_root, one, two, mem = tmp_path / "sys", tmp_path / "one", tmp_path / "two", tmp_path / "mem"
    for folder in (one, two, mem):
        folder.mkdir()
    sysfs_partition(sys_root, "vda", 1, "254:1", "hb-a")
    sysfs_partition(sys_root, "vda", 2, "254:2", "hb-a")
    sysfs_partition(sys_root, "vdc", 0, "254:32", None)
    info = mountinfo(tmp_path / "mountinfo", ("254:1", "/", str(one)), ("254:2", "/", str(two)),
                     ("0:45", "/", str(mem)))
    cases = {
        (str(one), str(two)): "different file systems",
        (str(mem),): "not on a block device",
        (f"{one}/missing",): "does not exist",
        ("relative/path",): "not an absolute path",
    }
    for paths, message in cases.items():
        with pytest.raises(InvalidArgument, match=message):
            locate(list(paths), sys_root=str(sys_root), mountinfo=str(info))
    info = mountinfo(tmp_path / "mountinfo", ("254:32", "/", str(one)))
    with pytest.raises(InvalidArgument, match="has no serial"):
        locate([str(one)], sys_root=str(sys_root), mountinfo=str(info))


def archive_image(tree: Path, out: Path, *paths: str) -> Path:
    """The image of a file-level snapshot as the host stores it: archive, padding, catalog."""
    with open(out, "wb") as f:
        spool(HostTree(tree), paths, f.fileno(), 65536, 2)
    return out


def test_restored_paths_are_bit_identical_with_modes_and_nanosecond_times(tmp_path: Path) -> None:
    tree = guest_tree(tmp_path / "tree")
    os.utime(tree / "etc" / "app" / "app.conf", ns=(1_700_000_000_987_654_321, 1_700_000_000_123_456_789))
    image = archive_image(tree, tmp_path / "image", "/etc/app", "/data")
    (tmp_path / "out").mkdir()
    where = FileSystemPaths("hb-data", 2, "/mnt/data", "/", ("/etc/app", "/data"))

    with open(image, "rb") as stream:
        done = restore_archive(stream, where, str(tmp_path / "out"))

    restored = snapshot_of_tree(tmp_path / "out" / "mnt" / "data")
    want = {k: v for k, v in snapshot_of_tree(tree).items() if k not in ("data/pipe", "etc")}
    want["data/tool"] = replace(want["data/tool"], mode=0o100755)  # owners are not kept: never setuid
    assert {k: v for k, v in restored.items() if k != "etc"} == want
    assert (done.files, done.links, done.skipped) == (6, 3, [])
    assert (tmp_path / "out/mnt/data/etc/app/app.conf").stat().st_mtime_ns == 1_700_000_000_123_456_789


def test_only_the_asked_paths_are_restored_and_a_missing_one_is_named(tmp_path: Path) -> None:
    tree = guest_tree(tmp_path / "tree")
    image = archive_image(tree, tmp_path / "image", "/etc/app", "/data")
    (tmp_path / "out").mkdir()
    where = FileSystemPaths("hb-data", 2, "/", "/", ("/etc/app/conf.d", "/usr/lib"))

    with open(image, "rb") as stream:
        done = restore_archive(stream, where, str(tmp_path / "out"))

    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        "etc", "etc/app", "etc/app/conf.d", "etc/app/conf.d/10-local.conf"]
    assert done.skipped == ["/usr/lib: not in the snapshot"]


def test_a_restore_in_place_replaces_files_and_leaves_a_folder_in_the_way_alone(tmp_path: Path) -> None:
    tree = guest_tree(tmp_path / "tree")
    image = archive_image(tree, tmp_path / "image", "/etc/app")
    live = tmp_path / "live"
    (live / "etc" / "app" / "app.conf").mkdir(parents=True)  # a folder where the snapshot has a file
    (live / "etc" / "app" / "conf.d").mkdir()
    (live / "etc" / "app" / "conf.d" / "10-local.conf").write_text("changed since\n")
    where = FileSystemPaths("hb-data", 2, "/", "/", ("/etc/app",))

    with open(image, "rb") as stream:
        done = restore_archive(stream, where, str(live))

    assert done.in_the_way == [f"{live}/etc/app/app.conf is a folder where the snapshot has a file"]
    assert (live / "etc/app/app.conf").is_dir()
    assert (live / "etc/app/conf.d/10-local.conf").read_text() == "debug = false\n"  # the rest restored
    assert [p.name for p in (live / "etc" / "app").iterdir() if ".hyperback-" in p.name] == []


def test_paths_that_no_longer_exist_are_located_for_a_restore(tmp_path: Path) -> None:
    sys_root, data = tmp_path / "sys", tmp_path / "data"
    data.mkdir()
    sysfs_partition(sys_root, "vdb", 1, "254:17", "hb-data")
    info = mountinfo(tmp_path / "mountinfo", ("254:17", "/", str(data)))
    with pytest.raises(InvalidArgument, match="does not exist"):
        locate([f"{data}/gone/file"], sys_root=str(sys_root), mountinfo=str(info))

    where = locate([f"{data}/gone/file"], sys_root=str(sys_root), mountinfo=str(info), existing=False)

    assert (where.serial, where.partition, where.paths) == ("hb-data", 1, ("/gone/file",))


def crafted(entries: list[tarfile.TarInfo]) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info in entries:
            tar.addfile(info, io.BytesIO(b"owned\n") if info.isfile() else None)
    out.seek(0)
    return out


def test_a_hostile_archive_writes_nothing_outside_the_target_nor_through_a_link(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "outside").mkdir()
    link = tarfile.TarInfo("srv/a")
    link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path / "outside")
    through = tarfile.TarInfo("srv/a/file")
    through.size = 6
    where = FileSystemPaths("hb-data", 0, "/", "/", ("/srv",))

    done = restore_archive(crafted([link, through]), where, str(tmp_path / "out"))
    assert len(done.in_the_way) == 1 and "srv/a is in the way" in done.in_the_way[0]
    assert list((tmp_path / "outside").iterdir()) == []

    dotdot = tarfile.TarInfo("srv/../../outside/x")
    dotdot.size = 6
    with pytest.raises(RestoreError, match="not a plain path"):
        restore_archive(crafted([dotdot]), FileSystemPaths("s", 0, "/", "/", ("/",)), str(tmp_path / "out"))
    assert list((tmp_path / "outside").iterdir()) == []
