"""The series `serve` is still receiving and why each waits, kept in <state_dir>/pending.json.

Written by serve's scheduler when it changes (at most once a second, and at shutdown), read by
`status` and by the next start: a series whose association was open or aborted when serve stopped
was cut off, so after a restart it waits for its sender's resend instead of being completed by the
idle rule. A JSON file rather than a table so the receive path never waits for the database.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from node.durable import write_atomic

log = logging.getLogger(__name__)

PENDING_NAME = "pending.json"
REQUESTS_NAME = "complete-requests"  # `paraspinal-node complete UID` leaves one empty file per series here
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def pending_path(state_dir: Path) -> Path:
    return Path(state_dir) / PENDING_NAME


class WaitReason(StrEnum):
    """Why a received series is not complete yet."""

    OPEN_ASSOCIATION = "open_association"
    ABORTED = "aborted"
    REFUSED = "refused"
    QUIET = "quiet"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]

    @property
    def waits_for_resend(self) -> bool:
        """Cut off: only the sender's resend (or completion.idle_completes_partial) completes it."""
        return self in (WaitReason.ABORTED, WaitReason.REFUSED)


_DESCRIPTIONS = {
    WaitReason.OPEN_ASSOCIATION: "an association carrying it is still open",
    WaitReason.ABORTED: "its association was aborted: waiting for the sender to send it again",
    WaitReason.REFUSED: "instances were refused: waiting for the sender to send them again",
    WaitReason.QUIET: "quiet period before it counts as complete",
}


@dataclass(frozen=True)
class PendingSeries:
    series_uid: str
    study_uid: str
    instances: int  # seen since serve started (a recovered series counts its spooled files)
    reason: WaitReason
    since: float  # wall-clock time first seen: a record for people, never a duration


def write_pending(path: Path, pending: list[PendingSeries]) -> None:
    """Replace the file atomically (0640, like every file of the node)."""
    rows = [{**asdict(p), "reason": str(p.reason)} for p in pending]
    write_atomic(path, (json.dumps({"pending_series": rows}, indent=1) + "\n").encode())


def read_pending(path: Path) -> list[PendingSeries]:
    """The last recorded pending series; none when the file is missing or unreadable (logged)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["pending_series"]
        return [PendingSeries(r["series_uid"], r["study_uid"], int(r["instances"]), WaitReason(r["reason"]),
                              float(r["since"])) for r in rows]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("event=pending_file_unreadable file=%s error=%s", path, exc)
        return []


def request_completion(state_dir: Path, series_uid: str) -> None:
    """Ask serve to process a series that waits for its sender's resend as it is (serve picks it up within a second)."""
    if len(series_uid) > 64 or not _UID.match(series_uid):
        raise ValueError(f"{series_uid[:70]!r} is not a Series Instance UID: copy it from `paraspinal-node status`")
    folder = Path(state_dir) / REQUESTS_NAME
    folder.mkdir(mode=0o750, exist_ok=True)
    write_atomic(folder / series_uid, b"")


def take_completion_requests(state_dir: Path) -> list[str]:
    """The series UIDs asked for since the last call; their request files are removed."""
    folder = Path(state_dir) / REQUESTS_NAME
    try:
        names = [n for n in os.listdir(folder) if _UID.match(n)]
    except FileNotFoundError:
        return []
    for name in names:
        (folder / name).unlink(missing_ok=True)
    return names
