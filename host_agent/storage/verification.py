"""A snapshot's boot verification record (docs/repository-format.md, section 5.4): whether a VM
booted from it answered, why not, and the console text it printed.

The snapshot document is the commit record of a backup and is never rewritten, so the verdict
lives beside it, in ``verifications/ID`` (the latest verification of snapshot ``ID``), with the
console text in ``verifications/ID.console``.  Repositories from before this existed have no
``verifications/`` folder: they read as "never verified".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from host_agent.storage.snapshot import FORMAT_VERSION, SNAPSHOT_ID

MAX_REASON = 1024        # characters of a reason
MAX_CHECK_OUTPUT = 4096  # characters of a check command's output (the wire protocol's bound)
MAX_CONSOLE = 256 * 1024  # bytes of console text kept: the end, where a boot failed
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """Text made safe to print on a terminal on one line, cut to ``limit`` characters."""
    text = _CONTROL.sub("?", text.replace("\n", " ").replace("\r", " "))
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class CheckOutcome:
    """What the operator's check command said in the guest."""

    command: tuple[str, ...]
    exit: int | None   # None: killed at its timeout, or it never ran
    output: str


@dataclass(frozen=True)
class Verification:
    snapshot: str
    time: datetime
    passed: bool
    reason: str                  # why it failed, or what was seen when it passed (one line)
    seconds: float               # from the start of the boot to the verdict
    host: str                    # the host that booted it
    check: CheckOutcome | None = None
    console_bytes: int = 0       # how long the whole console text was
    console_kept: int = 0        # how much of its end ``ID.console`` holds (0: none kept)

    @property
    def result(self) -> str:
        return "passed" if self.passed else "failed"

    def to_json(self) -> dict[str, Any]:
        check = None if self.check is None else {
            "command": list(self.check.command), "exit": self.check.exit, "output": self.check.output}
        return {"version": FORMAT_VERSION, "snapshot": self.snapshot,
                "time": self.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "result": self.result,
                "reason": self.reason, "seconds": self.seconds, "host": self.host, "check": check,
                "console": {"bytes": self.console_bytes, "kept": self.console_kept}}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Verification:
        """Raises KeyError, ValueError or TypeError on a malformed document."""
        if not SNAPSHOT_ID.fullmatch(doc["snapshot"]) or doc["result"] not in ("passed", "failed"):
            raise ValueError("not a verification record")
        check = doc.get("check")
        console = doc.get("console") or {}
        return cls(
            snapshot=doc["snapshot"],
            time=datetime.strptime(doc["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC),
            passed=doc["result"] == "passed", reason=one_line(str(doc["reason"])),
            seconds=float(doc["seconds"]), host=str(doc.get("host", "")),
            check=None if check is None else CheckOutcome(
                tuple(str(w) for w in check["command"]),
                None if check["exit"] is None else int(check["exit"]),
                one_line(str(check["output"]), MAX_CHECK_OUTPUT)),
            console_bytes=int(console.get("bytes", 0)), console_kept=int(console.get("kept", 0)))


def console_tail(data: bytes) -> bytes:
    """The end of a console log that a record keeps."""
    return data[-MAX_CONSOLE:]
