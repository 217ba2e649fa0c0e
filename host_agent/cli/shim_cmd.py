"""hyperback shim build [--out DIR]: the guest shim's own packages, built on the host.

Two files, both of the ``guest_shim`` package alone (stdlib only, Python 3.9+), at the host
project's version:

* ``hyperback_shim-VERSION-py3-none-any.whl``: a pure-Python wheel, distribution
  ``hyperback-shim``, no dependencies, ``Requires-Python >=3.9``, console script
  ``hyperback-shim = guest_shim.cli:main``.  Built by real tooling: ``guest_shim/`` is copied into
  a temporary project with a generated ``pyproject.toml`` (setuptools) and ``pip wheel
  --no-deps --no-build-isolation --no-index`` runs from this interpreter, so nothing is fetched.
  The top-level pyproject.toml stays the host project's (it pulls libvirt-python and grpc).
* ``hyperback-shim.pyz``: a single-file zipapp (stdlib ``zipapp``, shebang ``/usr/bin/env
  python3``) for guests without pip: ``python3 hyperback-shim.pyz backup``.

docs/guest.md says how a guest installs either.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipapp
from importlib import metadata
from pathlib import Path

import guest_shim
from host_agent import errors

DISTRIBUTION = "hyperback-shim"
PYZ_NAME = "hyperback-shim.pyz"
INTERPRETER = "/usr/bin/env python3"

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "{version}"
description = "hyperback's guest shim: ask the host for backups of this VM over virtio-serial"
requires-python = ">=3.9"
license = "Apache-2.0"
dependencies = []
classifiers = [
    "Programming Language :: Python :: 3",
    "Operating System :: POSIX :: Linux",
    "Topic :: System :: Archiving :: Backup",
]

[project.scripts]
hyperback-shim = "guest_shim.cli:main"

[tool.setuptools]
packages = ["guest_shim"]
"""

# zipapp's own __main__ (``main=``) drops main()'s return value: the exit code would be lost.
_PYZ_MAIN = """\
import sys

from guest_shim.cli import main

sys.exit(main())
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("shim", help="build the guest shim's packages",
                       description="The guest shim's packages, to copy into VMs: a wheel and a "
                                   "zipapp (docs/guest.md).")
    shim = p.add_subparsers(dest="shim_command", metavar="SHIM_COMMAND")
    shim.required = True
    b = shim.add_parser("build", help="build the wheel and the zipapp",
                        description="Build hyperback_shim-VERSION-py3-none-any.whl (pure Python, no "
                                    "dependencies) and hyperback-shim.pyz (runs with python3 alone).")
    b.add_argument("--out", default="dist", metavar="DIR", help="where to write them (default: dist)")
    b.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    wheel = build_wheel(out)
    pyz = build_zipapp(out)
    for path in (wheel, pyz):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


def version() -> str:
    """The host project's version, which the shim's packages carry."""
    try:
        return metadata.version("hyperback")
    except metadata.PackageNotFoundError as e:
        raise errors.PackageBuildError("the hyperback project is not installed: its version is "
                                       "unknown (pip install . first)") from e


def _source() -> Path:
    return Path(guest_shim.__file__).resolve().parent


def _copy_package(into: Path) -> Path:
    """``guest_shim/`` without bytecode, under ``into``; file times kept (they date the archive)."""
    target = into / "guest_shim"
    shutil.copytree(_source(), target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _prepare_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        return out.resolve()
    except OSError as e:
        raise errors.PackageBuildError(f"cannot create {out}: {e.strerror}") from e


def build_wheel(out: Path) -> Path:
    """Build the shim's wheel into ``out``; its path."""
    out = _prepare_out(out)
    ver = version()
    with tempfile.TemporaryDirectory(prefix="hyperback-shim-build-") as tmp:
        project = Path(tmp)
        package = _copy_package(project)
        (project / "pyproject.toml").write_text(_PYPROJECT.format(name=DISTRIBUTION, version=ver))
        newest = max(int(p.stat().st_mtime) for p in package.rglob("*.py"))
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(newest), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "--quiet", "--wheel-dir", str(project / "dist"), str(project)]
        try:
            proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise errors.PackageBuildError(f"pip wheel could not run: {e}") from e
        if proc.returncode != 0:
            tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise errors.PackageBuildError(
                f"pip wheel failed (exit {proc.returncode}): {tail} (it needs pip and setuptools>=77 "
                f"in {sys.prefix})")
        built = sorted((project / "dist").glob("hyperback_shim-*.whl"))
        if len(built) != 1:
            raise errors.PackageBuildError(f"pip wheel left {len(built)} wheels, expected one")
        target = out / built[0].name
        shutil.copyfile(built[0], target)
    return target


def build_zipapp(out: Path) -> Path:
    """Build ``hyperback-shim.pyz`` into ``out``; its path."""
    out = _prepare_out(out)
    target = out / PYZ_NAME
    with tempfile.TemporaryDirectory(prefix="hyperback-shim-pyz-") as tmp:
        root = Path(tmp)
        _copy_package(root)
        (root / "__main__.py").write_text(_PYZ_MAIN)
        partial = out / f".{PYZ_NAME}.part"
        try:
            zipapp.create_archive(root, partial, interpreter=INTERPRETER, compressed=True)
            os.replace(partial, target)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise errors.PackageBuildError(f"cannot write {target}: {e.strerror}") from e
    return target
