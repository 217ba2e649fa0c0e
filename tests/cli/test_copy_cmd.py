from __future__ import annotations

import json
import shutil
from pathlib import Path

from cli_helpers import assert_one_line_error, run, run_json
from conftest import MIB, mutate, sha256_file, write_image

from host_agent.storage.packfile import RECORD_HEADER, read_index


def two_snapshots(tmp_path: Path) -> tuple[Path, list[str], dict[str, str]]:
    """A repository with vm1/vda twice and vm2/vda once; the ids oldest first, and their images' digests."""
    run("init", tmp_path / "src")
    image = write_image(tmp_path / "a.img", 2 * MIB, 3)
    digests = {}
    ids = []
    for name, seed in (("vm1/vda", None), ("vm2/vda", 5), ("vm1/vda", 6)):
        if seed is not None:
            mutate(image, seed, 4)
        ids.append(run_json("backup", "--repo", tmp_path / "src", "--name", name, image)["snapshot"])
        digests[ids[-1]] = sha256_file(image)
    return tmp_path / "src", ids, digests


def test_help_answers() -> None:
    out = run("copy", "--help").stdout
    for word in ("--from", "--to", "--name", "--latest", "media://HOST:PORT/DESTINATION", "chunk size"):
        assert word in out


def test_copy_prints_each_snapshot_and_a_summary_then_skips_them_and_restores_bit_identical(
        tmp_path: Path) -> None:
    src, ids, digests = two_snapshots(tmp_path)
    run("init", tmp_path / "dst")
    proc = run("copy", "--from", src, "--to", tmp_path / "dst")
    assert [line.split()[:2] for line in proc.stderr.splitlines()] == [["copied", i] for i in ids]
    assert proc.stdout.startswith("3 snapshot(s) copied, 0 skipped (already there), 0 failed; sent ")
    again = run_json("copy", "--from", src, "--to", tmp_path / "dst")
    assert again["skipped"] == ids and again["bytes_sent"] == 0 and again["ok"]
    assert run_json("check", "--repo", tmp_path / "dst")["ok"]
    for sid, digest in digests.items():
        run("restore", "--repo", tmp_path / "dst", sid, tmp_path / f"{sid}.img")
        assert sha256_file(tmp_path / f"{sid}.img") == digest


def test_a_selection_by_name_latest_or_id(tmp_path: Path) -> None:
    src, ids, _ = two_snapshots(tmp_path)
    for n, (args, want) in enumerate([(["--name", "vm1/vda"], [ids[0], ids[2]]),
                                      (["--latest"], [ids[1], ids[2]]),
                                      (["--name", "vm1/vda", "--latest"], [ids[2]]),
                                      ([ids[1][:6], "vm1/vda@latest"], [ids[1], ids[2]])]):
        run("init", tmp_path / f"dst{n}")
        assert run_json("copy", "--from", src, "--to", tmp_path / f"dst{n}", *args)["copied"] == want, args


def test_a_damaged_chunk_exits_4_naming_it_and_copies_the_rest(tmp_path: Path) -> None:
    src, ids, _ = two_snapshots(tmp_path)
    # damage every data record of the first pack: the first snapshot's own chunks among them
    name = sorted((src / "index").iterdir(), key=lambda p: p.stat().st_mtime)[0].name
    pack = src / "packs" / name[:2] / name
    raw = bytearray(pack.read_bytes())
    for e in read_index(src / "index" / name):
        if e.type == 0:
            raw[e.offset + RECORD_HEADER.size] ^= 0x55
    pack.write_bytes(bytes(raw))
    run("init", tmp_path / "dst")
    proc = run("copy", "--from", src, "--to", tmp_path / "dst", check=False)
    assert proc.returncode == 4, proc.stderr
    assert f"FAILED {ids[0]} vm1/vda: chunk " in proc.stderr and "damaged" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert run_json("check", "--repo", tmp_path / "dst")["ok"]


def test_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    src, ids, _ = two_snapshots(tmp_path)
    run("init", tmp_path / "small", "--chunk-size", "4096")
    run("init", tmp_path / "dst")
    shutil.copytree(src, tmp_path / "twin")
    for args, code, words in [
            (["--from", src], 2, ["--to"]),
            (["--from", src, "--to", tmp_path / "small"], 2, ["chunk size is 32768", "--chunk-size 32768"]),
            (["--from", src, "--to", src], 2, ["same repository"]),
            (["--from", tmp_path / "nowhere", "--to", tmp_path / "dst"], 2, ["nowhere"]),
            (["--from", src, "--to", tmp_path / "dst", "ffffffff"], 2, ["no snapshot 'ffffffff'"]),
            (["--from", src, "--to", tmp_path / "dst", "--name", "vm9/vda"], 2, ["vm9/vda"]),
            (["--from", src, "--to", tmp_path / "dst", "--latest", ids[0]], 2, ["not both"]),
            (["--from", src, "--to", "media://nowhere"], 2, ["HOST:PORT/DESTINATION"]),
            (["--from", "media://127.0.0.1:1/x", "--to", tmp_path / "dst"], 2, ["--from"])]:
        assert_one_line_error(run("copy", *args, check=False), code, *map(str, words))
    assert json.loads(run("list", "--repo", tmp_path / "dst", "--json").stdout) == []
    # a repository copied by other means (rsync) is a target like any other: it holds everything
    assert run_json("copy", "--from", src, "--to", tmp_path / "twin")["skipped"] == ids
