"""The client library against a fake host on the other end of a stand-in port (socketpair or
pty): the calls, the resynchronisation rules, timeouts, disconnects, and freeze/thaw answers."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator

import pytest
from shim_helpers import FAST, Background, FakeHost, ok_result, socketpair_port

from guest_shim import protocol as p
from guest_shim.client import Client, JobStatus
from guest_shim.errors import Failed, HostNotConnected, InvalidArgument, Rejected, TimedOut
from guest_shim.port import Port


@pytest.fixture
def pair() -> Iterator[tuple[Client, FakeHost]]:
    port, host = socketpair_port()
    client = Client(FAST, port=port)
    yield client, host
    client.close()
    host.close()


def test_backup_over_socketpair_standin_returns_the_structured_result(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    seen: list[JobStatus] = []
    call = Background(lambda: client.backup(["hb-disk-1"], "nightly", "full", on_progress=seen.append))
    host.handshake()
    req = host.expect(p.Backup)
    assert req.targets == ("hb-disk-1",) and req.destination == "nightly" and req.policy is p.Policy.FULL
    assert req.quiesce is True
    host.send(p.Accepted(req.id, "job-1"))
    host.send(p.Progress(None, "job-1", p.JobState.RUNNING, 50, 100))
    host.send(ok_result(req.id, "job-1"))
    result = call.result()
    assert result.job == "job-1" and result.ok and result.quiesced
    assert result.disks[0].serial == "hb-disk-1"
    assert result.disks[0].change_detection is p.ChangeDetection.DIRTY_BITMAP
    assert seen == [JobStatus("job-1", "running", 50, 100)]
    assert result.to_dict()["disks"][0]["snapshot"] == "snap000000000000"


def test_defaults_come_from_the_configuration() -> None:
    port, host = socketpair_port()
    defaults = dataclasses.replace(FAST.defaults, targets=("a", "b"), destination="offsite", quiesce=False)
    client = Client(dataclasses.replace(FAST, defaults=defaults), port=port)
    call = Background(client.backup)
    host.handshake()
    req = host.expect(p.Backup)
    assert (req.targets, req.destination, req.policy, req.quiesce) == (
        ("a", "b"),
        "offsite",
        "incremental",
        False,
    )
    host.send(p.Accepted(req.id, "j"))
    host.send(ok_result(None, "j"))  # a result without id (host restarted) still matches by job
    assert call.result().job == "j"
    client.close()
    host.close()


def test_backup_over_pty_standin_opened_as_a_device() -> None:
    master, slave = os.openpty()
    host = FakeHost(master)
    client = Client(FAST, port=Port.open_device(os.ttyname(slave)))
    os.close(slave)
    call = Background(lambda: client.backup("all"))
    host.handshake()
    req = host.expect(p.Backup)
    assert req.targets == "all"
    host.send(p.Accepted(req.id, "job-pty"))
    host.send(ok_result(req.id, "job-pty"))
    assert call.result().job == "job-pty"
    client.close()
    host.close()


def test_sync_skips_stale_replies_half_lines_and_acks_of_other_syncs(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    call = Background(lambda: client.status("job-9"))
    sync = host.expect(p.Sync)
    host.send_raw(b'{"v":1,"type":"resu')  # half a stale line
    host.send_raw(p.sync_ack_frame(sync.id + 1))  # an ack for someone else's sync
    host.send(p.Result("old", "job-9", p.Op.BACKUP, True, (), 0, 1.0))  # stale reply
    host.send(p.Progress(None, "job-9", p.JobState.RUNNING, 1, 2))
    host.send_raw(b'{"v":1,"type":"acc')
    host.send_raw(p.sync_ack_frame(sync.id))
    host.expect(p.Hello)
    req = host.expect(p.Status)
    host.send(p.Progress(req.id, "job-9", p.JobState.QUEUED, 0, 0))
    assert call.result() == JobStatus("job-9", "queued", 0, 0)


def test_host_silent_gives_timed_out_and_resyncs_after_each_timeout(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    client.config = dataclasses.replace(FAST, connect_timeout=2.5)
    call = Background(lambda: client.status("job-1"))
    first = host.expect(p.Sync)
    second = host.expect(p.Sync, timeout=3)  # resent after the 1 s attempt timed out
    assert first.id != second.id
    with pytest.raises(TimedOut, match="sync"):
        call.result()
    assert host.raw.count(p.RESET) >= 2  # every sync is preceded by 0xFF


def test_host_silent_on_a_request_times_out_then_resyncs(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    client.config = dataclasses.replace(FAST, reply_timeout=0.5)
    call = Background(lambda: client.backup("all"))
    host.handshake()
    host.expect(p.Backup)
    with pytest.raises(TimedOut, match="did not answer the backup"):
        call.result()
    host.expect(p.Sync)  # 0xFF + sync after the timeout
    # The next call on the same client resyncs again before its request.
    call = Background(lambda: client.status("j"))
    host.handshake()
    req = host.expect(p.Status)
    host.send(p.Progress(req.id, "j", p.JobState.RUNNING, 1, 0))
    assert call.result().state == "running"


def test_host_disconnect_mid_request_gives_host_not_connected_with_the_job(
    pair: tuple[Client, FakeHost],
) -> None:
    client, host = pair
    call = Background(lambda: client.backup("all"))
    host.handshake()
    req = host.expect(p.Backup)
    host.send(p.Accepted(req.id, "job-7"))
    host.close()
    with pytest.raises(HostNotConnected) as info:
        call.result()
    assert info.value.job == "job-7" and "status job-7" in str(info.value)


def test_host_gone_before_the_call_gives_host_not_connected() -> None:
    port, host = socketpair_port()
    host.close()
    with Client(FAST, port=port) as client, pytest.raises(HostNotConnected, match="not connected"):
        client.list_snapshots()


def test_rejection_raises_rejected_with_code_and_retry_after(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    call = Background(lambda: client.backup("all"))
    host.handshake()
    req = host.expect(p.Backup)
    host.send(p.ErrorMessage(req.id, p.ErrorCode.RATE_LIMITED, "one backup per hour", 1800))
    with pytest.raises(Rejected) as info:
        call.result()
    assert info.value.code == "rate-limited" and info.value.retry_after == 1800
    assert "one backup per hour" in str(info.value)


def test_failed_job_raises_failed_carrying_the_result(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    call = Background(lambda: client.restore("hb-disk-1", "0123456789abcdef"))
    host.handshake()
    req = host.expect(p.Restore)
    assert req.mode is p.RestoreMode.NEW_DISK and req.snapshot == "0123456789abcdef"
    host.send(p.Accepted(req.id, "job-r"))
    host.send(
        p.Result(
            req.id, "job-r", p.Op.RESTORE, False, (), 0, 3.0, False, p.ErrorInfo(p.ErrorCode.FAILED, "EIO")
        )
    )
    with pytest.raises(Failed) as info:
        call.result()
    assert info.value.code == "failed" and info.value.job == "job-r"
    assert info.value.result is not None and info.value.result.error.message == "EIO"


def test_in_place_restore_is_refused_by_the_host_with_a_how_to(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    call = Background(lambda: client.restore("hb-disk-1", mode="in-place"))
    host.handshake()
    req = host.expect(p.Restore)
    host.send(p.ErrorMessage(req.id, p.ErrorCode.UNSUPPORTED, "the VM is running: use new-disk or stop it"))
    with pytest.raises(Rejected, match="new-disk"):
        call.result()


def test_status_of_a_finished_job_and_list_snapshots(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    call = Background(lambda: client.status("job-1"))
    host.handshake()
    req = host.expect(p.Status)
    host.send(ok_result(req.id, "job-1"))
    st = call.result()
    assert st.state == "done" and st.result is not None and st.result.job == "job-1"

    snap = p.SnapshotInfo("0123456789abcdef", "hb-disk-1", 1.7e9, p.Policy.FULL, 10, "nightly")
    call = Background(lambda: client.list_snapshots("hb-disk-1"))
    req2 = host.expect(p.ListSnapshots)  # same connection: no second sync
    assert req2.target == "hb-disk-1"
    host.send(p.Snapshots(req2.id, (snap,), True))
    snaps = call.result()
    assert list(snaps) == [snap] and snaps.truncated and len(snaps) == 1


def test_unknown_job_is_rejected(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    call = Background(lambda: client.status("nope"))
    host.handshake()
    req = host.expect(p.Status)
    host.send(p.ErrorMessage(req.id, p.ErrorCode.UNKNOWN_JOB, "no job nope"))
    with pytest.raises(Rejected, match="unknown-job"):
        call.result()


def test_silence_during_a_job_makes_the_client_resync_and_ask_status(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    client.config = dataclasses.replace(FAST, status_interval=1.0)
    call = Background(lambda: client.backup("all"))
    host.handshake()
    req = host.expect(p.Backup)
    host.send(p.Accepted(req.id, "job-q"))
    # The result got lost; after 1 s of silence the client resyncs and asks.
    host.answer_sync(timeout=5)
    st = host.expect(p.Status)
    assert st.job == "job-q"
    host.send(ok_result(st.id, "job-q"))
    assert call.result().job == "job-q"


def test_unsupported_version_answer_to_sync_is_rejected(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    call = Background(lambda: client.status("j"))
    sync = host.expect(p.Sync)
    host.send_raw(
        b'{"v":2,"type":"error","id":%d,"code":"unsupported-version","message":"host speaks 2"}\n' % sync.id
    )
    with pytest.raises(Rejected, match="unsupported-version"):
        call.result()


def test_client_answers_freeze_and_thaw_while_waiting(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    call = Background(lambda: client.backup(["hb-disk-1"]))
    host.handshake()
    req = host.expect(p.Backup)
    host.send(p.Accepted(req.id, "job-f"))
    host.send(p.Freeze("fz-1", "job-f", ("hb-disk-1",), 10))
    frozen = host.expect(p.Frozen)
    # No such disk in this (fake, empty) /sys: nothing frozen, the serial reported as skipped.
    assert frozen.id == "fz-1" and frozen.filesystems == ()
    assert frozen.skipped == (p.Skipped("hb-disk-1", p.SkipReason.UNKNOWN_DISK),)
    host.send(p.Thaw("th-1", "job-f"))
    assert host.expect(p.Thawed) == p.Thawed("th-1", "job-f", (), p.ThawCause.HOST)
    host.send(ok_result(req.id, "job-f"))
    assert call.result().job == "job-f"


def test_malformed_host_request_is_answered_with_error_and_the_wait_goes_on(
    pair: tuple[Client, FakeHost],
) -> None:
    client, host = pair
    call = Background(lambda: client.backup("all"))
    host.handshake()
    req = host.expect(p.Backup)
    host.send(p.Accepted(req.id, "job-m"))
    host.send_raw(b'{"v":1,"type":"freeze","id":"bad-1","job":"job-m","disks":[],"timeout":5}\n')
    err = host.expect(p.ErrorMessage)
    assert err.id == "bad-1" and err.code is p.ErrorCode.BAD_REQUEST
    host.send_raw(b"\x00\x01 garbage\n")  # dropped silently
    host.send(ok_result(req.id, "job-m"))
    assert call.result().job == "job-m"


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.backup(["../../etc"]),
        lambda c: c.backup("all", destination="/srv/backups"),
        lambda c: c.backup("all", policy="sometimes"),
        lambda c: c.restore("hb-disk-1", "no/such"),
        lambda c: c.status(""),
        lambda c: c.list_snapshots("x" * 100),
        lambda c: c.status("j", timeout=0),
    ],
)
def test_invalid_arguments_raise_invalid_argument_before_anything_is_sent(call: object) -> None:
    port, host = socketpair_port()
    with Client(FAST, port=port) as client, pytest.raises(InvalidArgument) as info:
        call(client)  # type: ignore[operator]
    assert isinstance(info.value, ValueError)
    assert host.nothing_for(0.1)
    host.close()


def test_timeout_of_the_whole_job(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    call = Background(lambda: client.backup("all", timeout=1.0))
    host.handshake()
    req = host.expect(p.Backup)
    host.send(p.Accepted(req.id, "job-slow"))
    t0 = time.monotonic()
    with pytest.raises(TimedOut) as info:
        call.result()
    assert info.value.job == "job-slow" and time.monotonic() - t0 < 3


def test_see_and_release_carry_the_new_disks_serial(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    call = Background(lambda: client.see("hb-disk-1", "0123456789abcdef"))
    host.handshake()
    req = host.expect(p.See)
    assert (req.target, req.snapshot) == ("hb-disk-1", "0123456789abcdef")
    host.send(p.Released(None, "hbsee-00000000", p.ReleaseCause.TIME_LIMIT))  # a notice: not the reply
    host.send(p.Seeing(req.id, "hb-disk-1", "0123456789abcdef", "hbsee-0a1b2c3d", 1 << 20, 1.7e9))
    seen = call.result()
    assert (seen.serial, seen.bytes, seen.device, seen.mount) == ("hbsee-0a1b2c3d", 1 << 20, None, None)

    call = Background(lambda: client.release(seen.serial))
    rel = host.expect(p.Release)
    assert rel.serial == "hbsee-0a1b2c3d"
    host.send(p.Released(rel.id, rel.serial, p.ReleaseCause.GUEST))
    assert call.result() is None


def test_see_of_another_vms_snapshot_is_rejected_with_the_hosts_code(pair: tuple[Client, FakeHost]) -> None:
    client, host = pair
    call = Background(lambda: client.see("hb-disk-1", "feedfacefeedface"))
    host.handshake()
    req = host.expect(p.See)
    host.send(p.ErrorMessage(req.id, p.ErrorCode.UNKNOWN_SNAPSHOT, "disk hb-disk-1 has no snapshot"))
    with pytest.raises(Rejected, match="unknown-snapshot") as raised:
        call.result()
    assert raised.value.code == "unknown-snapshot"


@pytest.mark.parametrize("bad", ["../../etc/shadow", "/dev/vda", "a b", ""])
def test_see_refuses_a_path_before_anything_is_sent(pair: tuple[Client, FakeHost], bad: str) -> None:
    client, host = pair
    with pytest.raises(InvalidArgument):
        client.see("hb-disk-1", bad)
    with pytest.raises(InvalidArgument):
        client.see(bad or "x y", p.LATEST)
    assert host.nothing_for(0.2)
