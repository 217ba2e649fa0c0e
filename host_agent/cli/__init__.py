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
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from host_agent import errors
from host_agent.cli import (
    backup_cmd,
    certs_cmd,
    check_cmd,
    copy_cmd,
    demo_cmd,
    export_cmd,
    files_cmd,
    forget_cmd,
    init_cmd,
    instant_restore_cmd,
    job_cmd,
    key_cmd,
    list_cmd,
    protect_cmd,
    prune_cmd,
    restore_cmd,
    restorevm_cmd,
    schedule_cmd,
    shim_cmd,
    tag_cmd,
    units_cmd,
    verify_boot_cmd,
    verify_cmd,
    vm_cmd,
)

COMMANDS = (init_cmd, backup_cmd, restore_cmd, restorevm_cmd, instant_restore_cmd, export_cmd, files_cmd,
            list_cmd, tag_cmd, protect_cmd, forget_cmd, verify_cmd, verify_boot_cmd, check_cmd, copy_cmd,
            prune_cmd, vm_cmd, job_cmd, schedule_cmd, units_cmd, demo_cmd, shim_cmd, certs_cmd, key_cmd)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise errors.UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hyperback",
        description="Deduplicating, compressed backups of VM disk images and block devices.",
        epilog="Exit codes: 0 ok, 2 usage, 3 system refused (media full, unreadable source, busy), "
               "4 damaged data, 130 interrupted. 'hyperback COMMAND --help' tells more.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
