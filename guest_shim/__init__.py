"""hyperback's guest side: ask the host for backups of this VM without data crossing the network.

Applications call :func:`backup`, :func:`restore`, :func:`status` and :func:`list_snapshots`
(synchronous; they talk to ``hyperback-shim serve`` if it runs, else to the virtio-serial port
directly).  The wire protocol is :mod:`guest_shim.protocol` (shared with the host agent) and is
specified in docs/wire-protocol.md.  Stdlib only, Python 3.9+.

Errors (all :class:`ShimError`)::

    ShimError
     +-- ProtocolError (FrameTooLong, MessageTooLarge, UnsupportedVersion)
     +-- HostNotConnected (PortNotFound, PortBusy)
     +-- Rejected        the host refused the request (.code)
     +-- Failed          the job ran and failed (.result)
     +-- TimedOut
     +-- FreezeError
     +-- ConfigError
     +-- InvalidArgument (also a ValueError)
"""

from __future__ import annotations

from .client import (
    SHIM_VERSION,
    Client,
    JobResult,
    JobStatus,
    SnapshotList,
    backup,
    list_snapshots,
    restore,
    status,
)
from .config import ShimConfig, load_config
from .errors import (
    ConfigError,
    Failed,
    FreezeError,
    HostNotConnected,
    InvalidArgument,
    PortBusy,
    PortNotFound,
    ProtocolError,
    Rejected,
    ShimError,
    TimedOut,
)
from .protocol import PROTOCOL_VERSION, DiskOutcome, Policy, RestoreMode, SnapshotInfo

__version__ = SHIM_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "Client",
    "ConfigError",
    "DiskOutcome",
    "Failed",
    "FreezeError",
    "HostNotConnected",
    "InvalidArgument",
    "JobResult",
    "JobStatus",
    "Policy",
    "PortBusy",
    "PortNotFound",
    "ProtocolError",
    "Rejected",
    "RestoreMode",
    "ShimError",
    "SnapshotInfo",
    "ShimConfig",
    "SnapshotList",
    "TimedOut",
    "__version__",
    "backup",
    "list_snapshots",
    "load_config",
    "restore",
    "status",
]
