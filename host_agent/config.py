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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from host_agent import errors
from host_agent.inventory import Inventory, Media
from host_agent.inventory import parse as parse_inventory

DEFAULT_PATH = Path("/etc/hyperback/agent.toml")
DESTINATION = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int = 30      # per VM; more are answered "rate-limited"
    pending_per_vm: int = 20           # accepted but unanswered requests per VM; more: "quota"
    max_disks_per_request: int = 16


@dataclass(frozen=True)
class AgentConfig:
    libvirt_uri: str = "qemu:///system"
    # journal of pending instructions and results
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
    # destination names guests may ask for -> repository directories on backup media
    repositories: dict[str, Path] = field(
        default_factory=lambda: {"default": Path("/var/lib/hyperback/repo")})
    default_destination: str = "default"
    # where images restored for guests are created before they are attached
    restore_dir: Path = Path("/var/lib/hyperback/restores")
    # a frozen guest thaws by itself after this many seconds
    freeze_timeout: float = 10.0
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
_INVENTORY_KEYS = ("hosts", "media", "appliances", "shared_storage")


def _coerce(name: str, value: Any, default: Any) -> Any:
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


def load(path: Path | None = None, env: dict[str, str] | None = None) -> AgentConfig:
    """Defaults, then the file (if present), then HYPERBACK_* variables."""
    env = dict(os.environ) if env is None else env
    path = Path(env.get(f"{_ENV_PREFIX}CONFIG", path or DEFAULT_PATH))
    doc: dict[str, Any] = {}
    if path.exists():
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise errors.UsageError(f"cannot read config {path}: {e}") from e
    config = AgentConfig()
    known = {f.name: f for f in fields(AgentConfig)}
    changes: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _INVENTORY_KEYS:
            continue
        if key == "repositories":
            if not isinstance(value, dict) or not all(DESTINATION.fullmatch(k) for k in value):
                raise errors.UsageError(f"config repositories: names must match {DESTINATION.pattern}")
            changes[key] = {k: Path(v) for k, v in value.items()}
        elif key == "policy_options":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise errors.UsageError("config policy_options must be a table of tables")
            changes[key] = {k: {kk: str(vv) for kk, vv in v.items()} for k, v in value.items()}
        elif key == "limits":
            if not isinstance(value, dict):
                raise errors.UsageError("config limits must be a table")
            changes[key] = Limits(**{k: int(v) for k, v in value.items()})
        elif key in known:
            changes[key] = _coerce(key, value, getattr(config, key))
        else:
            raise errors.UsageError(f"config {path}: unknown setting {key!r}")
    for key in known:
        if key in ("repositories", "limits", "policy_options", "inventory"):
            continue
        value = env.get(_ENV_PREFIX + key.upper())
        if value is not None:
            changes[key] = _coerce(key, value, getattr(config, key))
    config = replace(config, **changes)
    host_name = config.host_name or socket.gethostname()
    config = replace(config, host_name=host_name, inventory=parse_inventory(doc, host_name))
    clash = set(config.repositories) & set(config.inventory.media)
    if clash:
        raise errors.UsageError(f"config: {', '.join(sorted(clash))} named both in repositories and media")
    if config.default_destination not in config.destinations:
        raise errors.UsageError(f"default_destination {config.default_destination!r} is not in repositories")
    return config
