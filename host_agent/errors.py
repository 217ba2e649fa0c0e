"""Every exception the host side raises on purpose: one root, one drawing, converted once at each
boundary (libvirt in ``host_agent.hypervisor``, gRPC in each service and client, OSError where
the system call is made, the native copier in ``host_agent.storage.copier``).

::

    HyperbackError                  exit 1   unexpected: a bug if you see it
    ├── UsageError                  exit 2   bad arguments, names or configuration
    │   ├── UnknownDisk                      a request names a disk serial its domain does not have
    │   ├── UnknownJob                       no job of that id (NOT_FOUND)
    │   ├── JobFinished                      the job has finished: too late to cancel (FAILED_PRECONDITION)
    │   ├── UnknownSchedule                  no schedule of that name (NOT_FOUND)
    │   ├── MalformedMessage                 a protobuf message breaks its contract (INVALID_ARGUMENT)
    │   └── GuestPathError                   a path or file system a snapshot's guest lacks, or not that kind
    ├── RepositoryError             exit 2   the repository is missing, foreign or unusable
    │   ├── NotARepository
    │   ├── UnsupportedFormat                written by a newer hyperback
    │   ├── RepositoryExists
    │   ├── SnapshotNotFound
    │   ├── ObjectNotFound                   an object store holds no object under that key
    │   ├── UnknownDestination               a media service serves no destination of that name
    │   ├── KeyMissing                       an encrypted repository and nothing to unlock it with
    │   └── WrongKey                         the passphrase or key file does not open it
    ├── EnvironmentProblem          exit 3   the system refused: fix it and run again
    │   ├── SourceError                      the source cannot be opened or read
    │   │   ├── ImageError                   qemu-img failed or said something unexpected
    │   │   └── NotReadableInPlace           a qcow2 image the copier cannot read from its files
    │   ├── TargetError                      the restore target cannot be written
    │   ├── RepositoryFull                   ENOSPC/EDQUOT on the backup media
    │   ├── RepositoryIOError                another I/O error on the backup media
    │   ├── RepositoryBusy                   a lock is held by a live process
    │   ├── RemoteError                      a media service cannot be reached, or failed
    │   │   └── SessionExpired               it dropped a backup session (silent, aborted, restarted)
    │   ├── TlsError                         a TLS handshake or certificate failed: not retried
    │   ├── AccessDenied                     the peer's role may not do that (PERMISSION_DENIED)
    │   ├── HostLoadError                    /proc's load or pressure files are unreadable
    │   ├── HypervisorError                  libvirt refused (``code``: libvirt's error number)
    │   │   ├── HypervisorUnreachable        the libvirt daemon cannot be reached
    │   │   ├── NoDomain                     no such domain (gone, or never there)
    │   │   ├── NoCheckpoint                 no such checkpoint
    │   │   ├── NoBackupJob                  the domain runs no backup job
    │   │   └── OperationInvalid             not in this state (e.g. the domain is not running)
    │   ├── ViewError                        a point-in-time view could not be taken
    │   │   ├── FreezeFailed                 the guest could not freeze; nothing was taken
    │   │   ├── DomainGone                   the domain stopped during the view
    │   │   ├── DomainStarted                a shut-off domain started: take an online view
    │   │   └── CleanupFailed                the domain may still write into an overlay
    │   ├── ChannelClosed                    a guest's channel closed while the host waited
    │   ├── SandboxError                     a boot verification's sandbox could not be set up
    │   ├── MoveError                        a domain could not be moved between hosts
    │   │   ├── MigrationFailed              (MigrationTimeout: aborted after the timeout)
    │   │   └── MoveInProgress               another move of the domain is under way
    │   ├── ColocationError                  a backup on the media host failed; says where the VM runs
    │   ├── ApplianceError                   an appliance could not be found, held or moved
    │   ├── ServiceAddressError              a service address could not be claimed or released
    │   ├── PackageBuildError                the guest shim's wheel or zipapp could not be built
    │   └── ReaderError                      the isolated reader of guest file systems failed (libguestfs)
    ├── IntegrityError              exit 4   stored data is damaged
    │   ├── CorruptChunk                     a blob failed its checks
    │   ├── MissingChunk                     a referenced blob is not in the repository
    │   ├── DamagedKey                       an encrypted repository's key document fails its checksum
    │   └── DamagedFileSystem                a guest file system in a snapshot is damaged or unknown
    ├── OptimizerError                       the optimizer, its policies and its client
    │   ├── OptimizerConfigError    exit 2   an unusable policy chain, option, address or TLS file
    │   │   └── UnknownPolicy                no entry point provides a policy of that name
    │   ├── MalformedBatch                   a batch or plan that breaks the contract
    │   ├── ForeignHost                      a batch names another host than its certificate
    │   ├── PolicyError                      a policy returned an inconsistent plan (a bug)
    │   ├── OptimizerUnavailable             retry later: unreachable, deadline, busy
    │   └── OptimizerRejected                retrying will not help: the batch was refused
    ├── VmLabError                           the VM lab of the demo and the tests (host_agent.lab)
    └── Cancelled                   exit 130 interrupted

Every message says what happened and what to do; the CLIs print it as one line and exit with
the class's ``exit_code``. The guest shim has a tree of its own (``guest_shim.errors``) and its
own exit codes: docs/exit-codes.md puts the two side by side and says why they differ.
"""
from __future__ import annotations

from typing import ClassVar


class HyperbackError(Exception):
    """Root of every error hyperback raises on purpose."""

    exit_code: ClassVar[int] = 1


class UsageError(HyperbackError):
    exit_code = 2


class UnknownDisk(UsageError):
    """A request named a disk serial its domain does not have."""


class UnknownJob(UsageError):
    """No job of that id (the agent keeps the last ones in memory, their results in its journal)."""


class JobFinished(UsageError):
    """The job has finished already: there is nothing left to cancel."""


class UnknownSchedule(UsageError):
    """No schedule of that name in the agent's config."""


class MalformedMessage(UsageError):
    """A protobuf message breaks its contract: an enum value or a time this side cannot read."""


class GuestPathError(UsageError):
    """A path, or a file system, that a snapshot's guest does not have, or not of the kind asked
    for (a directory given to ``cat``)."""


class RepositoryError(HyperbackError):
    exit_code = 2


class NotARepository(RepositoryError):
    pass


class UnsupportedFormat(RepositoryError):
    pass


class RepositoryExists(RepositoryError):
    pass


class SnapshotNotFound(RepositoryError):
    pass


class ObjectNotFound(RepositoryError):
    """An object store (host_agent.storage.objectstore) holds no object under the key asked for."""


class UnknownDestination(RepositoryError):
    pass


class KeyMissing(RepositoryError):
    pass


class WrongKey(RepositoryError):
    pass


class EnvironmentProblem(HyperbackError):
    exit_code = 3


class SourceError(EnvironmentProblem):
    pass


class ImageError(SourceError):
    """qemu-img failed, or said something unexpected."""


class NotReadableInPlace(SourceError):
    """The image is fine, but the copier cannot read it from its files: convert it first.
    ``path`` is the image."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class TargetError(EnvironmentProblem):
    pass


class RepositoryFull(EnvironmentProblem):
    pass


class RepositoryIOError(EnvironmentProblem):
    pass


class RepositoryBusy(EnvironmentProblem):
    pass


class LockLost(EnvironmentProblem):
    """A writer's lock file was removed (judged stale) while it worked: nothing was committed."""


class RemoteError(EnvironmentProblem):
    pass


class SessionExpired(RemoteError):
    pass


class TlsError(EnvironmentProblem):
    """A TLS connection could not be made: this end's certificate is expired, from another CA or
    refused by the server, or the server's is not one this end trusts. Retrying cannot help, so
    nothing retries it (docs/tls.md)."""

    retryable = False


class AccessDenied(EnvironmentProblem):
    """The service knows who is calling (its certificate) and that role may not make that call, or
    not on that domain; the message names the role and the method (docs/tls.md, "Roles")."""


class HostLoadError(EnvironmentProblem):
    """A /proc file the load reading needs is unreadable or not in the format the kernel documents."""


class HypervisorError(EnvironmentProblem):
    """libvirt refused a call; ``code`` is libvirt's error number (0 if it gave none)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class HypervisorUnreachable(HypervisorError):
    """The libvirt daemon could not be reached."""


class NoDomain(HypervisorError):
    pass


class NoCheckpoint(HypervisorError):
    pass


class NoBackupJob(HypervisorError):
    pass


class OperationInvalid(HypervisorError):
    pass


class ViewError(EnvironmentProblem):
    """A point-in-time view could not be taken; the domain is back on its images (but see
    CleanupFailed)."""


class FreezeFailed(ViewError):
    """The guest's filesystems could not be frozen; no view was taken."""


class DomainGone(ViewError):
    """The domain stopped while its view existed."""


class DomainStarted(ViewError):
    """A shut-off domain runs after all (it started before its images were guarded): its disks are
    read through an online view instead."""


class CleanupFailed(ViewError):
    """A view could not be ended cleanly: the domain may still write into an overlay."""


class ChannelClosed(EnvironmentProblem):
    """The guest side of a channel went away while the host waited for a reply."""


class SandboxError(EnvironmentProblem):
    """A boot verification could not set up its sandbox (export, overlay, domain): no verdict was
    recorded, the snapshot is not at fault."""


class MoveError(EnvironmentProblem):
    """A domain could not be moved; the message says where it runs now."""


class MigrationFailed(MoveError):
    """A live migration failed; the domain was left running on the source (if it ran before).
    ``__cause__`` is the libvirt error when libvirt reported one."""


class MigrationTimeout(MigrationFailed):
    """The migration did not finish within the timeout and was aborted."""


class MoveInProgress(MoveError):
    """The domain carries a visit marker: another move is under way."""


class ColocationError(EnvironmentProblem):
    """A co-located backup failed; the message says which step and where the VM runs."""


class ApplianceError(EnvironmentProblem):
    """An appliance could not be found, held or moved; the message says where it runs."""


class ServiceAddressError(EnvironmentProblem):
    """The service address could not be claimed or released (no such interface, no permission)."""


class PackageBuildError(EnvironmentProblem):
    """The guest shim's wheel or zipapp could not be built (pip, setuptools, the output folder)."""


class ReaderError(EnvironmentProblem):
    """The isolated reader of guest file systems (the libguestfs appliance) could not start, or
    failed for a reason that is not the guest's file system."""


class IntegrityError(HyperbackError):
    exit_code = 4

    def __init__(self, message: str, chunk_id: str | None = None) -> None:
        super().__init__(message)
        self.chunk_id = chunk_id


class CorruptChunk(IntegrityError):
    pass


class MissingChunk(IntegrityError):
    pass


class DamagedKey(IntegrityError):
    pass


class DamagedFileSystem(IntegrityError):
    """A guest file system held in a snapshot cannot be read: damaged, or of no kind the reader
    knows. The snapshot's own chunks may be intact: the damage was in the guest."""


class OptimizerError(HyperbackError):
    """Anything the optimizer, its policies or its client raise on purpose; ``code`` is the
    grpc.StatusCode of the failed call, where there was one."""

    def __init__(self, message: str, code: object = None) -> None:
        super().__init__(message)
        self.code = code


class OptimizerConfigError(OptimizerError):
    exit_code = 2


class UnknownPolicy(OptimizerConfigError):
    pass


class MalformedBatch(OptimizerError):
    """A batch (or a plan) breaks the contract between driver and optimizer: INVALID_ARGUMENT."""


class ForeignHost(OptimizerError):
    """A batch names another host than the client certificate it came with: PERMISSION_DENIED."""


class PolicyError(OptimizerError):
    """A policy chain returned an inconsistent plan: INTERNAL (a bug in a policy)."""


class OptimizerUnavailable(OptimizerError):
    """The optimizer could not be reached or did not answer in time: retry the batch later."""

    retryable = True


class OptimizerRejected(OptimizerError):
    """The optimizer refused the batch, or its answer was unreadable: retrying will not help."""

    retryable = False


class VmLabError(HyperbackError):
    """Root of the VM lab's errors (the demo's and the tests' harness), drawn in host_agent.lab.errors."""

    exit_code = 3


class Cancelled(HyperbackError):
    exit_code = 130
