"""The wire protocol (docs/wire-protocol.md): every message round-trips, every malformed shape is
rejected with the right error, framing obeys its limits, resynchronisation skips stale data."""

from __future__ import annotations

import json

import pytest

from guest_shim import protocol as p
from guest_shim.errors import FrameTooLong, MessageTooLarge, ProtocolError, UnsupportedVersion

SNAP = p.SnapshotInfo("0123456789abcdef", "hb-disk-1", 1_700_000_000.5, p.Policy.FULL, 4096, "nightly")

PATHS = b'{"v":1,"type":"backup","id":1,"targets":["a"],"policy":"full",'  # the rest follows

SAMPLES: list[p.Message] = [
    p.Sync(0),
    p.Sync(2**53 - 1),
    p.SyncAck(12345),
    p.Hello("0.1.0", p.Role.CLIENT),
    p.Hello("1.2.3+dev_4", p.Role.SERVE),
    p.Backup(1, p.ALL, p.Policy.INCREMENTAL),
    p.Backup("a-1", ("hb-disk-1", "hb-disk-2"), p.Policy.FULL, "nightly", False),
    p.Backup("x", ("d",), p.Policy.DIFFERENTIAL, None, True),
    p.Backup("p", ("d",), p.Policy.FULL, None, True, ("/usr/lib", "/etc/app.conf"), 2),
    p.Backup("q", ("d",), p.Policy.FULL, paths=("/",)),
    p.Restore(2, "hb-disk-1", p.LATEST),
    p.Restore("r.2", "hb-disk-1", "0123456789abcdef", p.RestoreMode.IN_PLACE, "offsite"),
    p.Status(3, "job-1"),
    p.ListSnapshots(4),
    p.ListSnapshots("l:4", "hb-disk-1", "nightly"),
    p.Frozen("f1", "job-1", ("/", "/var"), (p.Skipped("/boot", p.SkipReason.READ_ONLY),)),
    p.Frozen(7, "job-1", (), (p.Skipped("hb-x", p.SkipReason.UNKNOWN_DISK),)),
    p.Thawed("t1", "job-1", ("/var", "/"), p.ThawCause.HOST),
    p.Thawed(None, "job-1", ("/",), p.ThawCause.WATCHDOG),
    p.ErrorMessage(5, p.ErrorCode.RATE_LIMITED, "slow down", 12.5),
    p.ErrorMessage(None, p.ErrorCode.BAD_REQUEST, ""),
    p.Accepted(1, "job-1"),
    p.Progress(None, "job-1", p.JobState.RUNNING, 10, 100),
    p.Progress("s1", "job-1", p.JobState.QUEUED, 0, 0),
    p.Result(
        1,
        "job-1",
        p.Op.BACKUP,
        True,
        (p.DiskOutcome("hb-disk-1", 100, "0123456789abcdef", p.ChangeDetection.DIRTY_BITMAP),),
        100,
        2.5,
        True,
    ),
    p.Result(None, "job-2", p.Op.RESTORE, True, (p.DiskOutcome("hb-disk-1", 5, "s1", None, "hb-r-1"),), 5, 0),
    p.Result("b", "job-3", p.Op.BACKUP, False, (), 0, 0.5, False, p.ErrorInfo(p.ErrorCode.QUOTA, "full")),
    p.Snapshots(4, (SNAP,), False),
    p.Snapshots("l", (), True),
    p.Snapshots("m", (SNAP, p.SnapshotInfo("fedcba9876543210", "d", 1.0, p.Policy.FULL, 1, "n", 2)), False),
    p.Freeze("f1", "job-1", ("hb-disk-1",), 30),
    p.Freeze(9, "job-1", ("a", "b"), 0.5),
    p.Thaw("t1", "job-1"),
    p.Check("c1", 30),
    p.Check(11, 0.5, ("systemctl", "is-system-running")),
    p.Checked("c1", True),
    p.Checked(11, False, 3, "degraded | 1 unit failed", 0.25),
    p.Checked("c2", False, None, "killed after 30 s", 30.0),
    p.See(10, "hb-disk-1", p.LATEST),
    p.See("s.10", "hb-disk-1", "0123456789abcdef", "nightly"),
    p.See("s.11", "hb-disk-1", p.LATEST, None, 0),
    p.Seeing(10, "hb-disk-1", "0123456789abcdef", "hbsee-0a1b2c3d", 64 << 20, 1_700_003_600.0),
    p.Release(11, "hbsee-0a1b2c3d"),
    p.Released(11, "hbsee-0a1b2c3d", p.ReleaseCause.GUEST),
    p.Released(None, "hbsee-0a1b2c3d", p.ReleaseCause.TIME_LIMIT),
]


def test_samples_cover_every_message_type() -> None:
    assert {type(m).TYPE for m in SAMPLES} == set(p.message_types())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).TYPE)
def test_every_message_round_trips(msg: p.Message) -> None:
    frame = p.encode(msg)
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    obj = json.loads(frame)
    assert list(obj)[:2] == ["v", "type"] and obj["v"] == 1 and obj["type"] == type(msg).TYPE
    assert p.decode(frame) == msg
    assert p.decode(frame.decode()) == msg
    assert (
        p.decode(frame, type(msg).DIRECTION if type(msg).DIRECTION is not p.Direction.BOTH else None) == msg
    )


def test_request_ids_keep_their_json_type() -> None:
    assert p.decode(p.encode(p.Status(7, "j"))).id == 7
    assert p.decode(p.encode(p.Status("7", "j"))).id == "7"


def test_optional_members_have_their_defaults() -> None:
    msg = p.decode(b'{"v":1,"type":"backup","id":1,"targets":"all","policy":"full"}')
    assert msg == p.Backup(1, "all", p.Policy.FULL, None, True)
    assert (
        p.decode(b'{"v":1,"type":"restore","id":1,"target":"d","snapshot":"latest"}').mode
        is p.RestoreMode.NEW_DISK
    )
    assert b"destination" not in p.encode(p.Backup(1, "all", p.Policy.FULL))


def test_enums_compare_and_print_as_their_wire_values() -> None:
    assert p.Policy.FULL == "full" and str(p.Policy.FULL) == "full" and f"{p.ErrorCode.BUSY}" == "busy"


BACKUP = '{"v":1,"type":"backup","id":"r1","targets":["hb-disk-1"],"policy":"full"}'


def _backup(**changes: object) -> bytes:
    obj = json.loads(BACKUP)
    for k, v in changes.items():
        if v is _DROP:
            del obj[k]
        else:
            obj[k] = v
    return json.dumps(obj).encode()


_DROP = object()

MALFORMED = [
    # framing / JSON
    (b"\xc3\x28", "not UTF-8"),
    (b"{nope", "not JSON"),
    (b"[1,2]", "must be a JSON object"),
    (b'"str"', "must be a JSON object"),
    (b"[" * 5000 + b"]" * 5000, ""),
    (b'{"v":1,"type":"status","id":1,"job":"j","job":"k"}', "duplicate member 'job'"),
    (b'{"v":1,"type":"freeze","id":1,"job":"j","disks":["a"],"timeout":NaN}', "NaN"),
    (b'{"v":1,"type":"freeze","id":1,"job":"j","disks":["a"],"timeout":Infinity}', "Infinity"),
    (b'{"v":1,"type":"status","id":' + b"9" * 5000 + b',"job":"j"}', "not JSON"),
    # envelope
    (_backup(v=_DROP), "missing member 'v'"),
    (_backup(v="1"), "'v' must be an integer"),
    (_backup(v=True), "'v' must be an integer"),
    (_backup(type=_DROP), "'type'"),
    (_backup(type=7), "'type'"),
    (_backup(type="explode"), "unknown message type 'explode'"),
    (_backup(extra=1), "unknown member 'extra'"),
    (_backup(policy=_DROP), "missing member 'policy'"),
    # request ids
    (_backup(id=True), "backup.id"),
    (_backup(id=-1), "backup.id"),
    (_backup(id=2**53), "backup.id"),
    (_backup(id=1.5), "backup.id"),
    (_backup(id=""), "backup.id"),
    (_backup(id="x" * 65), "backup.id"),
    (_backup(id="a b"), "backup.id"),
    (_backup(id=None), "backup.id"),
    # targets, destination, policy
    (_backup(targets="some"), "backup.targets"),
    (_backup(targets=[]), "backup.targets"),
    (_backup(targets=["a", "a"]), "not distinct"),
    (_backup(targets=[f"d{i}" for i in range(65)]), "backup.targets"),
    (_backup(targets=["../vda"]), "backup.targets[0]"),
    (_backup(targets=["x" * 65]), "backup.targets[0]"),
    (_backup(targets=[1]), "backup.targets[0]"),
    (_backup(destination="/etc/passwd"), "backup.destination"),
    (_backup(destination="Nightly"), "backup.destination"),
    (_backup(destination="a" * 33), "backup.destination"),
    (_backup(destination="-x"), "backup.destination"),
    (_backup(policy="forever"), "backup.policy"),
    (_backup(policy=["full"]), "backup.policy"),
    (_backup(quiesce="yes"), "backup.quiesce"),
    (_backup(quiesce=1), "backup.quiesce"),
    # other messages
    (b'{"v":1,"type":"restore","id":1,"target":"d","snapshot":"a/b"}', "restore.snapshot"),
    (b'{"v":1,"type":"restore","id":1,"target":"d","snapshot":"s","mode":"overwrite"}', "restore.mode"),
    (b'{"v":1,"type":"status","id":1,"job":""}', "status.job"),
    (b'{"v":1,"type":"sync","id":"abc"}', "sync.id"),
    (b'{"v":1,"type":"hello","shim":"0.1 beta","role":"client"}', "hello.shim"),
    (b'{"v":1,"type":"hello","shim":"0.1","role":"admin"}', "hello.role"),
    (b'{"v":1,"type":"frozen","id":1,"job":"j","filesystems":[""],"skipped":[]}', "frozen.filesystems[0]"),
    (b'{"v":1,"type":"frozen","id":1,"job":"j","filesystems":[],"skipped":[{"name":"/"}]}', "missing member"),
    (
        b'{"v":1,"type":"frozen","id":1,"job":"j","filesystems":[],"skipped":[{"name":"/","reason":"x"}]}',
        "reason",
    ),
    (b'{"v":1,"type":"thawed","id":1,"job":"j","filesystems":[],"by":"cosmic-ray"}', "thawed.by"),
    (b'{"v":1,"type":"error","id":1,"code":"oops","message":""}', "error.code"),
    (b'{"v":1,"type":"error","id":1,"code":"busy","message":"a\\u001b[31mred"}', "control characters"),
    (b'{"v":1,"type":"error","id":1,"code":"busy","message":"\\ud800"}', "lone surrogate"),
    (b'{"v":1,"type":"error","id":1,"code":"busy","message":"' + b"x" * 1025 + b'"}', "error.message"),
    (b'{"v":1,"type":"error","id":1,"code":"busy","message":"","retry_after":-1}', "error.retry_after"),
    (b'{"v":1,"type":"progress","id":null,"job":"j","state":"running","done":5,"total":4}', "exceeds total"),
    (b'{"v":1,"type":"progress","id":null,"job":"j","state":"done","done":0,"total":0}', "progress.state"),
    (
        b'{"v":1,"type":"result","id":1,"job":"j","op":"backup","ok":true,"disks":[],"bytes":0,"seconds":1,'
        b'"error":{"code":"failed","message":"x"}}',
        "present although ok",
    ),
    (
        b'{"v":1,"type":"result","id":1,"job":"j","op":"backup","ok":false,"disks":[],"bytes":0,"seconds":1}',
        "missing although ok is false",
    ),
    (
        b'{"v":1,"type":"result","id":1,"job":"j","op":"backup","ok":true,"disks":[{"serial":"d"}],'
        b'"bytes":0,"seconds":1}',
        "result.disks[0]",
    ),
    (
        b'{"v":1,"type":"result","id":1,"job":"j","op":"backup","ok":true,"disks":[],"bytes":-1,"seconds":1}',
        "result.bytes",
    ),
    (
        b'{"v":1,"type":"result","id":1,"job":"j","op":"backup","ok":true,"disks":[],"bytes":0,"seconds":1e400}',
        "result.seconds",
    ),
    (
        b'{"v":1,"type":"snapshots","id":1,"truncated":false,"snapshots":[{"id":"latest","serial":"d",'
        b'"created":1,"policy":"full","bytes":1,"destination":"n"}]}',
        "reserved",
    ),
    (b'{"v":1,"type":"freeze","id":1,"job":"j","disks":["a"],"timeout":0}', "freeze.timeout"),
    (b'{"v":1,"type":"freeze","id":1,"job":"j","disks":["a"],"timeout":601}', "freeze.timeout"),
    (b'{"v":1,"type":"freeze","id":1,"job":"j","disks":["a"],"timeout":"5"}', "freeze.timeout"),
    (b'{"v":1,"type":"freeze","id":1,"job":"j","disks":[],"timeout":5}', "freeze.disks"),
    # see/release: a guest names a disk serial and a snapshot id, never a path or a socket
    (b'{"v":1,"type":"see","id":1,"target":"d","snapshot":"../../etc/passwd"}', "see.snapshot"),
    (b'{"v":1,"type":"see","id":1,"target":"/dev/vda","snapshot":"latest"}', "see.target"),
    (b'{"v":1,"type":"see","id":1,"target":"d","snapshot":"s","socket":"/run/x.sock"}', "unknown member"),
    (b'{"v":1,"type":"see","id":1,"target":"d","snapshot":"s","destination":"/srv/repo"}', "see.destination"),
    (b'{"v":1,"type":"release","id":1,"serial":"a b"}', "release.serial"),
    # paths: plain absolute paths inside one file system of one disk, never a way out of it
    (b'{"v":1,"type":"backup","id":1,"targets":"all","policy":"full","paths":["/etc"]}', "exactly one disk"),
    (b'{"v":1,"type":"backup","id":1,"targets":["a","b"],"policy":"full","paths":["/etc"]}', "exactly one"),
    (PATHS + b'"paths":[]}', "backup.paths"),
    (PATHS + b'"paths":["etc"]}', "not a plain absolute"),
    (PATHS + b'"paths":["/usr/../etc"]}', "backup.paths[0]"),
    (PATHS + b'"paths":["/a//b"]}', "backup.paths[0]"),
    (PATHS + b'"paths":["/a/"]}', "backup.paths[0]"),
    (PATHS + b'"paths":["/a\\nb"]}', "control"),
    (PATHS + b'"paths":["/a","/a"]}', "not distinct"),
    (PATHS + b'"paths":["/a"],"partition":129}',
     "backup.partition"),
    (PATHS + b'"partition":1}', "only a backup of paths"),
    (b'{"v":1,"type":"see","id":1,"target":"d","snapshot":"latest","partition":-1}', "see.partition"),
    (b'{"v":1,"type":"release","id":1}', "missing member"),
    (b'{"v":1,"type":"seeing","id":1,"target":"d","snapshot":"latest","serial":"s","bytes":1,"expires":1}',
     "reserved"),
    (b'{"v":1,"type":"seeing","id":1,"target":"d","snapshot":"s","serial":"s","bytes":1,"expires":-1}',
     "seeing.expires"),
    (b'{"v":1,"type":"released","id":null,"serial":"s","by":"ghost"}', "released.by"),
]


@pytest.mark.parametrize(("line", "needle"), MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_malformed_lines_are_rejected_with_bad_request(line: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        p.decode(line)
    assert info.value.code == "bad-request"
    assert needle in str(info.value)
    assert type(info.value) in (ProtocolError, FrameTooLong)


def test_unsupported_version_gets_its_own_error_and_reply() -> None:
    with pytest.raises(UnsupportedVersion) as info:
        p.decode(b'{"v":2,"type":"sync","id":77,"new":"member"}')
    assert info.value.code == "unsupported-version" and info.value.version == 2
    reply = p.error_reply(info.value)
    assert reply == p.ErrorMessage(77, p.ErrorCode.UNSUPPORTED_VERSION, reply.message if reply else "")
    assert reply is not None and "speaks 1" in reply.message


def test_an_unsupported_version_error_is_still_understood() -> None:
    msg = p.decode(b'{"v":3,"type":"error","id":5,"code":"unsupported-version","message":"I speak 3"}')
    assert msg == p.ErrorMessage(5, p.ErrorCode.UNSUPPORTED_VERSION, "I speak 3")


def test_direction_is_enforced_when_given() -> None:
    with pytest.raises(ProtocolError, match="never sent to the guest"):
        p.decode(p.encode(p.Backup(1, "all", p.Policy.FULL)), p.Direction.TO_GUEST)
    with pytest.raises(ProtocolError, match="never sent to the host"):
        p.decode(p.encode(p.Accepted(1, "j")), p.Direction.TO_HOST)
    error = p.encode(p.ErrorMessage(1, p.ErrorCode.BUSY, "x"))
    assert p.decode(error, p.Direction.TO_HOST) == p.decode(error, p.Direction.TO_GUEST)


def test_error_reply_answers_malformed_requests_only() -> None:
    with pytest.raises(ProtocolError) as bad_request:
        p.decode(_backup(policy="forever"))
    reply = p.error_reply(bad_request.value)
    assert reply is not None and reply.id == "r1" and reply.code is p.ErrorCode.BAD_REQUEST
    assert "backup.policy" in reply.message
    for line in (
        b'{"v":1,"type":"result","id":1,"job":"j"}',  # a malformed reply: no error loop
        b'{"v":1,"type":"error","id":1,"code":"nope","message":""}',
        b"{garbage",
        _backup(id=True),  # unreadable id
    ):
        with pytest.raises(ProtocolError) as info:
            p.decode(line)
        assert p.error_reply(info.value) is None, line


def test_building_an_invalid_message_raises() -> None:
    with pytest.raises(ProtocolError, match="targets"):
        p.Backup(1, ["a/b"], p.Policy.FULL)
    with pytest.raises(ProtocolError, match="policy"):
        p.Backup(1, "all", "sometimes")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="error"):
        p.Result(1, "j", p.Op.BACKUP, False, (), 0, 0)


def test_encode_refuses_more_than_max_frame_and_fit_snapshots_truncates() -> None:
    infos = [
        p.SnapshotInfo(f"{i:064d}", "s" * 64, 1e9, p.Policy.FULL, 2**53 - 1, "d" * 32) for i in range(256)
    ]
    with pytest.raises(MessageTooLarge):
        p.encode(p.Snapshots(1, tuple(infos), False))
    fitted = p.fit_snapshots(1, infos)
    assert fitted.truncated and 0 < len(fitted.snapshots) < 256
    assert len(p.encode(fitted)) <= p.MAX_FRAME
    assert p.fit_snapshots(1, infos[:3]) == p.Snapshots(1, tuple(infos[:3]), False)


def test_clean_text_makes_any_string_valid_wire_text() -> None:
    text = p.clean_text("a\nb\x1b[0m\ud800" + "z" * 2000)
    assert len(text) == p.MAX_TEXT and text.endswith("...")
    p.ErrorMessage(1, p.ErrorCode.FAILED, text)  # valid


# --- framing ----------------------------------------------------------------------------------


def test_frames_split_on_newlines_across_feeds_and_blank_lines_are_ignored() -> None:
    dec = p.FrameDecoder()
    assert dec.feed(b'{"a":1}\n\n  \r\n{"b"') == [b'{"a":1}']
    assert dec.buffered == 4
    assert dec.feed(b':2}\r\n{"c":3}') == [b'{"b":2}\r']
    assert dec.feed(b"\n") == [b'{"c":3}']
    assert dec.buffered == 0


def test_ff_byte_discards_the_partial_line() -> None:
    dec = p.FrameDecoder()
    assert dec.feed(b'{"half":') == []
    assert dec.feed(b'\xff{"whole":1}\n') == [b'{"whole":1}']
    assert dec.feed(b'{"x"\xff\xff{"y":1}\n{"z"\xff') == [b'{"y":1}']
    assert dec.buffered == 0


def test_oversized_line_is_discarded_up_to_its_newline_and_reported_once() -> None:
    limit = 32
    dec = p.FrameDecoder(limit)
    out = dec.feed(b"x" * 20)
    assert out == [] and dec.buffered == 20
    out = dec.feed(b"y" * 20)
    assert len(out) == 1 and isinstance(out[0], FrameTooLong)
    assert dec.buffered == 0
    assert dec.feed(b"z" * 1000) == [] and dec.buffered == 0  # still discarding, nothing kept
    assert dec.feed(b'tail\n{"ok":1}\n') == [b'{"ok":1}']


def test_line_limit_is_max_frame_including_the_newline() -> None:
    dec = p.FrameDecoder()
    fits = b"a" * (p.MAX_FRAME - 1)
    assert dec.feed(fits + b"\n") == [fits]
    out = dec.feed(b"a" * p.MAX_FRAME + b"\n")
    assert len(out) == 1 and isinstance(out[0], FrameTooLong)
    with pytest.raises(FrameTooLong):
        p.decode(b"a" * (p.MAX_FRAME + 1))


def test_ff_ends_the_discarding_of_an_oversized_line() -> None:
    dec = p.FrameDecoder(16)
    assert isinstance(dec.feed(b"q" * 40)[0], FrameTooLong)
    assert dec.feed(b'\xff{"n":1}\n') == [b'{"n":1}']


def test_message_reader_yields_messages_and_errors_in_order() -> None:
    reader = p.MessageReader(p.Direction.TO_GUEST)
    out = reader.feed(p.encode(p.Accepted(1, "j")) + b"junk\n" + p.encode(p.Thaw("t", "j")))
    assert out[0] == p.Accepted(1, "j")
    assert isinstance(out[1], ProtocolError)
    assert out[2] == p.Thaw("t", "j")


# --- resynchronisation ------------------------------------------------------------------------


def test_sync_frame_starts_with_ff_and_carries_a_random_id() -> None:
    frame = p.sync_frame(42)
    assert frame.startswith(p.RESET) and p.decode(frame[1:]) == p.Sync(42)
    assert p.sync_ack_frame(42) == p.RESET + p.encode(p.SyncAck(42))
    assert len({p.new_sync_id() for _ in range(50)}) == 50


def test_resync_skips_stale_replies_half_lines_and_old_acks() -> None:
    resync = p.Resync()
    frame = resync.start()
    sid = resync.sync_id
    assert sid is not None and p.decode(frame[1:]) == p.Sync(sid)
    # What a host might have queued before it read our sync: a half line, stale replies,
    # the ack of an earlier sync; then 0xFF + our ack, then a real reply.
    stream = (
        b'{"v":1,"type":"res'
        + p.sync_ack_frame(sid ^ 1)
        + p.encode(_ok_result_msg("old-1"))
        + p.encode(p.Accepted("old-2", "job-old"))
        + b'{"v":1,"type":"acc'
        + p.sync_ack_frame(sid)
        + p.encode(p.Accepted("new-1", "job-new"))
    )
    reader = p.MessageReader(p.Direction.TO_GUEST)
    items = []
    for i in range(0, len(stream), 7):  # arrives in small pieces
        items += reader.feed(stream[i : i + 7])
    acked = [i for i, m in enumerate(items) if resync.is_ack(m)]
    assert len(acked) == 1
    skipped, after = items[: acked[0]], items[acked[0] + 1 :]
    assert p.SyncAck(sid ^ 1) in skipped and p.Accepted("old-2", "job-old") in skipped
    assert after == [p.Accepted("new-1", "job-new")]
    assert not resync.is_ack(p.SyncAck(sid ^ 1)) and not resync.is_ack(p.Sync(sid))


def _ok_result_msg(rid: str) -> p.Result:
    return p.Result(rid, "job-old", p.Op.BACKUP, True, (), 0, 1.0)
