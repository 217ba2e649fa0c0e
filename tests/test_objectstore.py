"""The object-store contract (host_agent.storage.objectstore), one suite for every implementation:
a local directory, and an S3 bucket on the lab's real Ceph RADOS Gateway (marker ``ceph``)."""
from __future__ import annotations

import http.server
import socket
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3  # type: ignore[import-untyped]
import pytest

from host_agent import errors
from host_agent.lab.ceph import S3Endpoint
from host_agent.storage.objectstore import Backoff, DirectoryStore, ObjectStore, S3Location, S3Store


def new_bucket(s3: S3Endpoint) -> str:
    name = f"hb-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id=s3.access_key,
                 aws_secret_access_key=s3.secret_key).create_bucket(Bucket=name)
    return name


def s3_location(s3: S3Endpoint, bucket: str, prefix: str = "repo/", secret: str | None = None) -> S3Location:
    return S3Location(s3.endpoint, bucket, prefix, s3.access_key, secret or s3.secret_key)


@pytest.fixture(params=["directory", pytest.param("s3", marks=pytest.mark.ceph)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "directory":
        return DirectoryStore(tmp_path / "store")
    s3: S3Endpoint = request.getfixturevalue("ceph_s3")
    return S3Store(s3_location(s3, new_bucket(s3)))


class Sleeps:
    """Backoff's sleep, recorded instead of slept: how many retries a request took."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def test_a_put_object_reads_back_whole_and_a_second_put_replaces_it(store: ObjectStore) -> None:
    store.put("snapshots/a", b"first")
    assert store.get("snapshots/a") == b"first"
    store.put("snapshots/a", b"second, longer")
    assert store.get("snapshots/a") == b"second, longer"


def test_reading_an_absent_key_raises_object_not_found(store: ObjectStore) -> None:
    with pytest.raises(errors.ObjectNotFound, match="packs/00/none"):
        store.get("packs/00/none")
    with pytest.raises(errors.ObjectNotFound):
        store.get_range("packs/00/none", 0, 10)


def test_a_ranged_read_returns_the_range_and_only_what_exists_past_the_end(store: ObjectStore) -> None:
    data = bytes(range(256)) * 64
    store.put("packs/ab/pack", data)
    assert store.get_range("packs/ab/pack", 1000, 300) == data[1000:1300]
    assert store.get_range("packs/ab/pack", len(data) - 5, 100) == data[-5:]
    assert store.get_range("packs/ab/pack", len(data) + 10, 100) == b""
    assert store.get_range("packs/ab/pack", 0, 0) == b""


def test_listing_names_the_objects_under_a_prefix_in_key_order_with_sizes(store: ObjectStore) -> None:
    for key, size in [("packs/ab/2", 3), ("packs/ab/1", 5), ("packs/ac/1", 7), ("packsx", 1), ("index/1", 2)]:
        store.put(key, b"x" * size)
    assert [(o.key, o.size) for o in store.list("packs/")] == [("packs/ab/1", 5), ("packs/ab/2", 3),
                                                              ("packs/ac/1", 7)]
    assert [o.key for o in store.list("packs/ab")] == ["packs/ab/1", "packs/ab/2"]
    assert [o.key for o in store.list()] == ["index/1", "packs/ab/1", "packs/ab/2", "packs/ac/1", "packsx"]
    assert list(store.list("tombstones/")) == []


def test_listing_pages_through_more_objects_than_one_s3_answer_holds(store: ObjectStore) -> None:
    keys = [f"index/{n:05d}" for n in range(1005)]  # S3 answers at most 1,000 keys a request
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: store.put(key, b""), keys))
    assert [o.key for o in store.list("index/")] == keys


def test_a_listed_object_carries_the_time_it_was_written(store: ObjectStore) -> None:
    store.put("locks/a", b"{}")
    (listed,) = store.list("locks/")
    assert listed.mtime > 1.7e9  # seconds since the epoch (2023 or later), not a count or a string


def test_delete_removes_an_object_and_deleting_an_absent_one_is_harmless(store: ObjectStore) -> None:
    store.put("tmp/x", b"1")
    store.delete("tmp/x")
    store.delete("tmp/x")
    with pytest.raises(errors.ObjectNotFound):
        store.get("tmp/x")
    assert list(store.list("tmp/")) == []


def test_create_writes_only_when_the_key_is_absent(store: ObjectStore) -> None:
    assert store.create("locks/gc", b"mine")
    assert not store.create("locks/gc", b"theirs")
    assert store.get("locks/gc") == b"mine"
    store.delete("locks/gc")
    assert store.create("locks/gc", b"theirs")
    assert store.get("locks/gc") == b"theirs"


def test_of_many_concurrent_creators_of_one_key_exactly_one_wins(store: ObjectStore) -> None:
    creators = 6
    for round_ in range(5):
        key = f"locks/gc-{round_}"
        start = threading.Barrier(creators)
        won: list[int] = []

        def create(n: int, key: str = key, start: threading.Barrier = start, won: list[int] = won) -> None:
            start.wait()
            if store.create(key, b"creator %d" % n * 1000):
                won.append(n)

        threads = [threading.Thread(target=create, args=(n,)) for n in range(creators)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, f"round {round_}: creators {won} all believe they created {key}"
        assert store.get(key) == b"creator %d" % won[0] * 1000


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "../up", ".tmp/x", "a/", "./a"])
def test_keys_that_could_escape_the_store_or_read_differently_are_refused(store: ObjectStore,
                                                                         key: str) -> None:
    with pytest.raises(errors.UsageError, match="is not an object key"):
        store.put(key, b"x")


@pytest.mark.ceph
def test_s3_stores_under_other_prefixes_of_one_bucket_do_not_see_each_other(ceph_s3: S3Endpoint) -> None:
    bucket = new_bucket(ceph_s3)
    one, two = (S3Store(s3_location(ceph_s3, bucket, prefix)) for prefix in ("one/", "two/"))
    one.put("config", b"1")
    assert [o.key for o in one.list()] == ["config"]
    assert list(two.list()) == []
    with pytest.raises(errors.ObjectNotFound):
        two.get("config")


@pytest.mark.ceph
def test_s3_a_refused_signature_fails_at_once_without_a_retry(ceph_s3: S3Endpoint) -> None:
    sleeps = Sleeps()
    store = S3Store(s3_location(ceph_s3, new_bucket(ceph_s3), secret="wrong"), Backoff(sleep=sleeps))
    with pytest.raises(errors.RepositoryIOError, match="check the access key"):
        store.put("config", b"1")
    assert sleeps.delays == []


@pytest.mark.ceph
def test_s3_a_missing_bucket_is_not_a_repository_and_is_not_retried(ceph_s3: S3Endpoint) -> None:
    sleeps = Sleeps()
    store = S3Store(s3_location(ceph_s3, "hb-no-such-bucket"), Backoff(sleep=sleeps))
    with pytest.raises(errors.NotARepository, match="bucket does not exist"):
        store.get("config")
    assert sleeps.delays == []


def test_s3_a_refused_connection_is_retried_with_growing_waits_then_reported() -> None:
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        sleeps = Sleeps()
        store = S3Store(S3Location(f"http://127.0.0.1:{port}", "b", "", "k", "s"),
                        Backoff(attempts=4, first_delay=1.0, sleep=sleeps))
        with pytest.raises(errors.RepositoryIOError, match="cannot read config"):
            store.get("config")
    assert len(sleeps.delays) == 3
    assert all(0 <= d <= 2**n for n, d in enumerate(sleeps.delays))


class FakeFaultyServer(http.server.BaseHTTPRequestHandler):
    """Faults RGW 16 cannot be made to show: 503 SlowDown to the first ``throttled`` requests (it has
    no rate limiter), and the first ``dropped`` answers to PUTs that did store lost (the connection
    closed before the answer). Stores objects in ``stored`` and honours ``If-None-Match: *``."""

    protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" at once, as S3 does
    throttled = 0
    dropped = 0
    seen = 0
    stored: dict[str, bytes] = {}

    def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        cls = type(self)
        cls.seen += 1
        if cls.seen <= cls.throttled:
            self.answer(503, b"<Error><Code>SlowDown</Code><Message>Reduce your rate.</Message></Error>")
        elif self.headers.get("If-None-Match") == "*" and self.path in cls.stored:
            self.answer(412, b"<Error><Code>PreconditionFailed</Code></Error>")
        else:
            cls.stored[self.path] = data
            if cls.dropped > 0:
                cls.dropped -= 1
                self.close_connection = True
                return
            self.answer(200, b"")

    def do_GET(self) -> None:  # noqa: N802
        self.answer(200, type(self).stored[self.path])

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("ETag", '"0"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_faulty_server() -> Iterator[tuple[str, type[FakeFaultyServer]]]:
    handler = type("Handler", (FakeFaultyServer,), {"throttled": 0, "dropped": 0, "seen": 0, "stored": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_s3_a_create_whose_answer_a_fake_server_lost_is_the_creators_own(
        fake_faulty_server: tuple[str, type[FakeFaultyServer]]) -> None:
    endpoint, handler = fake_faulty_server
    handler.dropped = 1
    store = S3Store(S3Location(endpoint, "b", "", "k", "s"), Backoff(sleep=Sleeps()))
    assert store.create("locks/gc", b"mine")  # stored, answer lost; the retry's 412 is its own object
    assert not store.create("locks/gc", b"mine")  # a second creator with the same bytes did not create
    assert not store.create("locks/gc", b"theirs")
    assert handler.stored["/b/locks/gc"] == b"mine"


def test_s3_throttling_from_a_fake_server_is_retried_until_the_put_succeeds(
        fake_faulty_server: tuple[str, type[FakeFaultyServer]]) -> None:
    endpoint, handler = fake_faulty_server
    handler.throttled = 3
    sleeps = Sleeps()
    store = S3Store(S3Location(endpoint, "b", "", "k", "s"), Backoff(attempts=5, sleep=sleeps))
    store.put("config", b"1")
    assert (handler.seen, store.requests, len(sleeps.delays)) == (4, 4, 3)


def test_s3_throttling_from_a_fake_server_past_the_attempts_is_reported(
        fake_faulty_server: tuple[str, type[FakeFaultyServer]]) -> None:
    endpoint, handler = fake_faulty_server
    handler.throttled = 100
    store = S3Store(S3Location(endpoint, "b", "", "k", "s"), Backoff(attempts=3, sleep=Sleeps()))
    with pytest.raises(errors.RepositoryIOError, match="cannot write config"):
        store.put("config", b"1")
    assert handler.seen == 3
