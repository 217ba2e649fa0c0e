"""One domain's hyperback channel, seen from the host.

QEMU listens on a unix socket for each virtio-serial channel; the agent
connects to it and speaks ``guest_shim.protocol`` (docs/wire-protocol.md). The
VM's identity is this channel: whatever a message says, it is handled as coming
from the domain whose socket it arrived on.

Connection states: DISCONNECTED -> CONNECTED -> (EOF, reset) -> DISCONNECTED,
reconnecting with backoff while the domain runs. Bytes are parsed by a bounded
:class:`MessageReader` (64 KiB per frame); malformed requests get ``error``
replies, everything else malformed is dropped. Requests are rate-limited per
domain with a token bucket. Host requests (freeze, thaw, check) wait for their reply
by id, each with its own future, and every waiter is woken with an error when
the connection drops.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from guest_shim import protocol as p
from host_agent.errors import ChannelClosed

log = logging.getLogger(__name__)

RECONNECT_MAX = 5.0
REQUESTS = (p.Backup, p.Restore, p.Status, p.ListSnapshots, p.See, p.Release)  # what a guest may ask
Request = p.Backup | p.Restore | p.Status | p.ListSnapshots | p.See | p.Release


class State(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTED = "connected"
    CLOSED = "closed"


class Handler(Protocol):
    """What the agent does with a domain's requests: returns the one reply to send."""

    async def on_request(self, channel: GuestChannel, msg: p.Message) -> p.Message: ...

    def on_thawed(self, channel: GuestChannel, msg: p.Thawed) -> None: ...


class TokenBucket:
    """At most ``per_minute`` requests a minute, with bursts up to that many."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.tokens = float(per_minute)
        self.clock = clock
        self.stamp = clock()

    def take(self) -> float:
        """0 if a request may pass now, else the seconds until one may."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate if self.rate else 3600.0


class GuestChannel:
    def __init__(self, domain_uuid: str, domain_name: str, path: str, handler: Handler,
                 requests_per_minute: int = 30) -> None:
        self.domain_uuid, self.domain_name, self.path = domain_uuid, domain_name, path
        self.log = log.getChild(domain_name)
        self._handler = handler
        self._bucket = TokenBucket(requests_per_minute)
        self.state = State.DISCONNECTED
        self._writer: asyncio.StreamWriter | None = None
        self._write_lock = asyncio.Lock()
        self._waiters: dict[str, asyncio.Future[p.Message]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connected = asyncio.Event()
        self.greeted = asyncio.Event()  # the guest's shim said hello since the last connect
        self.rejected = 0        # requests answered with an error, for operators and tests
        self.bytes_in = 0

    # ---------- connection ----------

    async def run(self) -> None:
        """Connect, serve, reconnect, until closed or cancelled."""
        delay = 0.1
        while self.state is not State.CLOSED:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
            except OSError as e:
                self.log.debug("cannot connect to %s: %s", self.path, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = 0.1
            self._writer, self.state = writer, State.CONNECTED
            self._connected.set()
            self.log.info("connected to channel %s", self.path)
            try:
                await self._serve(reader)
            except (ConnectionError, ChannelClosed) as e:
                # QEMU resets the socket when the guest dies under it: a disconnect like EOF
                self.log.info("channel reset: %s", e)
            finally:
                self._drop(writer)

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        self._writer = None
        self._connected.clear()
        self.greeted.clear()
        if self.state is State.CONNECTED:
            self.state = State.DISCONNECTED
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(ChannelClosed(f"channel of {self.domain_name} closed"))
        self._waiters.clear()

    def close(self) -> None:
        self.state = State.CLOSED
        if self._writer is not None:
            self._drop(self._writer)

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        messages = p.MessageReader(p.Direction.TO_HOST)
        while True:
            data = await reader.read(65536)
            if not data:
                self.log.info("channel closed by QEMU")
                return
            self.bytes_in += len(data)
            for item in messages.feed(data):
                if isinstance(item, p.ProtocolError):
                    await self._reject_malformed(item)
                else:
                    await self._dispatch(item)

    # ---------- sending ----------

    async def send(self, msg: p.Message) -> None:
        await self._send_bytes(p.encode(msg))

    async def _send_bytes(self, data: bytes) -> None:
        writer = self._writer
        if writer is None:
            raise ChannelClosed(f"channel of {self.domain_name} is not connected")
        async with self._write_lock:
            try:
                writer.write(data)
                await writer.drain()
            except ConnectionError as e:
                raise ChannelClosed(f"channel of {self.domain_name} was reset: {e}") from e

    # ---------- receiving ----------

    async def _reject_malformed(self, error: p.ProtocolError) -> None:
        self.rejected += 1
        self.log.warning("malformed message from the guest: %s", error)
        reply = p.error_reply(error)
        if reply is not None:
            await self.send(reply)

    async def _dispatch(self, msg: p.Message) -> None:
        if isinstance(msg, p.Sync):
            await self._send_bytes(p.sync_ack_frame(msg.id))
        elif isinstance(msg, p.Hello):
            self.log.info("guest shim %s (%s) says hello", msg.shim, msg.role.value)
            self.greeted.set()
        elif isinstance(msg, (p.Frozen, p.Thawed, p.Checked)) and msg.id is not None \
                and str(msg.id) in self._waiters:
            self._waiters.pop(str(msg.id)).set_result(msg)
        elif isinstance(msg, p.Thawed):
            self._handler.on_thawed(self, msg)
        elif isinstance(msg, p.ErrorMessage):
            if msg.id is not None and str(msg.id) in self._waiters:
                self._waiters.pop(str(msg.id)).set_result(msg)
            else:
                self.log.info("guest reports an error: %s %s", msg.code.value, msg.message)
        elif isinstance(msg, REQUESTS):
            await self._request(msg)
        else:
            self.log.info("ignoring unexpected %s from the guest", type(msg).__name__)

    async def _request(self, msg: Request) -> None:
        wait = self._bucket.take()
        if wait:
            self.rejected += 1
            await self.send(p.ErrorMessage(msg.id, p.ErrorCode.RATE_LIMITED,
                                           "too many requests from this VM; try again later",
                                           retry_after=round(wait, 1)))
            return
        # Answered in a task: a slow lookup must not stall this channel's freeze replies.
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: p.Message) -> None:
        try:
            reply = await self._handler.on_request(self, msg)
        except Exception as e:  # the guest always gets an answer, never silence
            self.log.exception("request failed")
            reply = p.ErrorMessage(getattr(msg, "id", None), p.ErrorCode.FAILED,
                                   p.clean_text(f"the host could not handle the request: {e}"))
        if isinstance(reply, p.ErrorMessage):
            self.rejected += 1
        try:
            await self.send(reply)
        except ChannelClosed:
            self.log.info("could not answer: the guest went away")

    # ---------- host requests ----------

    async def _ask(self, msg: p.Freeze | p.Thaw | p.Check, timeout: float) -> p.Message:
        future: asyncio.Future[p.Message] = asyncio.get_running_loop().create_future()
        self._waiters[str(msg.id)] = future
        try:
            await self.send(msg)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiters.pop(str(msg.id), None)

    async def freeze(self, job: str, serials: tuple[str, ...], timeout: float) -> p.Message:
        """Ask the guest to freeze the file systems on these disks; its reply (Frozen or ErrorMessage)."""
        return await self._ask(p.Freeze(f"f{os.urandom(6).hex()}", job, serials, timeout), timeout + 5)

    async def thaw(self, job: str, timeout: float = 10.0) -> p.Message:
        return await self._ask(p.Thaw(f"t{os.urandom(6).hex()}", job), timeout)

    async def check(self, command: tuple[str, ...] | None, timeout: float) -> p.Message:
        """Ask the guest's shim whether it is there (no command) or to run a health check command it
        allows; its reply (Checked or ErrorMessage).  TimeoutError if it does not answer in time."""
        return await self._ask(p.Check(f"c{os.urandom(6).hex()}", timeout, command), timeout + 5)

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
            return True
        except TimeoutError:
            return False

