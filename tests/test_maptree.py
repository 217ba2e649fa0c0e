"""Chunk-map trees: any number of entries round-trips; unchanged leaves are shared."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_agent.storage.copier import NativeRepository
from host_agent.storage.maptree import FANOUT, TreeBuilder, TreeReader


def native(root: Path) -> NativeRepository:
    for sub in ("packs", "index", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return NativeRepository(str(root), os.urandom(16), 4096, 1 << 22, 1)


def ids_for(n: int, seed: int) -> bytes:
    return b"".join(seed.to_bytes(4, "little") + i.to_bytes(28, "little") for i in range(n))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([0, 1, FANOUT - 1, FANOUT, FANOUT + 1, FANOUT * FANOUT, FANOUT * FANOUT + 1])
       | st.integers(0, 3 * FANOUT * FANOUT), st.integers(1, 5000))
def test_tree_round_trips_any_entry_count(tmp_path_factory, entries: int, step: int) -> None:  # type: ignore[no-untyped-def]
    ids = ids_for(entries, 7)
    with native(tmp_path_factory.mktemp("tree")) as nat:
        builder = TreeBuilder(nat)
        for i in range(0, len(ids), step * 32):
            builder.add_ids(ids[i:i + step * 32])
        ref = builder.finish()
        assert ref.entries == entries
        assert (ref.root is None) == (entries == 0)
        assert b"".join(TreeReader(nat, ref).chunk_ids()) == ids


def test_reused_leaf_gives_the_same_root(tmp_path: Path) -> None:
    ids = ids_for(3 * FANOUT + 5, 1)
    with native(tmp_path) as nat:
        first = TreeBuilder(nat)
        first.add_ids(ids)
        ref = first.finish()
        leaves = list(TreeReader(nat, ref).leaf_ids())
        second = TreeBuilder(nat)
        second.add_leaf(leaves[0], FANOUT)
        second.add_ids(ids[FANOUT * 32:])
        assert second.finish() == ref
        assert second.bytes_stored == 0


def test_one_changed_id_rewrites_only_its_path(tmp_path: Path) -> None:
    ids = bytearray(ids_for(FANOUT * FANOUT * 2, 3))
    with native(tmp_path) as nat:
        before = len(nat)
        builder = TreeBuilder(nat)
        builder.add_ids(bytes(ids))
        builder.finish()
        mid = len(nat)
        ids[100 * 32] ^= 1
        again = TreeBuilder(nat)
        again.add_ids(bytes(ids))
        ref = again.finish()
        assert len(nat) - mid == ref.height  # one new page per level
        assert mid > before


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([1, FANOUT, FANOUT + 1, FANOUT * FANOUT, FANOUT * FANOUT + 1, 2 * FANOUT * FANOUT + 7])
       | st.integers(1, 3 * FANOUT * FANOUT))
def test_leaf_at_finds_each_leaf_from_the_root(tmp_path_factory, entries: int) -> None:  # type: ignore[no-untyped-def]
    with native(tmp_path_factory.mktemp("tree")) as nat:
        builder = TreeBuilder(nat)
        builder.add_ids(ids_for(entries, 3))
        ref = builder.finish()
        reader = TreeReader(nat, ref)
        leaves = list(reader.chunk_ids())
        assert [reader.leaf_at(i) for i in range(len(leaves))] == leaves
        for outside in (-1, len(leaves)):
            with pytest.raises(IndexError):
                reader.leaf_at(outside)
