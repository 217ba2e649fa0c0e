"""The guest configuration file: parsed once into frozen dataclasses; mistakes are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_shim.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, ShimConfig, load_config, parse_config
from guest_shim.errors import ConfigError
from guest_shim.protocol import Policy

FULL = """
[shim]
port = /dev/vport2p1
socket = /run/hb/shim.sock   # comment
socket_group = backup
max_clients = 4
max_freeze_seconds = 20
connect_timeout = 2.5
reply_timeout = 5
job_timeout = 3600
status_interval = 10

[defaults]
targets = hb-disk-1, hb-disk-2
destination = nightly
policy = full
quiesce = no
"""


def test_a_full_file_parses_into_frozen_dataclasses() -> None:
    cfg = parse_config(FULL, "shim.conf")
    assert cfg.port == "/dev/vport2p1" and cfg.socket == "/run/hb/shim.sock"
    assert (cfg.socket_group, cfg.max_clients, cfg.max_freeze_seconds) == ("backup", 4, 20.0)
    assert (cfg.connect_timeout, cfg.reply_timeout, cfg.job_timeout, cfg.status_interval) == (
        2.5,
        5,
        3600,
        10,
    )
    assert cfg.defaults.targets == ("hb-disk-1", "hb-disk-2")
    assert (cfg.defaults.destination, cfg.defaults.policy, cfg.defaults.quiesce) == (
        "nightly",
        Policy.FULL,
        False,
    )
    with pytest.raises(AttributeError):
        cfg.port = "x"  # type: ignore[misc]


def test_empty_file_and_missing_default_file_give_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config("", "x") == ShimConfig(source="x")
    cfg = ShimConfig()
    assert cfg.port == "org.hyperback.agent.0" and cfg.socket == "/run/hyperback-shim.sock"
    assert cfg.defaults.targets == "all" and cfg.defaults.policy is Policy.INCREMENTAL
    assert not Path(DEFAULT_CONFIG_PATH).exists()
    assert load_config() == ShimConfig()


def test_the_environment_variable_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "shim.conf"
    conf.write_text("[defaults]\npolicy = differential\n")
    monkeypatch.setenv(CONFIG_ENV, str(conf))
    assert load_config().defaults.policy is Policy.DIFFERENTIAL
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.conf"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config()
    assert load_config(str(conf)).source == str(conf)  # an explicit path wins


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[shmi]\nport = x\n", "unknown section [shmi]"),
        ("[shim]\nprot = x\n", "unknown key 'prot'"),
        ("port = x\n", "section"),
        ("[DEFAULT]\nport = x\n", "outside a section"),
        ("[shim]\nport = ../etc\n", "[shim] port"),
        ("[shim]\nport = not a name\n", "[shim] port"),
        ("[shim]\nsocket = relative.sock\n", "absolute path"),
        ("[shim]\nsocket_group = a b\n", "socket_group"),
        ("[shim]\nmax_clients = 0\n", "outside 1..1024"),
        ("[shim]\nmax_clients = many\n", "not an integer"),
        ("[shim]\nmax_freeze_seconds = 9999\n", "outside 1..600"),
        ("[shim]\nreply_timeout = soon\n", "not a number"),
        ("[defaults]\ntargets = ../../dev/sda\n", "[defaults] targets"),
        ("[defaults]\ntargets = a a\n", "listed twice"),
        ("[defaults]\ntargets =\n", "empty"),
        ("[defaults]\ndestination = /srv/backup\n", "[defaults] destination"),
        ("[defaults]\npolicy = weekly\n", "not one of: full, incremental, differential"),
        ("[defaults]\nquiesce = perhaps\n", "yes/no"),
        ("[shim]\nport = a\nport = b\n", "shim.conf"),
    ],
)
def test_mistakes_are_config_errors_that_say_where(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "shim.conf")
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_unix_port_spec_is_accepted_for_stand_ins() -> None:
    assert parse_config("[shim]\nport = unix:/tmp/h.sock\n").port == "unix:/tmp/h.sock"
