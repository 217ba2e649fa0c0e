"""Jobs as operators see them: one per instruction, with a state and a stream of events.

The agent moves a job through QUEUED -> PLANNED/DEFERRED -> RUNNING -> SUCCEEDED/FAILED (or
REJECTED); every change is an event with a sequence number, and watchers (the operator API's
WatchJob) wait on the job's condition for the next one. Only the last ``KEEP`` finished jobs
are remembered in memory; the journal keeps results longer.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from host_agent.model import Instruction, WorkUnit
from host_agent.storage.cancel import CancelToken

log = logging.getLogger(__name__)

KEEP = 1000


class JobState(enum.Enum):
    QUEUED = 1
    PLANNED = 2
    DEFERRED = 3
    RUNNING = 4
    SUCCEEDED = 5
    FAILED = 6
    REJECTED = 7
    CANCELLED = 8

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.REJECTED, JobState.CANCELLED)


class Origin(enum.Enum):
    GUEST = 1
    OPERATOR = 2
    SCHEDULE = 3


@dataclass
class Event:
    sequence: int
    at: float
    state: JobState
    message: str
    final: bool
    bytes_done: int = 0
    bytes_total: int = 0


@dataclass
class Job:
    instruction: Instruction
    origin: Origin
    domain_name: str
    state: JobState = JobState.QUEUED
    detail: str = ""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    not_before: float = 0.0
    snapshot_ids: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    bytes_done: int = 0
    bytes_total: int = 0
    plan: WorkUnit | None = None     # the first unit serving it: placement and the optimizer's predictions
    moved_bytes: int = 0             # migration streams sent to back it up on another host
    schedule: str = ""               # Origin.SCHEDULE: the schedule that fired it
    cancel: CancelToken = field(default_factory=CancelToken)  # an operator asked to stop it
    offline: bool = False            # read while the domain was shut off, without a guest
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def id(self) -> str:
        return self.instruction.id


Observer = Callable[[Job, "JobState | None"], None]
"""Told of each job's change of state, with the state it left (None for a new job): metrics."""


class Jobs:
    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self.observers: list[Observer] = []

    def add(self, instruction: Instruction, origin: Origin, domain_name: str, schedule: str = "") -> Job:
        job = Job(instruction, origin, domain_name, schedule=schedule)
        self._jobs[job.id] = job
        self._record(job, JobState.QUEUED, "accepted")
        self._trim()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return list(reversed(self._jobs.values()))

    def by_request(self, domain_uuid: str, request_id: str) -> Job | None:
        """An operator's repeated request (same idempotency key) finds its earlier job."""
        return next((j for j in self._jobs.values() if j.instruction.domain_uuid == domain_uuid
                     and j.instruction.request_id == request_id and j.origin is Origin.OPERATOR), None)

    async def move(self, job_id: str, state: JobState, message: str, not_before: float = 0.0,
                   snapshot_ids: list[str] | None = None, moved_bytes: int = 0,
                   offline: bool = False) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.state.final:
            return
        job.not_before = not_before
        job.moved_bytes += moved_bytes
        job.offline = job.offline or offline
        if snapshot_ids:
            job.snapshot_ids = snapshot_ids
        self._record(job, state, message)
        async with job.changed:
            job.changed.notify_all()

    async def step(self, job_id: str, message: str, bytes_done: int = 0, bytes_total: int = 0) -> None:
        """A running job's next step (same state), with its progress."""
        job = self._jobs.get(job_id)
        if job is None or job.state.final:
            return
        job.bytes_done, job.bytes_total = bytes_done, bytes_total
        self._record(job, job.state, message)
        async with job.changed:
            job.changed.notify_all()

    def _record(self, job: Job, state: JobState, message: str) -> None:
        previous = job.state if job.events else None
        job.state, job.detail, job.updated_at = state, message, time.time()
        job.events.append(Event(len(job.events) + 1, job.updated_at, state, message, state.final,
                                job.bytes_done, job.bytes_total))
        if state is not previous:
            for observe in self.observers:
                try:
                    observe(job, previous)
                except Exception:  # an observer's bug (metrics) must never stop a job
                    log.exception("observer %r failed on job %s", observe, job.id)

    def pending_for(self, domain_uuid: str) -> int:
        return sum(1 for j in self._jobs.values()
                   if j.instruction.domain_uuid == domain_uuid and not j.state.final)

    def _trim(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.state.final]
        for key in finished[:max(len(finished) - KEEP, 0)]:
            del self._jobs[key]
