#!/usr/bin/env python3
"""How long a ``hyperback`` call takes to start: N runs of a few calls that do next to nothing
(help, a listing of an empty repository), wall time and CPU time (user + system) of each.

    .venv/bin/python bench/cli_startup.py [--runs 10] [--tree DIR]

``--tree``: a directory holding another ``host_agent`` package, put first on the path (to compare a
build with this one). Prints the median of each call, seconds. The test suite starts hundreds of
these processes, so their start-up is part of its wall time too.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(argv: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Wall and CPU seconds of one call (run elsewhere than the checkout: ``-m`` puts the working
    directory before PYTHONPATH)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "host_agent.cli", *argv], env=env, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tree", type=Path, help="a directory holding the host_agent package to time")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.tree is not None:
        env["PYTHONPATH"] = str(args.tree.resolve())
    with tempfile.TemporaryDirectory() as tmp:
        repo = str(Path(tmp) / "repo")
        subprocess.run([sys.executable, "-m", "host_agent.cli", "init", repo], env=env, cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        calls = [["--help"], ["list", "--help"], ["backup", "--help"], ["certs", "--help"],
                 ["list", "--repo", repo, "--json"]]
        print(f"{'call':32} {'wall s':>8} {'cpu s':>8}  (medians of {args.runs})")
        for argv in calls:
            runs = [one_run(argv, env, tmp) for _ in range(args.runs)]
            print(f"{' '.join(argv).replace(repo, 'REPO'):32} {statistics.median(w for w, _ in runs):8.3f} "
                  f"{statistics.median(c for _, c in runs):8.3f}")


if __name__ == "__main__":
    main()
