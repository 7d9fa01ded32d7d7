"""A scale-out site of real processes: one PostgreSQL, `serve` processes and `paraspinal-node worker` processes.

Used by tests/test_scaleout.py and bench/scaleout.py. The segmenter is the precomputed backend
with a simulated model time (`segmenter.simulated_model_s`); everything else is the real node:
storescu into serve, claims on PostgreSQL, the CT over DICOMweb when `dicomweb` is on, results
back by STOW-RS, C-STORE to a real storescp playing the PACS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dicom_peers import free_port, storescu
from netns import BRIDGE_ADDRESS, TestNetwork
from support import wait_until

from node.state.store import State, open_state

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "worker-token-for-tests-0123456789"


@dataclass
class Process:
    name: str
    command: list[str]
    log: Path
    popen: subprocess.Popen | None = None

    def start(self, started_event: str | None = None, timeout_s: float = 60) -> None:
        starts = self._count(started_event) if started_event else 0
        with self.log.open("a") as out:
            self.popen = subprocess.Popen(self.command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if started_event:
            wait_until(lambda: self._count(started_event) > starts or self.popen.poll() is not None,
                       f"{self.name} start", timeout_s)
            assert self.popen.poll() is None, f"{self.name} exited: {self.log.read_text()[-2000:]}"

    def _count(self, event: str) -> int:
        return self.log.read_text().count(event) if self.log.exists() else 0

    def signal(self, signum: int) -> None:
        os.kill(self.popen.pid, signum)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGCONT)
            self.popen.terminate()
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Site:
    root: Path
    database: str
    precomputed: Path
    pacs_port: int
    model_s: float = 1.0
    lease_s: float = 6.0
    dicomweb: bool = True
    serve_port: int = field(default_factory=free_port)
    dicomweb_port: int = field(default_factory=free_port)
    network: TestNetwork | None = None  # set: each worker in a network namespace of its own (tests/netns.py)
    workers: list[Process] = field(default_factory=list)
    serve: Process | None = None

    @property
    def _address(self) -> str:
        """Where workers reach PostgreSQL and serve's DICOMweb."""
        return BRIDGE_ADDRESS if self.network is not None else "127.0.0.1"

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        token = self.root / "worker-token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        (self.root / "serve.toml").write_text(self._serve_config())

    def _serve_config(self) -> str:
        dicomweb = f"""[dicomweb]
enabled = true
bind = "{self._address}"
port = {self.dicomweb_port}
url = "http://{self._address}:{self.dicomweb_port}"
token_file = "{self.root / 'worker-token'}"
""" if self.dicomweb else ""
        return f"""[receiver]
ae_title = "NODE"
port = {self.serve_port}
bind_address = "127.0.0.1"
min_free_disk_mb = 1
[[destinations]]
ae_title = "PACS"
host = "127.0.0.1"
port = {self.pacs_port}
[state]
database = "{self.database}"
serve_name = "recv1"
[storage]
state_dir = "{self.root / 'serve-state'}"
[completion]
release_quiet_s = 0.5
idle_quiet_s = 5.0
[worker]
count = 0
[delivery]
retry_base_s = 0.5
retry_max_interval_s = 1.0
timeout_s = 5.0
[web]
enabled = false
{dicomweb}"""

    def _worker_config(self, index: int) -> Path:
        path = self.root / f"worker-{index}.toml"
        source = 'series_source = "dicomweb"\n' if self.dicomweb else ""
        path.write_text(f"""[state]
database = "{self.database.replace('@127.0.0.1:', f'@{self._address}:')}"
[storage]
state_dir = "{self.root / f'worker-{index}-state'}"
[segmenter]
backend = "precomputed"
precomputed_dir = "{self.precomputed}"
simulated_model_s = {self.model_s}
[worker]
lease_s = {self.lease_s}
poll_s = 0.1
retry_delay_s = 0.5
cpu_threads_per_engine = 1
{source}[dicomweb]
token_file = "{self.root / 'worker-token'}"
""")
        return path

    def start_serve(self) -> None:
        self.serve = Process("serve", [sys.executable, "-m", "node.cli.main", "serve", "--config",
                                       str(self.root / "serve.toml")], self.root / "serve.log")
        self.serve.start("event=node_started")

    def start_worker(self, index: int) -> Process:
        """A worker process; with a network, in a namespace of its own (`ip netns exec` keeps its PID)."""
        inside = ["ip", "netns", "exec", self.network.host(index)] if self.network is not None else []
        worker = Process(f"worker-{index}", [*inside, sys.executable, "-m", "node.cli.main", "worker", "--config",
                                             str(self._worker_config(index)), "--index", str(index)],
                         self.root / f"worker-{index}.log")
        worker.start("event=worker_started", timeout_s=120)
        self.workers.append(worker)
        return worker

    def count_in_worker_logs(self, text: str) -> int:
        return sum(p.read_text().count(text) for p in self.root.glob("worker-*.log"))

    def send(self, files: list[Path]) -> None:
        result = storescu(self.serve_port, files, "NODE", "MODALITY")
        assert result.returncode == 0, result.stderr

    def state(self) -> State:
        return open_state(self.database)

    def stop(self) -> None:
        for process in [*self.workers, self.serve]:
            if process is not None:
                process.stop()
