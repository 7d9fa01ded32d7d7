"""A remote worker's side of DICOMweb: fetch a job's CT from the serve that holds it, STOW the results back.

Both go through the `dicomweb-client` library, at a base URL rooted at one job attempt,
<serve url>/dicomweb/jobs/<job id>/<fencing token>, so serve checks the attempt's lease on every
request. Every failure to move the data raises `TransferError` (its subclass `LeaseLost` when serve
says the attempt no longer holds its lease: the worker drops the job, nothing it did counts).
Connection errors, cuts and 5xx answers are retried a few times with backoff (serve may be
restarting); a STOW retried after a cut is answered as the first one was.

`fetch_series` streams the series (WADO-RS, instances as stored: no transcoding on either side)
and writes each instance as received into a folder the CT loader reads.
"""

from __future__ import annotations

import io
import logging
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pydicom
import requests
from dicomweb_client import DICOMwebClient

from node.config import DicomwebConfig

log = logging.getLogger(__name__)
# dicomweb-client's `retrying` logs every failed request as a multi-line traceback warning; this module
# retries itself and logs one line per retry (event=dicomweb_retry).
logging.getLogger("retrying").setLevel(logging.ERROR)

CONNECT_TIMEOUT_S = 10.0
CHUNK_BYTES = 4 << 20  # what the library reads from the socket at a time while streaming
RETRIED_STATUSES = {408, 429, 500, 502, 503, 504}
SERIES_MEDIA_TYPES = (("application/dicom", "*"),)  # as stored: no transcoding
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
T = TypeVar("T")


class TransferError(Exception):
    """A fetch or store that did not complete; the message names the job, what failed and why."""


class LeaseLost(TransferError):
    """serve refused the request because this job attempt no longer holds its lease: drop the job."""


class TokenError(Exception):
    """The worker token file cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class ClientSettings:
    """How a worker reaches serves: the worker token and the TLS material of `[dicomweb]`."""

    token: str
    ca_certificates: Path | None = None  # serve's CA; None: the system's CAs
    client_certificate: Path | None = None
    client_private_key: Path | None = None
    timeout_s: float = 60.0  # read timeout: no byte for this long counts as a cut
    attempts: int = 4  # tries of one fetch or store before TransferError
    backoff_s: float = 1.0  # before the second try; doubled each time

    @classmethod
    def from_config(cls, dicomweb: DicomwebConfig) -> ClientSettings:
        """The worker's settings from its `[dicomweb]` section; TokenError without a usable token_file."""
        if dicomweb.token_file is None:
            raise TokenError("dicomweb.token_file is not set: a worker on another host needs the worker token "
                             "that its serve checks (the same one-line file)")
        token = read_token(dicomweb.token_file, "dicomweb.token_file").decode()
        return cls(token, dicomweb.ca_certificates, dicomweb.client_certificate, dicomweb.client_private_key,
                   dicomweb.timeout_s)


def read_token(path: Path, key: str) -> bytes:
    """The token on the first line of `path`; refuses a missing, empty or world-readable file."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        token = path.read_bytes().strip()
    except OSError as exc:
        raise TokenError(f"{key} {path} cannot be read ({exc.strerror or exc}): create it with the worker token on "
                         "one line, readable by the service user only") from None
    if mode & stat.S_IRWXO:
        raise TokenError(f"{key} {path} can be read by every user on this host: chmod 600 {path}")
    if not token or b"\n" in token:
        raise TokenError(f"{key} {path} must hold the worker token on one line (e.g. `openssl rand -hex 32`)")
    return token


def job_url(base_url: str, job_id: int, token: int) -> str:
    """The DICOMweb root of one job attempt on the serve at `base_url`."""
    return f"{base_url.rstrip('/')}/dicomweb/jobs/{int(job_id)}/{int(token)}"


def fetch_series(base_url: str, job, series, into: Path, settings: ClientSettings) -> int:
    """WADO-RS the job's series from serve into `into` (created), one <SOPInstanceUID>.dcm per instance.

    `job` needs .id and .token, `series` .study_uid, .series_uid and .instances (the series record).
    Returns the number of instances written; TransferError when the transfer was cut, fewer than the
    series record's instances arrived or one of another series did; LeaseLost when serve says the
    attempt lost its lease.
    """
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    what = f"fetch of series {series.series_uid} for job {job.id}"
    written: list[Path] = []

    def once() -> int:
        _remove(written)
        client = _client(job_url(base_url, job.id, job.token), settings)
        count = 0
        started = time.monotonic()
        for ds in client.iter_series(series.study_uid, series.series_uid, media_types=SERIES_MEDIA_TYPES):
            sop_uid = str(ds.get("SOPInstanceUID", ""))
            if not _UID.match(sop_uid) or len(sop_uid) > 64:
                raise TransferError(f"{what}: serve sent an instance without a valid SOP Instance UID")
            if ds.get("SeriesInstanceUID") != series.series_uid:
                raise TransferError(f"{what}: serve sent an instance of series {ds.get('SeriesInstanceUID')}")
            written.append(into / f"{sop_uid}.dcm")
            _write_as_received(ds, written[-1])
            count += 1
        if count < series.instances:  # more is a series that grew since: the local worker would read them all too
            raise TransferError(f"{what}: {count} of {series.instances} instances arrived")
        log.info("event=series_fetched job=%d series=%s instances=%d seconds=%.2f", job.id, series.series_uid, count,
                 time.monotonic() - started)
        return count

    try:
        return _with_retries(what, settings, once)
    except TransferError:
        _remove(written)
        raise


def store_results(base_url: str, job, files: list[Path], settings: ClientSettings) -> list[str]:
    """STOW-RS the job's result files (SEG, SR, key image) to serve; returns their SOP Instance UIDs.

    Returns only when serve answered that every file is stored durably and staged for delivery;
    TransferError otherwise (LeaseLost when the attempt lost its lease: complete nothing).
    """
    what = f"store of {len(files)} result file(s) for job {job.id}"
    datasets = [pydicom.dcmread(path) for path in files]
    wanted = [str(ds.SOPInstanceUID) for ds in datasets]
    study = {str(ds.StudyInstanceUID) for ds in datasets}
    if len(study) != 1:
        raise TransferError(f"{what}: the files belong to {len(study)} studies, not one")

    (study_uid,) = study

    def once() -> list[str]:
        client = _client(job_url(base_url, job.id, job.token), settings)
        return _check_stored(what, client.store_instances(datasets, study_instance_uid=study_uid), wanted)

    return _with_retries(what, settings, once)


def _write_as_received(ds: pydicom.FileDataset, path: Path) -> None:
    """The instance's bytes exactly as serve sent them (the library parsed them from an in-memory buffer,
    which pydicom keeps as `ds.buffer`), without encoding the data set again; a plain write, as the
    folder is a scratch copy."""
    buffer = getattr(ds, "buffer", None)
    if isinstance(buffer, io.BytesIO):
        with open(path, "wb") as file:
            file.write(buffer.getbuffer())
    else:  # a library version that reads otherwise: encode the data set as read
        ds.save_as(path, enforce_file_format=False)


def _check_stored(what: str, answer: pydicom.Dataset, wanted: list[str]) -> list[str]:
    stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("ReferencedSOPSequence", [])}
    failures = [f"{item.get('ReferencedSOPInstanceUID', '?')} (0x{int(item.get('FailureReason', 0)):04X})"
                for item in answer.get("FailedSOPSequence", [])]
    missing = [uid for uid in wanted if uid not in stored]
    if missing:
        detail = f"; refused: {', '.join(failures)}" if failures else ""
        raise TransferError(f"{what}: serve did not store {len(missing)} of {len(wanted)} instance(s){detail}")
    return wanted


class _Retry(Exception):
    """A failure worth another try (connection, cut, 5xx)."""


def _with_retries(what: str, settings: ClientSettings, once: Callable[[], T]) -> T:
    delay = settings.backoff_s
    for attempt in range(1, settings.attempts + 1):
        try:
            try:
                return once()
            except requests.HTTPError as exc:
                raise _http_error(what, exc) from None
            except requests.exceptions.SSLError as exc:
                raise TransferError(f"{what}: TLS failed ({_short(exc)}): check dicomweb.ca_certificates and the "
                                    "client certificate") from None
            except (requests.RequestException, OSError) as exc:
                raise _Retry(f"{what}: connection failed or was cut ({_short(exc)})") from None
            except (pydicom.errors.InvalidDicomError, EOFError, ValueError, KeyError) as exc:
                raise _Retry(f"{what}: an instance arrived unreadable ({_short(exc)})") from None
        except _Retry as exc:
            if attempt == settings.attempts:
                raise TransferError(f"{exc} after {attempt} tries") from None
            log.warning("event=dicomweb_retry what=\"%s\" try=%d reason=\"%s\" next_in_s=%.1f", what, attempt, exc,
                        delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _http_error(what: str, exc: requests.HTTPError) -> Exception:
    response = exc.response
    status = response.status_code if response is not None else 0
    reason = _reason(response)
    if status == 409 and response is not None and response.headers.get("Paraspinal-Refusal") == "lease":
        return LeaseLost(f"{what}: {reason}")
    if status in RETRIED_STATUSES:
        return _Retry(f"{what}: serve answered {status} {reason}")
    if status == 401:
        return TransferError(f"{what}: serve refused the worker token (401): make dicomweb.token_file the same "
                             "on serve and worker")
    if status == 409 and response is not None and "json" in response.headers.get("content-type", ""):
        return TransferError(f"{what}: serve stored none of the instances: {reason}")
    return TransferError(f"{what}: serve answered {status}: {reason}")


def _reason(response: requests.Response | None) -> str:
    if response is None:
        return "no response"
    if "json" in response.headers.get("content-type", ""):  # a STOW-RS answer: the refused instances and why
        warning = response.headers.get("Warning", "").partition('"')[2].rstrip('"')
        try:
            answer = pydicom.Dataset.from_json(response.json())
            failed = [f"{item.get('ReferencedSOPInstanceUID', '?')} (0x{int(item.get('FailureReason', 0)):04X})"
                      for item in answer.get("FailedSOPSequence", [])]
        except (ValueError, TypeError, KeyError):
            failed = []
        return "; ".join(filter(None, [", ".join(failed), warning])) or response.reason
    return response.text.strip().splitlines()[0][:300] if response.text.strip() else response.reason


class _Session(requests.Session):
    """requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's CA file; dicomweb.ca_certificates wins."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # noqa: ANN001, ANN201
        merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self.verify is not True:
            merged["verify"] = self.verify
        return merged


def _client(url: str, settings: ClientSettings) -> DICOMwebClient:
    session = _Session()
    session.verify = str(settings.ca_certificates) if settings.ca_certificates is not None else True
    if settings.client_certificate is not None:
        session.cert = (str(settings.client_certificate), str(settings.client_private_key))
    client = DICOMwebClient(url, session=session, headers={"Authorization": f"Bearer {settings.token}"},
                            chunk_size=CHUNK_BYTES, timeout=(CONNECT_TIMEOUT_S, settings.timeout_s))
    client.set_http_retry_params(retry=False)  # retried here, around the whole transfer
    return client


def _remove(written: list[Path]) -> None:
    """Remove what an earlier, broken try wrote, so a short series never looks whole."""
    for path in written:
        path.unlink(missing_ok=True)
    written.clear()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
