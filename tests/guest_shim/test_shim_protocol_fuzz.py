"""Fuzzing the parser (hypothesis): whatever bytes or JSON arrive, the parser raises nothing but
the protocol's own errors, never holds more than the frame limit, and recovers at the next
newline or 0xFF."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest_shim import protocol as p
from guest_shim.errors import FrameTooLong, ProtocolError

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=80),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
member_names = st.sampled_from(
    [
        "id",
        "job",
        "targets",
        "policy",
        "destination",
        "quiesce",
        "target",
        "snapshot",
        "mode",
        "shim",
        "role",
        "filesystems",
        "skipped",
        "by",
        "code",
        "message",
        "retry_after",
        "state",
        "done",
        "total",
        "op",
        "ok",
        "disks",
        "bytes",
        "seconds",
        "quiesced",
        "error",
        "snapshots",
        "truncated",
        "timeout",
    ]
) | st.text(max_size=10)


def _decode_is_safe(line: bytes) -> None:
    try:
        msg = p.decode(line)
    except ProtocolError:
        return
    # Whatever was accepted is valid: it encodes and decodes to itself.
    assert p.decode(p.encode(msg)) == msg


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=12), st.integers(min_value=2, max_value=200))
def test_random_bytes_never_raise_foreign_errors_or_overbuffer(chunks: list[bytes], limit: int) -> None:
    reader = p.MessageReader(limit=limit)
    for chunk in chunks:
        for item in reader.feed(chunk):
            assert isinstance(item, (ProtocolError, p._Message))
        assert reader.frames.buffered <= limit - 1


@FUZZ
@given(st.binary(max_size=2000))
def test_decode_of_random_bytes_raises_only_protocol_errors(data: bytes) -> None:
    _decode_is_safe(data)


@FUZZ
@given(st.sampled_from(sorted(p.message_types())), st.dictionaries(member_names, json_values, max_size=8))
def test_random_json_objects_of_known_types(msg_type: str, members: dict[str, Any]) -> None:
    obj = {"v": 1, "type": msg_type, **members}
    _decode_is_safe(json.dumps(obj).encode())


VALID_MESSAGES = [
    p.Backup("r1", ("hb-disk-1",), p.Policy.FULL, "nightly"),
    p.Restore(1, "hb-disk-1", "latest"),
    p.Freeze("f", "j", ("hb-disk-1",), 5),
    p.Result(1, "j", p.Op.BACKUP, True, (p.DiskOutcome("d", 1, "s"),), 1, 1.0),
    p.Progress(None, "j", p.JobState.RUNNING, 1, 2),
    p.Frozen(1, "j", ("/",), ()),
    p.Snapshots(1, (p.SnapshotInfo("s", "d", 1.0, p.Policy.FULL, 1, "n"),), False),
]


@FUZZ
@given(st.sampled_from(VALID_MESSAGES), st.data())
def test_mutating_one_member_of_a_valid_message(msg: p.Message, data: st.DataObject) -> None:
    obj = json.loads(p.encode(msg))
    key = data.draw(st.sampled_from(sorted(obj)))
    if data.draw(st.booleans()):
        del obj[key]
    else:
        obj[key] = data.draw(json_values)
    _decode_is_safe(json.dumps(obj).encode())


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(VALID_MESSAGES), st.sampled_from(["whole", "truncated", "oversized"])),
        min_size=1,
        max_size=10,
    ),
    st.data(),
)
def test_stream_recovers_after_truncated_and_oversized_frames(
    plan: list[tuple[p.Message, str]], data: st.DataObject
) -> None:
    """Truncated frames followed by 0xFF, and oversized lines, cost only themselves."""
    limit = 400
    stream = b""
    expected = []
    for msg, how in plan:
        frame = p.encode(msg)
        if how == "whole":
            stream += frame
            expected.append(msg)
        elif how == "truncated":
            cut = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
            stream += frame[:cut] + p.RESET
        else:
            stream += b"x" * data.draw(st.integers(min_value=limit, max_value=3 * limit)) + b"\n"
    reader = p.MessageReader(limit=limit)
    got: list[Any] = []
    pos = 0
    while pos < len(stream):
        step = data.draw(st.integers(min_value=1, max_value=500))
        got += reader.feed(stream[pos : pos + step])
        assert reader.frames.buffered <= limit - 1
        pos += step
    assert [m for m in got if not isinstance(m, ProtocolError)] == expected
    oversized = sum(1 for _, how in plan if how == "oversized")
    assert sum(1 for m in got if isinstance(m, FrameTooLong)) == oversized


@FUZZ
@given(st.binary(min_size=1, max_size=200), st.integers(min_value=0, max_value=200))
def test_ff_in_the_middle_of_a_frame_drops_only_that_frame(junk: bytes, where: int) -> None:
    frame = p.encode(p.Thaw("t", "job"))
    where = min(where, len(frame) - 1)
    stream = frame[:where] + p.RESET + junk.replace(p.RESET, b"").replace(b"\n", b"") + p.RESET + frame
    out = p.MessageReader().feed(stream)
    assert out[-1] == p.Thaw("t", "job")
