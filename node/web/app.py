"""The HTTP application: pages, /metrics, /healthz, /readyz and the retry action.

Starlette on uvicorn with Jinja2 templates (autoescaped): a small, well-kept ASGI stack whose
sync endpoints run in a thread pool, so the blocking state queries never stall the event loop.
Pages are plain HTML that work without JavaScript; a meta refresh keeps them current.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from node.config import Config
from node.state.store import JobRow, JobStatus, SeriesRecord, State, StateError
from node.state.worklist import columns, parse_since, render, worklist_row
from node.web import status
from node.web.auth import Guard
from node.web.metrics import STAGES, registry
from node.web.thumbnail import THUMBNAIL_WIDTH, key_image_path, patient_name, thumbnail_png

PAGE_SIZE = 50
LARGE_WIDTH = 1280  # the key image as rendered, for the job page
IDENTITY_COLUMNS = ("patient_id", "accession", "study_date", "series_instance_uid", "job")
FLAG_COLUMN = "low_attenuation"
TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class WorklistEntry:
    row: dict[str, Any]
    series: SeriesRecord
    name: str | None
    has_key_image: bool


class Site:
    """The endpoints, bound to the node's config, state and live parts."""

    def __init__(self, config: Config, state: State, live: status.Live, guard: Guard) -> None:
        self.config = config
        self.state = state
        self.live = live
        self.guard = guard
        self.metrics = registry(config, state, live)
        self.templates = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
        self.templates.filters.update(when=_when, seconds=_seconds, cell=_cell, label=_label)

    def routes(self) -> list[Route]:
        protect = self._protected
        return [
            Route("/", protect(self.overview)),
            Route("/jobs", protect(self.jobs)),
            Route("/jobs/{job_id:int}", protect(self.job)),
            Route("/jobs/{job_id:int}/retry", protect(self.retry), methods=["POST"]),
            Route("/jobs/{job_id:int}/keyimage.png", protect(self.key_image)),
            Route("/worklist", protect(self.worklist)),
            Route("/worklist.csv", protect(self.worklist_csv)),
            Route("/metrics", protect(self.prometheus)),
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
        ]

    def _protected(self, endpoint):
        """Every page and /metrics need the secret when web.auth is set; health checks never do."""
        def guarded(request: Request) -> Response:
            if not self.guard.allows(request.headers.get("authorization")):
                return PlainTextResponse("authentication required: see web.auth in the node's configuration\n",
                                         status_code=401, headers={"WWW-Authenticate": self.guard.challenge()})
            return endpoint(request)
        return guarded

    def _page(self, template: str, request: Request, refresh: bool = True, status_code: int = 200,
              **values: Any) -> HTMLResponse:
        html = self.templates.get_template(template).render(
            request=request, refresh_s=self.config.web.refresh_s if refresh else 0, ae_title=self.config.receiver.ae_title,
            show_names=self.config.web.show_patient_names, can_retry=self.guard.enabled, stages=STAGES,
            now=time.time(), **values)
        return HTMLResponse(html, status_code=status_code)

    # pages ------------------------------------------------------------------------------------

    def overview(self, request: Request) -> Response:
        return self._page("overview.html", request, view=status.overview(self.config, self.state, self.live))

    def jobs(self, request: Request) -> Response:
        wanted = request.query_params.get("status", "")
        search = request.query_params.get("q", "").strip()
        page = _page_number(request)
        job_status = JobStatus(wanted) if wanted in set(JobStatus) else None
        rows, total = self.state.job_rows(job_status, search, (page - 1) * PAGE_SIZE, PAGE_SIZE)
        return self._page("jobs.html", request, rows=rows, total=total, page=page, pages=_pages(total),
                          statuses=[str(s) for s in JobStatus], wanted=wanted, search=search,
                          stage_seconds=self._latest_stage_seconds(rows), names=self._names(rows),
                          query=lambda **change: _query(request, **change))

    def job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = self.state.get_job(job_id)
        if job is None:
            return self._page("missing.html", request, refresh=False, status_code=404, job_id=job_id)
        series = self.state.get_series(job.series_uid)
        result = self.state.job_result(job_id)
        figures = worklist_row(series, job_id, result, self.config.measure.low_attenuation_hu) if result else None
        timings = self.state.stage_timings([job_id])
        return self._page("job.html", request, refresh=False, job=job, series=series, figures=figures,
                          levels=_level_table(figures) if figures else None,
                          timings=timings, deliveries=self.state.deliveries(job_id),
                          key_image=key_image_path(self.config.storage, job_id) is not None,
                          name=self._name(job_id, series), message=request.query_params.get("message", ""),
                          file_name=lambda path: Path(path).name)

    def retry(self, request: Request) -> Response:
        """The same as `paraspinal-node retry JOB`; needs web.auth, and refuses requests from other sites."""
        job_id = request.path_params["job_id"]
        if not self.guard.enabled:
            return PlainTextResponse("retry needs web.auth = basic or bearer with web.secret_file: set them, or run "
                                     f"`paraspinal-node retry {job_id}` on the node\n", status_code=403)
        if not _same_origin(request):
            return PlainTextResponse("retry refused: the request came from another site\n", status_code=403)
        try:
            message = self.state.retry(job_id)
        except StateError as exc:
            message = str(exc)
        return RedirectResponse(f"/jobs/{job_id}?{urlencode({'message': message})}", status_code=303)

    def key_image(self, request: Request) -> Response:
        path = key_image_path(self.config.storage, request.path_params["job_id"])
        if path is None:
            return PlainTextResponse("no key image for this job (not made yet, or removed after "
                                     "storage.retention_days)\n", status_code=404)
        width = LARGE_WIDTH if request.query_params.get("size") == "large" else THUMBNAIL_WIDTH
        return Response(thumbnail_png(path, width), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300"})

    def worklist(self, request: Request) -> Response:
        entries, error = self._worklist_entries(request)
        page = _page_number(request)
        shown = [WorklistEntry(row, series, self._name(row["job"], series),
                               key_image_path(self.config.storage, row["job"]) is not None)
                 for row, series in entries[(page - 1) * PAGE_SIZE:page * PAGE_SIZE]]
        summary = [c for c in columns() if c not in IDENTITY_COLUMNS and c != FLAG_COLUMN and not c[:1].isupper()]
        return self._page("worklist.html", request, entries=shown, total=len(entries), page=page,
                          pages=_pages(len(entries)), error=error, summary=summary, flag=FLAG_COLUMN,
                          since=request.query_params.get("from", ""), until=request.query_params.get("to", ""),
                          flagged=request.query_params.get("flagged", "") == "1",
                          query=lambda **change: _query(request, **change),
                          csv_link="/worklist.csv?" + urlencode({k: v for k, v in request.query_params.items()
                                                                 if k != "page"}))

    def worklist_csv(self, request: Request) -> Response:
        entries, error = self._worklist_entries(request)
        if error:
            return PlainTextResponse(error + "\n", status_code=400)
        body = render([row for row, _series in reversed(entries)], "csv")
        name = f"worklist-{time.strftime('%Y%m%d')}.csv"
        return Response(body, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    def _worklist_entries(self, request: Request) -> tuple[list[tuple[dict[str, Any], SeriesRecord]], str]:
        """Newest study first, within the date filter; an unreadable date is named, not ignored."""
        try:
            since = _date(request.query_params.get("from", ""))
            until = _date(request.query_params.get("to", ""))
        except ValueError as exc:
            return [], str(exc)
        flagged = request.query_params.get("flagged", "") == "1"
        entries = []
        for series, job_id, result in reversed(self.state.processed(since)):
            row = worklist_row(series, job_id, result, self.config.measure.low_attenuation_hu)
            if until is not None and series.study_date[:8] > until:
                continue
            if flagged and not row.get(FLAG_COLUMN):
                continue
            entries.append((row, series))
        return entries, ""

    # patient names (only with web.show_patient_names) ---------------------------------------------

    def _names(self, rows: list[JobRow]) -> dict[int, str | None]:
        return {row.job.id: self._name(row.job.id, row.series) for row in rows}

    def _name(self, job_id: int, series: SeriesRecord | None) -> str | None:
        """The patient name from the job's key image or its first spooled image; None unless names are shown."""
        if not self.config.web.show_patient_names:
            return None
        candidates = [key_image_path(self.config.storage, job_id)]
        if series is not None:
            candidates += sorted(Path(series.series_dir).glob("*.dcm"))[:1]
        for path in candidates:
            if path is not None and path.is_file():
                try:
                    return patient_name(path)
                except OSError:
                    continue
        return None

    def _latest_stage_seconds(self, rows: list[JobRow]) -> dict[int, dict[str, float]]:
        """Per job, the seconds of each stage in its latest attempt (deliver: the slowest file)."""
        latest: dict[int, dict[str, float]] = {}
        attempt: dict[int, int] = {}
        for timing in self.state.stage_timings([row.job.id for row in rows]):
            if timing.stage != "deliver" and timing.attempt > attempt.get(timing.job_id, 0):
                attempt[timing.job_id] = timing.attempt
                latest[timing.job_id] = {k: v for k, v in latest.get(timing.job_id, {}).items() if k == "deliver"}
            stages = latest.setdefault(timing.job_id, {})
            stages[timing.stage] = max(stages.get(timing.stage, 0.0), timing.seconds) if timing.stage == "deliver" \
                else timing.seconds
        return latest

    # machine endpoints ----------------------------------------------------------------------------

    def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics), media_type=CONTENT_TYPE_LATEST)

    def healthz(self, request: Request) -> Response:
        """The process answers: for systemd's watchdog or a liveness probe."""
        return PlainTextResponse("ok\n")

    def readyz(self, request: Request) -> Response:
        """200 when every readiness check holds, else 503; one line per check either way."""
        checks = status.readiness(self.config, self.state, self.live)
        ready = all(check.ok for check in checks)
        lines = [f"{'ok' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in checks]
        return PlainTextResponse(("ready\n" if ready else "not ready\n") + "\n".join(lines) + "\n",
                                 status_code=200 if ready else 503)


def make_app(config: Config, state: State, live: status.Live, guard: Guard) -> Starlette:
    return Starlette(routes=Site(config, state, live, guard).routes())


def _level_table(row: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[Any]]]]:
    """The per-level worklist columns (T1_median_hu, L1_bone_hu, ...) as a table: measures across, levels down."""
    measures: list[str] = []
    levels: dict[str, dict[str, Any]] = {}
    for key, value in row.items():
        if key[:1].isupper():
            level, _, measure = key.partition("_")
            levels.setdefault(level, {})[measure] = value
            if measure not in measures:
                measures.append(measure)
    return measures, [(level, [values.get(m) for m in measures]) for level, values in levels.items()]


def _same_origin(request: Request) -> bool:
    """A browser's cross-site form post carries an Origin (or Referer) of the other site; curl carries none."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _date(text: str) -> str | None:
    if not text.strip():
        return None
    try:
        return parse_since(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date: write it as YYYY-MM-DD") from None


def _page_number(request: Request) -> int:
    text = request.query_params.get("page", "1")
    return max(1, int(text)) if text.isdigit() else 1


def _pages(total: int) -> int:
    return max(1, math.ceil(total / PAGE_SIZE))


def _query(request: Request, **change: Any) -> str:
    values = {**request.query_params, **{k: str(v) for k, v in change.items()}}
    return "?" + urlencode({k: v for k, v in values.items() if v != ""})


def _when(timestamp: float | None) -> str:
    return "" if timestamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _label(column: str) -> str:
    return column.replace("_", " ").replace("t1 t10", "T1–T10").replace(" cm3", " (cm³)").replace(" hu", " (HU)")
