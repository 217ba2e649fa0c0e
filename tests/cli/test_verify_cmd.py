from __future__ import annotations

from pathlib import Path

from cli_helpers import run, run_json
from conftest import MIB, write_image

from host_agent.storage.packfile import RECORD_HEADER, read_index


def test_verify_is_clean_then_names_a_flipped_chunk(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", 2 * MIB, 3)
    sid = run_json("backup", "--repo", tmp_path / "r", "--name", "vm1/vda", image)["snapshot"]
    assert run_json("verify", "--repo", tmp_path / "r")["ok"]
    name = next((tmp_path / "r" / "index").iterdir()).name
    entry = next(e for e in read_index(tmp_path / "r" / "index" / name) if e.type == 0)
    pack = tmp_path / "r" / "packs" / name[:2] / name
    raw = bytearray(pack.read_bytes())
    raw[entry.offset + RECORD_HEADER.size] ^= 0x80
    pack.write_bytes(bytes(raw))
    proc = run("verify", "--repo", tmp_path / "r", check=False)
    assert proc.returncode == 4
    assert f"BAD chunk {entry.id.hex()} used by {sid}" in proc.stdout
