"""Running the real host agent (and optimizer) in a thread of the test process.

libvirt's event loop can be registered once per process, so one agent serves a
whole test module; each test boots its own guests under the real libvirtd.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from host_agent.agent.daemon import Agent, agent_in_thread
from host_agent.agent.schedules import Clock
from host_agent.config import AgentConfig
from host_agent.storage.repository import Repository

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
    """A test agent's config under ``root``; its default repository is created (only `hyperback
    init` creates repositories: an agent never does)."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "repo").exists():
        Repository.init(root / "repo")
    config = AgentConfig(state_dir=root / "state", run_dir=root / "run", interval=2.0, batch_size=10,
                         optimizer=f"unix:{root}/optimizer.sock", operator_listen=f"unix:{root}/agent.sock",
                         repositories={"default": root / "repo"}, restore_dir=root / "restores",
                         overlay_dir=root / "overlays",
                         freeze_timeout=20.0, metrics_listen="127.0.0.1:0",  # a free port: agents in parallel
                         # the host's own load is sent only by the test about busy hosts: TCG guests
                         # keep this machine busy enough to defer every other test's work
                         send_load=False, policy_options={"timing": {"recheck": "2s"}})
    return replace(config, **overrides)


@contextmanager
def running_agent(config: AgentConfig, clock: Clock | None = None) -> Iterator[RunningAgent]:
    with agent_in_thread(config, clock) as (agent, loop):
        yield RunningAgent(agent, loop)
