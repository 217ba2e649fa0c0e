"""hyperback demo: the main job on an embedded default, with no configuration.

By default a real VM backs itself up through the guest shim, the agent, the
driver, the gRPC optimizer and the copier (``host_agent.lab.demo``; needs root
and the host prepared by ``.ci/setup``). With ``--image`` it is a tour of the
data path alone: a sparse disk image with random and compressible data is
backed up (full), 1% of it changed and backed up again (incremental, once by
comparison and once from a change list), restored, checked bit-identical, and
the repository verified.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
from pathlib import Path

from host_agent import errors
from host_agent.cli.progress import bar_for, human
from host_agent.model import Policy
from host_agent.storage.repository import Repository

MIB = 1024 * 1024


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the main job on a built-in example",
                       description="Boot a VM whose application backs itself up through hyperback (guest "
                                   "shim, agent, driver, optimizer, copier), restore and check the result; "
                                   "with --image, tour the data path alone on a generated image.")
    p.add_argument("--image", action="store_true",
                   help="no VM: back up, change, back up again and restore a generated sparse image")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/hyperback-demo"),
                   help="where the image, repository and restore go (default /var/tmp/hyperback-demo; "
                        "emptied first)")
    p.add_argument("--size-mib", type=int, default=256, help="image size in MiB (default 256)")
    p.set_defaults(run=run)


def _make_image(path: Path, size: int, rng: random.Random) -> None:
    words = b"backup restore snapshot chunk pack index tree volume guest host ".split()
    text = b"\n".join(b" ".join(rng.choice(words) for _ in range(12)) for _ in range(20000))
    with open(path, "wb") as f:
        f.truncate(size)
        for mib in range(size // MIB):
            kind = rng.random()
            if kind < 0.3:
                continue  # a hole
            block = rng.randbytes(MIB) if kind < 0.65 else (text * (MIB // len(text) + 1))[:MIB]
            f.seek(mib * MIB)
            f.write(block)


def _mutate(path: Path, size: int, rng: random.Random) -> list[tuple[int, int]]:
    changes = []
    with open(path, "r+b") as f:
        for _ in range(max(size // 100 // (64 * 1024), 1)):
            off = rng.randrange(0, size - 64 * 1024, 4096)
            f.seek(off)
            f.write(rng.randbytes(64 * 1024))
            changes.append((off, 64 * 1024))
    return changes


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def run(args: argparse.Namespace) -> int:
    if not args.image:
        from host_agent.lab import demo

        if os.geteuid() != 0:
            raise errors.UsageError("the VM demo needs root (libvirtd, guests); 'hyperback demo --image' "
                                    "does not")
        return demo.run(args.workdir, print)
    work: Path = args.workdir
    size = args.size_mib * MIB
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    image, repo_dir, restored = work / "disk.img", work / "repo", work / "restored.img"
    rng = random.Random(42)
    print(f"1. generating a {human(size)} sparse image {image}")
    _make_image(image, size, rng)
    repo = Repository.init(repo_dir)
    print(f"2. created repository {repo_dir}")

    def backup(policy: Policy, changes: list[tuple[int, int]] | None = None) -> None:
        bar = bar_for(f"   {policy.value}", False)
        result = repo.backup(image, "demo/vda", policy, changes, bar)
        if bar:
            bar.close()
        s, st = result.snapshot, result.snapshot.stats
        print(f"   snapshot {s.id} {s.policy.value:12} ({s.change_detection.value}): "
              f"read {human(st.bytes_read)}, new {human(st.bytes_new)}, stored {human(st.bytes_stored)} "
              f"in {st.seconds:.2f}s")

    print("3. full backup")
    backup(Policy.FULL)
    changes = _mutate(image, size, rng)
    print(f"4. changed {len(changes)} scattered 64 KiB extents (1%); incremental backups:")
    backup(Policy.INCREMENTAL)
    backup(Policy.INCREMENTAL, changes)
    print(f"5. restoring demo/vda@latest to {restored}")
    result = repo.restore("demo/vda@latest", restored)
    same = _digest(restored) == _digest(image)
    print(f"   restored {human(result.bytes_written)} in {result.seconds:.2f}s: "
          f"{'bit-identical' if same else 'DIFFERENT'}")
    report = repo.verify()
    print(f"6. verify: {human(report.bytes_checked)} re-read and re-hashed, {report.bad_total} bad chunk(s)")
    print(f"\nThe backup is in {repo_dir}; try: hyperback list --repo {repo_dir}")
    return 0 if same and report.ok else 4
