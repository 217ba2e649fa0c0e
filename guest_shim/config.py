"""The guest shim's configuration: ``/etc/hyperback/shim.conf`` (INI), parsed once, here.

``HYPERBACK_SHIM_CONFIG`` names another file.  A missing default file means built-in defaults;
a missing file that was named explicitly (argument or environment) is an error, as are unknown
sections and keys (typos must not pass silently)::

    [shim]
    port = org.hyperback.agent.0        # a port name, a /dev path, or unix:PATH (tests)
    socket = /run/hyperback-shim.sock   # serve's socket; clients use it when it exists
    socket_group = root                 # group allowed to use the socket (name or number)
    max_clients = 16                    # serve: simultaneous local applications
    max_freeze_seconds = 60             # the longest this guest stays frozen, whatever the host asks
    connect_timeout = 10                # seconds to wait for the host to connect and answer sync
    reply_timeout = 30                  # seconds to wait for the host to answer a request
    job_timeout = 86400                 # seconds a backup/restore call waits for its result
    status_interval = 30                # seconds of silence before asking the host for status
    fsfreeze_hook_dir = /etc/hyperback/fsfreeze-hook.d   # hooks run with freeze/thaw; empty: none
    check_commands =                    # commands the host may run as health checks (boot
                                        # verification), one a line, exactly as the host asks;
                                        # empty: none (the host only learns the shim answers)

    [defaults]
    targets = all                       # or serials separated by spaces or commas
    destination =                       # empty: the host's default destination
    policy = incremental                # full | incremental | differential
    quiesce = yes                       # ask the host to freeze file systems for the backup
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ConfigError, ProtocolError
from .port import DEFAULT_PORT_NAME, UNIX_PREFIX
from .protocol import ALL, Check, Policy, check_destination, check_serial

DEFAULT_CONFIG_PATH = "/etc/hyperback/shim.conf"
CONFIG_ENV = "HYPERBACK_SHIM_CONFIG"
DEFAULT_SOCKET = "/run/hyperback-shim.sock"
DEFAULT_HOOK_DIR = "/etc/hyperback/fsfreeze-hook.d"

_PORT_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_GROUP_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10}")


@dataclass(frozen=True)
class Defaults:
    """What ``backup()`` uses for arguments left out."""

    targets: str | tuple[str, ...] = ALL
    destination: str | None = None
    policy: Policy = Policy.INCREMENTAL
    quiesce: bool = True


@dataclass(frozen=True)
class ShimConfig:
    port: str = DEFAULT_PORT_NAME
    socket: str = DEFAULT_SOCKET
    socket_group: str = "root"
    max_clients: int = 16
    max_freeze_seconds: float = 60.0
    connect_timeout: float = 10.0
    reply_timeout: float = 30.0
    job_timeout: float = 86400.0
    status_interval: float = 30.0
    sysfs: str = "/sys"  # where /sys/block is looked up (tests point it at a fake tree)
    fsfreeze_hook_dir: str | None = DEFAULT_HOOK_DIR  # None: no hooks (guest_shim.hooks)
    check_commands: tuple[tuple[str, ...], ...] = ()  # argv the host may run (guest_shim.checks)
    defaults: Defaults = field(default_factory=Defaults)
    source: str | None = None  # the file this came from, for messages


_SHIM_KEYS = {
    "port",
    "socket",
    "socket_group",
    "max_clients",
    "max_freeze_seconds",
    "connect_timeout",
    "reply_timeout",
    "job_timeout",
    "status_interval",
    "sysfs",
    "fsfreeze_hook_dir",
    "check_commands",
}
_DEFAULTS_KEYS = {"targets", "destination", "policy", "quiesce"}


def config_path(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """The file to read and whether it must exist (it must when named explicitly)."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit, True
    if env.get(CONFIG_ENV):
        return env[CONFIG_ENV], True
    return DEFAULT_CONFIG_PATH, False


def load_config(path: str | None = None, *, environ: Mapping[str, str] | None = None) -> ShimConfig:
    """The configuration from ``path``, else ``$HYPERBACK_SHIM_CONFIG``, else the default file."""
    where, required = config_path(path, environ)
    try:
        with open(where, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as e:
        if required:
            raise ConfigError(f"configuration file {where} does not exist") from e
        return ShimConfig()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read configuration file {where}: {e}") from e
    return parse_config(text, where)


def parse_config(text: str, source: str = "<string>") -> ShimConfig:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        parser.read_string(text, source)
    except configparser.Error as e:
        raise ConfigError(f"{source}: {_one_line(str(e))}") from e
    if parser.defaults():
        raise ConfigError(f"{source}: keys outside a section ([DEFAULT]) are not used here")
    for section in parser.sections():
        if section not in ("shim", "defaults"):
            raise ConfigError(f"{source}: unknown section [{section}] (known: [shim], [defaults])")
    shim = dict(parser["shim"]) if parser.has_section("shim") else {}
    dflt = dict(parser["defaults"]) if parser.has_section("defaults") else {}
    for section, values, known in (("shim", shim, _SHIM_KEYS), ("defaults", dflt, _DEFAULTS_KEYS)):
        for key in values:
            if key not in known:
                names = ", ".join(sorted(known))
                raise ConfigError(f"{source}: unknown key {key!r} in [{section}] (known: {names})")

    def where(key: str) -> str:
        return f"{source}: [shim] {key}"

    kwargs: dict[str, object] = {}
    if "port" in shim:
        kwargs["port"] = check_port_spec(shim["port"], where("port"))
    if "socket" in shim:
        kwargs["socket"] = _check_abs_path(shim["socket"], where("socket"))
    if "socket_group" in shim:
        group = shim["socket_group"].strip()
        if not _GROUP_RE.fullmatch(group):
            raise ConfigError(f"{where('socket_group')}: {group!r} is not a group name or number")
        kwargs["socket_group"] = group
    if "max_clients" in shim:
        kwargs["max_clients"] = int(_number(shim["max_clients"], where("max_clients"), 1, 1024, integer=True))
    if "fsfreeze_hook_dir" in shim:
        hook_dir = shim["fsfreeze_hook_dir"].strip()
        where_hooks = where("fsfreeze_hook_dir")
        kwargs["fsfreeze_hook_dir"] = _check_abs_path(hook_dir, where_hooks) if hook_dir else None
    if "check_commands" in shim:
        kwargs["check_commands"] = parse_check_commands(shim["check_commands"], where("check_commands"))
    if "sysfs" in shim:
        kwargs["sysfs"] = _check_abs_path(shim["sysfs"], where("sysfs"))
    for key, low, high in (
        ("max_freeze_seconds", 1, 600),
        ("connect_timeout", 0.1, 3600),
        ("reply_timeout", 0.1, 3600),
        ("job_timeout", 1, 30 * 86400),
        ("status_interval", 1, 86400),
    ):
        if key in shim:
            kwargs[key] = _number(shim[key], where(key), low, high)
    return ShimConfig(defaults=_parse_defaults(dflt, source), source=source, **kwargs)  # type: ignore[arg-type]


def _parse_defaults(values: Mapping[str, str], source: str) -> Defaults:
    def where(key: str) -> str:
        return f"{source}: [defaults] {key}"

    out = Defaults()
    targets: str | tuple[str, ...] = out.targets
    if "targets" in values:
        targets = parse_targets(values["targets"], where("targets"))
    destination = out.destination
    if values.get("destination", "").strip():
        try:
            destination = check_destination(values["destination"].strip())
        except ProtocolError as e:
            raise ConfigError(f"{where('destination')}: {e.message.partition(': ')[2]}") from e
    policy = out.policy
    if "policy" in values:
        policy = parse_policy(values["policy"], where("policy"))
    quiesce = out.quiesce
    if "quiesce" in values:
        word = values["quiesce"].strip().lower()
        if word not in configparser.ConfigParser.BOOLEAN_STATES:
            raise ConfigError(f"{where('quiesce')}: {word!r} is not yes/no")
        quiesce = configparser.ConfigParser.BOOLEAN_STATES[word]
    return Defaults(targets, destination, policy, quiesce)


def parse_check_commands(text: str, where: str = "check_commands") -> tuple[tuple[str, ...], ...]:
    """One command a line, split as a POSIX shell would split its words (no shell runs it)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            words = tuple(shlex.split(line))
        except ValueError as e:
            raise ConfigError(f"{where}: {line.strip()!r}: {e}") from e
        try:
            Check("c", 1.0, words)
        except ProtocolError as e:
            raise ConfigError(f"{where}: {line.strip()!r} cannot be asked for: {e.message}") from e
        out.append(words)
    return tuple(out)


def parse_targets(text: str, where: str = "targets") -> str | tuple[str, ...]:
    """``all``, or serials separated by spaces or commas."""
    words = [w for w in re.split(r"[\s,]+", text.strip()) if w]
    if not words:
        raise ConfigError(f"{where}: empty (use 'all' or disk serials)")
    if words == [ALL]:
        return ALL
    try:
        serials = tuple(check_serial(w) for w in words)
    except ProtocolError as e:
        raise ConfigError(f"{where}: {e.message.partition(': ')[2]}") from e
    if len(set(serials)) != len(serials):
        raise ConfigError(f"{where}: a serial is listed twice")
    return serials


def parse_policy(text: str, where: str = "policy") -> Policy:
    word = text.strip()
    for policy in Policy:
        if policy.value == word:
            return policy
    raise ConfigError(f"{where}: {word!r} is not one of: {', '.join(p.value for p in Policy)}")


def check_port_spec(text: str, where: str = "port") -> str:
    spec = text.strip()
    if spec.startswith(UNIX_PREFIX):
        _check_abs_path(spec[len(UNIX_PREFIX) :], where)
    elif "/" in spec:
        _check_abs_path(spec, where)
    elif not _PORT_NAME_RE.fullmatch(spec):
        raise ConfigError(f"{where}: {spec!r} is not a port name, a /dev path or unix:PATH")
    return spec


def _check_abs_path(text: str, where: str) -> str:
    path = text.strip()
    if not path.startswith("/") or "\0" in path:
        raise ConfigError(f"{where}: {path!r} is not an absolute path")
    return path


def _number(text: str, where: str, low: float, high: float, integer: bool = False) -> float:
    try:
        value = float(int(text.strip())) if integer else float(text.strip())
    except ValueError:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{where}: {text.strip()!r} is not {what}") from None
    if not low <= value <= high:
        raise ConfigError(f"{where}: {value:g} is outside {low:g}..{high:g}")
    return value


def _one_line(text: str) -> str:
    return " ".join(text.split())
