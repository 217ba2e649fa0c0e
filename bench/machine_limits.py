"""The machine's own limits, measured in the same run as the tools (bench_datapath.py).

- SHA-256 per core: Python's hashlib (OpenSSL's SHA-256, the same SHA-NI or AVX2 code a native
  copier gets) over an in-memory buffer, one thread.
- zstd per core: the ``zstd`` command's benchmark mode (``-b``) at the level hyperback writes with
  (-1), one thread, in 32 KiB blocks (hyperback's chunks), on text made like the images' text.
- The CPU-bound limit of a full backup: hash every chunk that is neither a hole nor written zeros,
  compress each unique compressible chunk once, on all cores; nothing else (no I/O, no index).

A plain copy (``qemu-img convert``) is measured by bench_datapath.py itself, as a tool.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
ZSTD_LEVEL = -1
CHUNK = 32 * 1024
_ZSTD_RESULT = re.compile(r"\(x\s*([\d.]+)\),\s*([\d.]+) MB/s")


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def sha256_per_core(seconds: float = 1.0) -> float:
    """Bytes per second SHA-256 hashes on one core."""
    block = os.urandom(8 * MiB)
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        hashlib.sha256(block).digest()
        done += len(block)
    return done / elapsed


def zstd_per_core(sample: Path) -> tuple[float, float]:
    """(bytes per second, ratio) of zstd at hyperback's level, one thread, per 32 KiB chunk."""
    # zstd's benchmark mode takes a negative level only as --fast=N (-b-1 is refused)
    argv = ["zstd", f"--fast={-ZSTD_LEVEL}", "-b", "-i1", "-T1", f"-B{CHUNK}", str(sample)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    found = _ZSTD_RESULT.findall(out.stdout + out.stderr)
    if not found:
        raise RuntimeError(f"cannot read zstd -b output: {(out.stdout + out.stderr)[-300:]!r}")
    ratio, mb_per_s = found[-1]
    return float(mb_per_s) * 1e6, float(ratio)  # zstd's MB is 10^6 bytes


@dataclass(frozen=True)
class Limits:
    sha256_bps: float       # per core
    zstd_bps: float         # per core, compressible text
    zstd_ratio: float
    cores: int
    hash_bytes: int         # what a full backup must hash: allocated, non-zero data of every image
    compress_bytes: int     # what it must compress: unique compressible data

    @property
    def cpu_seconds(self) -> float:
        return self.hash_bytes / self.sha256_bps + self.compress_bytes / self.zstd_bps

    @property
    def full_seconds(self) -> float:
        """The CPU-bound limit of a full backup, its work spread over every core."""
        return self.cpu_seconds / self.cores

    def describe(self) -> str:
        return (f"SHA-256 {self.sha256_bps / MiB:.0f} MiB/s per core; zstd {ZSTD_LEVEL} "
                f"{self.zstd_bps / MiB:.0f} MiB/s per core (x{self.zstd_ratio:.2f} on text); "
                f"a full backup must hash {self.hash_bytes / MiB:.0f} MiB and compress "
                f"{self.compress_bytes / MiB:.0f} MiB: {self.cpu_seconds:.2f} CPU-s, "
                f"{self.full_seconds:.2f} s on {self.cores} cores")


def measure(sample: Path, hash_bytes: int, compress_bytes: int) -> Limits:
    zstd_bps, ratio = zstd_per_core(sample)
    return Limits(sha256_per_core(), zstd_bps, ratio, os.cpu_count() or 1, hash_bytes, compress_bytes)
