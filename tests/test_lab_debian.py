"""The Debian guest's builder finds the mirror apt uses, in either format of apt's sources."""
from __future__ import annotations

from pathlib import Path

import pytest

from host_agent.lab import debian
from host_agent.lab.errors import HostNotReady


def test_the_mirror_comes_from_deb822_sources(tmp_path: Path) -> None:
    (tmp_path / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb deb-src\n# a comment\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert debian.apt_mirror((), tmp_path) == "http://mirror.example/debian"


def test_the_mirror_comes_from_a_one_line_sources_list(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text("# deb http://old.example/debian bookworm main\n"
                       "deb [arch=amd64] http://mirror.example/debian bookworm main contrib\n")
    assert debian.apt_mirror((sources,), tmp_path / "none") == "http://mirror.example/debian"


def test_no_bookworm_mirror_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "other.list").write_text("deb http://x.example/debian trixie main\n")
    with pytest.raises(HostNotReady, match="no Debian bookworm mirror"):
        debian.apt_mirror((), tmp_path)
