"""hyperback units: install the systemd units of the host's services, pointing at this installation.

The units are templates shipped in the package (``host_agent/cli/units/``): ``@COMMAND@`` stands
for the absolute path of an installed command (``hyperback-agent``, ``hyperback-optimizer``,
``hyperback-media``), found beside the running interpreter's scripts (a venv's ``bin/``,
``/usr/local/bin`` or ``/usr/bin``), else on ``PATH``. No prefix is written into the templates.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import sysconfig
from importlib import resources
from pathlib import Path

from host_agent import errors

DEFAULT_DIR = Path("/etc/systemd/system")
PLACEHOLDER = re.compile(r"@(hyperback(?:-[a-z]+)*)@")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "units", help="install the systemd units",
        description="Write the systemd units of hyperback-agent, hyperback-optimizer and hyperback-media, "
                    "with the absolute paths of this installation's commands. Then: systemctl "
                    "daemon-reload && systemctl enable --now hyperback-agent.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    install = actions.add_parser("install", help="write the units",
                                 description="Write the units (an unchanged one is left alone).")
    install.add_argument("--dir", type=Path, default=DEFAULT_DIR, metavar="DIR",
                         help="where to write them (default %(default)s)")
    install.add_argument("--dry-run", action="store_true", help="print the units instead of writing them")
    install.set_defaults(run=run)


def templates() -> dict[str, str]:
    """Unit name -> template text, as shipped in the package."""
    folder = resources.files("host_agent.cli") / "units"
    return {entry.name: entry.read_text() for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".service")}


def command_path(name: str) -> Path:
    """The absolute path of an installed command of this installation."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate.absolute()
    found = shutil.which(name)
    if found is None:
        raise errors.EnvironmentProblem(f"{name} is not installed beside {sys.executable} nor on PATH: "
                                        f"install hyperback (pip install .) first")
    return Path(found).absolute()


def render(template: str, paths: dict[str, Path] | None = None) -> str:
    """The template with each ``@COMMAND@`` replaced by the command's absolute path."""
    found = dict(paths or {})

    def path_of(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in found:
            found[name] = command_path(name)
        return str(found[name])

    return PLACEHOLDER.sub(path_of, template)


def rendered() -> dict[str, str]:
    """Every unit, rendered for this installation."""
    return {name: render(text) for name, text in templates().items()}


def run(args: argparse.Namespace) -> int:
    units = rendered()
    if args.dry_run:
        for name, text in units.items():
            print(f"# {args.dir / name}\n{text}")
        return 0
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
        for name, text in units.items():
            path = args.dir / name
            if path.exists() and path.read_text() == text:
                print(f"{path}: unchanged")
                continue
            path.write_text(text)
            print(f"{path}: written")
    except OSError as e:
        raise errors.EnvironmentProblem(f"cannot write the units to {args.dir}: {e.strerror or e}") from e
    print("next: systemctl daemon-reload && systemctl enable --now hyperback-agent"
          " (and hyperback-media on a host with backup media: /etc/hyperback/media.env first)")
    return 0
