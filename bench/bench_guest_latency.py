#!/usr/bin/env python3
"""Latency from a guest's backup call to the host's acknowledgement, in a real VM.

Boots a guest with the host lab (root, a host prepared by .ci/setup), runs the host agent and
the optimizer in this process, and has the guest send N backup requests one after the other
over its virtio-serial port, timing each from the write of the request to the arrival of the
host's ``accepted``. The agent is configured never to flush during the run (the point is the
acknowledgement path: channel, validation, libvirt disk lookup, journal), and its rate limit
and quota are raised so that every request is accepted.

    sudo .venv/bin/python bench/bench_guest_latency.py [--requests 200]
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host_agent import lab  # noqa: E402
from host_agent.config import Limits  # noqa: E402
from host_agent.lab.demo import agent_in_thread, demo_config  # noqa: E402

GUEST = r'''
import glob, json, os, select, sys, time
sys.path.insert(0, {checkout!r})
from guest_shim import protocol as p
name = next(n for n in glob.glob("/sys/class/virtio-ports/*/name")
            if open(n).read().strip() == "org.hyperback.agent.0")
fd = os.open("/dev/" + name.split("/")[-2], os.O_RDWR)
reader = p.MessageReader(p.Direction.TO_GUEST)
def wait_for(pred):
    while True:
        for m in reader.feed(os.read(fd, 65536)):
            if pred(m):
                return m
sid = p.new_sync_id()
os.write(fd, p.sync_frame(sid))
wait_for(lambda m: isinstance(m, p.SyncAck) and m.id == sid)
times = []
for i in range({requests}):
    frame = p.encode(p.Backup(i, ("bench-disk",), p.Policy.FULL, None, False))
    t0 = time.perf_counter()
    os.write(fd, frame)
    reply = wait_for(lambda m: getattr(m, "id", None) == i)
    times.append(time.perf_counter() - t0)
    assert isinstance(reply, p.Accepted), reply
print("LATENCIES " + json.dumps(times), flush=True)
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests to time (default 200)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/hyperback-bench-latency"))
    args = parser.parse_args()
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    config = replace(demo_config(args.workdir), interval=3600.0, batch_size=100000,
                     limits=Limits(requests_per_minute=100000, pending_per_vm=100000))
    disk = lab.make_disk(args.workdir / "disk.raw", 16 << 20)
    script = GUEST.format(checkout=str(Path(__file__).resolve().parents[1]), requests=args.requests)
    with agent_in_thread(config), lab.Lab(args.workdir / "lab") as the_lab:
        vm = the_lab.start_vm("latency", command=f"exec {sys.executable} -c {shlex.quote(script)}",
                              disks=[lab.Disk(disk, "vda", "raw", "bench-disk")], timeout=300)
        status = vm.wait_for_exit(timeout=600)
        console = vm.console()
    line = next((ln for ln in console.splitlines() if ln.startswith("LATENCIES ")), None)
    if status != 0 or line is None:
        print(f"the guest failed (exit {status}):\n{console[-3000:]}", file=sys.stderr)
        return 1
    ms = sorted(t * 1000 for t in json.loads(line[len("LATENCIES "):]))
    print(f"guest call -> host acknowledgement, {len(ms)} backup requests over virtio-serial (TCG guest):")
    print(f"  median {statistics.median(ms):.2f} ms   p95 {ms[int(len(ms) * 0.95) - 1]:.2f} ms   "
          f"min {ms[0]:.2f} ms   max {ms[-1]:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
