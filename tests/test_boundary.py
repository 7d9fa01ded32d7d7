"""The process boundary: `serve` receives, spools, schedules and sends without the compute stack.

A started `serve` with no workers, after it has received a CT series and queued its job, must
not have imported torch, SimpleITK, scipy, nibabel, matplotlib, the pipeline or the encoder:
they belong to the worker and model processes. `python -X importtime` lists every module the
real process imported, so the check is on the process itself, not on a static reading of imports.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import phantom as ph
from dicom_peers import free_port, storescu
from support import wait_until

from node.state.store import open_state

ROOT = Path(__file__).resolve().parents[1]
COMPUTE_STACK = ("torch", "SimpleITK", "scipy", "nibabel", "matplotlib", "highdicom", "totalsegmentator",
                 "nnunetv2", "node.pipeline", "dicom_sr")
# TotalSegmentator's table of model folders (plain dicts): serve reads it to say which weights are missing.
ALLOWED = {"totalsegmentator", "totalsegmentator.map_tasks_config"}
_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", re.M)


def _config(root: Path, port: int) -> Path:
    config = root / "node.toml"
    config.write_text(f"""
[receiver]
ae_title = "NODE"
port = {port}
bind_address = "127.0.0.1"
min_free_disk_mb = 1
[storage]
state_dir = "{root / 'state'}"
[completion]
release_quiet_s = 0.2
[worker]
count = 0
""")
    return config


def test_serve_never_imports_the_compute_stack(tmp_path: Path) -> None:
    series = ph.write_dicom_series(ph.make_phantom(spacing=(10.0, 4.0, 4.0)), tmp_path / "ct")
    port = free_port()
    config = _config(tmp_path, port)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "node.cli.main", "serve", "--config", str(config)],
                                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "event=node_started" in log.read_text(), "serve start", 60)
        sent = storescu(port, series.paths, "NODE", "MODALITY")
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: _jobs(tmp_path / "state" / "state.sqlite"), "the series queued as a job", 60)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    imported = set(_IMPORTED.findall(log.read_text()))
    assert "node.ingest.receiver" in imported and "node.delivery.loop" in imported  # the check sees serve's imports
    heavy = sorted(m for m in imported - ALLOWED if any(m == top or m.startswith(top + ".") for top in COMPUTE_STACK))
    assert heavy == [], f"serve imported the compute stack: {heavy[:20]}"


def _jobs(path: Path) -> list:
    if not path.exists():
        return []
    state = open_state(path)
    try:
        return state.jobs()
    finally:
        state.close()
