from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from cli_helpers import assert_one_line_error, run, run_json
from conftest import MIB, mutate, write_image

from host_agent.model import Fallback, FallbackNote, Policy
from host_agent.storage.repository import Repository
from host_agent.storage.verification import Verification


def test_list_shows_snapshots_oldest_first(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", MIB, 3)
    ids = [run_json("backup", "--repo", tmp_path / "r", "--name", n, image)["snapshot"]
           for n in ("a/x", "b/y")]
    assert [s["id"] for s in run_json("list", "--repo", tmp_path / "r")] == ids
    assert [s["id"] for s in run_json("list", "--repo", tmp_path / "r", "--name", "b/y")] == ids[1:]
    table = run("list", "--repo", tmp_path / "r").stdout
    assert ids[0] in table and "a/x" in table


def test_list_shows_each_snapshots_latest_boot_verification(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", MIB, 3)
    good, bad, never = (run_json("backup", "--repo", tmp_path / "r", "--name", "vm/vda", image)["snapshot"]
                        for _ in range(3))
    repo = Repository.open(tmp_path / "r")
    repo.record_verification(record(good, True, "the shim answered after 12.0 s"), b"booted\n")
    repo.record_verification(record(bad, False, "no answer from the shim within 60 s"), b"panic\n")
    rows = {s["id"]: s["verification"] for s in run_json("list", "--repo", tmp_path / "r")}
    assert rows[good]["result"] == "passed" and rows[never] is None
    assert rows[bad]["result"] == "failed" and rows[bad]["reason"] == "no answer from the shim within 60 s"
    table = run("list", "--repo", tmp_path / "r").stdout.splitlines()
    assert "BOOT" in table[0]
    assert [line.split()[-2] for line in table[1:]] == ["passed", "failed", "-"]


def record(snapshot: str, passed: bool, reason: str) -> Verification:
    return Verification(snapshot, datetime.now(UTC), passed, reason, 12.0, "host1")


def test_list_filters_by_name_time_label_and_policy(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", MIB, 3)
    made = [run_json("backup", "--repo", tmp_path / "r", "--name", name, "--policy", policy,
                     *(["--label", label] if label else []), image)["snapshot"]
            for name, policy, label in (("a/x", "full", "gold"), ("a/x", "incremental", None),
                                        ("b/y", "full", "gold"))]
    # the times are the documents' own: the first snapshot is taken in January 2020
    doc = tmp_path / "r" / "snapshots" / made[0]
    doc.write_text(doc.read_text().replace(doc.read_text().split('"time": "')[1][:10], "2020-01-15"))

    def ids(*filters: str) -> list[str]:
        return [s["id"] for s in run_json("list", "--repo", tmp_path / "r", *filters)]

    assert ids("--label", "gold") == made[::2]
    assert ids("--label", "gold", "--name", "b/y") == made[2:]
    assert ids("--policy", "incremental") == made[1:2]
    assert ids("--since", "2020-01-15", "--until", "2020-01-15") == made[:1]
    assert ids("--since", "2020-01-16T00:00") == made[1:]
    assert ids("--until", "2020-01-15T23:59:59Z") == made[:1]
    row = run_json("list", "--repo", tmp_path / "r")[0]
    assert {"id", "name", "time", "policy", "labels", "note", "protected", "verification"} <= set(row)
    assert row["labels"] == ["gold"] and row["protected"] is False and row["note"] == ""
    assert_one_line_error(run("list", "--repo", tmp_path / "r", "--since", "yesterday", check=False), 2,
                          "UTC date")
    assert_one_line_error(run("list", "--repo", tmp_path / "r", "--since", "2026-12-02", "--until",
                              "2026-12-01", check=False), 2, "nothing could match")


def test_list_says_why_a_snapshot_compared_instead_of_reading_a_dirty_bitmap(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    image = write_image(tmp_path / "d.img", MIB, 3)
    repo = Repository.open(tmp_path / "r")
    full = repo.backup(image, "vm/vda").snapshot
    mutate(image, 4, 2)
    why = FallbackNote(Fallback.BASE_PRUNED, "the snapshot of checkpoint hyperback-x was forgotten")
    compared = repo.backup(image, "vm/vda", Policy.INCREMENTAL, fallback=why).snapshot
    rows = {s["id"]: s for s in run_json("list", "--repo", tmp_path / "r")}
    assert rows[compared.id]["fallback"] == {"reason": "base-pruned", "text": str(why)}
    assert "fallback" not in rows[full.id]
    table = run("list", "--repo", tmp_path / "r").stdout.splitlines()
    assert table[2].endswith("vm/vda  (compared: base-pruned)") and table[1].endswith("vm/vda")
