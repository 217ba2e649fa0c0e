"""The lab's Ceph cluster (host_agent/lab/ceph.py): it serves S3, and leaves nothing behind."""
from __future__ import annotations

import os
from pathlib import Path

import boto3  # type: ignore[import-untyped]
import pytest

from host_agent.lab import HostNotReady
from host_agent.lab.ceph import CephLab


def ceph_processes_of(conf: Path) -> list[int]:
    """Every running process whose command line names this cluster's configuration."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(conf).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


@pytest.mark.ceph
@pytest.mark.slow
def test_a_second_start_replaces_a_cluster_left_running_and_stop_leaves_no_process_or_file(
        tmp_path: Path) -> None:
    root = tmp_path / "ceph"
    left_running = CephLab(root)  # as a run killed before its teardown leaves it
    left_running.start()
    first_daemons = set(left_running.daemon_pids().values())
    assert len(first_daemons) == 4
    lab = CephLab(root)
    try:
        s3 = lab.start()
        assert not first_daemons & set(ceph_processes_of(lab.conf))
        client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                              aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key)
        client.create_bucket(Bucket="lab")
        client.put_object(Bucket="lab", Key="k", Body=b"stored in RADOS")
        assert client.get_object(Bucket="lab", Key="k")["Body"].read() == b"stored in RADOS"
    finally:
        lab.stop()
    assert ceph_processes_of(lab.conf) == []
    assert not root.exists()


def test_a_host_without_ceph_is_told_what_to_install_and_nothing_is_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no ceph tool on it
    with pytest.raises(HostNotReady, match="apt-get install --no-install-recommends ceph-mon ceph-mgr"):
        CephLab(tmp_path / "ceph").start()
    assert not (tmp_path / "ceph").exists()
