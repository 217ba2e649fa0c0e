"""Two real libvirt hosts with a hyperback agent each, and backup media on host B only.

Host A is this machine's libvirtd and network namespace; host B is ``TwoHosts``'s second libvirtd in
its own network and mount namespaces, joined by the veth LAN.  ``Cluster`` adds:

* B's backup media: a tmpfs mounted in B's mount namespace only, so nothing on A can write it except
  through the LAN (or by moving the VM to B);
* the media service (``hyperback-media``) in B's namespaces, on the predefined service address
  10.77.0.100 that it claims on B's LAN interface;
* one ``hyperback-agent`` per host, as separate processes (B's entered with nsenter), reading one
  inventory that differs only in ``host_name``; B's operator API listens on B's LAN address;
* a cluster CA and a certificate per host (its LAN address and the service address in it), so that
  the media service, B's operator API and every client on the LAN speak mutual TLS (docs/tls.md):
  nothing in the lab allows plain TCP; the test itself calls as an operator.

Every process is stopped, and every mount goes with B's namespace, when the ``Cluster`` closes.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from host_agent._proto.hyperback.v1 import media_pb2, media_pb2_grpc
from host_agent._proto.hyperback.v1 import operator_pb2 as opb
from host_agent._proto.hyperback.v1 import operator_pb2_grpc as opb_grpc
from host_agent.config import TlsConfig
from host_agent.lab.twohosts import LAN_A_IF, LAN_B_IF, TwoHosts
from host_agent.storage.repository import Repository
from host_agent.tls import certs
from host_agent.tls.identity import Identity, Role
from host_agent.tls.transport import channel

SERVICE_IP = "10.77.0.100"
MEDIA_PORT = 7420
AGENT_PORT = 7411
BIN = Path(sys.executable).parent
FINAL = {opb.JOB_STATE_SUCCEEDED, opb.JOB_STATE_FAILED, opb.JOB_STATE_REJECTED, opb.JOB_STATE_CANCELLED}


def inventory(hosts: TwoHosts, media_root: Path) -> str:
    """The inventory's tables: the same for both hosts."""
    return f"""
[hosts.hosta]
libvirt_uri = "{hosts.uri_a}"
agent = "{hosts.lan_ip_a}:{AGENT_PORT}"
lan_ip = "{hosts.lan_ip_a}"

[hosts.hostb]
libvirt_uri = "{hosts.uri_b}"
agent = "{hosts.lan_ip_b}:{AGENT_PORT}"
lan_ip = "{hosts.lan_ip_b}"

[media.media-b]
host = "hostb"
service = "{SERVICE_IP}:{MEDIA_PORT}"
path = "{media_root}/media-b"

[media.media-b2]
host = "hostb"
service = "{SERVICE_IP}:{MEDIA_PORT}"
path = "{media_root}/media-b2"
"""


def agent_config(root: Path, host_name: str, shared: Path | tuple[Path, ...], operator: str,
                 extra: str = "") -> str:
    paths = ", ".join(f'"{p}"' for p in (shared if isinstance(shared, tuple) else (shared,)))
    return f"""
host_name = "{host_name}"
shared_storage = [{paths}]
default_destination = "media-b"
libvirt_uri = "qemu:///system"
state_dir = "{root}/state"
run_dir = "{root}/run"
restore_dir = "{root}/restores"
optimizer = "unix:{root}/optimizer.sock"
operator_listen = "{operator}"
metrics_listen = "127.0.0.1:0"
interval = 1.0
send_load = false
shutdown_timeout = 3
{extra}
[repositories]
local = "{root}/repo"

[policy_options.timing]
recheck = "2s"
"""


def lab_certificate(pki: Path, identity: Identity, *ips: str) -> TlsConfig:
    """A certificate of the lab's CA (made in ``pki`` on first use) naming ``ips``: a fixture may issue
    one before the cluster starts (the appliance's, baked into its disk)."""
    ca = pki / "ca"
    if not (ca / certs.CA_CERT).exists():
        certs.init_ca(ca, "colocation lab CA")
    issued = certs.issue(ca, identity, pki / identity.name, ips=ips)
    return TlsConfig(ca / certs.CA_CERT, issued.cert, issued.key)


def tls_table(tls: TlsConfig) -> str:
    return f'\n[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'


class Cluster:
    def __init__(self, hosts: TwoHosts, root: Path, shared: Path | tuple[Path, ...],
                 inventory_extra: str = "") -> None:
        self.hosts = hosts
        self.tls = self._certificates(root / "pki")
        self.inventory_extra = inventory_extra  # more inventory tables, e.g. appliances
        self.root = root
        self.shared = shared
        self.media_root = root / "media"      # a tmpfs in B's mount namespace only
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _certificates(self, pki: Path) -> dict[str, TlsConfig]:
        """Each host's certificate (its LAN address, and the service address the media service may
        move to), and the test's own operator certificate."""
        out = {name: lab_certificate(pki, Identity(Role.AGENT, name), ip, SERVICE_IP)
               for name, ip in (("hosta", self.hosts.lan_ip_a), ("hostb", self.hosts.lan_ip_b))}
        out["operator"] = lab_certificate(pki, Identity(Role.OPERATOR, "lab"))
        return out

    @property
    def client_tls(self) -> TlsConfig:
        """What the test calls the cluster's services with."""
        return self.tls["operator"]

    # -- processes --

    def in_b(self, *command: str) -> list[str]:
        return ["nsenter", f"--target={self.hosts.libvirtd_pid_b}", "--mount", "--net", "--", *command]

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        with open(self.root / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def kill(self, name: str) -> None:
        """SIGKILL: the process gets no chance to clean up (an agent that crashes, a host that dies)."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def start_media_b(self) -> None:
        self.media_root.mkdir(parents=True, exist_ok=True)
        subprocess.run(self.in_b("mount", "-t", "tmpfs", "-o", "size=2g", "hb-media-b", str(self.media_root)),
                       check=True)
        for repo in ("media-b", "media-b2"):
            subprocess.run(self.in_b(str(BIN / "hyperback"), "init", str(self.media_root / repo)), check=True,
                           capture_output=True)
        self.start_media("hostb", {r: self.media_root / r for r in ("media-b", "media-b2")})
        self.describe(timeout=30)

    def start_media(self, host: str, repos: dict[str, Path]) -> None:
        """The media service on ``host``, claiming the service address on that host's LAN interface."""
        lan = LAN_B_IF if host == "hostb" else LAN_A_IF
        command = [str(BIN / "hyperback-media"), "--listen", f"{SERVICE_IP}:{MEDIA_PORT}",
                   "--host-name", host, "--service-ip", f"{SERVICE_IP}/24", "--service-dev", lan]
        for name, path in repos.items():
            command += ["--repo", f"{name}={path}"]
        mine = self.tls[host]
        command += ["--tls-ca", str(mine.ca), "--tls-cert", str(mine.cert), "--tls-key", str(mine.key)]
        self._spawn(f"media-{host}", self.in_b(*command) if host == "hostb" else command)

    def start_agent(self, host: str, extra: str = "") -> None:
        root = self.root / host
        root.mkdir(exist_ok=True)
        if not (root / "repo").exists():
            Repository.init(root / "repo")
        operator = (f"{self.hosts.lan_ip_b}:{AGENT_PORT}" if host == "hostb" else f"unix:{root}/agent.sock")
        config = root / "agent.toml"
        config.write_text(agent_config(root, host, self.shared, operator, extra)
                          + inventory(self.hosts, self.media_root) + self.inventory_extra
                          + tls_table(self.tls[host]))
        command = [str(BIN / "hyperback-agent"), "--config", str(config), "--with-optimizer", "-v"]
        self._spawn(f"agent-{host}", self.in_b(*command) if host == "hostb" else command)
        self.wait_operator(host)

    def operator_target(self, host: str) -> str:
        return (f"{self.hosts.lan_ip_b}:{AGENT_PORT}" if host == "hostb"
                else f"unix:{self.root / host / 'agent.sock'}")

    @contextlib.contextmanager
    def operator(self, host: str = "hosta") -> Iterator[opb_grpc.OperatorStub]:
        with channel(self.operator_target(host), self.client_tls) as chan:
            yield opb_grpc.OperatorStub(chan)

    def wait_operator(self, host: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.procs[f"agent-{host}"]
            if proc.poll() is not None:
                log = self.log(f"agent-{host}")
                raise AssertionError(f"agent on {host} exited {proc.returncode}:\n{log}")
            try:
                with self.operator(host) as stub:
                    stub.ListDomains(opb.ListDomainsRequest(), timeout=2)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    log = self.log(f"agent-{host}")
                    raise AssertionError(f"agent on {host} does not answer:\n{log}") from None
                time.sleep(0.3)

    def describe(self, timeout: float = 10, target: str = f"{SERVICE_IP}:{MEDIA_PORT}") -> Any:
        """The media service's answer at the service address (from host A, over the LAN)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with channel(target, self.client_tls) as chan:
                    return media_pb2_grpc.MediaStub(chan).Describe(media_pb2.DescribeRequest(), timeout=3)
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    # -- jobs --

    def wait_job(self, job_id: str, host: str = "hosta", timeout: float = 600) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.operator(host) as stub:
                jobs = stub.ListJobs(opb.ListJobsRequest(), timeout=10).jobs
            job = next((j for j in jobs if j.id == job_id), None)
            if job is not None and job.state in FINAL:
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s:\n{self.log('agent-hosta')}")

    def jobs_of(self, domain: str, host: str = "hosta") -> list[Any]:
        with self.operator(host) as stub:
            return list(stub.ListJobs(opb.ListJobsRequest(domain=domain), timeout=10).jobs)

    def lan_bytes(self) -> int:
        """Bytes that crossed the LAN in either direction so far (lan0's counters)."""
        return self.hosts.lan_tx_bytes() + self.hosts.lan_rx_bytes()

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@contextlib.contextmanager
def cluster(hosts: TwoHosts, root: Path, shared: Path | tuple[Path, ...], *, agent_a_extra: str = "",
            inventory_extra: str = "") -> Iterator[Cluster]:
    c = Cluster(hosts, root, shared, inventory_extra)
    try:
        c.start_media_b()
        c.start_agent("hostb")
        c.start_agent("hosta", agent_a_extra)
        yield c
    finally:
        c.close()


__all__ = ["BIN", "FINAL", "LAN_A_IF", "MEDIA_PORT", "SERVICE_IP", "Cluster", "cluster", "lab_certificate"]
