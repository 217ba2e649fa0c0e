"""hyperback job: list and cancel the agent's jobs, against a real agent process over its socket."""
from __future__ import annotations

import json
from pathlib import Path

from cli_helpers import WEB_1, agent_with_a_missed_schedule, assert_one_line_error, run, run_json


def test_a_queued_job_is_listed_then_cancelled_and_answered_once(tmp_path: Path) -> None:
    with agent_with_a_missed_schedule(tmp_path) as agent:
        (job,) = run_json("job", "list", "--agent", agent)
        assert (job["domain_uuid"], job["origin"], job["schedule"], job["state"]) == \
            (WEB_1, "JOB_ORIGIN_SCHEDULE", "nightly", "JOB_STATE_QUEUED")
        assert "schedule nightly" in run("job", "list", "--agent", agent).stdout

        out = run("job", "cancel", job["id"], "--agent", agent).stdout
        assert out.strip() == f"job {job['id']}: cancelled: cancelled by the operator"
        (after,) = run_json("job", "list", "--agent", agent)
        assert after["state"] == "JOB_STATE_CANCELLED"
        # answered in the journal, so a restarted agent does not run it again; nothing was written
        assert not list((tmp_path / "state" / "pending").iterdir())
        result = json.loads((tmp_path / "state" / "results" / f"{job['id']}.json").read_text())
        assert result["ok"] is False
        assert not list((tmp_path / "repo" / "snapshots").iterdir())

        assert_one_line_error(run("job", "cancel", job["id"], "--agent", agent, check=False), 2,
                              "has finished (cancelled): nothing to cancel")
        assert_one_line_error(run("job", "cancel", "nope", "--agent", agent, check=False), 2, "no job 'nope'")


def test_without_an_agent_the_command_says_so_in_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run("job", "list", "--agent", f"unix:{tmp_path}/none.sock", check=False), 3,
                          "does not answer", "is hyperback-agent running?")
