"""Options several commands share, declared once."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def add_threads(p: argparse.ArgumentParser, what: str = "worker threads") -> None:
    p.add_argument("--threads", type=positive_int, default=None, metavar="N", help=f"{what} (default: cores)")
