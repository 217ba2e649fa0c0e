"""Stopping a backup or restore that is under way, from another thread."""
from __future__ import annotations

import threading

from host_agent import errors
from host_agent.storage import copier


class CancelToken:
    """Asks a backup to stop (thread-safe). The native workers see it at their next chunk; a backup
    it reaches before its snapshot is committed publishes nothing and raises Cancelled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._progress: list[copier.Progress] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            for progress in self._progress:
                progress.cancel()

    def watch(self, progress: copier.Progress) -> None:
        """Cancel ``progress``'s native work when (or if already) cancelled."""
        with self._lock:
            self._progress.append(progress)
            if self._cancelled:
                progress.cancel()

    def check(self) -> None:
        if self._cancelled:
            raise errors.Cancelled("cancelled; nothing was published")
