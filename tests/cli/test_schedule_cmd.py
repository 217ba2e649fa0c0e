"""hyperback schedule: what the agent's schedules cover, when they ran and run next."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from cli_helpers import HYPERBACK, agent_with_a_missed_schedule, assert_one_line_error, run, run_json


def test_the_schedules_show_their_domains_last_and_next_runs_and_retention(tmp_path: Path) -> None:
    with agent_with_a_missed_schedule(tmp_path) as agent:
        (nightly,) = run_json("schedule", "list", "--agent", agent)
        assert (nightly["name"], nightly["calendar"], nightly["domains"], nightly["retention"]) == \
            ("nightly", "30 1 * * *", ["web-1"], "keep-last=3")
        # it caught up on the missed night at start, and runs again at the next 01:30
        assert time.time() - 86400 <= nightly["last_run_at"] <= time.time()
        assert time.time() < nightly["next_run_at"] <= time.time() + 86400
        line = run("schedule", "list", "--agent", agent).stdout
        assert "nightly: '30 1 * * *' incremental to default; match=web-*" in line


def test_a_schedule_runs_now_on_request_and_an_unknown_one_is_named(tmp_path: Path) -> None:
    with agent_with_a_missed_schedule(tmp_path) as agent:
        out = run("schedule", "run", "nightly", "--agent", agent).stdout
        (line,) = out.splitlines()
        assert line.startswith("job ") and line.endswith(": web-1")
        job_id = line.split()[1].rstrip(":")
        jobs = {j["id"]: j for j in run_json("job", "list", "--agent", agent)}
        assert jobs[job_id]["schedule"] == "nightly" and len(jobs) == 2  # the caught-up run, and this one
        assert_one_line_error(run("schedule", "run", "weekly", "--agent", agent, check=False), 2,
                              "no schedule named 'weekly' (schedules: nightly)")


def test_run_wait_follows_the_jobs_to_their_end_and_fails_if_one_did_not_succeed(tmp_path: Path) -> None:
    with agent_with_a_missed_schedule(tmp_path) as agent:
        waiting = subprocess.Popen([*HYPERBACK, "schedule", "run", "nightly", "--wait", "--agent", agent],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert waiting.stdout is not None
        started = waiting.stdout.readline()  # printed before it waits
        job_id = started.split()[1].rstrip(":")
        run("job", "cancel", job_id, "--agent", agent)
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 3
        assert f"job {job_id}: web-1: cancelled: cancelled by the operator" in out
        assert "1 of 1 job(s) of schedule nightly did not succeed" in err
