"""A snapshot's chunk map, stored as a tree of content-addressed pages.

Level 0 pages ("leaves") hold the ids of consecutive chunks of the image, 32
bytes each, the all-zero id standing for an all-zero chunk. Level k pages hold
the ids of consecutive level k-1 pages. Every page holds ``FANOUT`` ids except
the last of its level. The snapshot records the root id, the height (number of
levels) and the number of chunks. See docs/repository-format.md, "Trees".

Pages are blobs of type TREE in packs, so unchanged parts of an image's map are
shared between snapshots exactly like unchanged data: an incremental snapshot
adds only the pages on the paths to changed chunks.
"""
from __future__ import annotations

from collections.abc import Iterator

from host_agent import errors
from host_agent.storage.copier import BLOB_TREE, ID_LEN, NativeRepository
from host_agent.storage.snapshot import Snapshot, TreeRef

FANOUT = 64
SEGMENT_LEAVES = 1024  # leaves a backup plans and copies at once


def leaves_for(entries: int) -> int:
    return -(-entries // FANOUT)


class TreeBuilder:
    """Builds a tree from chunk ids given in order; memory is one page per level."""

    def __init__(self, native: NativeRepository) -> None:
        self._native = native
        self._levels: list[bytearray] = []
        self._entries = 0
        self.bytes_stored = 0

    def add_ids(self, ids: bytes) -> None:
        """Append chunk ids (32 bytes each)."""
        view = memoryview(ids)
        page = FANOUT * ID_LEN
        while view:
            leaf = self._level(0)
            room = page - len(leaf)
            leaf += view[:room]
            self._entries += min(room, len(view)) // ID_LEN
            view = view[room:]
            if len(leaf) == page:
                self._push(0)

    def add_leaf(self, leaf_id: bytes, entries: int) -> None:
        """Append a whole existing leaf by id; only at a leaf boundary."""
        if self._levels and self._levels[0]:
            raise ValueError("add_leaf needs a leaf boundary")
        self._append(1, leaf_id)
        self._entries += entries

    @property
    def entries(self) -> int:
        return self._entries

    def finish(self) -> TreeRef:
        if self._entries == 0:
            return TreeRef(None, 0, 0)
        level = 0
        while True:
            above = self._levels[level + 1] if level + 1 < len(self._levels) else bytearray()
            current = self._levels[level] if level < len(self._levels) else bytearray()
            if not above and len(current) == ID_LEN and level > 0:
                return TreeRef(bytes(current), level, self._entries)
            if current:
                self._push(level)
            level += 1

    def _level(self, level: int) -> bytearray:
        while len(self._levels) <= level:
            self._levels.append(bytearray())
        return self._levels[level]

    def _append(self, level: int, page_id: bytes) -> None:
        buf = self._level(level)
        buf += page_id
        if len(buf) == FANOUT * ID_LEN:
            self._push(level)

    def _push(self, level: int) -> None:
        page = bytes(self._levels[level])
        self._levels[level].clear()
        page_id, was_new = self._native.store_blob(page, BLOB_TREE)
        if was_new:
            self.bytes_stored += len(page)
        self._append(level + 1, page_id)


class TreeReader:
    """Reads a tree: leaf ids in order, and leaf contents, verified by the native reader."""

    def __init__(self, native: NativeRepository, ref: TreeRef) -> None:
        self._native = native
        self.ref = ref

    def _page(self, page_id: bytes) -> bytes:
        page = self._native.read_blob(page_id)
        if not page or len(page) % ID_LEN or len(page) > FANOUT * ID_LEN:
            raise errors.CorruptChunk(f"tree page {page_id.hex()} has a bad length {len(page)}",
                                      page_id.hex())
        return page

    def leaf_ids(self) -> Iterator[bytes]:
        """Yield the id of every leaf, left to right."""
        if self.ref.root is None:
            return
        if self.ref.height == 0:
            raise errors.CorruptChunk("a non-empty tree of height 0", self.ref.root.hex())
        yield from self._walk(self.ref.root, self.ref.height - 1)

    def _walk(self, page_id: bytes, level: int) -> Iterator[bytes]:
        if level == 0:
            yield page_id
            return
        page = self._page(page_id)
        for i in range(0, len(page), ID_LEN):
            yield from self._walk(page[i:i + ID_LEN], level - 1)

    def pages(self) -> Iterator[bytes]:
        """Yield the id of every page (interior and leaves), parents first."""
        if self.ref.root is None:
            return
        stack = [(self.ref.root, self.ref.height - 1)]
        while stack:
            page_id, level = stack.pop()
            yield page_id
            if level > 0:
                page = self._page(page_id)
                stack.extend((page[i:i + ID_LEN], level - 1) for i in range(len(page) - ID_LEN, -1, -ID_LEN))

    def leaf(self, leaf_id: bytes) -> bytes:
        return self._page(leaf_id)

    def leaf_at(self, index: int) -> bytes:
        """The content of leaf ``index`` (the ids of chunks ``FANOUT·index …``), found from the root
        without reading the leaves before it: one page per level."""
        leaves = leaves_for(self.ref.entries)
        if not 0 <= index < leaves or self.ref.root is None:
            raise IndexError(f"leaf {index} of a tree of {leaves} leaves")
        page_id, rest = self.ref.root, index
        for level in range(self.ref.height - 1, 0, -1):
            span = FANOUT ** (level - 1)  # leaves under each id of a page of this level
            page = self._page(page_id)
            at = rest // span * ID_LEN
            if at >= len(page):
                raise errors.CorruptChunk(f"tree page {page_id.hex()} lacks the way to leaf {index}",
                                          page_id.hex())
            page_id, rest = page[at:at + ID_LEN], rest % span
        if rest:
            raise errors.CorruptChunk(f"snapshot tree of height {self.ref.height} is too short for "
                                      f"{self.ref.entries} chunks", self.ref.root.hex())
        leaf = self._page(page_id)
        want = min(FANOUT, self.ref.entries - index * FANOUT)
        if len(leaf) != want * ID_LEN:
            raise errors.CorruptChunk(f"leaf {page_id.hex()} holds {len(leaf) // ID_LEN} ids, not {want}",
                                      page_id.hex())
        return leaf

    def chunk_ids(self) -> Iterator[bytes]:
        """Yield every leaf's content (ids of FANOUT chunks, fewer in the last leaf)."""
        for leaf_id in self.leaf_ids():
            yield self.leaf(leaf_id)


class BaseLeaves:
    """The base snapshot's leaves, read lazily in order (a backup walks the image once)."""

    def __init__(self, native: NativeRepository, base: Snapshot | None) -> None:
        self._native = native
        self._base = base
        self._reader = TreeReader(native, base.tree) if base else None
        self._leaf_ids = self._reader.leaf_ids() if self._reader else iter(())
        self._ids: dict[int, bytes] = {}
        self._next = 0

    def leaf_id(self, index: int) -> bytes:
        """The id of base leaf ``index``; indexes must not go back more than one segment."""
        while self._next <= index:
            self._ids[self._next] = next(self._leaf_ids)
            self._ids.pop(self._next - SEGMENT_LEAVES, None)  # keep memory flat for huge images
            self._next += 1
        return self._ids[index]

    def reusable(self, lo: int, hi: int) -> bool:
        """Whether base leaf lo//FANOUT covers exactly chunks [lo, hi)."""
        if self._base is None or lo % FANOUT:
            return False
        return hi == min(lo + FANOUT, self._base.tree.entries)

    def ids(self, lo: int, hi: int) -> bytes | None:
        """Base ids of chunks [lo, hi), zero ids past the base's end; None without a base."""
        if self._base is None:
            return None
        out = bytearray()
        entries = self._base.tree.entries
        for leaf_index in range(lo // FANOUT, -(-min(hi, entries) // FANOUT)):
            leaf = self._reader.leaf(self.leaf_id(leaf_index)) if self._reader else b""
            start = leaf_index * FANOUT
            a, b = max(lo, start) - start, min(hi, start + FANOUT) - start
            out += leaf[a * ID_LEN:b * ID_LEN]
        out += bytes((hi - lo) * ID_LEN - len(out))
        return bytes(out)
