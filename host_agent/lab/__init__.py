"""vmlab: hyperback's real-VM test harness (libvirt + QEMU/TCG guests that run the host's Python).

A guest boots the host's own kernel (linux-image-amd64) with a cached busybox initramfs, mounts the
host's root read-only over 9p, chroots into it and runs one shell command, then powers off.  It has
no network device; it talks to the host over virtio-serial channels and sees the virtio-blk disks
the test gives it.  Set the host up once with ``host_agent/lab/setup_host.sh`` (root).

Facts a test must know:

* The guest sees the host's root read-only, live (9p, no caching), *except* /tmp, /run, /dev/shm,
  which are fresh tmpfs in the guest: files a guest must read go outside /tmp (pytest's tmp_path
  is under /tmp on the host, so it is invisible to the guest).  The guest writes results only to
  its disks, its channels and its console.
* Console markers: ``HB-READY uptime=<s>`` before the command runs, ``HB-EXIT <status>`` after.
* virtio-serial: the guest finds a port by name in /sys/class/virtio-ports/*/name (no udev, so no
  /dev/virtio-ports/); its read() returns EOF while no host client is connected and its write()
  blocks until one is; bytes the host sends before the guest opens the port arrive late.
* The guest CPU is QEMU TCG's "max" model: code built with -march=native on an AVX-512 host
  will die with SIGILL in the guest.

Modules: ``guest`` (kernel discovery, initramfs build + cache), ``domain`` (domain XML, ``Lab``,
``Vm``), ``errors`` (the exception tree).  Tests using real guests are marked ``@pytest.mark.vm``.
"""

from .domain import (
    AGENT_CHANNEL,
    Channel,
    Disk,
    Lab,
    Vm,
    compose_command,
    destroy_stale_guests,
    make_disk,
    render_domain_xml,
    running_guests,
)
from .errors import (
    BootTimeout,
    ChannelError,
    GuestBuildError,
    GuestFailure,
    GuestStopped,
    HostNotReady,
    LibvirtFailure,
    VmLabError,
)
from .guest import DEFAULT_CACHE_DIR, READY_MARKER, build_initramfs, find_guest_kernel

__all__ = [
    "AGENT_CHANNEL",
    "BootTimeout",
    "Channel",
    "ChannelError",
    "DEFAULT_CACHE_DIR",
    "Disk",
    "GuestBuildError",
    "GuestFailure",
    "GuestStopped",
    "HostNotReady",
    "Lab",
    "LibvirtFailure",
    "READY_MARKER",
    "Vm",
    "VmLabError",
    "build_initramfs",
    "compose_command",
    "destroy_stale_guests",
    "find_guest_kernel",
    "make_disk",
    "render_domain_xml",
    "running_guests",
]
