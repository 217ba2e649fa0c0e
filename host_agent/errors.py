"""The host side's exceptions: one root, converted once at each boundary.

::

    HyperbackError                  exit 1  (unexpected; a bug if you see it)
    ├── UsageError                  exit 2  bad arguments or names
    ├── RepositoryError             exit 2  the repository is missing, foreign or unusable
    │   ├── NotARepository
    │   ├── UnsupportedFormat       written by a newer hyperback
    │   ├── RepositoryExists
    │   ├── SnapshotNotFound
    │   └── UnknownDestination      a media service serves no destination of that name
    ├── EnvironmentProblem          exit 3  the system refused: fix it and run again
    │   ├── SourceError             the source cannot be opened or read
    │   ├── TargetError             the restore target cannot be written
    │   ├── RepositoryFull          ENOSPC/EDQUOT on the backup media
    │   ├── RepositoryIOError       another I/O error on the backup media
    │   ├── RepositoryBusy          a lock is held by a live process
    │   └── RemoteError             a media service cannot be reached, or failed
    │       └── SessionExpired      it dropped a backup session (silent too long, aborted, restarted)
    ├── IntegrityError              exit 4  stored data is damaged
    │   ├── CorruptChunk            a blob failed its checks
    │   └── MissingChunk            a referenced blob is not in the repository
    └── Cancelled                   exit 130

Every message says what happened and what to do; the CLI prints it as one line.
"""
from __future__ import annotations


class HyperbackError(Exception):
    """Root of every error hyperback raises on purpose."""

    exit_code = 1


class UsageError(HyperbackError):
    exit_code = 2


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


class UnknownDestination(RepositoryError):
    pass


class EnvironmentProblem(HyperbackError):
    exit_code = 3


class SourceError(EnvironmentProblem):
    pass


class TargetError(EnvironmentProblem):
    pass


class RepositoryFull(EnvironmentProblem):
    pass


class RepositoryIOError(EnvironmentProblem):
    pass


class RepositoryBusy(EnvironmentProblem):
    pass


class RemoteError(EnvironmentProblem):
    pass


class SessionExpired(RemoteError):
    pass


class IntegrityError(HyperbackError):
    exit_code = 4

    def __init__(self, message: str, chunk_id: str | None = None) -> None:
        super().__init__(message)
        self.chunk_id = chunk_id


class CorruptChunk(IntegrityError):
    pass


class MissingChunk(IntegrityError):
    pass


class Cancelled(HyperbackError):
    exit_code = 130
