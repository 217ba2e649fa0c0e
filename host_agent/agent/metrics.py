"""The agent's Prometheus metrics (``metrics_listen``; the list and an alert rule: docs/monitoring.md).

Observed from two places only, never counted along the way: every job's change of state (an
observer of :class:`~host_agent.agent.jobs.Jobs`) and every answer leaving the guests' door (an
observer of :meth:`~host_agent.agent.guests.Guests.answer`, with the instruction's ``Outcome`` and
its ``DiskResult`` per disk). What is a state rather than an event (jobs held, the driver's queue,
the domains served, visits done) is read at scrape time, on the agent's event loop, by a collector:
the HTTP server runs in a thread of its own, and the agent's state is not thread-safe. A loop that
hangs therefore fails the scrape, which ``up`` shows.

Each agent has a registry of its own (not the process-wide default), so one process may run several.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from host_agent import errors
from host_agent.agent.driver import BackupDriver
from host_agent.agent.guests import Guests
from host_agent.agent.jobs import Job, Jobs, JobState, Origin
from host_agent.config import host_port
from host_agent.model import ChangeDetection, Fallback, InstructionKind, Outcome, Placement, Policy

log = logging.getLogger(__name__)

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 6 * 3600, 24 * 3600)
SCRAPE_TIMEOUT = 5.0   # seconds a scrape waits for the event loop to read the agent's state
PREDICTED = {Placement.STREAM: "predicted_stream_bytes", Placement.MIGRATE: "predicted_move_bytes",
             Placement.COLD_MOVE: "predicted_move_bytes", Placement.APPLIANCE: "predicted_move_bytes"}


def _name(value: JobState | Origin) -> str:
    return value.name.lower()


@dataclass(frozen=True)
class _State:
    """What the collector reads of the agent, copied on its loop."""

    jobs: dict[tuple[str, str], int]
    queued: int
    served: list[str]
    visits: int
    appliance_visits: int


class Visits(Protocol):
    """What the metrics read of the executor: the co-located backups it did."""

    @property
    def visits(self) -> Sized: ...

    @property
    def appliance_visits(self) -> Sized: ...


class AgentMetrics:
    """The agent's metrics: observers on its jobs and its guests' door, and a collector of its state."""

    def __init__(self, jobs: Jobs, guests: Guests, driver: BackupDriver, executor: Visits) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._jobs, self._guests, self._driver, self._executor = jobs, guests, driver, executor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.address = ""
        r = self.registry
        self.accepted = Counter("hyperback_jobs_accepted", "Jobs accepted, by origin", ["origin"], registry=r)
        self.finished = Counter("hyperback_jobs_finished", "Jobs that reached a final state, by state and "
                                "origin", ["state", "origin"], registry=r)
        self.duration = Histogram("hyperback_job_duration_seconds",
                                  "Seconds from a job's acceptance to its final state", ["kind", "state"],
                                  buckets=DURATION_BUCKETS, registry=r)
        self.bytes_read = Counter("hyperback_backup_read_bytes", "Bytes backups read from disks",
                                  ["destination"], registry=r)
        self.bytes_new = Counter("hyperback_backup_new_bytes", "Bytes of chunks backups found new",
                                 ["destination"], registry=r)
        self.bytes_stored = Counter("hyperback_backup_stored_bytes",
                                    "Bytes backups added to repositories (new chunks, compressed)",
                                    ["destination"], registry=r)
        self.last_success = Gauge("hyperback_last_success_timestamp_seconds",
                                  "Unix time of the last successful backup of a domain", ["domain"],
                                  registry=r)
        self.deferrals = Counter("hyperback_deferrals", "Times the optimizer deferred a job", registry=r)
        self.fallbacks = Counter("hyperback_checkpoint_fallbacks",
                                 "Disks an incremental or differential backup read in full (no usable "
                                 "checkpoint: every chunk compared with the base), by why",
                                 ["domain", "reason"], registry=r)
        self.moved = Counter("hyperback_migration_bytes", "Bytes of migration streams sent to back VMs up "
                             "on another host", registry=r)
        self.predicted = Counter("hyperback_lan_predicted_bytes",
                                 "LAN bytes the optimizer predicted for the placement it chose",
                                 ["placement"], registry=r)
        for origin in Origin:
            self.accepted.labels(_name(origin))
            for state in JobState:
                if state.final:
                    self.finished.labels(_name(state), _name(origin))
        r.register(_StateCollector(self))
        jobs.observers.append(self.on_job)
        guests.observers.append(self.on_answer)

    # ---------- observers (on the agent's loop) ----------

    def on_job(self, job: Job, previous: JobState | None) -> None:
        origin = _name(job.origin)
        if previous is None:
            self.accepted.labels(origin).inc()
        if job.state is JobState.DEFERRED:
            self.deferrals.inc()
        if not job.state.final:
            return
        state = _name(job.state)
        self.finished.labels(state, origin).inc()
        seconds = max(job.updated_at - job.created_at, 0.0)
        self.duration.labels(job.instruction.kind.value, state).observe(seconds)
        if job.state is JobState.SUCCEEDED and job.instruction.kind is InstructionKind.BACKUP:
            self.last_success.labels(job.domain_name).set(job.updated_at)
        plan = job.plan
        if plan is not None and plan.placement in PREDICTED:
            self.predicted.labels(plan.placement.value).inc(getattr(plan, PREDICTED[plan.placement]))

    def on_answer(self, outcome: Outcome) -> None:
        instruction = outcome.instruction
        self.moved.inc(outcome.moved_bytes)
        if instruction.kind is not InstructionKind.BACKUP or outcome.error is not None:
            return
        destination = instruction.destination
        for disk in outcome.disks:
            self.bytes_read.labels(destination).inc(disk.bytes_read)
            self.bytes_new.labels(destination).inc(disk.bytes_new)
            self.bytes_stored.labels(destination).inc(disk.bytes_stored)
            if instruction.policy is not Policy.FULL and disk.change_detection is ChangeDetection.COMPARISON:
                domain = next((d.domain_name for d in instruction.disks if d.serial == disk.serial),
                              instruction.domain_uuid)
                self.fallbacks.labels(domain, (disk.fallback or Fallback.OTHER).value).inc()

    # ---------- the state, read at scrape time ----------

    def state(self) -> _State:
        """The agent's state now; call on its loop."""
        held: dict[tuple[str, str], int] = {}
        for job in self._jobs.all():
            key = (_name(job.state), _name(job.origin))
            held[key] = held.get(key, 0) + 1
        return _State(held, self._driver.queued,
                      sorted(c.domain_name for c in self._guests.channels.values()),
                      len(self._executor.visits), len(self._executor.appliance_visits))

    def read_state(self) -> _State:
        """The agent's state, read on its loop from the scraping thread."""
        loop = self._loop
        if loop is None:
            return self.state()

        async def read() -> _State:
            return self.state()

        return asyncio.run_coroutine_threadsafe(read(), loop).result(SCRAPE_TIMEOUT)

    # ---------- serving ----------

    def serve(self, listen: str) -> None:
        """Serve ``GET /metrics`` on ``listen`` (HOST:PORT; port 0 picks one, see ``address``)."""
        self._loop = asyncio.get_running_loop()
        host, port = host_port(listen)
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise errors.EnvironmentProblem(f"cannot serve metrics on {listen}: {e.strerror or e}") from e
        bound = self._server.server_port
        self.address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        log.info("metrics on http://%s/metrics", self.address)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class _StateCollector(Collector):
    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # the families below are known only at scrape time; nothing of them clashes

    def collect(self) -> Iterator[Metric]:
        state = self.metrics.read_state()
        jobs = GaugeMetricFamily("hyperback_jobs", "Jobs the agent holds now (the last finished ones "
                                 "too), by state and origin", labels=["state", "origin"])
        for state_name in (_name(s) for s in JobState):
            for origin in (_name(o) for o in Origin):
                jobs.add_metric([state_name, origin], state.jobs.get((state_name, origin), 0))
        yield jobs
        yield GaugeMetricFamily("hyperback_queue_depth", "Instructions waiting in the driver for a batch",
                                value=state.queued)
        served = GaugeMetricFamily("hyperback_domain_served", "1 for each domain whose channel this agent "
                                   "serves", labels=["domain"])
        for name in state.served:
            served.add_metric([name], 1)
        yield served
        yield CounterMetricFamily("hyperback_visits", "Backups done by moving a VM to the media host and "
                                  "back", value=state.visits)
        yield CounterMetricFamily("hyperback_appliance_visits", "Backup appliances brought to this host",
                                  value=state.appliance_visits)
