"""Planning: a batch of instructions becomes a :class:`~host_agent.model.Plan` through a chain of policies.

This is the optimizer's domain code; ``host_agent.optimizer`` is only the gRPC plumbing around
:meth:`Planner.plan`.

How a batch is planned
----------------------
1. **Checked.** What breaks the contract between driver and optimizer raises :class:`MalformedBatch`
   (the service answers INVALID_ARGUMENT): an empty or repeated instruction id, no domain or
   destination, a disk without serial or path, a disk of another domain than the instruction's, one
   serial twice in an instruction, a ``received_at`` that is not a finite non-negative number, more
   than ``max_batch`` instructions. What is well formed but cannot be done is **rejected**, one
   instruction at a time, with a reason: an instruction that names no disk, a restore that names no
   snapshot, a restore of a disk that an earlier instruction of the batch restores from another
   snapshot or destination.
2. **Baseline.** One unit per disk per accepted instruction, in batch order; this is the plan the
   ``passthrough`` policy returns unchanged. Where a disk is both written (restored) and read in one
   batch, each of its units depends on the one before, so the batch order holds.
3. **Policies**, in the order of the chain (default ``merge,colocate,timing``), each
   ``apply(plan_so_far, batch, context) -> Plan``. ``batch`` holds the accepted instructions only.
4. **Checked again** (:func:`check_plan`): unit ids unique, ``depends_on`` naming units of the plan
   without cycles, ``satisfies`` naming accepted instructions only, and every disk of every accepted
   instruction served by a unit of the right kind, disk and destination that satisfies it, a backup
   with a policy at least as strong as the one asked for, a restore from the snapshot asked for. A
   chain that breaks this raises :class:`PolicyError` (INTERNAL: a bug in a policy).

So every instruction of a batch is either satisfied by at least one unit or rejected with a reason.

Policies
--------
Policies are classes registered as entry points in the group ``hyperback.policies`` (the name of the
entry point is the class's ``name``), subclasses of :class:`PlanningPolicy`; :func:`build_chain` loads
them by name. Options reach a policy as strings through :meth:`PlanningPolicy.from_options`, which
parses them once into the policy's frozen configuration (``--policy-option timing.max_defer=1h``).

``passthrough``
    Returns the plan unchanged: one unit per disk per instruction, in order.

``merge``
    *Duplicates.* Backup units of the same disk (domain uuid and serial, same image path) for the same
    destination collapse into one unit that satisfies all their instructions, with the strongest policy
    asked for (full > differential > incremental) and the earliest ``not_before``. Restore units of the
    same disk from the same snapshot spec and destination collapse likewise. A disk that the batch both
    backs up and restores is left alone, so its units keep the batch order.

    *Shared bases.* Backing images are compared by path after lexical normalization
    (``posixpath.normpath``): the optimizer may run on another machine and cannot resolve symlinks,
    so the host sends chains resolved from the live domain XML. For one destination, an image counts as
    *shared* when the backing chains of at least two distinct disks of the batch contain it, and as
    *known* when ``context.known_bases`` holds ``(destination, base name)``, the base name being
    ``base/<first 16 hex digits of the SHA-256 of the normalized path>``. Each backup unit builds on
    the nearest image of its chain that is shared or known:

    - a known base gets no new unit: the disk unit's reason names the stored base;
    - a shared base gets one ``BACKUP_BASE`` unit per destination (policy full, no ``disk``,
      ``source`` the image path, ``snapshot_name`` the base name), and the disk unit depends on it.
      The base unit in turn builds on the nearest shared or known image further down its own chain,
      so with chains ``[mid, root]`` and ``[root]`` the plan reads ``root``, then ``mid`` on top of it,
      then the disks. A base unit satisfies (in part) every instruction of the units that build on it,
      directly or through other bases, and starts no later than the earliest of them. Its reason names
      the image and the disks sharing it. Base units come first in the plan, parents before children.

    Running ``merge`` again on its own output changes nothing.

``timing``
    Defers backup units while the sending host is busy or outside the backup window; restores are
    never deferred (someone is waiting to recover). *Busy* means any of: CPU pressure ``some avg10``
    above ``cpu_pressure`` (default 40 %), IO pressure above ``io_pressure`` (default 30 %), the
    1-minute load average per CPU above ``load_per_core`` (default 1.5); a threshold of ``off``
    disables it, and a host that sent no load reading is never busy. The window (``window=22:00-06:00``,
    optional) is in the host's local time when the host sent its UTC offset, else the optimizer's. A
    deferred unit gets ``not_before`` = ``now + recheck`` (default 60 s), at which time the driver asks
    again, and a reason. It never starves: the clock starts at the oldest ``received_at`` among the
    instructions a unit satisfies (0, unknown, counts as long ago), ``not_before`` is never set past
    that time plus ``max_defer`` (default 30 min), and a unit that has waited ``max_defer`` is released
    whatever the load, with a reason that says so. All times are the host's (``context.now``).

``colocate``
    For backup units whose destination's media sit on another host (``context.remote_destinations``),
    predicts the LAN bytes of the two ways to get the data there and picks the smaller:

    - *stream*: the sending host sends the new data to the media host's service. Per disk: the stored
      size of the destination's latest snapshot of that disk (``context.held``) for an incremental or
      differential (the data a deduplicating stream sends is what changed, and the last change is the
      best guess of the next), else the disk's allocated bytes (``DiskRef.allocated``, its size if
      unmeasured); times ``stream_overhead`` (default 1.03: TCP/IP and framing).
    - *migrate*: the VM goes to the media host and back, each way sending its touched memory plus what
      the guest dirties meanwhile: ``2 * (touched + dirty_rate * touched / lan_bandwidth) *
      migration_overhead`` (defaults: ``lan_bandwidth=125000000`` bytes/s, ``migration_overhead=1.02``).

    A guest that dirties memory at half the LAN bandwidth or more streams: pre-copy would not
    converge (the migration would run into the agent's ``move_timeout`` and fail the job).
    Migrating wins when it costs less than ``1 - margin`` (default ``margin=0.1``) of streaming. A
    domain that cannot be moved (a disk not on shared storage, ``VmFootprint.movable``) streams. One
    that cannot live-migrate (host devices, or metadata that says so) is moved cold (stopped, defined
    and booted on the media host) only with ``allow_cold_moves=yes``: a cold move sends almost nothing
    but stops the guest. Operators force a choice per instruction (``Instruction.placement``) or for
    every instruction with ``force=stream|migrate``; a forced migration of a domain that cannot live-
    migrate is a cold move. Restores from remote media always stream. Each unit gets the choice, the
    target host, both predictions and a reason that states them.

    A destination served by a backup *appliance* VM (``context.appliances``, measured where it runs
    now) has a third way: bring the appliance here, stream to it inside this host, and send it away
    again (to the next host in its queue, or home). One move serves every VM of the batch that backs
    up there, so it is priced once, like a VM's migration there and back, against the sum of what the
    batch's VMs would cost as decided above (per VM: its stream or its migration). It wins by the
    same ``margin``; an operator forces it with ``placement=appliance`` (or ``force=appliance``), and
    then every backup unit of that destination gets APPLIANCE with the appliance's prediction. An
    appliance that cannot live-migrate never moves.

Errors
------
::

    HyperbackError                        (host_agent.errors)
    └── OptimizerError                    anything the optimizer or its client raises on purpose
        ├── OptimizerConfigError  exit 2  an unusable policy chain, option, address or TLS file
        │   └── UnknownPolicy             no entry point provides a policy of that name
        ├── MalformedBatch                a batch that breaks the contract (INVALID_ARGUMENT)
        ├── PolicyError                   a policy returned an inconsistent plan (INTERNAL)
        ├── OptimizerUnavailable          (host_agent.optimizer) retryable: unreachable, deadline, busy
        └── OptimizerRejected             (host_agent.optimizer) not retryable: the batch was refused
"""
from __future__ import annotations

import abc
import hashlib
import logging
import math
import posixpath
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar, Self

from host_agent import errors
from host_agent.hostload import HostLoad
from host_agent.model import (
    ApplianceFootprint,
    DiskRef,
    Instruction,
    InstructionKind,
    Placement,
    Plan,
    Policy,
    UnitKind,
    VmFootprint,
    WorkUnit,
)

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hyperback.policies"
DEFAULT_CHAIN = ("merge", "colocate", "timing")
DEFAULT_MAX_BATCH = 10_000
STRENGTH = {Policy.INCREMENTAL: 1, Policy.DIFFERENTIAL: 2, Policy.FULL: 3}


# --------------------------------------------------------------------------- errors

class OptimizerError(errors.HyperbackError):
    """Root of the errors of host_agent.policies and host_agent.optimizer."""


class OptimizerConfigError(OptimizerError):
    exit_code = 2


class UnknownPolicy(OptimizerConfigError):
    pass


class MalformedBatch(OptimizerError):
    pass


class PolicyError(OptimizerError):
    pass


# --------------------------------------------------------------------------- types

@dataclass(frozen=True)
class HostContext:
    """What the optimizer knows of the sending host besides the batch."""

    host_name: str
    now: float                                  # the host's time.time() at the flush
    load: HostLoad | None = None                # None: not measured; never judged busy
    known_bases: frozenset[tuple[str, str]] = frozenset()  # (destination, "base/<16 hex>") already stored
    utc_offset: int | None = None               # seconds east of UTC of the host's local time
    footprints: Mapping[str, VmFootprint] = field(default_factory=dict)  # domain uuid -> cost of moving it
    remote_destinations: Mapping[str, str] = field(default_factory=dict)  # destination -> its media's host
    held: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (destination, name) -> last stored
    appliances: Mapping[str, ApplianceFootprint] = field(default_factory=dict)  # destination -> its appliance


@dataclass(frozen=True)
class Rejection:
    instruction_id: str
    reason: str


@dataclass(frozen=True)
class PlanResult:
    """A plan, and the instructions of the batch it does not serve, each with the reason why."""

    plan: Plan
    rejections: tuple[Rejection, ...] = ()


class PlanningPolicy(abc.ABC):
    """One step of a policy chain. Subclasses set ``name`` and implement :meth:`apply`."""

    name: ClassVar[str]

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        """Build the policy from ``key=value`` options given by name (none, by default)."""
        if options:
            raise OptimizerConfigError(f"policy {cls.name!r} takes no options "
                                       f"(got {', '.join(sorted(options))})")
        return cls()

    @abc.abstractmethod
    def apply(self, plan: Plan, batch: Sequence[Instruction], context: HostContext) -> Plan:
        """Return the plan transformed; ``batch`` holds the accepted instructions, in order."""


# --------------------------------------------------------------------------- small helpers

def normalize_path(path: str) -> str:
    return posixpath.normpath(path)


def base_name(image: str) -> str:
    """The repository name of a shared backing image: ``base/`` and 16 hex digits of its path's SHA-256."""
    return "base/" + hashlib.sha256(normalize_path(image).encode()).hexdigest()[:16]


def describe_disk(disk: DiskRef) -> str:
    return f"{disk.target or disk.serial} of {disk.domain_name or disk.domain_uuid}"


def listing(items: Sequence[str], limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 7 more``, for reasons people read."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def _disk_key(disk: DiskRef) -> tuple[str, str]:
    return disk.domain_uuid, disk.serial


def _ordered_union(groups: Iterable[Iterable[str]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for group in groups for item in group))


def _add_reason(unit: WorkUnit, reason: str) -> str:
    return f"{unit.reason}; {reason}" if unit.reason else reason


# --------------------------------------------------------------------------- checking a batch

def check_batch(batch: Sequence[Instruction], max_batch: int = DEFAULT_MAX_BATCH
                ) -> tuple[list[Instruction], list[Rejection]]:
    """Split a batch into accepted instructions and rejections; raise MalformedBatch if it is malformed."""
    if len(batch) > max_batch:
        raise MalformedBatch(f"the batch holds {len(batch)} instructions; at most {max_batch} are allowed")
    seen: set[str] = set()
    for n, instruction in enumerate(batch):
        _check_instruction(n, instruction, seen)
    accepted: list[Instruction] = []
    rejections: list[Rejection] = []
    restores: dict[tuple[str, str], tuple[Instruction, str, str]] = {}
    for instruction in batch:
        reason = _rejection_reason(instruction, restores)
        if reason:
            rejections.append(Rejection(instruction.id, reason))
        else:
            accepted.append(instruction)
            if instruction.kind is InstructionKind.RESTORE:
                for disk in instruction.disks:
                    restores.setdefault(_disk_key(disk), (instruction, instruction.snapshot,
                                                          instruction.destination))
    return accepted, rejections


def _check_instruction(n: int, instruction: Instruction, seen: set[str]) -> None:
    def malformed(what: str) -> MalformedBatch:
        return MalformedBatch(f"instruction #{n} (id {instruction.id!r}): {what}")

    if not instruction.id:
        raise malformed("the id is empty")
    if instruction.id in seen:
        raise malformed("the id appears twice in the batch")
    seen.add(instruction.id)
    if not instruction.domain_uuid:
        raise malformed("domain_uuid is empty")
    if not instruction.destination:
        raise malformed("destination is empty")
    if not (math.isfinite(instruction.received_at) and instruction.received_at >= 0):
        raise malformed(f"received_at {instruction.received_at!r} is not a time")
    serials: set[str] = set()
    for d, disk in enumerate(instruction.disks):
        if not disk.serial or not disk.path:
            raise malformed(f"disk #{d} has an empty serial or path")
        if disk.domain_uuid != instruction.domain_uuid:
            raise malformed(f"disk {disk.serial!r} belongs to domain {disk.domain_uuid!r}, "
                            f"not to the instruction's domain")
        if disk.serial in serials:
            raise malformed(f"disk serial {disk.serial!r} appears twice")
        serials.add(disk.serial)
        chain = [normalize_path(image) for image in disk.backing_chain if image]
        distinct = {normalize_path(disk.path), *chain}
        if len(chain) != len(disk.backing_chain) or len(distinct) != len(chain) + 1:
            raise malformed(f"disk {disk.serial!r}: its backing chain has an empty path "
                            f"or names an image twice")


def _rejection_reason(instruction: Instruction,
                      restores: Mapping[tuple[str, str], tuple[Instruction, str, str]]) -> str:
    if not instruction.disks:
        return f"the {instruction.kind.value} request names no disk"
    if instruction.kind is not InstructionKind.RESTORE:
        return ""
    if not instruction.snapshot:
        return "the restore request names no snapshot"
    for disk in instruction.disks:
        earlier = restores.get(_disk_key(disk))
        if earlier and earlier[1:] != (instruction.snapshot, instruction.destination):
            return (f"disk {describe_disk(disk)} is already being restored from {earlier[1]!r} in "
                    f"{earlier[2]!r} by request {earlier[0].request_id or earlier[0].id!r} of the same batch")
    return ""


# --------------------------------------------------------------------------- the baseline

def baseline_plan(batch: Sequence[Instruction], chain: str) -> Plan:
    """One unit per disk per instruction, in order; a disk's units chained where the batch restores it."""
    written = {_disk_key(d) for i in batch if i.kind is InstructionKind.RESTORE for d in i.disks}
    last: dict[tuple[str, str], str] = {}
    units: list[WorkUnit] = []
    for instruction in batch:
        restore = instruction.kind is InstructionKind.RESTORE
        for disk in instruction.disks:
            unit_id = f"u{len(units) + 1}"
            key = _disk_key(disk)
            after = (last[key],) if key in written and key in last else ()
            last[key] = unit_id
            units.append(WorkUnit(
                id=unit_id,
                kind=UnitKind.RESTORE_DISK if restore else UnitKind.BACKUP_DISK,
                source=instruction.snapshot if restore else disk.path,
                snapshot_name=disk.snapshot_name,
                destination=instruction.destination,
                policy=instruction.policy,
                satisfies=(instruction.id,),
                disk=disk,
                depends_on=after,
                reason="after the batch's earlier request for the same disk" if after else ""))
    return Plan(tuple(units), chain)


# --------------------------------------------------------------------------- checking a plan

def check_plan(plan: Plan, batch: Sequence[Instruction]) -> None:
    """Raise PolicyError unless ``plan`` serves every instruction of ``batch`` consistently."""
    def broken(what: str) -> PolicyError:
        return PolicyError(f"policy chain {plan.policy!r} produced an inconsistent plan: {what}")

    by_id = {u.id: u for u in plan.units}
    if len(by_id) != len(plan.units) or "" in by_id:
        raise broken("unit ids are empty or repeated")
    accepted = {i.id for i in batch}
    for unit in plan.units:
        if unknown := {d for d in unit.depends_on if d not in by_id}:
            raise broken(f"unit {unit.id} depends on units not in the plan: {sorted(unknown)}")
        if strangers := {i for i in unit.satisfies if i not in accepted}:
            raise broken(f"unit {unit.id} satisfies instructions not accepted in the batch: "
                         f"{sorted(strangers)}")
    state: dict[str, int] = {}  # 1 visiting, 2 done: depth-first search for a cycle
    for start in by_id:
        if start in state:
            continue
        state[start] = 1
        stack = [(start, iter(by_id[start].depends_on))]
        while stack:
            node, deps = stack[-1]
            nxt = next(deps, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                raise broken(f"units depend on each other in a cycle through {nxt}")
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(by_id[nxt].depends_on)))
    serving: dict[tuple[str, str, str, str], list[WorkUnit]] = {}
    for unit in plan.units:
        if unit.disk is not None:
            for instruction_id in unit.satisfies:
                serving.setdefault((instruction_id, unit.kind.value, unit.disk.snapshot_name,
                                    unit.destination), []).append(unit)
    for instruction in batch:
        kind = UnitKind.RESTORE_DISK if instruction.kind is InstructionKind.RESTORE else UnitKind.BACKUP_DISK
        for disk in instruction.disks:
            units = serving.get((instruction.id, kind.value, disk.snapshot_name, instruction.destination), [])
            if not units:
                raise broken(f"no {kind.value} unit serves disk {describe_disk(disk)} of instruction "
                             f"{instruction.id}")
            if kind is UnitKind.BACKUP_DISK and not any(
                    STRENGTH[u.policy] >= STRENGTH[instruction.policy] for u in units):
                raise broken(f"instruction {instruction.id} asked for a {instruction.policy.value} backup "
                             f"of {describe_disk(disk)}; its units are weaker")
            if kind is UnitKind.RESTORE_DISK and not any(u.source == instruction.snapshot for u in units):
                raise broken(f"instruction {instruction.id} restores {describe_disk(disk)} from "
                             f"{instruction.snapshot!r}; its unit restores another snapshot")


# --------------------------------------------------------------------------- the planner

class Planner:
    """Checks a batch, builds the baseline plan, runs the policy chain, checks the result."""

    def __init__(self, chain: Sequence[PlanningPolicy], max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if not chain:
            raise OptimizerConfigError("the policy chain is empty (use 'passthrough' for no policy)")
        self.chain = tuple(chain)
        self.max_batch = max_batch
        self.name = ",".join(p.name for p in self.chain)

    def plan(self, batch: Sequence[Instruction], context: HostContext) -> PlanResult:
        accepted, rejections = check_batch(batch, self.max_batch)
        plan = baseline_plan(accepted, self.name)
        for policy in self.chain:
            plan = policy.apply(plan, accepted, context)
        plan = replace(plan, policy=self.name)
        check_plan(plan, accepted)
        return PlanResult(plan, tuple(rejections))


# --------------------------------------------------------------------------- loading policies

def available_policies() -> dict[str, EntryPoint]:
    """The policies installed, by name (entry point group ``hyperback.policies``)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise OptimizerConfigError(f"two installed packages provide the policy {ep.name!r}: "
                                       f"{found[ep.name].value} and {ep.value}")
        found[ep.name] = ep
    return found


def load_policy(name: str) -> type[PlanningPolicy]:
    policies = available_policies()
    if name not in policies:
        raise UnknownPolicy(f"no policy named {name!r} is installed (available: "
                            f"{', '.join(sorted(policies)) or 'none'}; "
                            f"entry point group {ENTRY_POINT_GROUP})")
    try:
        cls = policies[name].load()
    except Exception as e:  # a broken plugin: say which one
        raise OptimizerConfigError(f"policy {name!r} ({policies[name].value}) cannot be loaded: {e}") from e
    where = f"policy {name!r} ({policies[name].value})"
    if not (isinstance(cls, type) and issubclass(cls, PlanningPolicy)):
        raise OptimizerConfigError(f"{where} is not a PlanningPolicy subclass")
    if cls.name != name:
        raise OptimizerConfigError(f"{where} calls itself {cls.name!r}")
    return cls


def parse_chain(spec: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in spec.split(","))
    if not spec.strip() or not all(names):
        raise OptimizerConfigError(f"policy chain {spec!r}: expected names separated by commas, "
                                   f"e.g. merge,timing")
    return names


def parse_policy_options(items: Iterable[str]) -> dict[str, dict[str, str]]:
    """``["timing.max_defer=1h", "timing.window=22:00-06:00"]`` -> ``{"timing": {...}}``."""
    options: dict[str, dict[str, str]] = {}
    for item in items:
        m = re.fullmatch(r"([\w-]+)\.(\w+)=(.*)", item)
        if not m:
            raise OptimizerConfigError(f"policy option {item!r}: expected POLICY.KEY=VALUE, "
                                       f"e.g. timing.max_defer=1h")
        options.setdefault(m[1], {})[m[2]] = m[3]
    return options


def build_chain(names: Sequence[str], options: Mapping[str, Mapping[str, str]] | None = None
                ) -> tuple[PlanningPolicy, ...]:
    options = options or {}
    if stray := set(options) - set(names):
        raise OptimizerConfigError(f"options given for policies not in the chain: {', '.join(sorted(stray))}")
    return tuple(load_policy(name).from_options(options.get(name, {})) for name in names)


# --------------------------------------------------------------------------- passthrough

class Passthrough(PlanningPolicy):
    """One unit per disk per instruction, in order: the baseline, unchanged."""

    name = "passthrough"

    def apply(self, plan: Plan, batch: Sequence[Instruction], context: HostContext) -> Plan:
        return plan


# --------------------------------------------------------------------------- merge

class Merge(PlanningPolicy):
    """Read the same data once: collapse duplicate requests, back up shared backing images once."""

    name = "merge"

    def apply(self, plan: Plan, batch: Sequence[Instruction], context: HostContext) -> Plan:
        units, collapsed = self._collapse_duplicates(plan.units)
        units, new_bases = self._shared_bases(units, context)
        notes = list(plan.notes)
        if collapsed:
            notes.append(f"merge: {collapsed} duplicate request(s) folded into the units of the same disk")
        if new_bases:
            notes.append(f"merge: {new_bases} shared backing image(s) read once as base units")
        return replace(plan, units=tuple(units), notes=tuple(notes))

    @staticmethod
    def _collapse_duplicates(units: Sequence[WorkUnit]) -> tuple[list[WorkUnit], int]:
        kinds: dict[tuple[str, str], set[UnitKind]] = {}
        for unit in units:
            if unit.disk is not None:
                kinds.setdefault(_disk_key(unit.disk), set()).add(unit.kind)
        groups: dict[tuple[str, ...], list[WorkUnit]] = {}
        for unit in units:
            disk = unit.disk
            if disk is None or len(kinds[_disk_key(disk)]) > 1 or unit.kind is UnitKind.BACKUP_BASE:
                key: tuple[str, ...] = ("unit", unit.id)
            elif unit.kind is UnitKind.BACKUP_DISK:
                key = ("backup", unit.destination, *_disk_key(disk), normalize_path(disk.path))
            else:
                key = ("restore", unit.destination, *_disk_key(disk), unit.source)
            groups.setdefault(key, []).append(unit)
        renamed: dict[str, str] = {}
        merged: list[WorkUnit] = []
        for members in groups.values():
            first = members[0]
            if len(members) == 1:
                merged.append(first)
                continue
            ids = {m.id for m in members}
            renamed.update((m.id, first.id) for m in members[1:])
            policy = max((m.policy for m in members), key=STRENGTH.__getitem__)
            satisfies = _ordered_union(m.satisfies for m in members)
            assert first.disk is not None
            reason = (f"one unit for {len(satisfies)} requests ({listing(satisfies)}) of disk "
                      f"{describe_disk(first.disk)} to {first.destination!r}")
            if first.kind is UnitKind.BACKUP_DISK:
                reason += f"; the strongest policy asked for ({policy.value}) applies to all"
            earlier = [m.reason for m in members if m.reason]
            merged.append(replace(
                first, policy=policy, satisfies=satisfies,
                depends_on=tuple(d for d in _ordered_union(m.depends_on for m in members) if d not in ids),
                not_before=min(m.not_before for m in members),
                reason="; ".join(dict.fromkeys([*earlier, reason]))))
        if renamed:
            merged = [replace(u, depends_on=tuple(dict.fromkeys(renamed.get(d, d) for d in u.depends_on)))
                      for u in merged]
        return merged, len(renamed)

    @staticmethod
    def _shared_bases(units: list[WorkUnit], context: HostContext) -> tuple[list[WorkUnit], int]:
        disks = [u for u in units if u.kind is UnitKind.BACKUP_DISK and u.disk and u.disk.backing_chain]
        sharers: dict[tuple[str, str], dict[tuple[str, str], DiskRef]] = {}
        tails: dict[str, tuple[str, ...]] = {}  # image -> the images under it, from the first chain naming it
        for unit in disks:
            assert unit.disk is not None
            chain = tuple(normalize_path(p) for p in unit.disk.backing_chain)
            for depth, image in enumerate(chain):
                sharers.setdefault((unit.destination, image), {})[_disk_key(unit.disk)] = unit.disk
                tails.setdefault(image, chain[depth + 1:])

        def builds_on(destination: str, images: Sequence[str]) -> str | None:
            """The nearest image that is shared in this batch or already stored."""
            for image in images:
                shared = len(sharers.get((destination, image), ())) >= 2
                if shared or (destination, base_name(image)) in known:
                    return image
            return None

        known = context.known_bases
        bases: dict[tuple[str, str], WorkUnit] = {
            (u.destination, normalize_path(u.source)): u for u in units if u.kind is UnitKind.BACKUP_BASE}
        created: list[tuple[str, str]] = []

        def base_unit(destination: str, image: str) -> str | None:
            """The id of the unit reading ``image`` for ``destination``, made if needed (None: stored)."""
            if (destination, base_name(image)) in known and (destination, image) not in bases:
                return None
            if (destination, image) not in bases:
                name = base_name(image)
                shared = list(sharers[(destination, image)].values())
                reason = (f"backing image {image} is shared by {len(shared)} disks "
                          f"({listing([describe_disk(d) for d in shared])}) backed up to {destination!r}: "
                          f"read once as {name}")
                unit = WorkUnit(id=f"{name}@{destination}", kind=UnitKind.BACKUP_BASE, source=image,
                                snapshot_name=name, destination=destination, policy=Policy.FULL,
                                satisfies=(), reason=reason)
                bases[(destination, image)] = unit
                created.append((destination, image))
                parent = builds_on(destination, tails.get(image, ()))
                parent_id = base_unit(destination, parent) if parent else None
                if parent and parent_id is None:
                    unit = replace(unit, reason=f"{reason}, on top of the stored base {base_name(parent)}")
                elif parent_id:
                    unit = replace(unit, depends_on=(*unit.depends_on, parent_id))
                bases[(destination, image)] = unit
            return bases[(destination, image)].id

        out: list[WorkUnit] = []
        disk_ids = {u.id for u in disks}
        for unit in units:
            if unit.id in disk_ids and unit.disk is not None:
                nearest = builds_on(unit.destination, [normalize_path(p) for p in unit.disk.backing_chain])
                if nearest is not None:
                    base_id = base_unit(unit.destination, nearest)
                    if base_id is None:
                        stored = f"builds on {base_name(nearest)}, the stored base {nearest}"
                        if stored not in unit.reason:
                            unit = replace(unit, reason=_add_reason(unit, stored))
                    elif base_id not in unit.depends_on:
                        unit = replace(unit, depends_on=(*unit.depends_on, base_id), reason=_add_reason(
                            unit, f"builds on {base_name(nearest)}, the shared base {nearest}"))
            if unit.kind is not UnitKind.BACKUP_BASE:
                out.append(unit)

        # each base satisfies (in part) what everything built on it satisfies, and starts no later
        by_id = {u.id: u for u in bases.values()}
        satisfies: dict[str, list[str]] = {i: list(u.satisfies) for i, u in by_id.items()}
        not_before: dict[str, list[float]] = {i: [] for i in by_id}
        for unit in out:
            below = [d for d in unit.depends_on if d in by_id]
            reached: set[str] = set()
            while below:
                base_id = below.pop()
                if base_id not in reached:
                    reached.add(base_id)
                    satisfies[base_id].extend(unit.satisfies)
                    not_before[base_id].append(unit.not_before)
                    below.extend(d for d in by_id[base_id].depends_on if d in by_id)
        ordered: list[WorkUnit] = []
        placed: set[str] = set()

        def place(unit_id: str) -> None:
            if unit_id in placed:
                return
            placed.add(unit_id)
            for dep in by_id[unit_id].depends_on:
                if dep in by_id:
                    place(dep)
            unit = by_id[unit_id]
            ordered.append(replace(unit, satisfies=_ordered_union([satisfies[unit_id]]),
                                   not_before=min(not_before[unit_id], default=unit.not_before)))

        for unit in bases.values():
            place(unit.id)
        return [*ordered, *out], len(created)


# --------------------------------------------------------------------------- timing

def parse_options(policy: str, options: Mapping[str, str],
                  parsers: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    """A policy's ``key=value`` options parsed by ``parsers`` (one per known key) into config fields;
    an unknown key or a value its parser refuses (ValueError) is an OptimizerConfigError."""
    fields: dict[str, Any] = {}
    for key, value in options.items():
        parser = parsers.get(key)
        if parser is None:
            raise OptimizerConfigError(f"policy {policy!r} has no option {key!r} "
                                       f"(options: {', '.join(parsers)})")
        try:
            fields[key] = parser(value)
        except ValueError as e:
            raise OptimizerConfigError(f"{policy}.{key}={value}: {e}") from e
    return fields


def _threshold(text: str) -> float:
    number = math.inf if text.strip() == "off" else float(text)
    if not number >= 0:
        raise ValueError(f"{text!r} is negative")
    return number


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1.5h`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 30m, 1h)")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass(frozen=True)
class BackupWindow:
    """Minutes after local midnight; ``start > end`` wraps past midnight (22:00-06:00)."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> BackupWindow:
        m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
        if not m or int(m[1]) > 23 or int(m[3]) > 24 or int(m[2]) > 59 or int(m[4]) > 59:
            raise ValueError(f"{text!r} is not a window like 22:00-06:00")
        start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
        if start == end or end > 24 * 60:
            raise ValueError(f"{text!r} is not a window like 22:00-06:00")
        return cls(start, end)

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


@dataclass(frozen=True)
class TimingConfig:
    cpu_pressure: float = 40.0      # percent, some avg10 of /proc/pressure/cpu
    io_pressure: float = 30.0       # percent, some avg10 of /proc/pressure/io
    load_per_core: float = 1.5      # 1-minute load average / CPUs
    window: BackupWindow | None = None
    recheck: float = 60.0           # seconds until a deferred unit is planned again
    max_defer: float = 30 * 60.0    # seconds after which a unit is released whatever the load


class Timing(PlanningPolicy):
    """Defer backups while the host is busy or outside the backup window, never past ``max_defer``."""

    name = "timing"

    def __init__(self, config: TimingConfig = TimingConfig()) -> None:
        self.config = config

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        config = TimingConfig(**parse_options("timing", options, {
            "cpu_pressure": _threshold, "io_pressure": _threshold, "load_per_core": _threshold,
            "window": lambda v: BackupWindow.parse(v) if v.strip() else None,
            "recheck": parse_duration, "max_defer": parse_duration}))
        if config.recheck <= 0:
            raise OptimizerConfigError("timing.recheck must be more than 0 seconds")
        return cls(config)

    def busy(self, load: HostLoad | None) -> list[str]:
        """Why the host counts as busy (empty: it does not)."""
        c, why = self.config, []
        if load is None:
            return []
        if load.cpu_some_avg10 is not None and load.cpu_some_avg10 > c.cpu_pressure:
            why.append(f"CPU pressure {load.cpu_some_avg10:.1f}% > {c.cpu_pressure:g}%")
        if load.io_some_avg10 is not None and load.io_some_avg10 > c.io_pressure:
            why.append(f"IO pressure {load.io_some_avg10:.1f}% > {c.io_pressure:g}%")
        if load.load_per_core > c.load_per_core:
            why.append(f"load {load.load_per_core:.2f} per CPU > {c.load_per_core:g}")
        return why

    def outside_window(self, context: HostContext) -> bool:
        window = self.config.window
        if window is None:
            return False
        if context.utc_offset is not None:
            local = time.gmtime(context.now + context.utc_offset)
        else:
            local = time.localtime(context.now)
        return not window.contains(local.tm_hour * 60 + local.tm_min)

    def apply(self, plan: Plan, batch: Sequence[Instruction], context: HostContext) -> Plan:
        c = self.config
        why = self.busy(context.load)
        if self.outside_window(context):
            why.append(f"outside the backup window {c.window}")
        if not why:
            return plan
        cause = "; ".join(why)
        received = {i.id: i.received_at for i in batch}
        units: list[WorkUnit] = []
        deferred = released = 0
        until = context.now
        for unit in plan.units:
            if unit.kind is UnitKind.RESTORE_DISK:
                units.append(unit)
                continue
            oldest = min((received.get(i, 0.0) for i in unit.satisfies), default=0.0)
            waited = context.now - oldest
            if waited >= c.max_defer:
                released += 1
                units.append(replace(unit, reason=_add_reason(
                    unit, f"released although {cause}: waited {format_duration(waited)}, "
                          f"max_defer is {format_duration(c.max_defer)}")))
                continue
            not_before = max(min(context.now + c.recheck, oldest + c.max_defer), unit.not_before)
            until = max(until, not_before)
            deferred += 1
            units.append(replace(unit, not_before=not_before, reason=_add_reason(
                unit, f"deferred {format_duration(not_before - context.now)} ({cause}); "
                      f"released at the latest after {format_duration(c.max_defer)} of waiting")))
        note = f"timing: {cause}: {deferred} unit(s) deferred"
        if deferred:
            note += f" up to {format_duration(until - context.now)}"
        if released:
            note += f", {released} released after waiting max_defer"
        return replace(plan, units=tuple(units), notes=(*plan.notes, note))


# --------------------------------------------------------------------------- colocate

_SIZE_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_rate(text: str) -> float:
    """Bytes per second from ``125000000``, ``125M`` (bytes) or ``1Gbit`` (bits)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(bit|b)?(?:/s)?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a rate (e.g. 125M, 1Gbit)")
    number, prefix, unit = match.groups()
    rate = float(number) * _SIZE_SUFFIXES[prefix] / (8 if unit == "bit" else 1)
    if not rate > 0:
        raise ValueError(f"{text!r} is not a positive rate")
    return rate


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


CONVERGENCE_SHARE = 0.5  # a guest dirtying more than this share of the LAN bandwidth is not live-migrated


@dataclass(frozen=True)
class ColocateConfig:
    lan_bandwidth: float = 125e6       # bytes/s between hosts, to price the guest's dirtying
    stream_overhead: float = 1.03      # LAN bytes per byte of streamed data (TCP/IP, framing)
    migration_overhead: float = 1.02   # LAN bytes per byte of migrated memory
    margin: float = 0.1                # migrate only if it saves more than this share of the stream
    allow_cold_moves: bool = False     # may a domain that cannot live-migrate be stopped and moved?
    force: Placement = Placement.AUTO  # stream, migrate or appliance for every instruction


class Colocate(PlanningPolicy):
    """Stream backups to another host's media, or move the VM there: whichever crosses the LAN less."""

    name = "colocate"

    def __init__(self, config: ColocateConfig = ColocateConfig()) -> None:
        self.config = config

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        return cls(ColocateConfig(**parse_options("colocate", options, {
            "lan_bandwidth": parse_rate, "stream_overhead": _overhead, "migration_overhead": _overhead,
            "margin": _margin, "allow_cold_moves": _parse_bool, "force": _forced})))

    def stream_bytes(self, units: Sequence[WorkUnit], context: HostContext) -> int:
        total = 0
        for unit in units:
            assert unit.disk is not None
            held = context.held.get((unit.destination, unit.snapshot_name))
            if unit.policy is not Policy.FULL and held is not None:
                total += held
            else:
                total += unit.disk.allocated or unit.disk.size
        return round(total * self.config.stream_overhead)

    def move_bytes(self, footprint: VmFootprint) -> int:
        c = self.config
        touched = footprint.touched_bytes
        one_way = touched + footprint.dirty_bytes_per_second * touched / c.lan_bandwidth
        return round(2 * one_way * c.migration_overhead)

    def converges(self, footprint: VmFootprint) -> bool:
        """Whether pre-copy can catch up with the guest: it must dirty memory well below the LAN's
        bandwidth (half: past that, each round resends most of the last and the copy drags on)."""
        return footprint.dirty_bytes_per_second < CONVERGENCE_SHARE * self.config.lan_bandwidth

    def choose(self, forced: Placement, footprint: VmFootprint | None, stream: int,
               move: int) -> tuple[Placement, str]:
        """The placement for one domain's units and why."""
        if footprint is None:
            return Placement.STREAM, "the host sent no footprint of the VM: it cannot be moved"
        if forced is Placement.STREAM:
            return Placement.STREAM, "streaming forced by the operator"
        if not footprint.movable:
            return Placement.STREAM, f"the VM cannot be moved ({footprint.why_not})"
        if forced is Placement.MIGRATE:
            if footprint.live_migratable:
                return Placement.MIGRATE, "migration forced by the operator"
            return Placement.COLD_MOVE, f"migration forced by the operator; cold move ({footprint.why_not})"
        if footprint.live_migratable and not self.converges(footprint):
            rate = format_bytes(round(footprint.dirty_bytes_per_second))
            return Placement.STREAM, (f"the guest dirties {rate}/s of memory, too close to the LAN's "
                                      "bandwidth: a live migration would not converge")
        if not footprint.live_migratable:
            if self.config.allow_cold_moves:
                return Placement.COLD_MOVE, f"cold move: the VM cannot live-migrate ({footprint.why_not})"
            return Placement.STREAM, (f"the VM cannot live-migrate ({footprint.why_not}) and "
                                      "allow_cold_moves is off")
        if move < stream * (1 - self.config.margin):
            return Placement.MIGRATE, "migrating there and back crosses the LAN less than streaming"
        return Placement.STREAM, "streaming crosses the LAN less than migrating there and back"

    def apply(self, plan: Plan, batch: Sequence[Instruction], context: HostContext) -> Plan:
        forced = {i.id: i.placement for i in batch}
        groups: dict[tuple[str, str], list[WorkUnit]] = {}
        for unit in plan.units:
            host = context.remote_destinations.get(unit.destination, "")
            if host and host != context.host_name and unit.kind is UnitKind.BACKUP_DISK and unit.disk:
                groups.setdefault((unit.disk.domain_uuid, unit.destination), []).append(unit)
        decided: dict[str, WorkUnit] = {}
        notes = []
        for (uuid, destination), units in groups.items():
            host = context.remote_destinations[destination]
            footprint = context.footprints.get(uuid)
            stream = self.stream_bytes(units, context)
            move = 0 if footprint is None else self.move_bytes(footprint)
            wish = self._wish(units, forced)
            placement, why = self.choose(Placement.AUTO if wish is Placement.APPLIANCE else wish,
                                         footprint, stream, move)
            if placement is Placement.COLD_MOVE:
                move = 0
            reason = (f"{placement.value} to {host}: {why} (predicted LAN bytes: stream "
                      f"{format_bytes(stream)}, migrate there and back {format_bytes(move)})")
            notes.append(f"colocate: {units[0].disk.domain_name if units[0].disk else uuid} -> {reason}")
            for unit in units:
                decided[unit.id] = replace(unit, placement=placement, target_host=host,
                                           predicted_stream_bytes=stream, predicted_move_bytes=move,
                                           reason=_add_reason(unit, reason))
        out = []
        for unit in plan.units:
            if unit.id in decided:
                out.append(decided[unit.id])
            elif context.remote_destinations.get(unit.destination, context.host_name) != context.host_name:
                host = context.remote_destinations[unit.destination]
                out.append(replace(unit, placement=Placement.STREAM, target_host=host))
            else:
                out.append(unit)
        for destination, appliance in sorted(context.appliances.items()):
            out, note = self._bring_appliance(out, destination, appliance, forced, context)
            if note:
                notes.append(note)
        return replace(plan, units=tuple(out), notes=(*plan.notes, *notes))

    def _wish(self, units: Sequence[WorkUnit], forced: Mapping[str, Placement]) -> Placement:
        """The operator's choice for these units (the first instruction that forces one), else the
        configured ``force``."""
        return next((forced[i] for u in units for i in u.satisfies
                     if forced.get(i, Placement.AUTO) is not Placement.AUTO), self.config.force)

    def _bring_appliance(self, units: list[WorkUnit], destination: str, appliance: ApplianceFootprint,
                         forced: Mapping[str, Placement], context: HostContext) -> tuple[list[WorkUnit], str]:
        """Every backup unit of ``destination`` gets APPLIANCE if moving its appliance here (and away
        again) crosses the LAN less than what the units would cost otherwise, or if an operator asks."""
        mine = [u for u in units if u.destination == destination
                and u.kind in (UnitKind.BACKUP_DISK, UnitKind.BACKUP_BASE)]
        if not mine:
            return units, ""
        host = context.remote_destinations.get(destination, "")
        wish = self._wish(mine, forced)
        otherwise = self._otherwise(mine)
        bring = self.move_bytes(appliance.footprint)
        f = appliance.footprint
        if wish not in (Placement.AUTO, Placement.APPLIANCE):
            return units, ""
        if not (f.movable and f.live_migratable):
            why = f"appliance {appliance.appliance} cannot live-migrate ({f.why_not})"
            return units, f"colocate: {destination} -> no appliance move: {why}"
        if wish is Placement.AUTO and not self.converges(f):
            why = f"appliance {appliance.appliance} dirties memory too fast to live-migrate"
            return units, f"colocate: {destination} -> no appliance move: {why}"
        if wish is Placement.APPLIANCE:
            why = "forced by the operator"
        elif bring < otherwise * (1 - self.config.margin):
            why = "moving it here and away crosses the LAN less than the backups would"
        else:
            return units, (f"colocate: {destination} -> appliance {appliance.appliance} stays on {host}: "
                           f"moving it here and away ({format_bytes(bring)}) saves too little against "
                           f"{format_bytes(otherwise)}")
        reason = (f"appliance: bring {appliance.appliance} from {host} to {context.host_name}: {why} "
                  f"(predicted LAN bytes: appliance here and away {format_bytes(bring)}, otherwise "
                  f"{format_bytes(otherwise)} for {len(mine)} unit(s))")
        chosen = {u.id for u in mine}
        return [replace(u, placement=Placement.APPLIANCE, target_host=context.host_name,
                        predicted_move_bytes=bring, reason=_add_reason(u, reason))
                if u.id in chosen else u for u in units], f"colocate: {destination} -> {reason}"

    @staticmethod
    def _otherwise(units: Sequence[WorkUnit]) -> int:
        """What the units cross the LAN with as decided, counted once per VM (each of its units carries
        the VM's whole prediction): its migration, its stream, or almost nothing for a cold move."""
        per_vm: dict[str, int] = {}
        for unit in units:
            if unit.disk is None:
                continue
            if unit.placement is Placement.MIGRATE:
                per_vm[unit.disk.domain_uuid] = unit.predicted_move_bytes
            elif unit.placement is Placement.STREAM:
                per_vm[unit.disk.domain_uuid] = unit.predicted_stream_bytes
        return sum(per_vm.values())


def _overhead(text: str) -> float:
    value = float(text)
    if not value >= 1:
        raise ValueError("must be at least 1")
    return value


def _margin(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError("must be from 0 to below 1")
    return value


def _forced(text: str) -> Placement:
    value = Placement(text.strip())
    if value not in (Placement.AUTO, Placement.STREAM, Placement.MIGRATE, Placement.APPLIANCE):
        raise ValueError("must be auto, stream, migrate or appliance")
    return value


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{text!r} is not yes or no")


__all__ = [
    "DEFAULT_CHAIN", "ENTRY_POINT_GROUP", "BackupWindow", "Colocate", "ColocateConfig", "HostContext",
    "MalformedBatch", "Merge",
    "OptimizerConfigError", "OptimizerError", "Passthrough", "PlanResult", "Planner", "PlanningPolicy",
    "PolicyError", "Rejection", "Timing", "TimingConfig", "UnknownPolicy", "available_policies",
    "base_name", "baseline_plan", "build_chain", "check_batch", "check_plan", "load_policy", "parse_chain",
    "parse_policy_options",
]
