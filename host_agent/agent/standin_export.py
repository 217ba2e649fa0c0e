"""A stand-in for host_agent.storage.export until it is merged: the snapshot restored to an image
in the export's directory, served read-only by qemu-nbd. Same interface (start, stop,
socket_path, size); unlike the real export it restores first."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from host_agent import errors
from host_agent.agent.destinations import AnyRepository


class RestoredExport:
    def __init__(self, repository: AnyRepository, spec: str, run_dir: Path) -> None:
        self.repository, self.spec, self.run_dir = repository, spec, run_dir
        self.image = run_dir / "snapshot.img"
        self._proc: subprocess.Popen[bytes] | None = None
        self.size = 0

    @property
    def socket_path(self) -> str:
        return str(self.run_dir / "nbd.sock")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket_path}"

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.repository.restore(self.spec, self.image, overwrite=True)
        self.size = self.image.stat().st_size
        self._proc = subprocess.Popen(["qemu-nbd", "--read-only", "--persistent", "--format=raw",
                                       f"--socket={self.socket_path}", str(self.image)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not Path(self.socket_path).exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise errors.EnvironmentProblem(f"qemu-nbd did not serve {self.image}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        shutil.rmtree(self.run_dir, ignore_errors=True)
