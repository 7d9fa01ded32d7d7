"""The status page, /metrics and health checks of a real `serve`, fetched over loopback.

One `serve` (precomputed segmenter, dcmtk storescu in, storescp out) processes a phantom; its
pages are then read with urllib, /metrics with prometheus_client's own parser, and the
overview and worklist with a real headless Chromium (screenshot and DOM). A second `serve`
with basic authentication and patient names shown checks what the secret guards. Every wait
is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import phantom as ph
import pytest
from dicom_peers import dcmtk_env, free_port, storescu, wait_for_port
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from support import wait_until

ROOT = Path(__file__).resolve().parents[1]
PATIENT_NAME = "Webtest^Hidden"
NAME_PARTS = ("Webtest", "Hidden")
SECRET = "s3cret-token-for-the-test"
WAIT_S = 120.0


@dataclass(frozen=True)
class Series:
    files: list[Path]
    series_uid: str
    precomputed: Path
    scout: list[Path]  # a series the selection rules skip (its description says scout)


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    root = tmp_path_factory.mktemp("web-data")
    body = ph.make_phantom(spacing=(5.0, 3.0, 3.0))
    written = ph.write_dicom_series(body, root / "ct", patient_name=PATIENT_NAME)
    ph.write_masks(body, root / "precomputed" / written.series_uid)
    scout = ph.write_dicom_series(ph.make_phantom(spacing=(5.0, 6.0, 6.0)), root / "scout", study_uid=written.study_uid,
                                  series_description="Scout", patient_name=PATIENT_NAME)
    return Series(written.paths, written.series_uid, root / "precomputed", scout.paths)


class Node:
    """`paraspinal-node serve` in a subprocess with a generated config, a storescp destination and a web port."""

    def __init__(self, root: Path, series: Series, web: str = "", min_free_disk_mb: int = 1, workers: int = 1) -> None:
        self.root = root
        self.port = free_port()
        self.web_port = free_port()
        self.destination_port = free_port()
        self.log = root / "node.log"
        self.config = root / "node.toml"
        self.config.write_text(f"""
[receiver]
ae_title = "NODE"
port = {self.port}
bind_address = "127.0.0.1"
min_free_disk_mb = {min_free_disk_mb}
[[destinations]]
ae_title = "DEST"
host = "127.0.0.1"
port = {self.destination_port}
[storage]
state_dir = "{root / 'state'}"
[segmenter]
backend = "precomputed"
precomputed_dir = "{series.precomputed}"
[completion]
release_quiet_s = 0.5
[worker]
count = {workers}
poll_s = 0.2
[delivery]
retry_base_s = 0.5
timeout_s = 5.0
[web]
port = {self.web_port}
{web}
""")
        self._processes: list[subprocess.Popen] = []
        self.done_job = 0

    def start(self) -> None:
        received = self.root / "received"
        received.mkdir(exist_ok=True)
        self._processes.append(subprocess.Popen(
            ["storescp", "-aet", "DEST", "-od", str(received), str(self.destination_port)], env=dcmtk_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_port(self.destination_port)
        with self.log.open("a") as log:
            self._processes.append(subprocess.Popen(
                [sys.executable, "-m", "node.cli.main", "serve", "--config", str(self.config)], cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT))
        wait_until(lambda: "event=node_started" in self.log.read_text(), "node start", 60)

    def stop(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)

    def send(self, files: list[Path]) -> None:
        result = storescu(self.port, files, "NODE", "MODALITY")
        assert result.returncode == 0, result.stderr

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.web_port}{path}"

    def get(self, path: str, authorization: str | None = None, method: str = "GET",
            headers: dict[str, str] | None = None) -> Answer:
        request = urllib.request.Request(self.url(path), method=method, headers=headers or {})
        if authorization:
            request.add_header("Authorization", authorization)
        try:
            with _no_redirects.open(request, timeout=30) as response:
                return Answer(response.status, response.read(), dict(response.headers))
        except urllib.error.HTTPError as error:
            return Answer(error.code, error.read(), dict(error.headers))

    def metric(self, name: str, labels: dict[str, str] | None = None, authorization: str | None = None) -> float:
        """One sample of /metrics, read with prometheus_client's parser; 0 when absent."""
        for family in text_string_to_metric_families(self.get("/metrics", authorization).text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    return sample.value
        return 0.0


def _first_job(node: Node, status: str) -> int:
    """The newest job with `status`, as the job list links it."""
    page = node.get(f"/jobs?status={status}").text
    return int(page.split('<td><a href="/jobs/', 1)[1].split('"', 1)[0])


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # the test reads the 303 itself
        return None


_no_redirects = urllib.request.build_opener(_NoRedirect)


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory, series: Series) -> Iterator[Node]:
    """A node with the default [web] settings that has received, processed and delivered the phantom."""
    node = Node(tmp_path_factory.mktemp("web-node"), series)
    node.start()
    try:
        assert node.get("/healthz").status == 200
        assert node.metric("paraspinal_series_completed_total") == 0
        node.send(series.files + series.scout)
        wait_until(lambda: node.metric("paraspinal_deliveries", {"status": "sent"}) == 3, "results delivered", WAIT_S)
        wait_until(lambda: node.metric("paraspinal_jobs", {"status": "skipped"}) == 1, "scout skipped", WAIT_S)
        node.done_job = _first_job(node, "done")
        yield node
    finally:
        node.stop()


def test_healthz_readyz_and_metrics_answer(processed: Node) -> None:
    ready = wait_until(lambda: (answer := processed.get("/readyz")).status == 200 and answer, "ready", 30)
    assert ready.text.startswith("ready\n")
    for check in ("receiver", "database", "disk", "weights"):
        assert f"ok {check}:" in ready.text
    assert "paraspinal_receiver_listening 1.0" in processed.get("/metrics").text


def test_metrics_count_the_processed_phantom(processed: Node, series: Series) -> None:
    metric = processed.metric
    assert metric("paraspinal_instances_received_total", {"outcome": "stored"}) == len(series.files + series.scout)
    assert metric("paraspinal_instances_received_total", {"outcome": "duplicate"}) == 0
    assert metric("paraspinal_associations_total", {"outcome": "accepted"}) == 1
    assert metric("paraspinal_associations_open") == 0
    assert metric("paraspinal_series_completed_total") == 2
    assert metric("paraspinal_series_skipped_total", {"rule": "series_description_exclude"}) == 1
    assert metric("paraspinal_jobs", {"status": "done"}) == 1
    assert metric("paraspinal_jobs", {"status": "queued"}) == 0
    for stage in ("load", "segment", "measure", "encode"):
        assert metric("paraspinal_stage_duration_seconds_count", {"stage": stage}) == 1, stage
        assert metric("paraspinal_stage_duration_seconds_sum", {"stage": stage}) > 0, stage
    assert metric("paraspinal_stage_duration_seconds_count", {"stage": "deliver"}) == 3  # SEG, SR, key image
    destination = {"destination": f"DEST@127.0.0.1:{processed.destination_port}"}
    assert metric("paraspinal_delivery_attempts_total", destination) == 3
    assert metric("paraspinal_delivery_failures_total", destination) == 0
    assert metric("paraspinal_oldest_queued_job_age_seconds") == 0
    assert metric("paraspinal_disk_free_bytes") > 0
    assert metric("paraspinal_workers_alive") == 1
    assert metric("paraspinal_weights_missing") == 0
    families = {family.name for family in text_string_to_metric_families(processed.get("/metrics").text)}
    assert all(name.startswith("paraspinal_") for name in families), sorted(families)


def test_pages_show_the_job_and_no_patient_name(processed: Node, series: Series) -> None:
    job = processed.done_job
    pages = {path: processed.get(path) for path in ("/", "/jobs", "/jobs?status=done&q=Phantom", f"/jobs/{job}",
                                                     "/worklist", "/worklist?flagged=1", "/worklist.csv", "/metrics",
                                                     "/readyz", "/healthz")}
    assert {path: answer.status for path, answer in pages.items()} == dict.fromkeys(pages, 200)
    for path, answer in pages.items():
        for part in NAME_PARTS:
            assert part not in answer.text, f"{path} shows the patient name"
    job_page = pages[f"/jobs/{job}"].text
    assert series.series_uid in job_page and "deliver" in job_page and "Retry" not in job_page  # none without web.auth
    assert "matches selection.series_description_exclude" in processed.get("/jobs?status=skipped").text
    assert f'href="/jobs/{job}"' in pages["/jobs?status=done&q=Phantom"].text
    csv = pages["/worklist.csv"]
    assert csv.headers["content-type"].startswith("text/csv")
    assert series.series_uid in csv.text and csv.text.startswith("patient_id,")
    assert processed.get(f"/jobs/{job}/retry", method="POST").status == 403


def test_key_image_thumbnail_is_a_png(processed: Node) -> None:
    answer = processed.get(f"/jobs/{processed.done_job}/keyimage.png")
    assert answer.status == 200 and answer.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(answer.body))
    assert image.format == "PNG" and image.width == 320 and image.height > 100
    assert processed.get("/jobs/99/keyimage.png").status == 404
    assert processed.get("/jobs/99").status == 404


def test_worklist_date_filter(processed: Node, series: Series) -> None:
    assert series.series_uid in processed.get("/worklist?from=1990-01-01").text
    assert series.series_uid not in processed.get("/worklist?from=2999-01-01").text
    assert series.series_uid not in processed.get("/worklist?to=1900-01-01").text
    bad = processed.get("/worklist?from=yesterday")
    assert bad.status == 200 and "is not a date: write it as YYYY-MM-DD" in bad.text
    assert processed.get("/worklist.csv?from=yesterday").status == 400


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(url: str, profile: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--window-size=1400,1000", "--hide-scrollbars", *mode, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium is not installed")
def test_a_real_browser_shows_the_overview_and_the_worklist_row(processed: Node, series: Series,
                                                                tmp_path: Path) -> None:
    for page, marker in (("/", 'id="workers"'), ("/worklist", f'data-series="{series.series_uid}"')):
        dom = _chromium(processed.url(page), tmp_path / "profile", "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert marker in dom.stdout, page
        for part in NAME_PARTS:
            assert part not in dom.stdout
        shot = tmp_path / f"{page.strip('/') or 'overview'}.png"
        taken = _chromium(processed.url(page), tmp_path / "profile", f"--screenshot={shot}")
        assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
        with Image.open(shot) as image:
            assert image.size == (1400, 1000)
            assert len(image.convert("L").getcolors(256) or range(257)) > 16  # a rendered page, not a blank one
    assert f'<img src="/jobs/{processed.done_job}/keyimage.png"' in dom.stdout


def _basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"radiology:{password}".encode()).decode()


def test_basic_auth_guards_pages_metrics_and_retry_and_names_show_when_enabled(tmp_path: Path, series: Series) -> None:
    secret = tmp_path / "web-secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    node = Node(tmp_path, series, f'auth = "basic"\nsecret_file = "{secret}"\nshow_patient_names = true')
    node.start()
    try:
        node.send(series.files)
        wait_until(lambda: node.metric("paraspinal_jobs", {"status": "done"}, _basic(SECRET)) == 1, "job done", WAIT_S)
        for path in ("/", "/jobs", "/jobs/1", "/worklist", "/worklist.csv", "/metrics", "/jobs/1/keyimage.png"):
            refused = node.get(path)
            assert refused.status == 401 and refused.headers["www-authenticate"].startswith("Basic"), path
            assert node.get(path, _basic("wrong")).status == 401, path
            assert node.get(path, f"Bearer {SECRET}").status == 401, path  # basic was configured, not bearer
            assert node.get(path, _basic(SECRET)).status == 200, path
        assert node.get("/healthz").status == 200 and node.get("/readyz").status in (200, 503)
        assert PATIENT_NAME in node.get("/worklist", _basic(SECRET)).text
        assert PATIENT_NAME in node.get("/jobs/1", _basic(SECRET)).text
        assert node.get("/jobs/1/retry", method="POST").status == 401
        other_site = node.get("/jobs/1/retry", _basic(SECRET), "POST", {"Origin": "http://elsewhere.example"})
        assert other_site.status == 403
        retried = node.get("/jobs/1/retry", _basic(SECRET), "POST")
        assert retried.status == 303 and retried.headers["location"].startswith("/jobs/1?message=")
        shown = node.get(retried.headers["location"], _basic(SECRET)).text
        assert "no failed deliveries: there is nothing to retry" in shown
    finally:
        node.stop()
    assert "event=web_unprotected" not in node.log.read_text()


def test_readyz_names_what_is_not_ready(tmp_path: Path, series: Series) -> None:
    node = Node(tmp_path, series, min_free_disk_mb=10**9, workers=0)
    node.start()
    try:
        answer = node.get("/readyz")
        assert answer.status == 503 and answer.text.startswith("not ready\n")
        assert "ok receiver:" in answer.text and "ok database:" in answer.text
        assert "FAIL disk:" in answer.text and "free space or the receiver refuses images" in answer.text
        assert "FAIL weights: unknown: no worker has reported" in answer.text
        assert node.get("/healthz").status == 200
        assert node.metric("paraspinal_workers_alive") == 0
        assert storescu(node.port, series.files[:1], "NOT-THE-NODE", "MODALITY").returncode != 0
        assert node.metric("paraspinal_associations_total", {"outcome": "rejected"}) == 1
        assert node.metric("paraspinal_instances_refused_total", {"reason": "out_of_resources"}) == 0
        assert storescu(node.port, series.files[:1], "NODE", "MODALITY").returncode != 0  # disk below the watermark
        assert node.metric("paraspinal_instances_refused_total", {"reason": "out_of_resources"}) == 1
        assert "No worker has reported yet" in node.get("/").text
    finally:
        node.stop()


def test_unreadable_secret_file_refuses_the_start_in_one_line(tmp_path: Path, series: Series) -> None:
    node = Node(tmp_path, series, f'auth = "bearer"\nsecret_file = "{tmp_path / "absent"}"')
    result = subprocess.run([sys.executable, "-m", "node.cli.main", "serve", "--config", str(node.config)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"web.secret_file {tmp_path / 'absent'} cannot be read" in result.stderr
    assert "Traceback" not in result.stderr and "event=receiver_started" not in result.stderr


def test_web_port_taken_leaves_the_node_running_and_says_why(tmp_path: Path, series: Series) -> None:
    node = Node(tmp_path, series, 'bind = "0.0.0.0"')
    with _listening_on(node.web_port):
        node.start()
        try:
            log = node.log.read_text()
            assert "event=web_not_started" in log and "change web.port" in log
            assert "event=web_unprotected" in log  # 0.0.0.0 without auth is warned about
            node.send(series.files[:1])
        finally:
            node.stop()


@contextlib.contextmanager
def _listening_on(port: int) -> Iterator[None]:
    """Something else already listening on the port."""
    with socket.create_server(("0.0.0.0", port)):
        yield
