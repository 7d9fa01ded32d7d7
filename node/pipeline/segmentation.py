"""The segmentation the measurement needs, on the CT grid, and why a segmenter may have none yet."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Segmentation:
    """Masks on the CT grid, indexed [k, r, c] like `CTVolume.hu`.

    `labels` uses TotalSegmentator's `total` numbering (see node.labels); `body` is the
    `vertebrae_body` class of the `vertebrae_body` task, or None when it was not run.
    """

    labels: np.ndarray  # uint8
    body: np.ndarray | None = None  # bool
    totalsegmentator_version: str | None = None
    discs: np.ndarray | None = None  # bool, MR only: total_mr's intervertebral_discs (lumbosacral QC)


class SegmenterError(Exception):
    """Segmentation of one CT failed; the message says why and what to do."""


class NotReadyError(SegmenterError):
    """Something the segmenter needs is not there yet; the node holds the job until it is."""


class WeightsMissingError(NotReadyError):
    """Required TotalSegmentator model folders are not installed."""


class PrecomputedMissingError(NotReadyError):
    """The segmentation made elsewhere for this series has not arrived yet."""
