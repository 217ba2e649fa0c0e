#!/usr/bin/env python3
"""Encryption benchmark: an encrypted full backup and restore against an unencrypted one, on the same
image in the same run, and AES-256-GCM and HMAC-SHA256 throughput per core.

Run by hand (bench/README.md, "Encryption"):

    .venv/bin/python bench/bench_encryption.py --size-mib 512 --runs 3
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_datapath import MiB, write_base
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

BLOCK = 32 * 1024  # hyperback's chunk size: the unit the copier seals and keys
HYPERBACK = str(Path(sys.executable).with_name("hyperback"))
PASSPHRASE = "bench passphrase"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of a command; CPU time is what a shared, loaded machine distorts least."""
    start, cpu = time.monotonic(), cpu_seconds()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.monotonic() - start, cpu_seconds() - cpu


Timing = tuple[tuple[float, float], tuple[float, float]]


def one_run(work: Path, image: Path, encrypted: bool) -> Timing:
    """((wall, CPU) of the full backup, (wall, CPU) of the restore) of ``image`` into a new repository."""
    repo, out = work / "repo", work / "restored.img"
    shutil.rmtree(repo, ignore_errors=True)
    out.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERBACK_")}
    if encrypted:
        env["HYPERBACK_PASSPHRASE"] = PASSPHRASE
    subprocess.run([HYPERBACK, "init", str(repo), *(["--encryption", "passphrase"] if encrypted else [])],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    backup = timed([HYPERBACK, "backup", "--repo", str(repo), "--name", "vm1/vda", str(image)], env)
    restore = timed([HYPERBACK, "restore", "--repo", str(repo), "vm1/vda@latest", str(out)], env)
    if hashlib.sha256(out.read_bytes()).digest() != hashlib.sha256(image.read_bytes()).digest():
        raise SystemExit("the restored image differs from the source")
    return backup, restore


def per_core(label: str, fn: object, total: int) -> float:
    """MB/s of ``fn(block)`` over ``total`` bytes in 32 KiB blocks on one core."""
    assert callable(fn)
    block = os.urandom(BLOCK)
    start = time.perf_counter()
    for _ in range(total // BLOCK):
        fn(block)
    rate = total / (time.perf_counter() - start) / 1e6
    print(f"  {label:<34} {rate:8.0f} MB/s")
    return rate


def primitives(total: int) -> None:
    aead, id_key, nonce = AESGCM(os.urandom(32)), os.urandom(32), os.urandom(12)
    aad = bytes(44)
    print(f"per core, {BLOCK // 1024} KiB blocks ({total // MiB} MiB each; OpenSSL's code through Python):")
    per_core("AES-256-GCM seal", lambda b: aead.encrypt(nonce, b, aad), total)
    sealed = aead.encrypt(nonce, os.urandom(BLOCK), aad)
    per_core("AES-256-GCM open (tag checked)", lambda _: aead.decrypt(nonce, sealed, aad), total)
    per_core("HMAC-SHA256 (encrypted ids)", lambda b: hmac.digest(id_key, b, "sha256"), total)
    per_core("SHA-256 (unencrypted ids)", lambda b: hashlib.sha256(b).digest(), total)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=512, help="image size (bench_datapath's base recipe)")
    p.add_argument("--runs", type=int, default=3, help="runs of each; medians are reported")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch directory (default: a new one in /var/tmp)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hb-bench-enc-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    image = work / "base.img"
    write_base(image, args.size_mib * MiB, seed=1)
    times: dict[bool, list[Timing]] = {False: [], True: []}
    for run in range(args.runs):
        # alternate which goes first, so neither always meets a colder or warmer machine
        for encrypted in ((False, True) if run % 2 == 0 else (True, False)):
            times[encrypted].append(one_run(work, image, encrypted))
    print(f"{args.size_mib} MiB image (bench_datapath base recipe), CLI end to end, medians of {args.runs}:")
    print(f"  {'':<10} {'backup wall':>11} {'CPU':>6} {'restore wall':>12} {'CPU':>6}")
    med = {}
    for encrypted in (False, True):
        row = [statistics.median(t[phase][kind] for t in times[encrypted])
               for phase in (0, 1) for kind in (0, 1)]
        med[encrypted] = row
        runs = ", ".join(f"{b[0]:.2f}/{r[0]:.2f}" for b, r in times[encrypted])
        print(f"  {'encrypted' if encrypted else 'plain':<10} {row[0]:11.2f} {row[1]:6.2f} {row[2]:12.2f} "
              f"{row[3]:6.2f}   (wall backup/restore runs: {runs})")
    ratio = [e / p for e, p in zip(med[True], med[False], strict=True)]
    print(f"  encrypted / plain: backup {ratio[0]:.2f}x wall, {ratio[1]:.2f}x CPU; "
          f"restore {ratio[2]:.2f}x wall, {ratio[3]:.2f}x CPU (goal <= 1.20x)")
    primitives(256 * MiB)
    if args.workdir is None:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
