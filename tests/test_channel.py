"""A guest channel outlives its connection: a reset socket is a disconnect, never the end of the channel.

QEMU's side of the channel is played by a real unix socket server. A unix socket whose
owner closes it with bytes it never read resets the other end (ECONNRESET), which is what
the agent sees when a guest dies with a request from the host still unread.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from guest_shim import protocol as p
from host_agent.agent.channel import GuestChannel, State
from host_agent.errors import ChannelClosed


class NoRequests:
    async def on_request(self, channel: GuestChannel, msg: p.Message) -> p.Message:
        raise AssertionError("no request is sent in these tests")

    def on_thawed(self, channel: GuestChannel, msg: p.Thawed) -> None:
        pass


def listening(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    server.setblocking(False)
    return server


def has_unread_bytes(conn: socket.socket) -> bool:
    try:
        return bool(conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


def test_a_reset_connection_fails_the_waiting_request_and_the_channel_reconnects(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = listening(tmp_path / "channel.sock")
        channel = GuestChannel("uuid-1", "vm1", str(tmp_path / "channel.sock"), NoRequests())
        runner = asyncio.create_task(channel.run())
        try:
            first, _ = await asyncio.wait_for(loop.sock_accept(server), 10)
            await until(lambda: channel.state is State.CONNECTED)
            asking = asyncio.create_task(channel.check(None, 30))
            await until(lambda: has_unread_bytes(first))
            first.close()   # with the check frame unread: the agent's end is reset
            with pytest.raises(ChannelClosed):
                await asking
            second, _ = await asyncio.wait_for(loop.sock_accept(server), 10)
            await until(lambda: channel.state is State.CONNECTED)
            assert not runner.done()
            second.close()
        finally:
            channel.close()
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            server.close()
    asyncio.run(scenario())
