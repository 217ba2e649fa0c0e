from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run, run_json
from conftest import MIB, write_image
from tls_helpers import hyperback_as, make_pki, tls_media_service

from host_agent.storage.repository import Repository
from host_agent.tls.identity import Role


def test_prune_keeps_the_last_and_frees_the_rest(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    ids = [run_json("backup", "--repo", tmp_path / "r", "--name", "vm1/vda",
                    write_image(tmp_path / f"d{i}.img", 2 * MIB, i))["snapshot"] for i in range(3)]
    dry = run_json("prune", "--repo", tmp_path / "r", "--keep-last", "1", "--dry-run")
    assert dry["removed"] == ids[:2] and len(run_json("list", "--repo", tmp_path / "r")) == 3
    out = run_json("prune", "--repo", tmp_path / "r", "--keep-last", "1")
    assert out["kept"] == ids[2:] and out["gc"]["packs_deleted"] >= 1
    assert [s["id"] for s in run_json("list", "--repo", tmp_path / "r")] == ids[2:]
    run("restore", "--repo", tmp_path / "r", ids[2], tmp_path / "out.img")


def test_prune_without_a_keep_rule_is_refused(tmp_path: Path) -> None:
    run("init", tmp_path / "r")
    assert_one_line_error(run("prune", "--repo", tmp_path / "r", check=False), 2, "--keep-last")



def test_prune_through_the_media_service_needs_an_operators_certificate_and_keeps_protected_snapshots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.init(tmp_path / "r")
    ids = [repo.backup(write_image(tmp_path / f"d{i}.img", MIB, i), "vm1/vda").snapshot.id for i in range(3)]
    run("protect", "--repo", repo.path, ids[0])
    pki = make_pki(tmp_path / "pki")
    with tls_media_service(repo, pki) as server:
        url = f"media://{server.address}/main"
        hyperback_as(pki, Role.AGENT, "hosta", monkeypatch)
        refused = run("prune", "--repo", url, "--keep-last", "1", check=False)
        assert_one_line_error(refused, 3, "role agent (hosta) may not call Prune")
        assert [s.id for s in repo.snapshots()] == ids
        hyperback_as(pki, Role.OPERATOR, "ops", monkeypatch)
        assert run_json("prune", "--repo", url, "--keep-last", "1", "--dry-run")["removed"] == [ids[1]]
        out = run_json("prune", "--repo", url, "--keep-last", "1")
        assert out["removed"] == [ids[1]] and out["kept"] == [ids[0], ids[2]] and out["gc"]["bytes_freed"] > 0
    assert [s.id for s in repo.snapshots()] == [ids[0], ids[2]]
