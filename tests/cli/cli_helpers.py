"""Running the real ``hyperback`` command as a user would."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

HYPERBACK = [sys.executable, "-m", "host_agent.cli"]


def run(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*HYPERBACK, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"hyperback {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def run_json(*args: object) -> Any:
    return json.loads(run(*args, "--json").stdout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """A user mistake: the given exit code, one line on stderr, no traceback."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hyperback: ")
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0]
