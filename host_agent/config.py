"""The host agent's configuration: parsed once, at the edge, into frozen dataclasses.

Every knob has a default that works; a config file (TOML, default
``/etc/hyperback/agent.toml``, absent is fine) overrides some of them, and
``HYPERBACK_*`` environment variables override single values. Each knob is
documented once, here, in the field comments; ``docs/agent.md`` shows a file.
"""
from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from croniter import croniter

from host_agent import errors
from host_agent.inventory import Inventory, Media
from host_agent.inventory import parse as parse_inventory
from host_agent.model import Policy

DEFAULT_PATH = Path("/etc/hyperback/agent.toml")
DESTINATION = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class TlsConfig:
    ca: Path | None = None        # the cluster's CA certificate (PEM): peers must be signed by it
    cert: Path | None = None      # this end's certificate (PEM), from 'hyperback certs issue'
    key: Path | None = None       # its private key (PEM)
    allow_plaintext: bool = False  # plain TCP on a non-loopback address when there is no TLS (docs/tls.md)
    server_name: str = ""         # the name to check in a server's certificate, if not the address's host
    crl: Path | None = None       # revoked certificates (PEM CRL of the CA), from 'hyperback certs revoke'

    @property
    def enabled(self) -> bool:
        return self.ca is not None

    def check(self, where: str = "tls") -> TlsConfig:
        """Itself, if ``ca``, ``cert`` and ``key`` are all set or none is; else UsageError."""
        given = [self.ca, self.cert, self.key]
        if any(p is not None for p in given) and not all(p is not None for p in given):
            raise errors.UsageError(f"{where}: ca, cert and key go together (the CA, and this end's "
                                    f"certificate and key: see 'hyperback certs --help')")
        if self.crl is not None and self.ca is None:
            raise errors.UsageError(f"{where}: crl needs ca, cert and key (it lists what the CA revoked)")
        return self


NO_TLS: Final = TlsConfig()


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int = 30      # per VM; more are answered "rate-limited"
    pending_per_vm: int = 20           # accepted but unanswered requests per VM; more: "quota"
    max_disks_per_request: int = 16
    snapshot_disks_per_vm: int = 2     # snapshots a VM may see at once (`see`); more: "quota"


@dataclass(frozen=True)
class Schedule:
    """One ``[[schedules]]`` table: when, which domains, how, where, and what to keep."""

    name: str
    # cron, in the host's local time: "minute hour day-of-month month day-of-week" (e.g. "30 1 * * *"
    # nightly at 01:30, "0 3 * * 6" Saturdays at 03:00), an optional sixth field for seconds, or a
    # nickname (@daily, @weekly, @hourly); evaluated by croniter
    calendar: str
    # the domains it covers: any of these three (a domain matching any is covered):
    domains: tuple[str, ...] = ()    # names or UUIDs
    match: str = ""                  # a shell-style pattern on domain names ("web-*")
    group: str = ""                  # domains tagged with this group (`hyperback vm enable --group`)
    policy: Policy = Policy.INCREMENTAL
    destination: str = ""            # "" = default_destination
    # retention applied to each covered disk's snapshots in the destination after every run, with
    # the rules of `hyperback prune`; all 0 = keep everything
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    # a run missed while the agent was down is made up once when it starts (systemd's Persistent=)
    catch_up: bool = True
    # "backup", or "verify": boot the latest snapshot of each covered domain's boot disk in the
    # destination in a sandbox and record the verdict (hyperback verify-boot; policy and keep_*
    # do not apply), or "copy": copy the covered domains' snapshots in the destination (a
    # repository of this host) that `copy_to` lacks into it (hyperback copy; policy and keep_* do
    # not apply)
    kind: str = "backup"
    copy_to: str = ""                # copy schedules: the destination the snapshots are copied into

    @property
    def selector(self) -> str:
        """The domains it covers, for people."""
        parts = [f"domains={','.join(self.domains)}" if self.domains else "",
                 f"match={self.match}" if self.match else "", f"group={self.group}" if self.group else ""]
        return " ".join(p for p in parts if p)

    @property
    def retention(self) -> str:
        """The keep rules, for people ("" = keep everything)."""
        rules = (("last", self.keep_last), ("daily", self.keep_daily), ("weekly", self.keep_weekly),
                 ("monthly", self.keep_monthly))
        return " ".join(f"keep-{rule}={n}" for rule, n in rules if n)


@dataclass(frozen=True)
class GuestRule:
    """One ``[[guests]]`` table: what the guests of some domains may use (docs/agent.md, "Guests").
    A guest's own requests only; operators and schedules are not limited by it."""

    # the domains it covers, as a schedule's: names or UUIDs, a name pattern, a group
    domains: tuple[str, ...] = ()
    match: str = ""
    group: str = ""
    # the destinations they may back up to, restore, list and see from; () = every destination.
    # A domain covered by rules that name some may use those (all such rules together); a domain
    # no such rule covers may use every destination, as before this setting existed
    destinations: tuple[str, ...] = ()
    # per destination, what each covered domain may keep there: the bytes its snapshots read from
    # its own disks (never what dedup stored: that would depend on other VMs), and its snapshots;
    # 0 = no limit; with several rules, the smallest limit holds
    max_bytes: int = 0
    max_snapshots: int = 0


@dataclass(frozen=True)
class AgentConfig:
    libvirt_uri: str = "qemu:///system"
    # journal of pending instructions and results, schedules.json, and checkpoints/: the libvirt
    # checkpoint of each view, redefined when libvirt loses it (docs/changed-block-tracking.md)
    state_dir: Path = Path("/var/lib/hyperback")
    # the agent's sockets
    run_dir: Path = Path("/run/hyperback")
    # driver: flush a batch this many seconds after its first instruction arrived...
    interval: float = 10.0
    # ... or as soon as this many instructions wait
    batch_size: int = 10
    # gRPC target of the optimizer, and seconds allowed for one plan
    optimizer: str = "unix:/run/hyperback/optimizer.sock"
    optimizer_timeout: float = 10.0
    # the optimizer's policy chain and options (e.g. {"timing": {"recheck": "30s"}}), when the
    # agent starts the optimizer itself; see host_agent.planning.chain for every option
    policies: tuple[str, ...] = ("merge", "colocate", "timing")
    policy_options: dict[str, dict[str, str]] = field(default_factory=dict)
    # send this host's load (/proc/pressure, /proc/loadavg) with each batch, so the timing
    # policy can defer work while the host is busy
    send_load: bool = True
    # where the operator gRPC API listens
    operator_listen: str = "unix:/run/hyperback/agent.sock"
    # Prometheus metrics over HTTP (GET /metrics; docs/monitoring.md), "HOST:PORT" ("[::1]:PORT"
    # for IPv6, port 0: any free one); "" serves none
    metrics_listen: str = "127.0.0.1:9721"
    # destination names guests may ask for -> repository directories on backup media
    repositories: dict[str, Path] = field(
        default_factory=lambda: {"default": Path("/var/lib/hyperback/repo")})
    default_destination: str = "default"
    # local destinations that are encrypted repositories -> the file holding each one's passphrase
    # (docs/repository-format.md, 11.4)
    passphrase_files: dict[str, Path] = field(default_factory=dict)
    # where images restored for guests are created before they are attached
    restore_dir: Path = Path("/var/lib/hyperback/restores")
    # where a point-in-time view puts the overlay (and the backup job's scratch file) of a disk
    # backed by a block device (LVM, a raw volume), which has no folder beside it; a disk that is an
    # image file gets its overlay beside the image, on storage QEMU already uses. Must be local
    # storage QEMU can see and write (not a file system mounted after the domains started: QEMU
    # runs in a mount namespace of its own), with room for what the guests write during a backup
    overlay_dir: Path = Path("/var/lib/hyperback/overlays")
    # a frozen guest thaws by itself after this many seconds
    freeze_timeout: float = 10.0
    # seconds a guest may see a snapshot (`hyperback-shim see`) before the host unplugs it
    see_time_limit: float = 3600.0
    limits: Limits = Limits()
    # this host's name in the inventory (hosts, media on other hosts, shared storage: see
    # host_agent.inventory); empty: the machine's host name
    host_name: str = ""
    inventory: Inventory = Inventory()
    # seconds one live migration (or one leg of a cold move) may take before it is aborted
    move_timeout: float = 300.0
    # cap on a live migration's stream in MiB/s, to leave the LAN to other traffic; 0: no cap
    move_bandwidth: int = 0
    # seconds a backup on another host (after moving the VM there) may take
    visit_timeout: float = 6 * 3600.0
    # a cold move asks the guest to shut down and forces it off after this many seconds
    shutdown_timeout: float = 120.0
    # periodic backups without a guest's call: [[schedules]] tables, see Schedule above
    schedules: tuple[Schedule, ...] = ()
    # boot verification (kind = "verify" schedules): where a sandbox's overlay, sockets and console
    # log live while it runs, and the seconds its guest's shim has to answer
    verify_dir: Path = Path("/var/lib/hyperback/verify")
    boot_timeout: float = 300.0
    # a health check run in a domain's guest once its shim answered, by domain name or UUID: the
    # command's words, e.g. web1 = ["systemctl", "is-system-running"]; the guest must list it in its
    # shim.conf check_commands; it must exit 0 for the snapshot to pass
    boot_checks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # mutual TLS of the operator API on TCP, and of this agent as a client of media services and
    # other hosts' agents: a [tls] table with ca, cert, key (PEM files from `hyperback certs`),
    # crl, allow_plaintext and server_name; every key is described in docs/tls.md
    tls: TlsConfig = TlsConfig()
    # guests' destination allow-lists and quotas: [[guests]] tables, see GuestRule above
    guests: tuple[GuestRule, ...] = ()

    @property
    def destinations(self) -> frozenset[str]:
        """Every destination name guests and operators may use: local repositories and media."""
        return frozenset(self.repositories) | frozenset(self.inventory.media)

    def media(self, destination: str) -> Media | None:
        """The media entry of ``destination`` if it is served by a media service, else None."""
        return self.inventory.media.get(destination)

    def repository(self, destination: str | None) -> Path:
        """The directory of a destination this host writes directly (a local repository, or media
        attached to this host)."""
        name = destination or self.default_destination
        media = self.media(name)
        if media is not None and media.host == self.inventory.host_name and media.path is not None:
            return media.path
        if name not in self.repositories:
            known = ", ".join(sorted(self.destinations))
            if media is not None:
                where = f"appliance {media.appliance}" if media.appliance else f"host {media.host}"
                raise errors.UsageError(f"destination {name!r} is on {where}: reach it through "
                                        f"its media service at {media.service}")
            raise errors.UsageError(f"no destination named {name!r}; known: {known}")
        return self.repositories[name]


_ENV_PREFIX = "HYPERBACK_"
_TABLES = ("repositories", "passphrase_files", "limits", "policy_options", "inventory", "schedules",
           "boot_checks", "tls", "guests")
SCHEDULE_KINDS = ("backup", "verify", "copy")


def _table_fields(where: str, doc: Any, kind: type[Any]) -> dict[str, Any]:
    """The fields of dataclass ``kind`` by name, once ``doc`` is a table naming only those."""
    if not isinstance(doc, dict):
        raise errors.UsageError(f"{where} must be a table")
    known = {f.name: f for f in fields(kind)}
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise errors.UsageError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(known)})")
    return known


def _schedule(index: int, doc: Any) -> Schedule:
    where = f"config schedules[{index}]"
    _table_fields(where, doc, Schedule)
    name, calendar = doc.get("name"), doc.get("calendar")
    if not isinstance(name, str) or not DESTINATION.fullmatch(name):
        raise errors.UsageError(f"{where}: name must match {DESTINATION.pattern}")
    where = f"config schedule {name!r}"
    if not isinstance(calendar, str) or not croniter.is_valid(calendar):
        raise errors.UsageError(f"{where}: calendar {calendar!r} is not a cron expression "
                                "(e.g. '30 1 * * *' for 01:30 every night)")
    values: dict[str, Any] = {"name": name, "calendar": calendar}
    for key in ("match", "group", "destination", "copy_to"):
        if key in doc:
            if not isinstance(doc[key], str):
                raise errors.UsageError(f"{where}: {key} must be a string")
            values[key] = doc[key]
    if "domains" in doc:
        if not isinstance(doc["domains"], list) or not all(isinstance(d, str) for d in doc["domains"]):
            raise errors.UsageError(f"{where}: domains must be a list of names")
        values["domains"] = tuple(doc["domains"])
    if not (values.get("domains") or values.get("match") or values.get("group")):
        raise errors.UsageError(f"{where}: say which domains it covers (domains, match or group)")
    if "policy" in doc:
        try:
            values["policy"] = Policy(doc["policy"])
        except ValueError:
            raise errors.UsageError(f"{where}: policy must be one of "
                                    f"{', '.join(p.value for p in Policy)}") from None
    for key in ("keep_last", "keep_daily", "keep_weekly", "keep_monthly"):
        if key in doc:
            if not isinstance(doc[key], int) or isinstance(doc[key], bool) or doc[key] < 0:
                raise errors.UsageError(f"{where}: {key} must be a count (0 or more)")
            values[key] = doc[key]
    if "catch_up" in doc:
        if not isinstance(doc["catch_up"], bool):
            raise errors.UsageError(f"{where}: catch_up must be true or false")
        values["catch_up"] = doc["catch_up"]
    if "kind" in doc:
        if doc["kind"] not in SCHEDULE_KINDS:
            raise errors.UsageError(f"{where}: kind must be one of {', '.join(SCHEDULE_KINDS)}")
        values["kind"] = doc["kind"]
        backup_only = sorted(set(doc) & {"policy", "keep_last", "keep_daily", "keep_weekly", "keep_monthly"})
        if doc["kind"] == "verify" and backup_only:
            raise errors.UsageError(f"{where}: {backup_only[0]} is a backup schedule's setting; a verify "
                                    "schedule boots the latest snapshot and keeps every one")
        if doc["kind"] == "copy" and backup_only:
            raise errors.UsageError(f"{where}: {backup_only[0]} is a backup schedule's setting; a copy "
                                    "schedule copies what the destination holds (prune the copy_to "
                                    "destination with a schedule or 'hyperback prune' of its own)")
    if (values.get("kind") == "copy") != bool(values.get("copy_to")):
        raise errors.UsageError(f"{where}: copy_to (the destination to copy into) goes with kind = "
                                "\"copy\", and a copy schedule needs it")
    return Schedule(**values)


def _schedules(value: Any) -> tuple[Schedule, ...]:
    if not isinstance(value, list):
        raise errors.UsageError("config schedules must be an array of tables ([[schedules]])")
    out = tuple(_schedule(i, doc) for i, doc in enumerate(value))
    names = [s.name for s in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise errors.UsageError(f"config: schedule {twice[0]!r} is defined twice")
    return out


def _guest_rule(index: int, doc: Any) -> GuestRule:
    where = f"config guests[{index}]"
    known = _table_fields(where, doc, GuestRule)
    values = {name: _typed(f"{where}: {name}", value, known[name].default) for name, value in doc.items()}
    if not (values.get("domains") or values.get("match") or values.get("group")):
        raise errors.UsageError(f"{where}: say which domains it covers (domains, match or group)")
    for limit in ("max_bytes", "max_snapshots"):
        if values.get(limit, 0) < 0:
            raise errors.UsageError(f"{where}: {limit} must be 0 (no limit) or more")
    if not (values.get("destinations") or values.get("max_bytes") or values.get("max_snapshots")):
        raise errors.UsageError(f"{where}: it limits nothing: give destinations, max_bytes or max_snapshots")
    return GuestRule(**values)


def _guest_rules(value: Any) -> tuple[GuestRule, ...]:
    if not isinstance(value, list):
        raise errors.UsageError("config guests must be an array of tables ([[guests]])")
    return tuple(_guest_rule(i, doc) for i, doc in enumerate(value))


_INVENTORY_KEYS = ("hosts", "media", "appliances", "shared_storage")


def _coerce(name: str, value: Any, default: Any) -> Any:
    """A HYPERBACK_* variable's text as the type of the knob's default."""
    try:
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if isinstance(default, Path):
            return Path(value)
        if isinstance(default, tuple):
            return tuple(value) if isinstance(value, list) else tuple(str(value).split(","))
        if isinstance(default, (int, float, str)):
            return type(default)(value)
    except (TypeError, ValueError) as e:
        raise errors.UsageError(f"config {name}: {value!r} is not a valid {type(default).__name__}") from e
    return value


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          Path: "a path (string)", tuple: "a list of strings"}


def _typed(where: str, value: Any, default: Any) -> Any:
    """A value from the file, checked (not coerced) against the type of the knob's default: TOML
    has types, so ``interval = "ten"`` or ``batch_size = 2.5`` is a mistake to name, not to guess at."""
    kind = bool if isinstance(default, bool) else Path if isinstance(default, Path) else type(default)
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str), Path: isinstance(value, str),
          tuple: isinstance(value, list) and all(isinstance(v, str) for v in value)}.get(kind, False)
    if not ok:
        raise errors.UsageError(f"{where}: expected {_KINDS.get(kind, kind.__name__)}, got {value!r}")
    if kind is Path:
        return Path(value)
    if kind is tuple:
        return tuple(value)
    return float(value) if kind is float else value


def _table_of(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise errors.UsageError(f"{where}: expected a table ([{where}]), got {value!r}")
    return value


def _parse_file(doc: dict[str, Any], config: AgentConfig) -> dict[str, Any]:
    """The file's settings, each key known and each value of its knob's type."""
    known = {f.name for f in fields(AgentConfig)} - {"inventory"}
    changes: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _INVENTORY_KEYS:
            continue
        if key in ("repositories", "passphrase_files"):
            table = _table_of(key, value)
            for name, where in table.items():
                if not DESTINATION.fullmatch(name):
                    raise errors.UsageError(f"{key}.{name}: names must match {DESTINATION.pattern}")
                _typed(f"{key}.{name}", where, Path())
            changes[key] = {k: Path(v) for k, v in table.items()}
        elif key == "policy_options":
            options: dict[str, dict[str, str]] = {}
            for policy, table in _table_of(key, value).items():
                options[policy] = {}
                for option, setting in _table_of(f"{key}.{policy}", table).items():
                    if not isinstance(setting, (str, int, float)) or isinstance(setting, bool):
                        raise errors.UsageError(f"{key}.{policy}.{option}: expected a string or a number, "
                                                f"got {setting!r}")
                    options[policy][option] = str(setting)
            changes[key] = options
        elif key == "schedules":
            changes[key] = _schedules(value)
        elif key == "guests":
            changes[key] = _guest_rules(value)
        elif key == "boot_checks":
            checks = {}
            for domain, command in _table_of(key, value).items():
                if not isinstance(command, list) or not command or \
                        not all(isinstance(w, str) and w for w in command):
                    raise errors.UsageError(f"boot_checks.{domain}: expected the command's words, e.g. "
                                            "[\"systemctl\", \"is-system-running\"]")
                checks[domain] = tuple(command)
            changes[key] = checks
        elif key == "limits":
            limits = {f.name: f for f in fields(Limits)}
            table = _table_of(key, value)
            for name, setting in table.items():
                if name not in limits:
                    raise errors.UsageError(f"limits: unknown setting {name!r} "
                                            f"(settings: {', '.join(limits)})")
                _typed(f"limits.{name}", setting, getattr(config.limits, name))
            changes[key] = replace(config.limits, **table)
        elif key == "tls":
            changes[key] = _tls(_table_of(key, value))
        elif key in known:
            changes[key] = _typed(key, value, getattr(config, key))
        else:
            raise errors.UsageError(f"unknown setting {key!r}")
    return changes


def _tls(table: dict[str, Any]) -> TlsConfig:
    """The [tls] table: paths, a flag and a name, each checked."""
    settings = {f.name: f for f in fields(TlsConfig)}
    out: dict[str, Any] = {}
    for name, setting in table.items():
        if name not in settings:
            raise errors.UsageError(f"tls: unknown setting {name!r} (settings: {', '.join(settings)})")
        default = {"allow_plaintext": False, "server_name": ""}.get(name, Path())
        out[name] = _typed(f"tls.{name}", setting, default)
    return TlsConfig(**out).check()


def source(path: Path | None = None, env: dict[str, str] | None = None) -> Path:
    """The file :func:`load` reads: ``HYPERBACK_CONFIG``, else ``path``, else the default."""
    env = dict(os.environ) if env is None else env
    return Path(env.get(f"{_ENV_PREFIX}CONFIG", path or DEFAULT_PATH))


def load(path: Path | None = None, env: dict[str, str] | None = None) -> AgentConfig:
    """Defaults, then the file (if present), then HYPERBACK_* variables.  A mistake in the file is
    a UsageError of one line that names the file and the key: ``config FILE: KEY: what is wrong``."""
    env = dict(os.environ) if env is None else env
    path = source(path, env)
    doc: dict[str, Any] = {}
    if path.exists():
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise errors.UsageError(f"cannot read config {path}: {e}") from e
    config = AgentConfig()
    with _naming(path):
        changes = _parse_file(doc, config)
    for key in (f.name for f in fields(AgentConfig)):
        if key in _TABLES:
            continue
        value = env.get(_ENV_PREFIX + key.upper())
        if value is not None:
            changes[key] = _coerce(key, value, getattr(config, key))
    config = replace(config, **changes)
    host_name = config.host_name or socket.gethostname()
    with _naming(path):
        config = replace(config, host_name=host_name, inventory=parse_inventory(doc, host_name))
        stray = sorted(set(config.passphrase_files) - set(config.repositories))
        if stray:
            raise errors.UsageError(f"passphrase_files names {', '.join(stray)}, not in repositories")
        clash = set(config.repositories) & set(config.inventory.media)
        if clash:
            raise errors.UsageError(f"{', '.join(sorted(clash))} named both in repositories and media")
        if config.metrics_listen:
            host_port(config.metrics_listen)
        if config.default_destination not in config.destinations:
            raise errors.UsageError(f"default_destination {config.default_destination!r} is not in "
                                    f"repositories or media")
        _check_schedule_destinations(config)
        _check_guest_destinations(config)
    return config


def _check_guest_destinations(config: AgentConfig) -> None:
    for index, rule in enumerate(config.guests):
        unknown = sorted(set(rule.destinations) - config.destinations)
        if unknown:
            raise errors.UsageError(f"config guests[{index}]: no destination named {unknown[0]!r}; "
                                    f"known: {', '.join(sorted(config.destinations))}")


def _check_schedule_destinations(config: AgentConfig) -> None:
    for schedule in config.schedules:
        destination = schedule.destination or config.default_destination
        if destination not in config.destinations:
            raise errors.UsageError(f"config schedule {schedule.name!r}: no destination named "
                                    f"{destination!r}; known: {', '.join(sorted(config.destinations))}")
        if schedule.copy_to and schedule.copy_to not in config.destinations - {destination}:
            known = ", ".join(sorted(config.destinations))
            raise errors.UsageError(f"config schedule {schedule.name!r}: copy_to {schedule.copy_to!r} is "
                                    f"not another destination; known: {known}")
        media = config.media(destination)
        if schedule.copy_to and media is not None and media.host != config.inventory.host_name:
            raise errors.UsageError(f"config schedule {schedule.name!r}: it copies from {destination!r}, "
                                    f"media of host {media.host}: run the copy schedule on that host")
        if schedule.retention and media is not None and media.host != config.inventory.host_name:
            raise errors.UsageError(
                f"config schedule {schedule.name!r}: retention on {destination!r}, media of host "
                f"{media.host}, runs there (`hyperback prune` on that host): remove the keep_* settings")


def host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``) as a host and a port number; UsageError naming the setting."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise errors.UsageError(f"metrics_listen: {address!r} is not HOST:PORT (\"\" serves no metrics)")
    return host, int(port)


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A mistake found in the file is told as ``config FILE: KEY: what is wrong``, on one line."""
    try:
        yield
    except errors.UsageError as e:
        what = str(e).removeprefix("config: ").removeprefix("config ")
        raise errors.UsageError(f"config {path}: {what}") from e


def summary(config: AgentConfig) -> str:
    """One line saying what a configuration sets up (``hyperback-agent --check-config``)."""
    inventory = config.inventory
    cluster = (f"; host {config.host_name} of {len(inventory.hosts)} host(s), {len(inventory.media)} media, "
               f"{len(inventory.appliances)} appliance(s)" if inventory.hosts else "")
    return (f"libvirt {config.libvirt_uri}; destinations {', '.join(sorted(config.destinations))} "
            f"(default {config.default_destination}); operator API {config.operator_listen}; "
            f"optimizer {config.optimizer}; batches of {config.batch_size} or every {config.interval:g} s; "
            f"{len(config.schedules)} schedule(s), {len(config.guests)} guest rule(s){cluster}")
