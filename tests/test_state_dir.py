"""One owner per state dir: a second serve is refused, workers work only under a serve, a lost database is not
silently replaced, and what the node writes is not readable by other users."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_peers import free_port
from support import wait_until

from node.service.owner import DatabaseReplaced, OwnerCheck, StateDirOwner, owner_alive

ROOT = Path(__file__).resolve().parents[1]


class Serve:
    """`paraspinal-node serve` subprocesses on one state dir, started with the umask of a login shell."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.config = root / "node.toml"
        self.config.write_text(f"""
[receiver]
port = {free_port()}
bind_address = "127.0.0.1"
min_free_disk_mb = 0
[storage]
state_dir = "{self.state_dir}"
[worker]
count = 0
""")
        self.processes: list[subprocess.Popen] = []

    def start(self, *extra: str) -> subprocess.Popen:
        log = (self.root / f"serve-{len(self.processes)}.log").open("w")
        process = subprocess.Popen([sys.executable, "-m", "node.cli.main", "serve", "--config", str(self.config), *extra],
                                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                                   stderr=subprocess.STDOUT, preexec_fn=lambda: os.umask(0o022))
        process.log = Path(log.name)
        self.processes.append(process)
        return process

    def started(self, process: subprocess.Popen) -> None:
        wait_until(lambda: "event=node_started" in process.log.read_text() or process.poll() is not None,
                   "serve start", 60)
        assert process.poll() is None, process.log.read_text()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    node = Serve(tmp_path)
    yield node
    node.stop()


def test_a_second_serve_on_the_same_state_dir_is_refused_with_one_line(serve: Serve) -> None:
    first = serve.start()
    serve.started(first)
    second = serve.start()
    assert second.wait(timeout=60) == 2
    lines = second.log.read_text().strip().splitlines()
    assert len(lines) == 1 and "in use by another serve" in lines[0] and f"(pid {first.pid})" in lines[0]
    assert first.poll() is None


def test_an_empty_database_beside_a_spool_is_refused_unless_init(serve: Serve) -> None:
    series = serve.state_dir / "spool" / "1.2.3" / "1.2.3.4"
    series.mkdir(parents=True)
    (series / "1.2.3.4.5.dcm").write_bytes(b"spooled")
    (serve.state_dir / "state.sqlite").write_bytes(b"")
    refused = serve.start()
    assert refused.wait(timeout=60) == 2
    (line,) = refused.log.read_text().strip().splitlines()
    assert "state.sqlite is empty" in line and "serve --init" in line
    started = serve.start("--init")
    serve.started(started)


def test_files_are_private_whatever_the_umask_and_sighup_does_not_stop_serve(serve: Serve) -> None:
    process = serve.start()
    serve.started(process)
    process.send_signal(signal.SIGHUP)
    wait_until(lambda: "event=signal_ignored signal=SIGHUP" in process.log.read_text(), "SIGHUP logged", 30)
    assert process.poll() is None
    written = [p for p in serve.state_dir.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"state.sqlite", "state.sqlite-wal", "serve.lock", "pending.json"}
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) & 0o027 == 0, f"{path.name} is {oct(path.stat().st_mode)}"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def test_a_worker_works_only_while_a_serve_owns_the_state_dir(tmp_path: Path) -> None:
    database = tmp_path / "state.sqlite"
    database.write_bytes(b"")
    check = OwnerCheck(tmp_path, database)
    assert not owner_alive(tmp_path) and not check()
    owner = StateDirOwner(tmp_path)
    owner.acquire()
    try:
        assert owner_alive(tmp_path) and check()
    finally:
        owner.release()
    assert not check()
    (tmp_path / "restored.sqlite").write_bytes(b"")
    os.replace(tmp_path / "restored.sqlite", database)  # a restore in its place: the worker must not use the old one
    with pytest.raises(DatabaseReplaced):
        check()
