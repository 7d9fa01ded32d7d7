"""The node's earlier SRs at a PACS, what a lookup asks and finds (node/priors/retrieve.py asks it).

Every step is bounded by one deadline (`[priors] timeout_s`) and the number of series
(`max_series`); connect, association and every DIMSE message wait at most the time left. A PACS
that is down, refuses or is too slow raises PacsUnavailable with the reason, which the job
records as "priors not checked"; it never fails the job. C-GET is tried first (the SRs come back
on the same association); a PACS that refuses it (no C-GET context, or a failure status) is asked
for a C-MOVE to the node's receiver, which keeps what arrives in the priors inbox.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


class PacsUnavailable(Exception):
    """The PACS could not be asked or did not answer in time; the message says why."""


class RetrieveRefused(Exception):
    """The PACS does not allow this way of retrieving (C-GET), so the other is tried."""


@dataclass(frozen=True)
class Pacs:
    ae_title: str
    host: str
    port: int

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class SeriesQuery:
    """The node's own SR series of one patient: the C-FIND keys."""

    patient_id: str
    issuer_of_patient_id: str
    series_description: str
    manufacturer: str


@dataclass(frozen=True)
class FoundSeries:
    study_uid: str
    series_uid: str
    study_date: str


class Deadline:
    """The time one lookup may take, shared by its associations."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise PacsUnavailable("no answer within priors.timeout_s")
        return left


