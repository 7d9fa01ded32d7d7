"""`paraspinal-node backfill` end to end: Orthanc as the PACS with chest CTs on two days, `serve` killed with
SIGKILL after its first retrieve and started again; every chest CT measured once, nothing sent back.

The segmenter is the "precomputed" backend (the phantom's masks linked per series UID), as in
tests/test_orthanc.py. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_peers import free_port, wait_for_port
from orthanc import ORTHANC, Modality, Orthanc
from support import wait_until

pytestmark = pytest.mark.skipif(not ORTHANC.exists(), reason=f"{ORTHANC} missing: apt-get install orthanc")

ROOT = Path(__file__).resolve().parents[1]
NODE_AE = "PARASPINAL"
DAYS = ("20240102", "20240103")
WAIT_S = 180.0


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli.main", *args, "--config", str(config)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)


class Serve:
    def __init__(self, root: Path, port: int, orthanc: Orthanc, precomputed: Path) -> None:
        self.port, self.log, self.config = port, root / "node.log", root / "node.toml"
        self.results = root / "results"
        self.config.write_text(f"""
[receiver]
ae_title = "{NODE_AE}"
port = {port}
bind_address = "127.0.0.1"
allowed_calling_aes = ["ORTHANC"]
min_free_disk_mb = 1
[[destinations]]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.dicom_port}
[storage]
state_dir = "{root / 'state'}"
[segmenter]
backend = "precomputed"
precomputed_dir = "{precomputed}"
[completion]
release_quiet_s = 0.5
idle_quiet_s = 5.0
[worker]
lease_s = 10.0
poll_s = 0.2
retry_delay_s = 0.5
[delivery]
retry_base_s = 0.5
retry_max_interval_s = 1.0
timeout_s = 10.0
results_dir = "{self.results}"
[backfill]
retry_delay_s = 1.0
timeout_s = 60.0
[backfill.pacs]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.dicom_port}
""")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "node.cli.main", "serve", "--config", str(self.config)],
                                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout_s=30)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def progress(self) -> dict:
        run = cli(self.config, "backfill", "--list", "--format", "json")
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)[0]

    def jobs(self) -> list[dict]:
        run = cli(self.config, "status", "--format", "json", "--jobs", "100")
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)["recent_jobs"]


@pytest.fixture
def site(tmp_path: Path, phantom_dicom, phantom_masks) -> Iterator[tuple[Serve, Orthanc, list[str]]]:
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"node": Modality(NODE_AE, port)}, "ORTHANC")
    orthanc.start()
    serve = None
    try:
        orthanc.upload(phantom_dicom().paths)
        original = orthanc.study_id(phantom_dicom().study_uid)
        series = []
        precomputed = tmp_path / "precomputed"
        precomputed.mkdir()
        for day in DAYS:  # one chest CT per day, new UIDs each
            copy = orthanc.post(f"/studies/{original}/modify", {"Replace": {"StudyDate": day}, "Force": True})["ID"]
            uid = orthanc.series_of(copy)[0]["MainDicomTags"]["SeriesInstanceUID"]
            (precomputed / uid).symlink_to(phantom_masks(), target_is_directory=True)
            series.append(uid)
        orthanc.request("DELETE", f"/studies/{original}")
        serve = Serve(tmp_path, port, orthanc, precomputed)
        serve.start()
        yield serve, orthanc, series
    finally:
        if serve is not None:
            serve.stop()
        orthanc.stop()


def test_backfill_survives_kill_9_measures_each_chest_ct_once_and_sends_nothing(site) -> None:
    serve, orthanc, series = site
    started = cli(serve.config, "backfill", "--from", "2024-01-01", "--to", "2024-01-04", "--no-send-results")
    assert started.returncode == 0, started.stderr
    wait_until(lambda: "event=backfill_retrieved" in serve.log.read_text(), "the first retrieve", WAIT_S)
    serve.kill()
    serve.start()
    done = wait_until(lambda: (p := serve.progress())["status"] == "done" and p["measured"] == 2 and p, "both measured",
                      WAIT_S)
    assert (done["found"], done["failed"]) == (2, 0)
    jobs = [j for j in serve.jobs() if j["status"] == "done"]
    assert sorted(j["series"] for j in jobs) == sorted(series), "a series missed or measured twice"
    wait_until(lambda: {p.stem for p in serve.results.glob("*.json")} == set(series),  # the delivery loop writes them
               "both results in the results folder", WAIT_S)
    sops = {orthanc.metadata(i, "SopClassUid") for i in orthanc.get("/instances")}
    assert sops == {"1.2.840.10008.5.1.4.1.1.2"}, f"results were sent to the PACS: {sops}"
