from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run, run_json
from conftest import MIB, write_image
from tls_helpers import hyperback_as, make_pki, tls_media_service

from host_agent.media.access import OWNERS
from host_agent.storage.repository import Repository
from host_agent.tls.identity import Role


def backups(tmp_path: Path, count: int) -> list[str]:
    run("init", tmp_path / "r")
    return [run_json("backup", "--repo", tmp_path / "r", "--name", "vm1/vda",
                     write_image(tmp_path / f"d{i}.img", MIB, i))["snapshot"] for i in range(count)]


def test_forget_by_prefix_and_latest_then_prune_frees_the_space(tmp_path: Path) -> None:
    ids = backups(tmp_path, 3)
    dry = run("forget", "--repo", tmp_path / "r", "--dry-run", ids[0][:6]).stdout
    assert f"would forget {ids[0]} vm1/vda" in dry and len(run_json("list", "--repo", tmp_path / "r")) == 3
    out = run("forget", "--repo", tmp_path / "r", ids[0][:6], "vm1/vda@latest").stdout
    assert f"forgot {ids[0]}" in out and f"forgot {ids[2]}" in out and "hyperback prune" in out
    assert [s["id"] for s in run_json("list", "--repo", tmp_path / "r")] == [ids[1]]
    assert run_json("prune", "--repo", tmp_path / "r", "--keep-last", "1")["gc"]["bytes_freed"] > 0
    run("restore", "--repo", tmp_path / "r", ids[1], tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == (tmp_path / "d1.img").read_bytes()


def test_forget_refuses_a_protected_snapshot_and_forgets_nothing(tmp_path: Path) -> None:
    ids = backups(tmp_path, 2)
    run("protect", "--repo", tmp_path / "r", ids[1])
    proc = run("forget", "--repo", tmp_path / "r", ids[0], ids[1], check=False)
    assert_one_line_error(proc, 2, ids[1], "protected", "hyperback unprotect")
    assert [s["id"] for s in run_json("list", "--repo", tmp_path / "r")] == ids
    run("unprotect", "--repo", tmp_path / "r", ids[1])
    assert run_json("forget", "--repo", tmp_path / "r", ids[1])["forgotten"] == [ids[1]]
    assert not (tmp_path / "r" / "annotations" / ids[1]).exists(), "the record outlived its snapshot"


def test_forget_of_an_unknown_snapshot_is_one_line(tmp_path: Path) -> None:
    backups(tmp_path, 1)
    assert_one_line_error(run("forget", "--repo", tmp_path / "r", "ffffffff", check=False), 2, "no snapshot")


def test_forget_through_the_media_service_needs_an_operators_certificate_and_refuses_a_protected_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.init(tmp_path / "r")
    ids = [repo.backup(write_image(tmp_path / f"d{i}.img", MIB, i), "vm1/vda").snapshot.id for i in range(2)]
    run("protect", "--repo", repo.path, ids[0])
    (repo.path / OWNERS).mkdir()
    (repo.path / OWNERS / "vm1").write_text("hosta\n")  # the agent may read vm1: forgetting is another thing
    pki = make_pki(tmp_path / "pki")
    with tls_media_service(repo, pki) as server:
        url = f"media://{server.address}/main"
        hyperback_as(pki, Role.AGENT, "hosta", monkeypatch)
        refused = run("forget", "--repo", url, ids[1], check=False)
        assert_one_line_error(refused, 3, "role agent (hosta) may not call Forget")
        hyperback_as(pki, Role.OPERATOR, "ops", monkeypatch)
        protected = run("forget", "--repo", url, ids[0], ids[1], check=False)
        assert_one_line_error(protected, 2, "protected", "hyperback unprotect")
        assert [s.id for s in repo.snapshots()] == ids  # nothing forgotten
        assert run_json("forget", "--repo", url, ids[1][:8])["forgotten"] == [ids[1]]
    assert [s.id for s in repo.snapshots()] == [ids[0]]
