"""The ``hyperback`` command: one module per subcommand, all over the Python API.

Exit codes: 0 success; 1 unexpected error (a bug: please report it);
2 usage error or unusable repository/snapshot name; 3 the system refused
(source unreadable, media full, target unwritable, repository busy);
4 damaged data found (verify, check, restore) or a snapshot failed to boot
(verify-boot); 130 interrupted.
A user mistake prints one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Final, NoReturn

from host_agent import errors

# Which module serves each command, in the order --help lists them. A call imports only its
# command's module: importing all of them (grpc, cryptography, libvirt, croniter) was most of a
# call's start-up (bench/cli_startup.py).
COMMANDS: Final = {
    "init": "init_cmd", "backup": "backup_cmd", "restore": "restore_cmd", "restore-vm": "restorevm_cmd",
    "instant-restore": "instant_restore_cmd", "export": "export_cmd", "files": "files_cmd",
    "list": "list_cmd", "tag": "tag_cmd", "protect": "protect_cmd", "unprotect": "protect_cmd",
    "forget": "forget_cmd", "verify": "verify_cmd", "verify-boot": "verify_boot_cmd", "check": "check_cmd",
    "copy": "copy_cmd", "prune": "prune_cmd", "vm": "vm_cmd", "job": "job_cmd", "schedule": "schedule_cmd",
    "units": "units_cmd", "demo": "demo_cmd", "shim": "shim_cmd", "certs": "certs_cmd",
    "key": "key_cmd",
}


def command_modules(argv: Sequence[str]) -> list[ModuleType]:
    """The modules that must build the parser for ``argv``: its command's, or all of them when
    it names none (--help) or an unknown one (the error lists every command)."""
    # The first word that is not an option is the command: the top level's option takes no value.
    named = next((word for word in argv if not word.startswith("-")), None)
    wanted = [COMMANDS[named]] if named in COMMANDS else dict.fromkeys(COMMANDS.values())
    return [importlib.import_module(f"{__name__}.{module}") for module in wanted]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise errors.UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser(modules: Sequence[ModuleType]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hyperback",
        description="Deduplicating, compressed backups of VM disk images and block devices.",
        epilog="Exit codes: 0 ok, 2 usage, 3 system refused (media full, unreadable source, busy), "
               "4 damaged data, 130 interrupted. 'hyperback COMMAND --help' tells more.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in modules:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_modules(argv))
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                            format="hyperback: %(levelname)s %(name)s: %(message)s")
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except errors.HyperbackError as e:
        print(f"hyperback: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("hyperback: interrupted; nothing partial was published", file=sys.stderr)
        return errors.Cancelled.exit_code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
