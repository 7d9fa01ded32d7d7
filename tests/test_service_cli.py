"""`status`, `retry` and `echo` through the real command line parser."""

from __future__ import annotations

import json
import logging
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_peers import free_port
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.cli.main import main
from node.state.store import JobStatus, SeriesRecord, WorkerReport, open_state


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[receiver]\nae_title = "NODE"\n[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    state = open_state(tmp_path / "state" / "state.sqlite")
    state.record_series(SeriesRecord("1.2.3", "1.2", "P", "A", "20240101", "CT", "", 40, "f", "/x"))
    job = state.add_job("1.2.3", "f", "/x")
    claimed = state.claim("w", 60, 3)
    state.fail(job.id, claimed.token, "refused input: no pixel data in 3 files", retry_in_s=None)
    state.close()
    return path


@pytest.fixture
def verification_scp() -> Iterator[int]:
    port = free_port()
    ae = AE(ae_title="PEER")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


def test_status_shows_depths_errors_and_jobs(config_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["status", "--config", str(config_file), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["jobs"] == {"failed": 1}
    assert report["recent_errors"][0]["error"] == "refused input: no pixel data in 3 files"
    assert report["recent_jobs"][0]["status"] == "failed"
    assert main(["status", "--config", str(config_file)]) == 0
    assert "failed 1" in capsys.readouterr().out


def test_status_lists_workers_with_their_host_job_and_lease(config_file: Path, capsys: pytest.CaptureFixture) -> None:
    state = open_state(config_file.parent / "state" / "state.sqlite")
    state.record_series(SeriesRecord("1.2.4", "1.2", "P", "A", "20240101", "CT", "", 40, "f", "/y"))
    job = state.add_job("1.2.4", "f", "/y")
    state.report_worker(WorkerReport("gpu2:77:0", "gpu2", 77, 0, "gpu", "resident", ()))
    assert state.claim("gpu2:77:0", 600, 3).id == job.id
    state.close()
    assert main(["status", "--config", str(config_file), "--format", "json"]) == 0
    (worker,) = json.loads(capsys.readouterr().out)["workers"]
    assert (worker["host"], worker["state"], worker["job"], worker["device"]) == ("gpu2", "running", job.id, "gpu")
    assert worker["lease_until"] is not None
    assert main(["status", "--config", str(config_file)]) == 0
    assert f"gpu2 pid 77 slot 0 on gpu: running job {job.id} lease until" in capsys.readouterr().out


def test_status_into_a_closed_pipe_exits_quietly(config_file: Path) -> None:
    state = open_state(config_file.parent / "state" / "state.sqlite")
    for n in range(1200):  # more than a pipe holds, so the writer is still writing when `head` exits
        state.add_job("1.2.3", f"content-{n}", "/x")
    state.close()
    command = (f"{shlex.quote(sys.executable)} -m node.cli.main status --config {shlex.quote(str(config_file))} "
               "--jobs 1200 | head -1")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=60)
    assert done.stderr == "" and done.returncode == 0
    assert done.stdout.startswith("jobs:")


def test_retry_requeues_and_unknown_job_is_a_usage_error(config_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["retry", "1", "--config", str(config_file)]) == 0
    assert "queued again" in capsys.readouterr().out
    state = open_state(config_file.parent / "state" / "state.sqlite")
    assert state.get_job(1).status is JobStatus.QUEUED
    state.close()
    assert main(["retry", "42", "--config", str(config_file)]) == 2
    assert "no job 42" in capsys.readouterr().err


def test_echo_reports_success_refusal_and_bad_syntax(config_file: Path, verification_scp: int,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["echo", f"PEER@127.0.0.1:{verification_scp}", "--config", str(config_file)]) == 0
    assert "C-ECHO succeeded" in capsys.readouterr().out
    assert main(["echo", f"PEER@127.0.0.1:{free_port()}", "--config", str(config_file)]) == 1
    assert "check that it is running" in capsys.readouterr().out
    assert main(["echo", "PEER-127.0.0.1", "--config", str(config_file)]) == 2
    assert "AE@host:port" in capsys.readouterr().err


def test_serve_on_a_taken_port_says_which_setting_to_change(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    port = free_port()
    ae = AE(ae_title="SQUATTER")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", port), block=False)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), logging.getLogger().handlers[:]
    try:
        config = tmp_path / "node.toml"
        config.write_text(f'[receiver]\nport = {port}\nbind_address = "127.0.0.1"\n[worker]\ncount = 0\n'
                          f'[storage]\nstate_dir = "{tmp_path / "state"}"\n')
        assert main(["serve", "--config", str(config)]) == 2
    finally:
        server.shutdown()
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
        logging.getLogger().handlers[:] = handlers[2]
    assert "change receiver.port" in capsys.readouterr().err
