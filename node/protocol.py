"""Which levels a series reports: its protocol, from the header or else from the field of view.

A protocol (node.config `[[protocols]]`) is chosen by the header, the most structured value
first: the first protocol whose `body_part` pattern matches BodyPartExamined, else the first
whose `description` pattern matches SeriesDescription, then StudyDescription, then ProtocolName.
A series none matches (a vendor's PARTIALBODY, no description, NIfTI input) takes the protocol
whose levels hold the most segmented vertebrae, the first listed on a tie: an abdominal CT
without words is known by the lumbar spine in its field of view.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from pydicom.dataset import Dataset

from node.config import ProtocolConfig

_DESCRIPTIONS = ("SeriesDescription", "StudyDescription", "ProtocolName")


@dataclass(frozen=True)
class Choice:
    """The protocol and why it was chosen, for the log and the reader."""

    protocol: ProtocolConfig
    reason: str


def protocol_by_header(header: Dataset, protocols: list[ProtocolConfig]) -> Choice | None:
    """The protocol the header alone names (also a backfill's C-FIND answer); None if no pattern matches."""
    for keyword in ("BodyPartExamined", *_DESCRIPTIONS):
        text = " ".join(str(header.get(keyword, "") or "").split())
        for protocol in protocols:
            pattern = protocol.body_part if keyword == "BodyPartExamined" else protocol.description
            if text and pattern and re.search(pattern, text):
                return Choice(protocol, f"{keyword} {text}")
    return None


def choose_protocol(header: Dataset | None, present: Collection[str], protocols: list[ProtocolConfig]) -> Choice:
    """`present`: the levels whose vertebra was segmented; `header`: any instance (None for NIfTI)."""
    chosen = protocol_by_header(header, protocols) if header is not None else None
    if chosen is not None:
        return chosen
    counts = [sum(level in present for level in protocol.levels) for protocol in protocols]
    best = protocols[counts.index(max(counts))]
    return Choice(best, f"field of view: {max(counts)} of its levels segmented")

