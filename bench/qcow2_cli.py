#!/usr/bin/env python3
"""qcow2 in and out of the ``hyperback`` command, against ``qemu-img convert``.

Two 1 GiB qcow2 images with 512 MiB of data, every other MiB: ``random`` (incompressible, stored
uncompressed) and ``compressed`` (text, written by ``qemu-img convert -c``: every data cluster
compressed). For each, ROUNDS times with a fresh repository: ``qemu-img convert -O raw`` of the image
(the reference), ``hyperback backup``, ``hyperback restore`` to raw and to qcow2, and a raw restore
followed by ``qemu-img convert -O qcow2`` (the alternative to the streamed qcow2 restore); then an
incremental after a 1 MiB write. Prints the median seconds. Page cache warm; stdlib only.

    bench/qcow2_cli.py [--workdir /var/tmp/hyperback-bench-qcow2] [--hyperback "python -m host_agent.cli"]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import time
from pathlib import Path

MIB = 1 << 20
SIZE_MIB = 1024
ROUNDS = 3


def sh(*args: object) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def timed(*args: object) -> tuple[float, str]:
    started = time.monotonic()
    out = sh(*args)
    return time.monotonic() - started, out


def make_images(work: Path) -> dict[str, Path]:
    rng = random.Random(1)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(500)]
    images = {}
    for kind in ("random", "compressed"):
        image = work / f"{kind}.qcow2"
        images[kind] = image
        if image.exists():
            continue
        raw = work / f"{kind}.raw"
        with open(raw, "wb") as f:
            f.truncate(SIZE_MIB * MIB)
            for i in range(0, SIZE_MIB, 2):
                f.seek(i * MIB)
                if kind == "random":
                    f.write(os.urandom(MIB))
                else:
                    line = b" ".join(rng.choice(words) for _ in range(4000))
                    f.write((line * (MIB // len(line) + 1))[:MIB])
        sh("qemu-img", "convert", *(["-c"] if kind == "compressed" else []), "-f", "raw", "-O", "qcow2",
           raw, image)
        raw.unlink()
    return images


def bench(hb: list[str], work: Path, kind: str, image: Path) -> dict[str, float]:
    times: dict[str, list[float]] = {}
    repo, out = work / "repo", work / "out"
    for _ in range(ROUNDS):
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        sh(*hb, "init", repo)
        steps = {
            "qemu-img convert -O raw": ["qemu-img", "convert", "-O", "raw", image, out / "convert.raw"],
            "hyperback backup": [*hb, "backup", "--repo", repo, "--name", "vm/vda", image],
            "hyperback restore (raw)": [*hb, "restore", "--repo", repo, "vm/vda@latest", out / "r.raw"],
            "hyperback restore (qcow2)": [*hb, "restore", "--repo", repo, "vm/vda@latest", out / "r.qcow2"],
            "  raw restore + qemu-img convert -O qcow2": [
                "sh", "-c", f"{shlex.join(map(str, hb))} restore --repo {repo} vm/vda@latest {out}/t.raw && "
                f"qemu-img convert -f raw -O qcow2 {out}/t.raw {out}/t.qcow2 && sync {out}/t.qcow2"],
        }
        for name, cmd in steps.items():
            times.setdefault(name, []).append(timed(*cmd)[0])
        sh("cmp", out / "convert.raw", out / "r.raw")
        sh("qemu-img", "compare", "-q", out / "r.qcow2", image)
    copy = work / "inc.qcow2"
    shutil.copyfile(image, copy)
    shutil.rmtree(repo)
    sh(*hb, "init", repo)
    sh(*hb, "backup", "--repo", repo, "--name", "vm/inc", copy)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x42 100M 1M", copy)
    seconds, text = timed(*hb, "backup", "--json", "--repo", repo, "--name", "vm/inc",
                          "--policy", "incremental", copy)
    result = json.loads(text)
    copy.unlink()
    print(f"{kind}: incremental after a 1 MiB write: {seconds:.2f} s, {result['change_detection']}, "
          f"read {result['bytes_read']} bytes, {result['bytes_through_qemu']} through qemu-img")
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/hyperback-bench-qcow2"))
    parser.add_argument("--hyperback", default="python3 -m host_agent.cli")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    hb = shlex.split(args.hyperback)
    for kind, image in make_images(args.workdir).items():
        for name, seconds in bench(hb, args.workdir, kind, image).items():
            print(f"{kind}: {name:42} {seconds:6.2f} s (median of {ROUNDS})")
    print(os.getloadavg())


if __name__ == "__main__":
    main()
