"""The nbdkit Python plugin that serves a snapshot (``nbdkit python nbd_plugin.py KEY=VALUE…``).

nbdkit runs this file in its own embedded interpreter (the system's libpython), which knows neither
the project nor its virtual environment: the ``pythonpath`` parameter names the directories to add
(site directories, so that an editable install's ``.pth`` files count), and only then is the project
imported. ``host_agent.storage.export.SnapshotExport`` starts nbdkit with these parameters:

    pythonpath=DIR:DIR…     added with site.addsitedir, in order
    opener=MODULE:FUNCTION  called as FUNCTION(params, snapshot) -> ChunkSource (the repository's kind)
    snapshot=ID             the snapshot served
    cache=BYTES             the chunk cache's size
    error=PATH              where a failure to open is written ("ErrorClass<TAB>message") for the parent
    anything else           the opener's params (a repository path; a media service and destination)

Every connection shares one reader (and its cache). The thread model is parallel: the native reader
and gRPC release the GIL while they work, so requests of several connections overlap there.
"""
from __future__ import annotations

import errno
import importlib
import site
from pathlib import Path
from typing import Any

import nbdkit  # type: ignore[import-not-found]  # exists only inside nbdkit

API_VERSION = 2
EXTENT_HOLE_ZERO = 3  # nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO

_params: dict[str, str] = {}
_reader: Any = None
_errors: Any = None


def config(key: str, value: str) -> None:
    if key == "pythonpath":
        for directory in value.split(":"):
            if directory:
                site.addsitedir(directory)
    else:
        _params[key] = value


def config_complete() -> None:
    for key in ("opener", "snapshot", "cache", "error"):
        if key not in _params:
            raise RuntimeError(f"the hyperback plugin needs {key}=")


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def get_ready() -> None:
    """Open the repository and the snapshot now, so that a failure stops nbdkit before it listens."""
    global _reader, _errors
    from host_agent import errors
    from host_agent.storage.imagereader import ImageReader
    _errors = errors
    try:
        module, _, name = _params["opener"].partition(":")
        opener = getattr(importlib.import_module(module), name)
        source = opener(_params, _params["snapshot"])
        _reader = ImageReader(source, int(_params["cache"]))
    except errors.HyperbackError as e:
        # (pathlib: this module's open() is nbdkit's callback)
        Path(_params["error"]).write_text(f"{type(e).__name__}\t{e}\n")
        raise


def cleanup() -> None:
    if _reader is not None:
        _reader.close()


def open(readonly: bool) -> Any:  # nbdkit's name for it, shadowing the builtin here
    return _reader


def get_size(h: Any) -> int:
    return int(h.size)


def block_size(h: Any) -> tuple[int, int, int]:
    # any size works; a chunk is what one read fetches and verifies
    return 1, int(h.chunk_size), 0xFFFFFFFF


def can_write(h: Any) -> bool:
    return False


def can_multi_conn(h: Any) -> bool:
    return True  # read-only: every connection sees the same bytes


def can_extents(h: Any) -> bool:
    return True


def is_rotational(h: Any) -> bool:
    return False


def pread(h: Any, buf: Any, offset: int, flags: int) -> None:
    try:
        h.read_into(buf, offset)
    except _errors.HyperbackError as e:
        # only this request fails: the export goes on serving every other chunk
        nbdkit.debug(f"read of {len(buf)} bytes at {offset}: {e}")
        nbdkit.set_error(errno.EIO)
        raise


def extents(h: Any, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    try:
        return [(e.offset, e.length, EXTENT_HOLE_ZERO if e.hole else 0) for e in h.extents(offset, count)]
    except _errors.HyperbackError as e:
        nbdkit.debug(f"extents of {count} bytes at {offset}: {e}")
        nbdkit.set_error(errno.EIO)
        raise
