"""The agent's record of every destination's checkpoint chain (host_agent.agent.chains)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from host_agent import errors
from host_agent.agent.chains import ChainRecord
from host_agent.model import Fallback

DOM = "4f1c2a9e-0000-4000-8000-000000000001"


def test_a_backup_to_one_destination_keeps_what_the_other_destinations_need(tmp_path: Path) -> None:
    record = ChainRecord(tmp_path)
    assert record.update(DOM, "a", {"hb-1": {"cp-a1"}}, {"a", "b"}) == {"cp-a1"}
    assert record.update(DOM, "b", {"hb-1": {"cp-b1"}}, {"a", "b"}) == {"cp-a1", "cp-b1"}
    # a's chain moves on: its old checkpoint goes, b's stays
    assert record.update(DOM, "a", {"hb-1": {"cp-a2"}}, {"a", "b"}) == {"cp-a2", "cp-b1"}
    assert ChainRecord(tmp_path).needs(DOM) == {"a": {"hb-1": ["cp-a2"]}, "b": {"hb-1": ["cp-b1"]}}


def test_the_chain_of_a_destination_removed_from_the_configuration_ends(tmp_path: Path) -> None:
    record = ChainRecord(tmp_path)
    record.update(DOM, "a", {"hb-1": {"cp-a1"}, "hb-2": {"cp-a1"}}, {"a", "b"})
    record.update(DOM, "b", {"hb-1": {"cp-b1", "cp-b0"}}, {"a", "b"})
    assert record.update(DOM, "a", {"hb-1": {"cp-a2"}}, {"a"}) == {"cp-a2"}
    assert set(record.needs(DOM)) == {"a"}


def test_an_unreadable_record_keeps_only_what_the_destination_written_needs(tmp_path: Path) -> None:
    record = ChainRecord(tmp_path)
    (tmp_path / "chains").mkdir()
    (tmp_path / "chains" / f"{DOM}.json").write_text("{not json")
    assert record.needs(DOM) == {}
    assert record.update(DOM, "a", {"hb-1": {"cp-a1"}}, {"a"}) == {"cp-a1"}
    assert json.loads((tmp_path / "chains" / f"{DOM}.json").read_text())["version"] == 1


def test_a_record_that_cannot_be_written_is_an_environment_problem(tmp_path: Path) -> None:
    (tmp_path / "chains").write_text("a file where the folder should be")
    with pytest.raises(errors.EnvironmentProblem, match="chain record"):
        ChainRecord(tmp_path).update(DOM, "a", {"hb-1": {"cp"}}, {"a"})


def test_a_checkpoint_gone_because_the_chains_latest_snapshot_was_forgotten_is_told_apart(
        tmp_path: Path) -> None:
    record = ChainRecord(tmp_path)
    record.update(DOM, "a", {"hb-1": {"cp-3", "cp-1"}}, {"a", "b"})  # latest cp-3, latest full cp-1
    record.update(DOM, "b", {"hb-1": {"cp-b"}}, {"a", "b"})
    # cp-3's snapshot forgotten in a: the next backup goes on from cp-2's, whose checkpoint was pruned
    why = record.forgotten_base(DOM, "a", "hb-1", "cp-2", {"cp-1", "cp-2"})
    assert why is not None and why.reason is Fallback.BASE_PRUNED and "cp-3" in why and "cp-2" in why
    # nothing forgotten, a checkpoint the chain still keeps, another destination or disk: no such cause
    assert record.forgotten_base(DOM, "a", "hb-1", "cp-2", {"cp-1", "cp-2", "cp-3"}) is None
    assert record.forgotten_base(DOM, "a", "hb-1", "cp-1", {"cp-1"}) is None
    assert record.forgotten_base(DOM, "b", "hb-1", "cp-2", {"cp-b", "cp-2"}) is None
    assert record.forgotten_base(DOM, "a", "hb-2", "cp-2", {"cp-2"}) is None
