#!/usr/bin/env python3
"""Backup through the media service vs local backup: seconds, MiB/s and bytes sent.

Run by hand with the project's virtualenv::

    .venv/bin/python bench/bench_media.py                 # 512 MiB of random data
    .venv/bin/python bench/bench_media.py --size-mib 128 --json-out /tmp/media.json

Each mode starts from a fresh repository and a fresh copy of the same pristine image and runs:
a full backup; 1% of the image rewritten in 64 KiB extents at 4 KiB-aligned offsets, then an
incremental backup without a change list (every chunk read and compared); another 1% rewritten,
then an incremental with that change list; then a restore. "local" is ``Repository`` on this host;
"media" is ``RemoteRepository`` talking to a ``hyperback-media`` process on 127.0.0.1 that serves a
repository on the same disk, so the numbers measure the protocol's cost (spool, gRPC, the server's
checks), not a network's. "sealed" is "media" to an encrypted repository (passphrase mode): the
client seals and opens every record, the service holds no key (docs/media-protocol.md, section 6).
The page cache is hot for the image.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from host_agent.media.client import RemoteRepository
from host_agent.model import Policy
from host_agent.storage import keys
from host_agent.storage.repository import Repository

MiB = 1 << 20
EXTENT = 64 * 1024
MEDIA = Path(sys.executable).with_name("hyperback-media")


@dataclass
class Phase:
    mode: str
    phase: str
    seconds: float
    mib_per_s: float  # image MiB per second
    bytes_sent: int
    bytes_received: int


def make_image(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(0, size, MiB):
            f.write(rng.randbytes(MiB))


def mutation(size: int, seed: int, fraction: float = 0.01) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(0, size - EXTENT, 4096), EXTENT) for _ in range(int(size * fraction) // EXTENT)]


def apply(path: Path, extents: list[tuple[int, int]], seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for off, n in extents:
            f.seek(off)
            f.write(rng.randbytes(n))


class MediaProcess:
    """``hyperback-media`` serving one repository on a free port of 127.0.0.1."""

    def __init__(self, repo: Path, log: Path) -> None:
        self._log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([str(MEDIA), "--listen", "127.0.0.1:0", "--repo", f"bench={repo}"],
                                     stderr=self._log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if " serving bench on " in line:
                    self.address = line.rsplit(" on ", 1)[1].strip()
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        sys.exit(f"hyperback-media did not start; see {log}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._log.close()


def run_phases(mode: str, pristine: Path, work: Path, size: int,
               backup: Callable[..., object], restore: Callable[[Path], object],
               counters: Callable[[], tuple[int, int]]) -> list[Phase]:
    shutil.copyfile(pristine, work)
    first, second = mutation(size, 11), mutation(size, 12)
    out = []

    def timed(phase: str, call: Callable[[], object]) -> None:
        sent0, received0 = counters()
        t = time.perf_counter()
        call()
        seconds = time.perf_counter() - t
        sent, received = counters()
        out.append(Phase(mode, phase, round(seconds, 3), round(size / MiB / seconds, 1), sent - sent0,
                         received - received0))

    timed("full", lambda: backup(work, "vm/vda", Policy.FULL))
    apply(work, first, 21)
    timed("incr (no list)", lambda: backup(work, "vm/vda", Policy.INCREMENTAL))
    apply(work, second, 22)
    timed("incr (change list)", lambda: backup(work, "vm/vda", Policy.INCREMENTAL, second))
    target = work.with_suffix(".restored")
    timed("restore", lambda: restore(target))
    target.unlink()
    return out


def through_media(mode: str, repo: Path, pristine: Path, root: Path, size: int,
                  secret: keys.Secret | None) -> list[Phase]:
    server = MediaProcess(repo, root / f"{mode}.log")
    try:
        with RemoteRepository(server.address, "bench", spool_dir=root, secret=secret) as remote:
            return run_phases(mode, pristine, root / "work.img", size, remote.backup,
                              lambda t: remote.restore("vm/vda@latest", t),
                              lambda: (remote.bytes_sent, remote.bytes_received))
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/hyperback-bench-media"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    size = args.size_mib * MiB
    args.workdir.mkdir(parents=True, exist_ok=True)
    pristine = args.workdir / f"pristine-{args.size_mib}.img"
    if not pristine.exists() or pristine.stat().st_size != size:
        make_image(pristine, size, seed=1)
    results: list[Phase] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        local = Repository.init(root / "local")
        results += run_phases("local", pristine, root / "work.img", size, local.backup,
                              lambda t: local.restore("vm/vda@latest", t), lambda: (0, 0))
        served = Repository.init(root / "served")
        results += through_media("media", served.path, pristine, root, size, None)
        check = served.check()
        if not check.ok:
            sys.exit(f"the served repository fails its check: {check}")
        secret = keys.Secret(passphrase=b"bench passphrase")
        sealed = Repository.init(root / "sealed", encryption=keys.PASSPHRASE, secret=secret)
        results += through_media("sealed", sealed.path, pristine, root, size, secret)
    print(f"{args.size_mib} MiB of random data, {os.cpu_count()} cores, page cache hot")
    print(f"{'mode':6} {'phase':20} {'seconds':>8} {'MiB/s':>8} {'MiB sent':>9} {'MiB recv':>9}")
    for r in results:
        print(f"{r.mode:6} {r.phase:20} {r.seconds:8.2f} {r.mib_per_s:8.1f} {r.bytes_sent / MiB:9.2f} "
              f"{r.bytes_received / MiB:9.2f}")
    changed = len(mutation(size, 12)) * EXTENT
    print(f"each incremental rewrote {changed / MiB:.2f} MiB")
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
