"""Telling systemd how a service is doing: the ``sd_notify`` protocol, readiness and the watchdog.

A service started by a unit with ``Type=notify`` finds the address of systemd's notification
socket in ``$NOTIFY_SOCKET`` (a path, or a name in the abstract namespace when it starts with
``@``) and sends it datagrams of newline-separated ``KEY=VALUE`` lines (sd_notify(3)):

* ``READY=1`` once the service serves (systemd holds back the units ordered after it until then),
* ``STATUS=...`` a line for ``systemctl status``,
* ``STOPPING=1`` when it begins to shut down,
* ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds (``WatchdogSec=``), else systemd
  kills and restarts it. :meth:`Notifier.keep_alive` pings at half that period *from the event
  loop*, so a loop that hangs stops pinging and the hang is noticed. ``$WATCHDOG_PID``, when set,
  names the process meant: any other process (a child that inherited the environment) stays quiet.

Without ``$NOTIFY_SOCKET`` (not started by systemd, or by a unit of another type) every call is a
no-op. No library is needed for a protocol this small; a datagram that cannot be sent (no
listener, or a receiver whose queue is full) is dropped and logged once, never waited for nor
raised: the service goes on serving, and systemd's own timeouts say what went wrong.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """The service's line to systemd (a no-op when it has none)."""

    def __init__(self, address: str | None = None, watchdog_usec: int = 0) -> None:
        self.address = address or None
        # half the period systemd allows, as sd_watchdog_enabled(3) advises
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec > 0 and self.address else 0.0
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd set up for this process through its environment."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        usec = 0
        pid = env.get("WATCHDOG_PID", "")
        if not pid or (pid.isdigit() and int(pid) == os.getpid()):
            try:
                usec = int(env.get("WATCHDOG_USEC", "0"))
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", env["WATCHDOG_USEC"])
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one notification of these ``KEY=VALUE`` lines; False if there is no socket or it failed."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        data = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # never blocks: a receiver that does not read (a full queue) must not stall the event
                # loop the watchdog pings come from; the datagram is dropped instead
                self._sock.sendto(data, socket.MSG_DONTWAIT, target)
            except OSError as e:
                if not self._warned:
                    log.warning("cannot notify systemd at %s: %s", self.address, e)
                    self._warned = True
                return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    async def keep_alive(self) -> None:
        """Ping the watchdog from this event loop until cancelled (returns at once if it is off)."""
        if not self.watchdog_interval:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
