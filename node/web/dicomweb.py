"""The DICOMweb routes `serve` offers to workers on other hosts: WADO-RS of a job's CT, STOW-RS of its results.

Every route is rooted at one job attempt, /dicomweb/jobs/{job_id}/{token}/…, where `token` is the
fencing token of the attempt's claim, so a worker's client library carries it in its base URL. A
request must bring the worker token (`Authorization: Bearer …`, compared in constant time: 401
otherwise) and an attempt that still holds its lease by the database's clock (409 with a one-line
reason otherwise), so a worker that lost its job can neither read the CT again nor leave results.

WADO-RS streams the spooled files of the job's own series as they were received (no decode, one
file in memory at a time); each part names its transfer syntax. STOW-RS takes the SEG, SR and key
image: each part must be a DICOM Part 10 file of the job's study; each is written durably to
<outbox>/job-<id>/attempt-<token>/<SOPInstanceUID>.dcm, then staged as deliveries that become
pending only when the job completes with the same token. A repeated STOW of the same files answers
as the first did (a worker retries after a cut connection); a different file under a stored SOP
Instance UID is refused, so what was acknowledged never changes.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import anyio
import pydicom
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from node.config import Config
from node.delivery.destinations import DicomPeer, configured
from node.durable import make_dirs, write_atomic
from node.state.store import NewDelivery, State

log = logging.getLogger(__name__)

READ_CHUNK = 4 << 20  # a spooled file is read (and sent) in pieces of at most this many bytes
REFUSAL_HEADER = "Paraspinal-Refusal"  # "lease" on a 409 for a lost lease, so a worker can tell it from a conflict
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

# STOW-RS failure reasons (PS3.18 table 10.5.3-1 / PS3.4 C-STORE statuses)
PROCESSING_FAILURE = 0x0110
DUPLICATE_INSTANCE = 0x0111
OUT_OF_RESOURCES = 0xA700
NOT_OF_THIS_STUDY = 0xA900
CANNOT_UNDERSTAND = 0xC000


def attempt_outbox(config: Config, job_id: int, token: int) -> Path:
    """Where the STOWed results of one job attempt are kept until delivered."""
    return config.storage.job_outbox(job_id) / f"attempt-{token}"


@dataclass(frozen=True)
class Stored:
    sop_class_uid: str
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class Failed:
    sop_class_uid: str
    sop_instance_uid: str
    reason: int
    message: str


class Refusal(Exception):
    """A request answered with a status and a one-line reason."""

    def __init__(self, status: int, reason: str, lease: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.lease = lease

    def response(self) -> Response:
        headers = {REFUSAL_HEADER: "lease"} if self.lease else {}
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="paraspinal-node workers"'
        return PlainTextResponse(self.reason + "\n", status_code=self.status, headers=headers)


class DicomwebSite:
    """The worker-facing routes over this serve's state, spool and outbox."""

    def __init__(self, config: Config, state: State, worker_token: bytes) -> None:
        self.config = config
        self.state = state
        self._token = worker_token
        self._peers = [h for h in configured(config) if isinstance(h, DicomPeer)]
        self._max_body = config.dicomweb.max_stow_mb << 20

    def app(self) -> Starlette:
        base = "/dicomweb/jobs/{job_id:int}/{token:int}/studies"
        return Starlette(routes=[
            Route(base + "/{study}/series/{series}", self._guarded(self.retrieve_series), methods=["GET"]),
            Route(base, self._guarded(self.store), methods=["POST"]),
            Route(base + "/{study}", self._guarded(self.store), methods=["POST"]),
        ])

    def _guarded(self, endpoint):
        async def guarded(request: Request) -> Response:
            try:
                self._authenticate(request)
                job_id, token = request.path_params["job_id"], request.path_params["token"]
                await self._check_lease(job_id, token)
                return await endpoint(request, job_id, token)
            except Refusal as refusal:
                if refusal.status != 401:
                    log.warning("event=dicomweb_refused method=%s path=%s status=%d reason=\"%s\"", request.method,
                                request.url.path, refusal.status, refusal.reason)
                return refusal.response()
        return guarded

    def _authenticate(self, request: Request) -> None:
        kind, _, value = request.headers.get("authorization", "").partition(" ")
        if not (kind.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self._token)):
            raise Refusal(401, "worker token required: Authorization: Bearer <the line of dicomweb.token_file>")

    async def _check_lease(self, job_id: int, token: int) -> None:
        try:
            current = await run_in_threadpool(self.state.lease_is_current, job_id, token)
        except Exception as exc:  # StateError, or the database driver's own while it reconnects
            raise _unavailable(exc) from None
        if not current:
            raise Refusal(409, f"job {job_id} attempt {token} does not hold the job's lease (expired, completed or "
                               "claimed again): drop the job", lease=True)

    # WADO-RS ------------------------------------------------------------------------------------

    async def retrieve_series(self, request: Request, job_id: int, token: int) -> Response:
        _check_accept(request.headers.get("accept", ""))
        files = await run_in_threadpool(self._series_files, job_id, request.path_params["study"],
                                        request.path_params["series"])
        boundary = secrets.token_hex(16)
        log.info("event=dicomweb_retrieve job=%d attempt=%d instances=%d", job_id, token, len(files))
        return StreamingResponse(_multipart(files, boundary.encode()),
                                 media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')

    def _series_files(self, job_id: int, study_uid: str, series_uid: str) -> list[Path]:
        """The job's series, or another series of its study in this serve's spool (a Dixon pair's partner)."""
        job = self.state.get_job(job_id)
        own = self.state.get_series(job.series_uid) if job is not None else None
        wanted = self.state.get_series(series_uid) if own is not None else None
        if wanted is None or study_uid != own.study_uid or wanted.study_uid != own.study_uid or wanted.serve != own.serve:
            raise Refusal(404, f"series {series_uid} of study {study_uid} is not of job {job_id}'s study on this serve")
        folder = Path(wanted.series_dir)
        files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
        if not files:
            raise Refusal(404, f"series {series_uid} has no files in this serve's spool ({folder}): removed?")
        return files

    # STOW-RS ------------------------------------------------------------------------------------

    async def store(self, request: Request, job_id: int, token: int) -> Response:
        boundary = _boundary(request.headers.get("content-type", ""))
        body = await self._read_body(request)
        parts = _split_multipart(body, boundary)
        if not parts:
            raise Refusal(400, "the STOW-RS body holds no parts")
        stored, failed = await run_in_threadpool(self._store_parts, job_id, token, request.path_params.get("study"),
                                                 parts)
        if stored:
            staged = [NewDelivery(peer.key, str(item.path)) for item in stored for peer in self._peers]
            try:
                current = await run_in_threadpool(self.state.stage_deliveries, job_id, token, staged)
            except Exception as exc:
                raise _unavailable(exc) from None
            if not current:
                raise Refusal(409, f"job {job_id} attempt {token} lost its lease while storing: nothing staged, "
                                   "drop the job", lease=True)
        log.info("event=dicomweb_stored job=%d attempt=%d stored=%d failed=%d deliveries_staged=%d", job_id, token,
                 len(stored), len(failed), len(stored) * len(self._peers))
        status = 200 if not failed else 202 if stored else 409
        headers = {"Warning": f'299 paraspinal-node "{_header_text(failed[0].message)}"'} if failed else {}
        return Response(json.dumps(_stow_response(stored, failed)).encode(), status_code=status,
                        media_type="application/dicom+json", headers=headers)

    async def _read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self._max_body):
            raise Refusal(413, f"the STOW-RS body is larger than dicomweb.max_stow_mb = {self.config.dicomweb.max_stow_mb}")
        chunks, total = [], 0
        try:
            with anyio.fail_after(self.config.dicomweb.timeout_s):
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > self._max_body:
                        raise Refusal(413, "the STOW-RS body is larger than dicomweb.max_stow_mb = "
                                           f"{self.config.dicomweb.max_stow_mb}")
                    chunks.append(chunk)
        except TimeoutError:
            raise Refusal(408, f"the STOW-RS body did not arrive within dicomweb.timeout_s = "
                               f"{self.config.dicomweb.timeout_s:g} s") from None
        except ClientDisconnect:
            raise Refusal(400, "the worker disconnected before the whole body arrived: nothing stored") from None
        return b"".join(chunks)

    def _store_parts(self, job_id: int, token: int, study_in_path: str | None,
                     parts: list[tuple[dict[str, str], memoryview]]) -> tuple[list[Stored], list[Failed]]:
        job = self.state.get_job(job_id)
        series = self.state.get_series(job.series_uid) if job is not None else None
        if series is None:
            raise Refusal(404, f"job {job_id} or its series is not known to this serve")
        if study_in_path is not None and study_in_path != series.study_uid:
            raise Refusal(404, f"study {study_in_path} is not job {job_id}'s study")
        folder = attempt_outbox(self.config, job_id, token)
        stored: list[Stored] = []
        failed: list[Failed] = []
        for headers, content in parts:
            outcome = self._store_one(headers, content, series.study_uid, folder)
            (stored if isinstance(outcome, Stored) else failed).append(outcome)
            if isinstance(outcome, Failed):
                log.warning("event=dicomweb_instance_refused job=%d attempt=%d sop=%s reason=\"%s\"", job_id, token,
                            outcome.sop_instance_uid or "-", outcome.message)
        return stored, failed

    def _store_one(self, headers: dict[str, str], content: memoryview, study_uid: str,
                   folder: Path) -> Stored | Failed:
        media_type = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if media_type != "application/dicom":
            return Failed("", "", CANNOT_UNDERSTAND, f"a part is {media_type}, not application/dicom")
        if len(content) < 132 or bytes(content[128:132]) != b"DICM":
            return Failed("", "", CANNOT_UNDERSTAND, "a part is not a DICOM Part 10 file (no DICM preamble)")
        raw = bytes(content)
        try:
            ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
            sop_class, sop_uid, study = (str(ds.get(k, "")) for k in ("SOPClassUID", "SOPInstanceUID",
                                                                       "StudyInstanceUID"))
        except Exception as exc:  # pydicom raises many kinds on malformed input
            return Failed("", "", CANNOT_UNDERSTAND, f"a part cannot be read as DICOM: {exc}")
        for value, keyword in ((sop_class, "SOPClassUID"), (sop_uid, "SOPInstanceUID")):
            if not (0 < len(value) <= 64 and _UID.match(value)):
                return Failed(sop_class, sop_uid, CANNOT_UNDERSTAND, f"{keyword} {value!r} is not a UID")
        if study != study_uid:
            return Failed(sop_class, sop_uid, NOT_OF_THIS_STUDY, f"study {study} is not the job's study {study_uid}")
        target = folder / f"{sop_uid}.dcm"
        try:
            if target.exists():
                if target.read_bytes() == raw:
                    return Stored(sop_class, sop_uid, target)  # the same STOW again: already durable
                return Failed(sop_class, sop_uid, DUPLICATE_INSTANCE,
                              f"{sop_uid} was already stored for this attempt with other content")
            make_dirs(folder, self.config.storage.state_dir)
            write_atomic(target, raw)
        except OSError as exc:
            log.error("event=dicomweb_store_failed file=%s reason=\"%s\"", target, exc.strerror or exc)
            return Failed(sop_class, sop_uid, OUT_OF_RESOURCES, f"cannot write {target.name}: {exc.strerror or exc}")
        return Stored(sop_class, sop_uid, target)


def _header_text(text: str) -> str:
    """One line of printable ASCII without quotes, fit for a header value."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)[:300]


def _unavailable(exc: Exception) -> Refusal:
    text = str(exc).strip().splitlines()
    return Refusal(503, f"the state database is unavailable, try again ({text[0] if text else type(exc).__name__})")


def _check_accept(accept: str) -> None:
    """The series is returned as stored: multipart/related application/dicom, any (or no named) transfer syntax."""
    if not accept.strip():
        return
    for item in accept.split(","):
        media, *params = [p.strip() for p in item.split(";")]
        values = {k.strip().lower(): v.strip().strip('"') for k, _, v in (p.partition("=") for p in params)}
        if media in ("*/*", "multipart/*") or (media == "multipart/related" and values.get("type", "application/dicom")
                                                 in ("application/dicom", "*/*")):
            return
    raise Refusal(406, 'this route sends instances as stored: Accept multipart/related; type="application/dicom"; '
                       "transfer-syntax=*")


def _multipart(files: list[Path], boundary: bytes) -> Iterator[bytes]:
    """The series as a multipart/related body, one file in memory at a time.

    A file that vanishes mid-stream (pruned) raises, which cuts the connection: the worker sees a
    broken transfer, never a short series that looks whole.
    """
    for path in files:
        with open(path, "rb") as file:
            data = file.read(READ_CHUNK)
            syntax = _transfer_syntax(data)
            header = b"--" + boundary + b"\r\nContent-Type: application/dicom" + (
                b"; transfer-syntax=" + syntax.encode() if syntax else b"") + b"\r\n\r\n"
            yield header + data
            while data := file.read(READ_CHUNK):
                yield data
        yield b"\r\n"
    yield b"--" + boundary + b"--\r\n"


def _transfer_syntax(head: bytes) -> str | None:
    """(0002,0010) from a Part 10 file's meta group (always explicit VR little endian); None when absent."""
    if head[128:132] != b"DICM":
        return None
    offset = 132
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 2:
            return None
        vr = head[offset + 4:offset + 6]
        if vr in _LONG_VRS:
            (length,), start = struct.unpack_from("<I", head, offset + 8), offset + 12
        else:
            (length,), start = struct.unpack_from("<H", head, offset + 6), offset + 8
        if element == 0x0010:
            value = head[start:start + length].rstrip(b"\x00 ").decode("ascii", "replace")
            return value if _UID.match(value) else None
        offset = start + length
    return None


def _boundary(content_type: str) -> bytes:
    media, *params = [p.strip() for p in content_type.split(";")]
    values = {k.strip().lower(): v.strip().strip('"') for k, _, v in (p.partition("=") for p in params)}
    if media.lower() != "multipart/related" or values.get("type", "application/dicom").lower() != "application/dicom":
        raise Refusal(415, 'STOW-RS takes multipart/related; type="application/dicom", not ' + (media or "no type"))
    if not values.get("boundary"):
        raise Refusal(400, "the multipart Content-Type has no boundary")
    return values["boundary"].encode()


def _split_multipart(body: bytes, boundary: bytes) -> list[tuple[dict[str, str], memoryview]]:
    """The parts of a multipart body (RFC 2046) as (lower-cased headers, content), without copying content."""
    delimiter = b"--" + boundary
    view = memoryview(body)
    position = body.find(delimiter)
    if position < 0:
        raise Refusal(400, "the multipart body does not contain its boundary")
    parts = []
    position += len(delimiter)
    while body[position:position + 2] != b"--":
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise Refusal(400, "the multipart body ends inside a boundary line")
        start = line_end + 2
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise Refusal(400, "the multipart body is cut off: its closing boundary is missing")
        if body.startswith(b"\r\n", start):
            headers_end, content_start = start, start + 2
        else:
            headers_end = body.find(b"\r\n\r\n", start, end)
            if headers_end < 0:
                raise Refusal(400, "a multipart part has no blank line after its headers")
            content_start = headers_end + 4
        headers = {}
        for line in body[start:headers_end].decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, view[content_start:end]))
        position = end + 2 + len(delimiter)
    return parts


def _stow_response(stored: list[Stored], failed: list[Failed]) -> dict:
    """The STOW-RS response data set in DICOM JSON (PS3.18 10.5.3)."""
    def uids(item: Stored | Failed) -> dict:
        return {"00081150": {"vr": "UI", "Value": [item.sop_class_uid]} if item.sop_class_uid else {"vr": "UI"},
                "00081155": {"vr": "UI", "Value": [item.sop_instance_uid]} if item.sop_instance_uid else {"vr": "UI"}}

    answer: dict = {}
    if stored:
        answer["00081199"] = {"vr": "SQ", "Value": [uids(item) for item in stored]}
    if failed:
        answer["00081198"] = {"vr": "SQ", "Value": [
            {**uids(item), "00081197": {"vr": "US", "Value": [item.reason]}} for item in failed]}
    return answer
