"""hyperback schedule: what the agent's schedules cover, when they ran and run next."""
from __future__ import annotations

import time
from pathlib import Path

from cli_helpers import agent_with_a_missed_schedule, run, run_json


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
