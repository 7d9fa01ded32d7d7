"""Where the receiver keeps the SRs a C-MOVE for priors brought, until the worker that asked reads them.

A C-MOVE's sub-operations arrive at the node's own AE on a separate association the PACS opens, so
the worker cannot receive them itself: the receiver (node.ingest.receiver) hands every SR that
comes from the configured PACS, by its AE title and address, to this inbox instead of the spool.
They never start a job. The worker takes them by series once the C-MOVE has answered.
"""

from __future__ import annotations

import logging
import socket
import time
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from node.config import Config
from node.durable import make_dirs, write_atomic

log = logging.getLogger(__name__)

SR_STORAGE = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR: what the node writes
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR: what a PACS may have converted it to
})
STALE_S = 3600.0  # files a worker never took (it timed out) are removed after this


class PriorsInbox:
    def __init__(self, folder: Path, pacs_ae: str, pacs_addresses: frozenset[str]) -> None:
        self.folder = folder
        self._pacs_ae = pacs_ae.strip()
        self._addresses = pacs_addresses

    @classmethod
    def from_config(cls, config: Config) -> PriorsInbox | None:
        """None without a PACS in [priors]; the PACS host is resolved once, here."""
        priors = config.priors
        if not priors.pacs:
            return None
        return cls(inbox_folder(config), priors.ae_title, _addresses(priors.host))

    def accepts(self, calling_ae: str, address: str, sop_class: str) -> bool:
        """An SR from the configured PACS: its AE title and one of its host's addresses."""
        host = address.removeprefix("::ffff:")
        return sop_class in SR_STORAGE and calling_ae.strip() == self._pacs_ae and host in self._addresses

    def put(self, sop_uid: str, parts: list[bytes | memoryview]) -> None:
        """One received SR as a Part 10 file in its series' folder, renamed into place when complete.

        Raises ValueError when the data set names no series."""
        data = b"".join(bytes(part) for part in parts)
        header = pydicom.dcmread(BytesIO(data), specific_tags=["SeriesInstanceUID"])
        series_uid = str(header.get("SeriesInstanceUID", "") or "")
        if not series_uid:
            raise ValueError("the SR has no SeriesInstanceUID")
        folder = self.folder / _safe(series_uid)
        make_dirs(folder)
        write_atomic(folder / f"{_safe(sop_uid)}.dcm", data)

    def take(self, series_uids: list[str]) -> list[Dataset]:
        """The SRs received for these series, removed from the inbox as they are read."""
        found = []
        for series_uid in series_uids:
            folder = self.folder / _safe(series_uid)
            for path in sorted(folder.glob("*.dcm")) if folder.is_dir() else []:
                found.append(pydicom.dcmread(path))
                path.unlink(missing_ok=True)
        self.sweep()
        return found

    def sweep(self, max_age_s: float = STALE_S) -> None:
        """Remove what no worker took: a C-MOVE that answered after its job had given up."""
        cutoff = time.time() - max_age_s
        for path in self.folder.glob("*/*.dcm") if self.folder.is_dir() else []:
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)


def inbox_folder(config: Config) -> Path:
    return config.storage.state_dir / "priors-inbox"


def _addresses(host: str) -> frozenset[str]:
    try:
        return frozenset(info[4][0] for info in socket.getaddrinfo(host, None))
    except OSError as exc:
        log.warning("event=priors_host_unresolved reason=%r", f"{host}: {exc}: retrieved SRs will be refused")
        return frozenset()


def _safe(uid: str) -> str:
    """A UID as a file name: digits and dots only, whatever a peer sent."""
    return "".join(c for c in uid if c.isdigit() or c == ".")[:64] or "unnamed"
