"""Reading host busyness: pressure stall information where the kernel has it, load average always."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from host_agent.errors import HostLoadError
from host_agent.planning.hostload import HostLoad, HostLoadReader, parse_loadavg, parse_pressure

PSI = Path("/proc/pressure")
CPU = "some avg10=12.50 avg60=3.00 avg300=0.75 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
IO = "some avg10=41.20 avg60=20.00 avg300=5.00 total=99\nfull avg10=30.00 avg60=10.00 avg300=2.00 total=77\n"


def fake_proc(root: Path, loadavg: str = "3.00 2.00 1.00 2/345 6789\n", cpu: str | None = CPU,
              io: str | None = IO) -> Path:
    """A directory laid out like /proc, for content this kernel does not produce."""
    (root / "pressure").mkdir(parents=True)
    (root / "loadavg").write_text(loadavg)
    for name, text in (("cpu", cpu), ("io", io)):
        if text is not None:
            (root / "pressure" / name).write_text(text)
    return root


@pytest.mark.skipif(not PSI.exists(), reason="this kernel has no /proc/pressure")
def test_the_real_pressure_files_parse() -> None:
    for name in ("cpu", "io"):
        parsed = parse_pressure((PSI / name).read_text(), name)
        assert 0.0 <= parsed.some.avg10 <= 100.0 and parsed.some.total >= 0
    load = HostLoadReader().read()
    assert load.cpu_some_avg10 is not None and load.io_some_avg10 is not None and load.notes == ()


def test_the_real_proc_gives_a_reading_on_any_kernel() -> None:
    load = HostLoadReader().read()
    assert load.load1 >= 0 and load.cpu_count >= 1
    assert (load.cpu_some_avg10 is None) == (not PSI.exists()) == bool(load.notes)


def test_a_reading_has_pressure_and_load_per_cpu(tmp_path: Path) -> None:
    load = HostLoadReader(fake_proc(tmp_path), cpu_count=2).read()
    assert load == HostLoad(3.0, 2.0, 1.0, 2, cpu_some_avg10=12.5, io_some_avg10=41.2)
    assert load.load_per_core == 1.5


def test_without_pressure_files_the_reader_degrades_to_load_average_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reader = HostLoadReader(fake_proc(tmp_path, io=None), cpu_count=4)
    with caplog.at_level(logging.WARNING, logger="host_agent.planning.hostload"):
        first, second = reader.read(), reader.read()
    assert first.cpu_some_avg10 is None and first.io_some_avg10 is None and first.load1 == 3.0
    assert "no pressure stall information" in first.notes[0] and "load average alone" in first.notes[0]
    assert second == first
    assert len(caplog.records) == 1, "said once per reader, not at every flush"


def test_a_cpu_file_without_a_full_line_parses() -> None:
    parsed = parse_pressure("some avg10=1.00 avg60=2.00 avg300=3.00 total=4\n")
    assert parsed.full is None and parsed.some.avg300 == 3.0


@pytest.mark.parametrize("text, message", [
    ("", "no 'some' line"),
    ("full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", "no 'some' line"),
    ("some avg10=1.00 avg60=2.00 avg300=3.00\n", "missing field"),
    ("some avg10=abc avg60=2.00 avg300=3.00 total=4\n", "bad or missing field"),
    ("some avg10=101.0 avg60=2.00 avg300=3.00 total=4\n", "not a percentage"),
    ("some avg10=nan avg60=2.00 avg300=3.00 total=4\n", "not a percentage"),
    ("some avg10=1.00 avg60=2.00 avg300=3.00 total=-4\n", "negative total"),
    ("some avg10=1.00 avg60 avg300=3.00 total=4\n", "is not key=value"),
    ("some avg10=1 avg60=2 avg300=3 total=4\nsome avg10=1 avg60=2 avg300=3 total=4\n", "one 'some'"),
    ("partial avg10=1 avg60=2 avg300=3 total=4\n", "one 'some'"),
])
def test_malformed_pressure_content_is_an_error_not_a_guess(text: str, message: str) -> None:
    with pytest.raises(HostLoadError, match=message):
        parse_pressure(text, "/proc/pressure/cpu")


@pytest.mark.parametrize("text", ["", "0.5 0.4", "a b c 1/2 3", "-1 0 0 1/2 3", "inf 0 0 1/2 3"])
def test_malformed_loadavg_is_an_error(text: str) -> None:
    with pytest.raises(HostLoadError, match="/proc/loadavg"):
        parse_loadavg(text)


def test_malformed_pressure_in_proc_fails_the_reading(tmp_path: Path) -> None:
    with pytest.raises(HostLoadError, match="pressure/io line 1"):
        HostLoadReader(fake_proc(tmp_path, io="some avg10=x\n")).read()


def test_an_unreadable_loadavg_fails_the_reading(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    (proc / "loadavg").unlink()
    with pytest.raises(HostLoadError, match="cannot read .*loadavg"):
        HostLoadReader(proc).read()


def test_a_pressure_path_that_cannot_be_read_for_another_reason_is_an_error(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, cpu=None)
    (proc / "pressure" / "cpu").mkdir()
    with pytest.raises(HostLoadError, match="cannot read .*pressure/cpu"):
        HostLoadReader(proc).read()
