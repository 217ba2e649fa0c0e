"""The agent's Prometheus endpoint, scraped over real HTTP after a real guest's backup: the job,
its bytes and the domain's last success are those of the job's result."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import lab_or_fail
from prometheus_client.parser import text_string_to_metric_families
from test_notify import NotifySocket, start

from host_agent._proto.hyperback.v1 import operator_pb2, operator_pb2_grpc
from host_agent.lab import Disk, Lab, make_disk
from host_agent.storage.repository import Repository

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]  # the guest sees this checkout over 9p
SHIM = f"PYTHONPATH={REPO} {sys.executable} -m guest_shim"
MIB = 1024 * 1024
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path("/var/tmp") / f"hb-metrics-vm-{uuid.uuid4().hex[:8]}"  # guests see the host's /var/tmp
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(workdir: Path) -> Iterator[Lab]:
    with lab_or_fail(workdir / "lab", max_running=1) as the_lab:
        yield the_lab


@dataclass
class Agent:
    """The installed agent, as systemd runs it: it tells its metrics address when READY."""

    metrics: str
    operator: str
    log: Path

    def log_tail(self) -> str:
        return agent_log(self.log)


def agent_log(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def agent(workdir: Path, lab: Lab) -> Iterator[Agent]:
    """A process of its own (libvirt's event loop can be registered once per process, and the
    in-process agent belongs to tests/test_agent_vm.py)."""
    root = workdir / "agent"
    root.mkdir()
    config = root / "agent.toml"
    config.write_text(f"""
state_dir = "{root}/state"
run_dir = "{root}/run"
interval = 1
optimizer = "unix:{root}/run/optimizer.sock"
operator_listen = "unix:{root}/run/agent.sock"
restore_dir = "{root}/restores"
send_load = false
metrics_listen = "127.0.0.1:0"
[repositories]
default = "{root}/repo"
""")
    subprocess.run([str(BIN / "hyperback"), "init", str(root / "repo")], check=True, capture_output=True)
    notify = NotifySocket(str(root / "notify.sock"))
    proc = start([str(BIN / "hyperback-agent"), "--config", str(config), "--with-optimizer", "-v"], notify,
                 root / "agent.log")
    try:
        ready = " ".join(notify.until(lambda lines: "READY=1" in lines))
        match = re.search(r"metrics on (http://\S+/metrics)", ready)
        assert match, ready
        yield Agent(match.group(1), f"unix:{root}/run/agent.sock", root / "agent.log")
    finally:
        proc.terminate()
        try:
            assert proc.wait(60) == 0, agent_log(root / "agent.log")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            notify.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(agent: Agent) -> tuple[Samples, int, float]:
    """Every sample of a GET /metrics, the body's size and the seconds the request took."""
    started = time.perf_counter()
    with urllib.request.urlopen(agent.metrics, timeout=10) as response:
        assert response.status == 200
        body = response.read().decode()
    seconds = time.perf_counter() - started
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(body) for s in family.samples}
    return samples, len(body), seconds


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_a_scrape_shows_the_guests_backup_its_bytes_and_its_domains_last_success(
        agent: Agent, lab: Lab, workdir: Path) -> None:
    before, _, _ = scrape(agent)
    assert sample(before, "hyperback_jobs_finished_total", state="succeeded", origin="guest") == 0
    disk = make_disk(workdir / "metrics.qcow2", 64 * MIB, "qcow2")
    script = f"""
        dd if=/dev/urandom of=/dev/vda bs=1M seek=8 count=4 conv=fsync 2>/dev/null
        echo "BACKUP $({SHIM} backup --json --policy full hb-metrics)"
    """
    vm = lab.start_vm("metrics", command=script, disks=[Disk(disk, "vda", "qcow2", "hb-metrics")],
                      timeout=180)
    assert vm.wait_for_exit(timeout=240) == 0, vm.console_tail()
    match = re.search(r"BACKUP (\{.*\})", vm.console())
    assert match, vm.console_tail()
    result = json.loads(match.group(1))
    assert result["ok"] is True, f"{result}\n{agent.log_tail()}"
    with grpc.insecure_channel(agent.operator) as channel:
        listed = operator_pb2_grpc.OperatorStub(channel).ListJobs(operator_pb2.ListJobsRequest(), timeout=30)
    jobs = listed.jobs
    job = next(j for j in jobs if j.id == result["job"])
    assert (job.state, job.origin) == (operator_pb2.JOB_STATE_SUCCEEDED, operator_pb2.JOB_ORIGIN_GUEST)
    snap = Repository.open(workdir / "agent" / "repo").resolve(result["disks"][0]["snapshot"])

    samples, size, seconds = scrape(agent)
    print(f"scrape: {size} bytes in {seconds * 1000:.1f} ms")
    assert sample(samples, "hyperback_jobs_accepted_total", origin="guest") == 1
    assert sample(samples, "hyperback_jobs_finished_total", state="succeeded", origin="guest") == 1
    assert sample(samples, "hyperback_jobs", state="succeeded", origin="guest") == 1
    assert sample(samples, "hyperback_job_duration_seconds_count", kind="backup", state="succeeded") == 1
    duration = sample(samples, "hyperback_job_duration_seconds_sum", kind="backup", state="succeeded")
    assert duration == pytest.approx(job.updated_at - job.created_at)
    read = sample(samples, "hyperback_backup_read_bytes_total", destination="default")
    assert read == result["bytes"] == snap.stats.bytes_read >= 4 * MIB  # the 4 MiB written, at least
    stats = snap.stats
    assert sample(samples, "hyperback_backup_new_bytes_total", destination="default") == stats.bytes_new
    assert sample(samples, "hyperback_backup_stored_bytes_total", destination="default") == stats.bytes_stored
    last = sample(samples, "hyperback_last_success_timestamp_seconds", domain=job.domain_name)
    assert last == pytest.approx(job.updated_at)
    assert snap.time.timestamp() <= last <= time.time()
    assert sample(samples, "hyperback_queue_depth") == 0
    assert sample(samples, "hyperback_deferrals_total") == 0
    assert sample(samples, "hyperback_migration_bytes_total") == 0
    assert not [key for key in samples if key[0] == "hyperback_checkpoint_fallbacks_total"]
