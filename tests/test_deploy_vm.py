"""docs/deploy.md, run as written on a hypervisor with an existing VM.

Every host ``sh`` block of the guide runs, in order, in one bash session, in a private mount
namespace: /etc/hyperback, /etc/systemd/system, /opt/hyperback, /srv/backup, /var/lib/hyperback
and /run/hyperback are fresh tmpfs there, so the guide's real paths are used and this machine's
are left alone. libvirtd, the VM and the network are this machine's own. ``systemctl`` is played
by tests/systemctl_standin.py, because this machine's PID 1 is not systemd: it starts the units
``hyperback units install`` wrote the way systemd does (ExecStartPre, then ExecStart, ready on
READY=1). The guide's guest block is what tests/test_shim_install_vm.py runs in a real Debian guest.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import lab_or_fail

from host_agent.lab import Disk, make_disk

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "deploy.md"
SHIM = f"PYTHONPATH={REPO} {sys.executable} -m guest_shim"
FRESH = ("/etc/hyperback", "/etc/systemd/system", "/opt/hyperback", "/srv/backup", "/var/lib/hyperback",
         "/run/hyperback")

# web1 before the guide: a VM without any hyperback XML, shut off. Wired in and started, it runs an
# application that writes, and the shim's serve mode (the guide's guest block installs that unit).
WEB1 = f"""
[ -n "$(cat /sys/block/vda/serial 2>/dev/null)" ] || exit 0
{SHIM} serve &
while true; do dd if=/dev/urandom of=/dev/vda bs=64k count=16 conv=fsync 2>/dev/null; sleep 1; done
"""


def host_blocks(markdown: str) -> list[str]:
    """The guide's ``sh`` blocks, in order (not the ``sh guest`` ones)."""
    return re.findall(r"^```sh\n(.*?)^```$", markdown, re.MULTILINE | re.DOTALL)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path("/var/tmp") / f"hb-deploy-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def stop_all(pids_file: Path) -> None:
    if not pids_file.exists():
        return
    for line in pids_file.read_text().splitlines():
        pid = int(line.split()[1])
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue


def test_the_guide_blocks_are_what_the_test_runs() -> None:
    blocks = host_blocks(GUIDE.read_text())
    assert len(blocks) == 8 and "hyperback vm enable web1" in blocks[4]
    assert "pip install --no-index" not in "".join(blocks)  # the guest block is not run on the host


def test_deploy_md_runs_as_written_with_systemctl_played_by_the_test(workdir: Path) -> None:
    disk = make_disk(workdir / "web1.qcow2", 64 << 20, "qcow2")
    prelude = "\n".join(f"mkdir -p {d} && mount -t tmpfs hb-deploy {d}" for d in FRESH)
    prelude += f'\nsystemctl() {{ /usr/bin/python3 {REPO}/tests/systemctl_standin.py "$@"; }}\n'
    script = prelude + "\n".join(host_blocks(GUIDE.read_text()))
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
           "HB_STANDIN_PIDS": str(workdir / "pids"), "HB_STANDIN_LOGS": str(workdir)}
    with lab_or_fail(workdir / "lab", name_prefix="") as lab:
        web1 = lab.start_vm("web1", command=WEB1, persistent=True, channels=(),
                            disks=[Disk(disk, "vda", "qcow2")])
        assert web1.wait_for_exit(timeout=120) == 0, web1.console_tail()
        try:
            proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-euo",
                                   "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=1200)
        finally:
            stop_all(workdir / "pids")
        logs = "\n".join(p.read_text()[-2000:] for p in workdir.glob("hyperback-*.log"))
        assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n{logs}"
        out = proc.stdout
        assert "channel org.hyperback.agent.0 added to the persistent definition" in out
        assert re.search(r"^job [0-9a-f]{16}: web1: succeeded", out, re.MULTILINE), out
        assert re.search(r'^hyperback_last_success_timestamp_seconds\{domain="web1"\} [0-9.e+]+$', out,
                         re.MULTILINE), out
        assert web1.is_active()
