"""Planning: a batch of instructions becomes a :class:`~host_agent.model.Plan` through a chain of policies.

This is the optimizer's domain code; ``host_agent.planning.service`` is only the gRPC plumbing around
:meth:`Planner.plan`.

How a batch is planned
----------------------
1. **Checked.** What breaks the contract between driver and optimizer raises :class:`MalformedBatch`
   (the service answers INVALID_ARGUMENT): an empty or repeated instruction id, no domain or
   destination, a disk without serial or path, a disk of another domain than the instruction's, one
   serial twice in an instruction, a ``received_at`` that is not a finite non-negative number, more
   than ``max_batch`` instructions. What is well formed but cannot be done is **rejected**, one
   instruction at a time, with a reason: an instruction that names no disk, a path-level backup that
   names several disks, a restore that names no snapshot, a restore of a disk that an earlier
   instruction of the batch restores from another snapshot or destination.
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
hyperback's own, one module each: ``passthrough`` (the baseline, unchanged), ``merge`` (read the
same data once), ``colocate`` (keep backup data off the LAN), ``timing`` (defer work while the host
is busy).

Errors are ``OptimizerError`` and its branch of the tree drawn in ``host_agent.errors``:
``MalformedBatch`` (INVALID_ARGUMENT), ``PolicyError`` (INTERNAL), ``OptimizerConfigError``.
"""
from __future__ import annotations

import abc
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import EntryPoint, entry_points
from typing import Any, ClassVar, Self

from host_agent.errors import MalformedBatch, OptimizerConfigError, PolicyError, UnknownPolicy
from host_agent.model import (
    STRENGTH,
    ApplianceFootprint,
    DiskRef,
    Instruction,
    InstructionKind,
    Plan,
    UnitKind,
    VmFootprint,
    WorkUnit,
    normalize_path,
)
from host_agent.planning.hostload import HostLoad

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hyperback.policies"
DEFAULT_CHAIN = ("merge", "colocate", "timing")
DEFAULT_MAX_BATCH = 10_000


# --------------------------------------------------------------------------- types

@dataclass(frozen=True)
class ImageIdentity:
    """A backing image on shared storage as a host sees it: the same data for two hosts when all is equal."""

    path: str       # normalized
    inode: int
    size: int
    mtime_ns: int


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
    shared_images: Mapping[str, ImageIdentity] = field(default_factory=dict)  # normalized path -> identity
    repositories: Mapping[str, str] = field(default_factory=dict)  # destination -> its repository's repo_id
    # (destination, normalized image) the merge policy reads as a base even for one disk, so that other
    # hosts can build on it; set by the fleet layer (host_agent.planning.fleet), never sent by a host
    fleet_shared: frozenset[tuple[str, str]] = frozenset()


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

def describe_disk(disk: DiskRef) -> str:
    return f"{disk.target or disk.serial} of {disk.domain_name or disk.domain_uuid}"


def listing(items: Sequence[str], limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 7 more``, for reasons people read."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def disk_key(disk: DiskRef) -> tuple[str, str]:
    return disk.domain_uuid, disk.serial


def ordered_union(groups: Iterable[Iterable[str]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for group in groups for item in group))


def add_reason(unit: WorkUnit, reason: str) -> str:
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
                    restores.setdefault(disk_key(disk), (instruction, instruction.snapshot,
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
    if instruction.paths is not None and (len(instruction.disks) != 1 or not instruction.paths.paths
                                          or instruction.kind is not InstructionKind.BACKUP):
        return "a path-level backup names one disk and at least one path"
    if instruction.kind is not InstructionKind.RESTORE:
        return ""
    if not instruction.snapshot:
        return "the restore request names no snapshot"
    for disk in instruction.disks:
        earlier = restores.get(disk_key(disk))
        if earlier and earlier[1:] != (instruction.snapshot, instruction.destination):
            return (f"disk {describe_disk(disk)} is already being restored from {earlier[1]!r} in "
                    f"{earlier[2]!r} by request {earlier[0].request_id or earlier[0].id!r} of the same batch")
    return ""


# --------------------------------------------------------------------------- the baseline

def baseline_plan(batch: Sequence[Instruction], chain: str) -> Plan:
    """One unit per disk per instruction, in order; a disk's units chained where the batch restores it."""
    written = {disk_key(d) for i in batch if i.kind is InstructionKind.RESTORE for d in i.disks}
    last: dict[tuple[str, str], str] = {}
    units: list[WorkUnit] = []
    for instruction in batch:
        restore = instruction.kind is InstructionKind.RESTORE
        for disk in instruction.disks:
            unit_id = f"u{len(units) + 1}"
            key = disk_key(disk)
            after = (last[key],) if key in written and key in last else ()
            last[key] = unit_id
            units.append(WorkUnit(
                id=unit_id,
                kind=instruction.unit_kind,
                source=instruction.snapshot if restore else disk.path,
                snapshot_name=instruction.snapshot_name(disk),
                destination=instruction.destination,
                policy=instruction.policy,
                satisfies=(instruction.id,),
                disk=disk,
                depends_on=after,
                reason="after the batch's earlier request for the same disk" if after else "",
                paths=instruction.paths))
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
                serving.setdefault((instruction_id, unit.kind.value, unit.snapshot_name,
                                    unit.destination), []).append(unit)
    for instruction in batch:
        kind = instruction.unit_kind
        for disk in instruction.disks:
            units = serving.get((instruction.id, kind.value, instruction.snapshot_name(disk),
                                 instruction.destination), [])
            if not units:
                raise broken(f"no {kind.value} unit serves disk {describe_disk(disk)} of instruction "
                             f"{instruction.id}")
            if kind is UnitKind.BACKUP_DISK and not any(
                    STRENGTH[u.policy] >= STRENGTH[instruction.policy] for u in units):
                raise broken(f"instruction {instruction.id} asked for a {instruction.policy.value} backup "
                             f"of {describe_disk(disk)}; its units are weaker")
            asked = instruction.paths
            if asked is not None and not any(u.paths is not None and u.paths.covers(asked) for u in units):
                raise broken(f"instruction {instruction.id} asked for paths {listing(asked.paths)} of "
                             f"{describe_disk(disk)}; its unit stores others")
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


# --------------------------------------------------------------------------- options

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
