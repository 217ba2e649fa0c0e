"""Errors raised by the vmlab test harness.

One root, converted once at the boundary (libvirt, subprocess, OSError); ``VmLabError`` is the
lab's branch of the host side's tree (host_agent.errors)::

    VmLabError
     +-- HostNotReady        libvirtd unreachable, kernel/busybox/modules missing
     +-- GuestBuildError     building the initramfs failed
     +-- LibvirtFailure      a libvirt call failed (the libvirtError is the __cause__)
     +-- GuestFailure        the guest misbehaved; carries the console tail
          +-- BootTimeout    the ready marker did not appear in time
          +-- GuestStopped   the guest stopped before the awaited event
          +-- ChannelError   the virtio-serial channel is missing or unreachable
"""

from __future__ import annotations

from host_agent.errors import VmLabError

__all__ = ["BootTimeout", "ChannelError", "GuestBuildError", "GuestFailure", "GuestStopped", "HostNotReady",
           "LibvirtFailure", "VmLabError"]


class HostNotReady(VmLabError):
    """The host lacks something the harness needs (see host_agent/lab/setup_host.sh)."""


class GuestBuildError(VmLabError):
    """The guest initramfs could not be built."""


class LibvirtFailure(VmLabError):
    """A libvirt call failed; ``__cause__`` is the original ``libvirt.libvirtError``."""


class GuestFailure(VmLabError):
    """The guest did not do what was expected. ``console_tail`` holds its last console lines."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        self.console_tail = console_tail
        if console_tail:
            message = f"{message}\n--- guest console (tail) ---\n{console_tail}\n--- end ---"
        super().__init__(message)


class BootTimeout(GuestFailure):
    """The awaited console marker did not appear before the timeout."""


class GuestStopped(GuestFailure):
    """The guest stopped (powered off, crashed) before the awaited event."""


class ChannelError(GuestFailure):
    """A virtio-serial channel is not in the domain or its socket cannot be reached."""
