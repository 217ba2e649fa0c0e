"""Running the real host agent (and optimizer) in a thread of the test process.

libvirt's event loop can be registered once per process, so one agent serves a
whole test module; each test boots its own guests under the real libvirtd.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from host_agent.config import AgentConfig
from host_agent.daemon import Agent, serve

T = TypeVar("T")


class RunningAgent:
    def __init__(self, agent: Agent, loop: asyncio.AbstractEventLoop) -> None:
        self.agent = agent
        self.loop = loop

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the agent's loop (its state is not thread-safe) and return what it returns."""
        async def run() -> T:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(300)


def agent_config_for(root: Path, **overrides: Any) -> AgentConfig:
    root.mkdir(parents=True, exist_ok=True)
    config = AgentConfig(state_dir=root / "state", run_dir=root / "run", interval=2.0, batch_size=10,
                         optimizer=f"unix:{root}/optimizer.sock", operator_listen=f"unix:{root}/agent.sock",
                         repositories={"default": root / "repo"}, restore_dir=root / "restores",
                         freeze_timeout=20.0,
                         # the host's own load is sent only by the test about busy hosts: TCG guests
                         # keep this machine busy enough to defer every other test's work
                         send_load=False, policy_options={"timing": {"recheck": "2s"}})
    return replace(config, **overrides)


@contextmanager
def running_agent(config: AgentConfig) -> Iterator[RunningAgent]:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        holder["stop"] = stop

        def ready(agent: Agent) -> None:
            holder["agent"] = agent
            started.set()

        try:
            await serve(config, True, stop, ready)
        except BaseException as e:
            holder["error"] = e
            started.set()
            raise

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), name="agent", daemon=True)
    thread.start()
    if not started.wait(60) or "error" in holder:
        raise RuntimeError(f"the agent did not start: {holder.get('error')!r}")
    try:
        yield RunningAgent(holder["agent"], loop)
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(30)
