#!/usr/bin/env python3
"""Data-path benchmark: hyperback vs borg vs restic on synthetic VM disk images.

Run by hand; see bench/README.md and --help.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import machine_limits

KiB = 1 << 10
MiB = 1 << 20
REGION = MiB  # layout granularity of base.img
EXTENT = 64 * KiB  # size of every mutated extent
PAGE = 4 * KiB  # alignment of mutated extents

# Bump when the image layout or content recipe changes, so old images are not reused.
GENERATOR_VERSION = 1

HOLE_FRACTION = 0.30
ZERO_FRACTION = 0.03
RANDOM_FRACTION = 0.35
# Whatever remains (~32%) is compressible text.
CLONE_CHANGE_FRACTION = 0.03
MUTATION_FRACTION = 0.01

# The peers as a knowledgeable user configures them for disk images, besides their defaults: borg
# with a fixed 4 MiB chunker (a disk image has no boundary shifts for a content-defined chunker to
# find) and a fast compressor, extracting with --sparse; restic with compression off and auto.
PEERS = ("borg", "borg-fixed-lz4", "borg-fixed-zstd", "restic-auto", "restic-off")
ALL_TOOLS = ("hyperback", *PEERS)
COPY_TOOL = "qemu-img"  # the machine's own limit: a plain copy (qemu-img convert), not a backup tool
PHASE_LABELS = {
    "full": "full",
    "incr": "incr (no list)",
    "incr-cl": "incr (change list)",
    "restore": "restore",
    # hyperback fsyncs a restore before it reports success; restic and borg never do. This row
    # compares like with like: hyperback restore --no-sync.
    "restore-nosync": "restore (no sync)",
}

TARGET_FULL_SPEEDUP = 3.0
TARGET_INCR_SPEEDUP = 2.0
TARGET_INCR_CL_SPEEDUP = 10.0
TARGET_GROWTH_RATIO = 1.5
TARGET_RESTORE_SPEEDUP = 2.0
TARGET_PEAK_RSS_MIB = 128.0

REPO_ROOT = Path(__file__).resolve().parents[1]

# The measured tool is started by this tiny, separate Python process rather than
# by the benchmark itself: on Linux, exec() folds the *pre-exec* address space's
# high-water RSS into the child's ru_maxrss, so a child spawned (fork or vfork)
# from a big parent reports at least the parent's peak. A fresh "python -I -S"
# keeps that floor at a few MiB and it is measured and printed.
_LAUNCHER = r"""
import json, os, sys, time
result_path, argv = sys.argv[1], sys.argv[2:]
start = time.monotonic()
try:
    pid = os.posix_spawnp(argv[0], argv, os.environ)
except OSError as exc:
    sys.stderr.write(f"bench launcher: cannot start {argv[0]!r}: {exc}\n")
    rc, maxrss = 127, 0
else:
    _, status, usage = os.wait4(pid, 0)
    rc, maxrss = os.waitstatus_to_exitcode(status), usage.ru_maxrss
seconds = time.monotonic() - start
with open(result_path, "w") as fh:
    json.dump({"rc": rc, "seconds": seconds, "maxrss_kib": maxrss}, fh)
"""


# --------------------------------------------------------------------------- data set


@dataclass(frozen=True)
class Dataset:
    dir: Path
    size: int
    seed: int

    @property
    def base(self) -> Path:
        return self.dir / "base.img"

    @property
    def base_orig(self) -> Path:
        return self.dir / "base.orig"

    @property
    def clones(self) -> list[Path]:
        return [self.dir / "clone1.img", self.dir / "clone2.img"]

    @property
    def images(self) -> list[Path]:
        return [self.base, *self.clones]

    @property
    def changes(self) -> Path:
        return self.dir / "changes.txt"

    @property
    def marker(self) -> Path:
        return self.dir / "params.json"

    def marker_content(self) -> dict[str, int]:
        return {"generator": GENERATOR_VERSION, "size": self.size, "seed": self.seed}


def make_vocabulary(rng: random.Random) -> list[str]:
    # 256 words so a random byte indexes a word directly (fast); long-ish words
    # with skewed letters give ~4x with zstd, ~2.8x with lz4: "compressible" but
    # far from the trivial case of zeros or repeated blocks.
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = range(len(letters), 0, -1)
    words: set[str] = set()
    while len(words) < 256:
        words.add("".join(rng.choices(letters, weights=weights, k=rng.randint(4, 13))))
    return sorted(words)


def text_block(rng: random.Random, vocab: list[str]) -> bytes:
    words = [vocab[b] for b in rng.randbytes(REGION // 8)]
    # Every 12th token becomes a number ending a line: log-like text.
    numbers = rng.choices(range(100_000), k=len(words[11::12]))
    words[11::12] = [f"{n}\n" for n in numbers]
    data = " ".join(words).encode()
    if len(data) < REGION:  # cannot happen with 4..13-letter words; guards edits to the recipe
        raise RuntimeError("text recipe produced less than one region")
    return data[:REGION]


def region_layout(n_regions: int, rng: random.Random) -> list[str]:
    holes = round(n_regions * HOLE_FRACTION)
    zeros = max(1, round(n_regions * ZERO_FRACTION))
    rand = round(n_regions * RANDOM_FRACTION)
    text = n_regions - holes - zeros - rand
    kinds = ["hole"] * holes + ["zero"] * zeros + ["random"] * rand + ["text"] * text
    rng.shuffle(kinds)
    return kinds


def write_base(path: Path, size: int, seed: int) -> list[str]:
    rng = random.Random(f"{seed}/base")
    kinds = region_layout(size // REGION, rng)
    vocab = make_vocabulary(rng)
    zero = bytes(REGION)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        # Holes are just regions never written after the truncate.
        os.ftruncate(fd, size)
        for index, kind in enumerate(kinds):
            if kind == "hole":
                continue
            if kind == "zero":
                data = zero
            elif kind == "random":
                data = rng.randbytes(REGION)
            else:
                data = text_block(rng, vocab)
            os.pwrite(fd, data, index * REGION)
    finally:
        os.close(fd)
    return kinds


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but a hole up to EOF
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end))
        pos = end
    return extents


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy src to dst via a temp file, writing only data extents so holes stay holes."""
    tmp = dst.with_name(dst.name + ".tmp")
    size = src.stat().st_size
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(dst_fd, size)
        for start, end in data_extents(src_fd, size):
            pos = start
            while pos < end:
                chunk = os.pread(src_fd, min(4 * MiB, end - pos), pos)
                if not chunk:
                    break
                os.pwrite(dst_fd, chunk, pos)
                pos += len(chunk)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    os.replace(tmp, dst)


def pick_extents(rng: random.Random, count: int, candidate: Callable[[random.Random], int]) -> list[int]:
    """Sorted, non-overlapping EXTENT-sized offsets, so changed bytes add up exactly."""
    chosen: list[int] = []
    attempts = 0
    while len(chosen) < count:
        attempts += 1
        if attempts > 1000 * count + 1000:
            raise RuntimeError("cannot place non-overlapping extents; image too small?")
        off = candidate(rng)
        i = bisect.bisect_left(chosen, off)
        if i > 0 and chosen[i - 1] + EXTENT > off:
            continue
        if i < len(chosen) and off + EXTENT > chosen[i]:
            continue
        chosen.insert(i, off)
    return chosen


def overwrite_extents(path: Path, offsets: Sequence[int], rng: random.Random) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in offsets:
            os.pwrite(fd, rng.randbytes(EXTENT), off)
    finally:
        os.close(fd)


def make_clone(ds: Dataset, clone: Path, index: int) -> None:
    rng = random.Random(f"{ds.seed}/clone{index}")
    count = max(1, round(ds.size * CLONE_CHANGE_FRACTION / EXTENT))
    last_page = (ds.size - EXTENT) // PAGE
    offsets = pick_extents(rng, count, lambda r: r.randint(0, last_page) * PAGE)
    tmp = clone.with_name(clone.name + ".gen")
    sparse_copy(ds.base_orig, tmp)
    overwrite_extents(tmp, offsets, rng)
    os.replace(tmp, clone)


def plan_mutation(ds: Dataset, kinds: list[str]) -> list[int]:
    rng = random.Random(f"{ds.seed}/mutation-plan")
    data_regions = [i for i, kind in enumerate(kinds) if kind != "hole"]
    count = max(1, round(ds.size * MUTATION_FRACTION / EXTENT))
    pages_per_region = (REGION - EXTENT) // PAGE

    def candidate(r: random.Random) -> int:
        # Inside one data region, and deliberately not 64 KiB-aligned so a
        # change straddles two 64 KiB blocks of a fixed-block chunker.
        while True:
            off = r.choice(data_regions) * REGION + r.randint(0, pages_per_region) * PAGE
            if off % EXTENT:
                return off

    return pick_extents(rng, count, candidate)


def read_change_list(path: Path) -> list[tuple[int, int]]:
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip():
            off, length = line.split()
            pairs.append((int(off), int(length)))
    return pairs


def apply_mutation(ds: Dataset) -> int:
    """Overwrite the change-list extents of base.img; returns changed bytes."""
    rng = random.Random(f"{ds.seed}/mutation-data")
    changes = read_change_list(ds.changes)
    fd = os.open(ds.base, os.O_WRONLY)
    try:
        for off, length in changes:
            os.pwrite(fd, rng.randbytes(length), off)
    finally:
        os.close(fd)
    return sum(length for _, length in changes)


def dataset_is_current(ds: Dataset) -> bool:
    try:
        if json.loads(ds.marker.read_text()) != ds.marker_content():
            return False
    except (OSError, ValueError):
        return False
    files = [ds.base_orig, *ds.clones]
    return ds.changes.exists() and all(p.exists() and p.stat().st_size == ds.size for p in files)


def prepare_dataset(ds: Dataset, regenerate: bool) -> None:
    ds.dir.mkdir(parents=True, exist_ok=True)
    if not regenerate and dataset_is_current(ds):
        print(f"reusing images in {ds.dir}")
        return
    # Marker goes first (removed) and last (written) so an interrupted run regenerates.
    ds.marker.unlink(missing_ok=True)
    started = time.monotonic()
    print(f"generating {ds.size // MiB} MiB images in {ds.dir} (seed {ds.seed}) ...", flush=True)
    tmp = ds.base_orig.with_name("base.orig.gen")
    kinds = write_base(tmp, ds.size, ds.seed)
    os.replace(tmp, ds.base_orig)
    offsets = plan_mutation(ds, kinds)
    ds.changes.write_text("".join(f"{off} {EXTENT}\n" for off in offsets))
    for index, clone in enumerate(ds.clones, start=1):
        make_clone(ds, clone, index)
    ds.marker.write_text(json.dumps(ds.marker_content()) + "\n")
    print(f"generated in {time.monotonic() - started:.1f}s", flush=True)


def describe_dataset(ds: Dataset) -> dict[str, Any]:
    info: dict[str, Any] = {"size": ds.size, "seed": ds.seed}
    for path in [ds.base_orig, *ds.clones]:
        st = path.stat()
        info[path.name] = {"apparent": st.st_size, "allocated": st.st_blocks * 512}
    changes = read_change_list(ds.changes)
    info["mutation_extents"] = len(changes)
    info["mutation_bytes"] = sum(length for _, length in changes)
    return info


# --------------------------------------------------------------------------- running


@dataclass
class CmdResult:
    argv: list[str]
    rc: int
    seconds: float
    maxrss_kib: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class Context:
    workdir: Path
    dataset: Dataset
    keep: bool
    chunk_size: int | None
    hyperback_cmd: list[str]
    log_counter: int = 0
    cold: bool = False  # drop the page cache before every timed step instead of reading the images

    @property
    def repos(self) -> Path:
        return self.workdir / "repos"

    @property
    def restore_dir(self) -> Path:
        return self.workdir / "restore"

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"


def run_measured(ctx: Context, argv: list[str], tag: str, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> CmdResult:
    """Run argv through the launcher; wall time and ru_maxrss cover the tool only."""
    ctx.log_counter += 1
    stem = ctx.logs / f"{ctx.log_counter:02d}-{tag}"
    out_path, err_path, res_path = (stem.with_suffix(s) for s in (".out", ".err", ".res"))
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(res_path), *argv]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.run(launcher, stdout=out, stderr=err, env=env, cwd=cwd, check=False)
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    try:
        res = json.loads(res_path.read_text())
    except (OSError, ValueError):
        res = {"rc": proc.returncode or 1, "seconds": 0.0, "maxrss_kib": 0}
        stderr += f"\n(bench launcher failed, rc={proc.returncode})"
    return CmdResult(argv, int(res["rc"]), float(res["seconds"]), int(res["maxrss_kib"]), stdout, stderr)


def run_quiet(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=False)


def warm_cache(paths: Sequence[Path]) -> None:
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


def settle() -> None:
    # Flush dirty pages left by the previous phase so their writeback is not
    # billed to the next timed command.
    os.sync()


def prepare_cache(ctx: Context, paths: Sequence[Path]) -> None:
    """Before a timed step: the images in the page cache (hot), or nothing cached at all (cold)."""
    if ctx.cold:
        machine_limits.drop_caches()
        return
    warm_cache(paths)
    settle()


def tree_size(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of regular files under path, like du -sb / du -s."""
    apparent = allocated = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def files_equal(a: Path, b: Path) -> bool:
    return a.is_file() and run_quiet(["cmp", "-s", str(a), str(b)]).returncode == 0


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def last_json_object(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


# --------------------------------------------------------------------------- tools


class Tool:
    """One backup program. Each method returns the commands it ran (all timed)."""

    name = ""
    program = ""
    supports_change_list = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def version(self) -> str:
        raise NotImplementedError

    def reset_state(self) -> None:
        pass

    def init(self, repo: Path) -> list[CmdResult]:
        raise NotImplementedError

    def backup_full(self, repo: Path, images: list[Path]) -> list[CmdResult]:
        raise NotImplementedError

    def backup_incremental(self, repo: Path, image: Path, changes: Path | None) -> list[CmdResult]:
        raise NotImplementedError

    def restore(self, repo: Path, image: Path, target_dir: Path) -> tuple[list[CmdResult], Path]:
        """Restore the latest backup of image below target_dir; returns the restored file."""
        raise NotImplementedError

    def run(self, argv: list[str], tag: str, cwd: Path | None = None) -> CmdResult:
        return run_measured(self.ctx, argv, f"{self.name}-{tag}", env=self.env(), cwd=cwd)


class Borg(Tool):
    program = "borg"

    def __init__(self, ctx: Context, name: str = "borg", create: Sequence[str] = (),
                 extract: Sequence[str] = ()) -> None:
        super().__init__(ctx)
        self.name, self.create_args, self.extract_args = name, list(create), list(extract)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BORG_BASE_DIR=str(self.ctx.state / self.name),
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        )
        return env

    def version(self) -> str:
        return run_quiet(["borg", "--version"]).stdout.strip()

    def reset_state(self) -> None:
        # Files/chunks caches from an earlier run would make "full" incremental.
        remove(self.ctx.state / self.name)
        (self.ctx.state / self.name).mkdir(parents=True)

    def init(self, repo: Path) -> list[CmdResult]:
        return [self.run(["borg", "init", "--encryption=none", str(repo)], "init")]

    def backup_full(self, repo: Path, images: list[Path]) -> list[CmdResult]:
        return [self.run(["borg", "create", *self.create_args, f"{repo}::full", *map(str, images)], "full")]

    def backup_incremental(self, repo: Path, image: Path, changes: Path | None) -> list[CmdResult]:
        return [self.run(["borg", "create", *self.create_args, f"{repo}::incr", str(image)], "incr")]

    def restore(self, repo: Path, image: Path, target_dir: Path) -> tuple[list[CmdResult], Path]:
        cmd = self.run(["borg", "extract", *self.extract_args, f"{repo}::incr"], "restore", cwd=target_dir)
        return [cmd], target_dir / image.relative_to("/")


class Restic(Tool):
    program = "restic"

    def __init__(self, ctx: Context, name: str = "restic-auto", compression: str = "auto") -> None:
        super().__init__(ctx)
        self.name, self.compression = name, compression
        self._init_extra: list[str] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(self.ctx.state / f"{self.name}-cache"))
        return env

    def version(self) -> str:
        return run_quiet(["restic", "version"]).stdout.strip()

    def reset_state(self) -> None:
        remove(self.ctx.state / f"{self.name}-cache")

    def init_extra(self) -> list[str]:
        # Format v2 is the one with compression; 0.14 still defaults to v1.
        if self._init_extra is None:
            help_text = run_quiet(["restic", "init", "--help"]).stdout
            self._init_extra = ["--repository-version", "2"] if "--repository-version" in help_text else []
        return self._init_extra

    def init(self, repo: Path) -> list[CmdResult]:
        return [self.run(["restic", "init", "--repo", str(repo), *self.init_extra()], "init")]

    def backup_full(self, repo: Path, images: list[Path]) -> list[CmdResult]:
        return [self.run(["restic", "--compression", self.compression, "backup", "--repo", str(repo),
                          *map(str, images)], "full")]

    def backup_incremental(self, repo: Path, image: Path, changes: Path | None) -> list[CmdResult]:
        return [self.run(["restic", "--compression", self.compression, "backup", "--repo", str(repo),
                          str(image)], "incr")]

    def restore(self, repo: Path, image: Path, target_dir: Path) -> tuple[list[CmdResult], Path]:
        argv = ["restic", "restore", "latest", "--repo", str(repo), "--target", str(target_dir)]
        return [self.run(argv, "restore")], target_dir / image.relative_to("/")


class Hyperback(Tool):
    name = program = "hyperback"
    supports_change_list = True

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Lets the "python -m host_agent.cli" fallback work from any cwd.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def cmd(self, *args: str) -> list[str]:
        return [*self.ctx.hyperback_cmd, *args]

    def version(self) -> str:
        return shlex.join(self.ctx.hyperback_cmd)

    def init(self, repo: Path) -> list[CmdResult]:
        extra = ["--chunk-size", str(self.ctx.chunk_size)] if self.ctx.chunk_size else []
        return [self.run(self.cmd("init", str(repo), *extra), "init")]

    def backup(self, repo: Path, image: Path, policy: str, changes: Path | None, tag: str) -> CmdResult:
        argv = self.cmd("backup", "--repo", str(repo), "--name", image.stem, "--policy", policy, "--json")
        if changes is not None:
            argv += ["--changes", str(changes)]
        return self.run([*argv, str(image)], tag)

    def backup_full(self, repo: Path, images: list[Path]) -> list[CmdResult]:
        results = []
        for image in images:
            results.append(self.backup(repo, image, "full", None, f"full-{image.stem}"))
            if not results[-1].ok:
                break
        return results

    def backup_incremental(self, repo: Path, image: Path, changes: Path | None) -> list[CmdResult]:
        tag = "incr-cl" if changes else "incr"
        return [self.backup(repo, image, "incremental", changes, tag)]

    def restore(self, repo: Path, image: Path, target_dir: Path,
                sync: bool = True) -> tuple[list[CmdResult], Path]:
        target = target_dir / image.name
        argv = self.cmd("restore", "--repo", str(repo), "--json", *([] if sync else ["--no-sync"]),
                        f"{image.stem}@latest", str(target))
        return [self.run(argv, "restore")], target


FIXED = ["--chunker-params", "fixed,4194304"]
TOOL_FACTORIES: dict[str, Callable[[Context], Tool]] = {
    "hyperback": Hyperback,
    "borg": Borg,
    "borg-fixed-lz4": lambda ctx: Borg(ctx, "borg-fixed-lz4", [*FIXED, "--compression", "lz4"], ["--sparse"]),
    "borg-fixed-zstd": lambda ctx: Borg(ctx, "borg-fixed-zstd", [*FIXED, "--compression", "zstd"],
                                        ["--sparse"]),
    "restic-auto": lambda ctx: Restic(ctx, "restic-auto", "auto"),
    "restic-off": lambda ctx: Restic(ctx, "restic-off", "off"),
}


# --------------------------------------------------------------------------- phases


@dataclass
class PhaseResult:
    tool: str
    phase: str
    ok: bool = False
    seconds: float | None = None
    logical_bytes: int = 0
    repo_bytes: int | None = None  # apparent size after "full"; growth for incr phases
    repo_disk_bytes: int | None = None  # allocated size after "full"; growth for incr phases
    peak_rss_kib: int | None = None
    verified: bool | None = None
    error: str | None = None
    tool_reports: list[dict[str, Any]] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)  # seconds of each run (--runs)

    @property
    def mib_per_s(self) -> float | None:
        if not self.ok or not self.seconds:
            return None
        return self.logical_bytes / MiB / self.seconds


def record(phase: PhaseResult, cmds: list[CmdResult]) -> bool:
    phase.seconds = sum(c.seconds for c in cmds)
    phase.peak_rss_kib = max((c.maxrss_kib for c in cmds), default=None)
    phase.tool_reports = [r for c in cmds if (r := last_json_object(c.stdout)) is not None]
    failed = next((c for c in cmds if not c.ok), None)
    phase.ok = bool(cmds) and failed is None
    if failed is not None:
        phase.error = f"rc={failed.rc}"
        loud(f"{phase.tool} {PHASE_LABELS[phase.phase]} FAILED: {shlex.join(failed.argv)} (rc={failed.rc})",
             tail(failed.stderr) or tail(failed.stdout))
    return phase.ok


def loud(headline: str, detail: str = "") -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!! {headline}", file=sys.stderr)
    if detail:
        print("\n".join(f"!!   {line}" for line in detail.splitlines()), file=sys.stderr)
    print(bar, file=sys.stderr, flush=True)


def fresh_dir(path: Path) -> Path:
    remove(path)
    path.mkdir(parents=True)
    return path


def set_growth(phase: PhaseResult, repo: Path, before: tuple[int, int]) -> None:
    after = tree_size(repo)
    phase.repo_bytes = after[0] - before[0]
    phase.repo_disk_bytes = after[1] - before[1]


def do_restore(tool: Tool, repo: Path, phase: PhaseResult, target_name: str, sync: bool = True) -> None:
    ctx = tool.ctx
    target_dir = fresh_dir(ctx.restore_dir / target_name)
    settle()
    if ctx.cold:
        machine_limits.drop_caches()
    if isinstance(tool, Hyperback):
        cmds, restored = tool.restore(repo, ctx.dataset.base, target_dir, sync)
    else:
        cmds, restored = tool.restore(repo, ctx.dataset.base, target_dir)
    if record(phase, cmds):
        phase.verified = files_equal(restored, ctx.dataset.base)
        if not phase.verified:
            phase.ok = False
            phase.error = "restored file differs" if restored.exists() else "restored file missing"
            loud(f"{tool.name}: RESTORE MISMATCH ({target_name})",
                 f"{restored} vs {ctx.dataset.base}: {phase.error}")
    if not ctx.keep:
        remove(target_dir)


def bench_tool(tool: Tool) -> list[PhaseResult]:
    ctx, ds = tool.ctx, tool.ctx.dataset
    print(f"\n=== {tool.name} ===", flush=True)
    hyperback = isinstance(tool, Hyperback)
    phase_names = ["full", "incr", *(["incr-cl"] if tool.supports_change_list else []), "restore",
                   *(["restore-nosync"] if hyperback else [])]
    logical = {"full": len(ds.images) * ds.size, "incr": ds.size, "incr-cl": ds.size, "restore": ds.size,
               "restore-nosync": ds.size}
    phases = {p: PhaseResult(tool.name, p, logical_bytes=logical[p]) for p in phase_names}
    repo = ctx.repos / tool.name
    cl_repo = ctx.repos / f"{tool.name}-changelist"

    def skip_rest(reason: str) -> list[PhaseResult]:
        for p in phases.values():
            if p.seconds is None and p.error is None:
                p.error = reason
        return list(phases.values())

    for path in (repo, cl_repo):
        remove(path)
    tool.reset_state()
    sparse_copy(ds.base_orig, ds.base)

    init_cmds = tool.init(repo)
    if not all(c.ok for c in init_cmds):
        bad = next(c for c in init_cmds if not c.ok)
        loud(f"{tool.name} init FAILED: {shlex.join(bad.argv)} (rc={bad.rc})",
             tail(bad.stderr) or tail(bad.stdout))
        return skip_rest("init failed")

    print("  full backup ...", flush=True)
    prepare_cache(ctx, ds.images)
    if not record(phases["full"], tool.backup_full(repo, ds.images)):
        return skip_rest("full backup failed")
    after_full = tree_size(repo)
    phases["full"].repo_bytes, phases["full"].repo_disk_bytes = after_full

    if tool.supports_change_list:
        # Both incrementals must start from the same post-full repository.
        subprocess.run(["cp", "-a", str(repo), str(cl_repo)], check=True)

    apply_mutation(ds)
    print("  incremental backup ...", flush=True)
    prepare_cache(ctx, [ds.base])
    if record(phases["incr"], tool.backup_incremental(repo, ds.base, None)):
        set_growth(phases["incr"], repo, after_full)

    cl_ok = False
    if tool.supports_change_list:
        print("  incremental backup with change list ...", flush=True)
        prepare_cache(ctx, [ds.base])
        cl_ok = record(phases["incr-cl"], tool.backup_incremental(cl_repo, ds.base, ds.changes))
        if cl_ok:
            set_growth(phases["incr-cl"], cl_repo, after_full)

    if phases["incr"].ok:
        print("  restore ...", flush=True)
        do_restore(tool, repo, phases["restore"], tool.name)
        if hyperback:
            print("  restore without sync ...", flush=True)
            do_restore(tool, repo, phases["restore-nosync"], f"{tool.name}-nosync", sync=False)
    else:
        phases["restore"].error = "incremental backup failed"

    if cl_ok:
        # Untimed in the table: only proves the change-list snapshot is complete.
        print("  restore of change-list snapshot (verification) ...", flush=True)
        check = PhaseResult(tool.name, "restore", logical_bytes=ds.size)
        do_restore(tool, cl_repo, check, f"{tool.name}-changelist")
        phases["incr-cl"].verified = check.verified
        if not check.ok:
            phases["incr-cl"].ok = False
            phases["incr-cl"].error = f"restore of its snapshot failed: {check.error}"

    if not ctx.keep:
        remove(repo)
        remove(cl_repo)
    return list(phases.values())


def bench_copy(ctx: Context) -> list[PhaseResult]:
    """The machine's own limit for the same bytes: a plain ``qemu-img convert`` of the 3 images (to
    set against a full backup) and of base.img (against a restore), written where restores go."""
    ds = ctx.dataset
    print(f"\n=== {COPY_TOOL} (plain copy) ===", flush=True)
    full = PhaseResult(COPY_TOOL, "full", logical_bytes=len(ds.images) * ds.size)
    restore = PhaseResult(COPY_TOOL, "restore", logical_bytes=ds.size)
    target_dir = fresh_dir(ctx.restore_dir / COPY_TOOL)

    def convert(image: Path, tag: str) -> CmdResult:
        target = target_dir / image.name
        argv = ["qemu-img", "convert", "-f", "raw", "-O", "raw", str(image), str(target)]
        done = run_measured(ctx, argv, f"{COPY_TOOL}-{tag}")
        remove(target)
        return done

    prepare_cache(ctx, ds.images)
    record(full, [convert(image, f"full-{image.stem}") for image in ds.images])
    settle()
    if ctx.cold:
        machine_limits.drop_caches()
    record(restore, [convert(ds.base, "restore")])
    remove(target_dir)
    return [full, restore]


def dataset_work(ds: Dataset, sample: Path) -> tuple[int, int]:
    """(bytes a full backup must hash, bytes it must compress) of the data set, from its recipe;
    writes some of the base's text regions to ``sample`` for the zstd measurement."""
    kinds = region_layout(ds.size // REGION, random.Random(f"{ds.seed}/base"))  # as write_base draws it
    data = sum(1 for k in kinds if k in ("random", "text")) * REGION
    text = [i for i, k in enumerate(kinds) if k == "text"]
    with open(ds.base_orig, "rb") as src, open(sample, "wb") as out:
        for index in text[:16]:
            src.seek(index * REGION)
            out.write(src.read(REGION))
    # every image's data is hashed (clones too: that is how they are found equal); only the base's
    # text is compressible and unique (the clones' changes are random)
    return len(ds.images) * data, len(text) * REGION


def merge_runs(runs: list[list[PhaseResult]]) -> list[PhaseResult]:
    """One result per tool and phase: the median seconds of the runs, the highest RSS, failed if any
    run failed; ``samples`` keeps every run's seconds."""
    merged: list[PhaseResult] = []
    for same in zip(*runs, strict=True):
        last = same[-1]
        ok = all(p.ok for p in same)
        times = [p.seconds for p in same if p.seconds is not None]
        rss = [p.peak_rss_kib for p in same if p.peak_rss_kib]
        bad = next((p.error for p in same if not p.ok), None)
        merged.append(PhaseResult(
            last.tool, last.phase, ok, statistics.median(times) if times else None, last.logical_bytes,
            last.repo_bytes, last.repo_disk_bytes, max(rss) if rss else None,
            all(p.verified for p in same) if last.verified is not None else None, bad, last.tool_reports,
            [round(t, 3) for t in times]))
    return merged


# Each hyperback phase, and the peers' phase it is set against.
COMPARED = {"full": "full", "incr": "incr", "incr-cl": "incr", "restore": "restore",
            "restore-nosync": "restore"}


def ratio_rows(results: list[PhaseResult], limits: machine_limits.Limits | None) -> list[list[str]]:
    """hyperback against the fastest peer configuration (peer seconds / hyperback's: above 1 is
    faster) and against the machine's limits (hyperback's seconds / the limit's: 1 is the limit)."""
    rows = [["phase", "hyperback s", "fastest peer", "peer s", "x faster", "copy s", "/ copy",
             "CPU limit s", "/ CPU limit"]]
    for phase, peer_phase in COMPARED.items():
        hb = lookup(results, "hyperback", phase)
        if hb is None or not hb.ok or not hb.seconds:
            continue
        peers = [p for t in PEERS
                 if (p := lookup(results, t, peer_phase)) is not None and p.ok and p.seconds]
        best = min(peers, key=lambda p: p.seconds or 0.0) if peers else None
        copy = lookup(results, COPY_TOOL, peer_phase) if peer_phase in ("full", "restore") else None
        copy_s = copy.seconds if copy is not None and copy.ok else None
        cpu = limits.full_seconds if limits is not None and phase == "full" else None
        rows.append([
            PHASE_LABELS[phase], fmt(hb.seconds), best.tool if best else "-",
            fmt(best.seconds if best else None),
            fmt((best.seconds or 0.0) / hb.seconds if best else None),
            fmt(copy_s), fmt(hb.seconds / copy_s if copy_s else None),
            fmt(cpu), fmt(hb.seconds / cpu if cpu else None)])
    return rows


# --------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str = ".2f", prefix: str = "") -> str:
    return "-" if value is None else f"{prefix}{value:{spec}}"


def status_text(p: PhaseResult) -> str:
    if p.ok:
        return "ok, verified" if p.verified else "ok"
    if p.seconds is None:
        return f"not run ({p.error})" if p.error else "not run"
    return f"FAILED ({p.error})"


def table_rows(results: list[PhaseResult]) -> list[list[str]]:
    rows = [["tool", "phase", "seconds", "MiB/s", "repo MiB", "disk MiB", "RSS MiB", "status"]]
    for p in results:
        growth = p.phase.startswith("incr")
        repo = None if p.repo_bytes is None else p.repo_bytes / MiB
        disk = None if p.repo_disk_bytes is None else p.repo_disk_bytes / MiB
        rows.append([
            p.tool,
            PHASE_LABELS[p.phase],
            fmt(p.seconds),
            fmt(p.mib_per_s, ".1f"),
            fmt(repo, ".1f", "+" if growth else ""),
            fmt(disk, ".1f", "+" if growth else ""),
            fmt(None if p.peak_rss_kib is None else p.peak_rss_kib / KiB, ".1f"),
            status_text(p),
        ])
    return rows


def render_table(rows: list[list[str]], numeric: frozenset[int] = frozenset({2, 3, 4, 5, 6})) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        pairs = enumerate(zip(r, widths, strict=True))
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in pairs]
        return "  ".join(cells).rstrip()

    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *map(line, rows[1:])])


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    value: float | None
    target: str
    note: str = ""


def lookup(results: list[PhaseResult], tool: str, phase: str) -> PhaseResult | None:
    return next((p for p in results if p.tool == tool and p.phase == phase), None)


def speedup_check(name: str, results: list[PhaseResult], phase: str, hb_phase: str,
                  others: Sequence[str], target: float) -> Check:
    refs = [p for t in others if (p := lookup(results, t, phase)) is not None and p.ok]
    hb = lookup(results, "hyperback", hb_phase)
    target_text = f">= {target:g}x"
    if not refs:
        return Check(name, "SKIP", None, target_text, f"no successful {'/'.join(others)} {phase} to compare")
    best = min(refs, key=lambda p: p.seconds or 0.0)
    if hb is None:
        return Check(name, "SKIP", None, target_text, "hyperback not run")
    if not hb.ok or not hb.seconds:
        return Check(name, "FAIL", None, target_text, "hyperback phase failed")
    ratio = (best.seconds or 0.0) / hb.seconds
    note = f"hyperback {hb.seconds:.2f}s vs {best.tool} {best.seconds:.2f}s"
    return Check(name, "PASS" if ratio >= target else "FAIL", ratio, target_text, note)


def growth_check(name: str, results: list[PhaseResult], phase: str, changed: int) -> Check:
    hb = lookup(results, "hyperback", phase)
    target_text = f"<= {TARGET_GROWTH_RATIO:g}x changed bytes"
    if hb is None:
        return Check(name, "SKIP", None, target_text, "hyperback not run")
    if not hb.ok or hb.repo_bytes is None:
        return Check(name, "FAIL", None, target_text, "hyperback phase failed")
    ratio = hb.repo_bytes / changed
    note = f"+{hb.repo_bytes / MiB:.2f} MiB for {changed / MiB:.2f} MiB changed"
    return Check(name, "PASS" if ratio <= TARGET_GROWTH_RATIO else "FAIL", ratio, target_text, note)


def rss_check(results: list[PhaseResult]) -> Check:
    hb = [p for p in results if p.tool == "hyperback"]
    target_text = f"<= {TARGET_PEAK_RSS_MIB:g} MiB"
    if not hb:
        return Check("hyperback peak RSS", "SKIP", None, target_text, "hyperback not run")
    peak = peak_rss_mib(results, "hyperback")
    if peak is None or not all(p.ok for p in hb):
        return Check("hyperback peak RSS", "FAIL", None, target_text, "some hyperback phases failed")
    others = [f"{t} {rss:.0f}" for t in PEERS if (rss := peak_rss_mib(results, t)) is not None]
    note = ("peak of others (MiB): " + ", ".join(others)) if others else ""
    status = "PASS" if peak <= TARGET_PEAK_RSS_MIB else "FAIL"
    return Check("hyperback peak RSS", status, peak, target_text, note)


def peak_rss_mib(results: list[PhaseResult], tool: str) -> float | None:
    measured = [p.peak_rss_kib for p in results if p.tool == tool and p.ok and p.peak_rss_kib]
    return max(measured) / KiB if measured else None


def build_checks(results: list[PhaseResult], changed: int) -> list[Check]:
    restic = ("restic-auto", "restic-off")
    return [
        speedup_check("full backup vs fastest peer configuration", results, "full", "full", PEERS,
                      TARGET_FULL_SPEEDUP),
        speedup_check("incremental (no list) vs fastest peer", results, "incr", "incr", PEERS, 1.0),
        speedup_check("incremental (no list) vs restic", results, "incr", "incr", restic,
                      TARGET_INCR_SPEEDUP),
        speedup_check("incremental (change list) vs restic", results, "incr", "incr-cl", restic,
                      TARGET_INCR_CL_SPEEDUP),
        growth_check("repo growth, incr (no list)", results, "incr", changed),
        growth_check("repo growth, incr (change list)", results, "incr-cl", changed),
        speedup_check("restore vs restic (neither syncs)", results, "restore", "restore-nosync", restic,
                      TARGET_RESTORE_SPEEDUP),
        speedup_check("restore, hyperback synced, vs restic", results, "restore", "restore", restic,
                      TARGET_RESTORE_SPEEDUP),
        rss_check(results),
    ]


def render_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        unit = " MiB" if "RSS" in c.name else "x"
        value = "-" if c.value is None else f"{c.value:.2f}{unit}"
        line = f"  [{c.status}] {c.name.ljust(width)}  {value:>9}  (target {c.target})  {c.note}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def other_ratios(results: list[PhaseResult], changed: int) -> list[str]:
    """Repository growth per changed byte for every tool, to put hyperback's in context."""
    lines = []
    for p in results:
        if p.phase.startswith("incr") and p.ok and p.repo_bytes is not None:
            ratio = p.repo_bytes / changed
            lines.append(f"  {p.tool} {PHASE_LABELS[p.phase]}: repo growth {ratio:.2f}x changed bytes")
    return lines


# --------------------------------------------------------------------------- main


def default_hyperback() -> str:
    found = shutil.which("hyperback")
    if found:
        return found
    venv = REPO_ROOT / ".venv" / "bin"
    if (venv / "hyperback").exists():
        return str(venv / "hyperback")
    # host_agent.cli is a package with a main() entry point (pyproject's
    # [project.scripts]); "-m host_agent.cli" only works if it grows a __main__.
    python = venv / "python" if (venv / "python").exists() else Path(sys.executable)
    code = "import sys; from host_agent.cli import main; sys.exit(main())"
    return shlex.join([str(python), "-c", code])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Benchmark the backup data path of hyperback against borg and restic (as they come and\n"
            "as configured for disk images) on synthetic VM disk images: full backup of 3 related\n"
            "images, an incremental after a 1% change, and a restore; hot page cache (or --cold),\n"
            "fresh repositories, same data for every tool; and the machine's limits in the same run."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""\
images (generated once into WORKDIR/images, reused while --size-mib/--seed match):
  base.orig     pristine image: 1 MiB regions shuffled: ~30% holes, ~35% random,
                ~32% text-like (~4x with zstd), ~3% written zeros
  base.img      working copy, restored from base.orig before each tool runs
  clone1/2.img  base + ~3% rewritten in 64 KiB extents (4 KiB-aligned)
  changes.txt   the mutation applied to base.img after the full backup:
                1% of the size, 64 KiB extents at 4 KiB- (not 64 KiB-)aligned
                offsets in data regions; lines "OFFSET LENGTH" (bytes)

per tool: init -> full backup of the 3 images -> mutate base.img ->
  incremental backup of base.img (hyperback: also with --changes, on a copy of
  the post-full repository) -> restore base.img, compared with cmp.
Seconds are wall time of the tool processes; peak RSS is ru_maxrss from wait4.
tools: hyperback, borg (defaults), borg-fixed-lz4 / borg-fixed-zstd (--chunker-params
  fixed,4194304, --compression lz4 / zstd, extract --sparse), restic-auto / restic-off
  (--compression auto / off). limits: qemu-img convert of the same images, SHA-256
  and zstd -1 per core, the CPU-bound limit of a full backup (bench/README.md).

targets (hyperback):
  full backup >= {TARGET_FULL_SPEEDUP:g}x faster than the fastest peer configuration
  incremental without change list faster than the fastest peer configuration
  incremental without change list >= {TARGET_INCR_SPEEDUP:g}x faster than restic
  incremental with change list >= {TARGET_INCR_CL_SPEEDUP:g}x faster than restic
  repository growth for the 1% change <= {TARGET_GROWTH_RATIO:g}x the changed bytes
  restore >= {TARGET_RESTORE_SPEEDUP:g}x faster than restic
  peak RSS <= {TARGET_PEAK_RSS_MIB:g} MiB

exit status: 0 all ran and all targets met, 1 a tool failed or a restore
  differed, 2 everything ran but a target was missed or skipped.

examples:
  bench/bench_datapath.py --tools borg-fixed-lz4,restic-off --size-mib 64
  bench/bench_datapath.py --size-mib 1024 --runs 3 --cold
  bench/bench_datapath.py --json-out /tmp/bench.json
  bench/bench_datapath.py --tools hyperback --chunk-size 4194304
""",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/hyperback-bench"),
                        help="images, repos, restores and logs go here (default: %(default)s)")
    parser.add_argument("--size-mib", type=int, default=512,
                        help="size of each image in MiB (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed for image contents and mutations (default: %(default)s)")
    parser.add_argument("--tools", default=",".join(ALL_TOOLS),
                        help="comma-separated subset of " + ",".join(ALL_TOOLS)
                        + ", run in this order (default: %(default)s)")
    parser.add_argument("--hyperback", default=None,
                        help="hyperback command line, split like a shell would (default: 'hyperback' "
                             "on PATH, else the checkout's .venv/bin/hyperback, else host_agent.cli:main "
                             "run by python with the checkout on PYTHONPATH)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="passed as 'hyperback init --chunk-size N' (bytes)")
    parser.add_argument("--keep", action="store_true",
                        help="keep repositories and restored files for inspection")
    parser.add_argument("--regenerate", action="store_true", help="regenerate images even if reusable")
    parser.add_argument("--json-out", type=Path, default=None, help="also write all results as JSON here")
    parser.add_argument("--runs", type=int, default=1,
                        help="run everything this many times and report medians (default: %(default)s)")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache (echo 3 > /proc/sys/vm/drop_caches) before every timed "
                             "step instead of reading the images first (needs root)")
    parser.add_argument("--no-limits", action="store_true",
                        help="skip the machine's limits (qemu-img copy, SHA-256 and zstd per core)")
    args = parser.parse_args(argv)
    if args.size_mib < 16:
        parser.error("--size-mib must be at least 16")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(ALL_TOOLS))
    if unknown or not tools:
        parser.error(f"--tools: unknown {unknown}; choose from {','.join(ALL_TOOLS)}")
    args.tool_list = tools
    return args


def launcher_rss_floor(ctx: Context) -> float:
    """ru_maxrss of /bin/true through the launcher: values near this are upper bounds."""
    return run_measured(ctx, ["true"], "rss-floor").maxrss_kib / KiB


@dataclass
class Report:
    params: dict[str, Any]
    dataset: dict[str, Any]
    rss_floor_mib: float
    versions: dict[str, str]
    results: list[PhaseResult]
    checks: list[Check]
    changed_bytes: int
    logs: Path
    limits: machine_limits.Limits | None = None

    def exit_status(self) -> int:
        if any(not p.ok for p in self.results):
            return 1
        return 0 if all(c.status == "PASS" for c in self.checks) else 2

    def show(self) -> None:
        ds, size = self.dataset, self.dataset["size"]
        print()
        print(f"images: 3 x {size // MiB} MiB (seed {ds['seed']}, "
              f"{ds['base.orig']['allocated'] / MiB:.0f} MiB allocated in base); "
              f"mutation: {ds['mutation_extents']} x 64 KiB = {self.changed_bytes / MiB:.2f} MiB")
        for name, version in self.versions.items():
            print(f"{name}: {version.splitlines()[0] if version else '?'}")
        if self.params["chunk_size"]:
            print(f"hyperback chunk size: {self.params['chunk_size']}")
        print(f"host: {platform.node()} {platform.release()}, {os.cpu_count()} CPUs; RSS floor of the "
              f"launcher: {self.rss_floor_mib:.1f} MiB (RSS values near it are upper bounds)")
        runs = self.params["runs"]
        print(f"page cache {'dropped before every step (cold)' if self.params['cold'] else 'hot'}; "
              f"{'median of ' + str(runs) + ' runs' if runs > 1 else 'one run'}")
        print("full = 3 images; MiB/s = logical bytes / seconds; incr rows show repo growth (+)\n")
        print(render_table(table_rows(self.results)))
        if self.limits is not None:
            print(f"\nmachine: {self.limits.describe()}")
        ratios = ratio_rows(self.results, self.limits)
        if len(ratios) > 1:
            print("\nhyperback against the fastest peer configuration (x faster: peer s / hyperback s) and "
                  "the machine's limits (hyperback s / limit s; 1.00 = at the limit):")
            print(render_table(ratios, frozenset({1, 3, 4, 5, 6, 7, 8})))
        extra = other_ratios(self.results, self.changed_bytes)
        if extra:
            print("\nother ratios:")
            print("\n".join(extra))
        if self.checks:
            print("\ntargets (hyperback):")
            print(render_checks(self.checks))
        failed = [p for p in self.results if not p.ok]
        if failed:
            print(f"\n{len(failed)} phase(s) FAILED or not run; logs in {self.logs}")

    def to_json(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "host": {"node": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count()},
            "versions": self.versions,
            "dataset": self.dataset,
            "changed_bytes": self.changed_bytes,
            "rss_floor_mib": self.rss_floor_mib,
            "results": [dict(asdict(p), label=PHASE_LABELS[p.phase], mib_per_s=p.mib_per_s)
                        for p in self.results],
            "checks": [asdict(c) for c in self.checks],
            "limits": None if self.limits is None else dict(asdict(self.limits),
                                                              full_seconds=self.limits.full_seconds),
        }


def run_benchmarks(ctx: Context, tool_names: Sequence[str]) -> tuple[list[PhaseResult], dict[str, str]]:
    results: list[PhaseResult] = []
    versions: dict[str, str] = {}
    for name in tool_names:
        tool = TOOL_FACTORIES[name](ctx)
        if name != "hyperback" and shutil.which(tool.program) is None:
            loud(f"{name} not found on PATH", "install it: apt-get install -y borgbackup restic")
            results += [PhaseResult(name, p, error="not installed") for p in ("full", "incr", "restore")]
            continue
        versions[name] = tool.version()
        results += bench_tool(tool)
    return results, versions


def median_limits(measured: list[machine_limits.Limits]) -> machine_limits.Limits | None:
    if not measured:
        return None
    first = measured[0]
    return machine_limits.Limits(statistics.median(m.sha256_bps for m in measured),
                                 statistics.median(m.zstd_bps for m in measured), first.zstd_ratio,
                                 first.cores, first.hash_bytes, first.compress_bytes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    ds = Dataset(workdir / "images", args.size_mib * MiB, args.seed)
    ctx = Context(workdir, ds, args.keep, args.chunk_size,
                  shlex.split(args.hyperback or default_hyperback()))
    for path in (ctx.logs, ctx.restore_dir, ctx.state):
        fresh_dir(path)
    ctx.repos.mkdir(parents=True, exist_ok=True)

    ctx.cold = args.cold
    prepare_dataset(ds, args.regenerate)
    info = describe_dataset(ds)
    floor = launcher_rss_floor(ctx)
    runs: list[list[PhaseResult]] = []
    measured: list[machine_limits.Limits] = []
    versions: dict[str, str] = {}
    for run in range(args.runs):
        if args.runs > 1:
            print(f"\n##### run {run + 1} of {args.runs}", flush=True)
        results, versions = run_benchmarks(ctx, args.tool_list)
        if not args.no_limits:
            sparse_copy(ds.base_orig, ds.base)
            results += bench_copy(ctx)
            sample = ctx.state / "text-sample"
            measured.append(machine_limits.measure(sample, *dataset_work(ds, sample)))
        runs.append(results)
    results = merge_runs(runs)
    limits = median_limits(measured)
    remove(ds.base)  # mutated; rebuilt from base.orig by the next run

    changed = int(info["mutation_bytes"])
    params = {"size_mib": args.size_mib, "seed": args.seed, "tools": args.tool_list,
              "chunk_size": args.chunk_size, "workdir": str(workdir), "runs": args.runs, "cold": args.cold,
              "hyperback": shlex.join(ctx.hyperback_cmd)}
    checks = build_checks(results, changed) if "hyperback" in args.tool_list else []
    report = Report(params, info, floor, versions, results, checks, changed, ctx.logs, limits)
    report.show()
    if args.json_out:
        args.json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"\nJSON written to {args.json_out}")
    return report.exit_status()


if __name__ == "__main__":
    sys.exit(main())
