"""The node's MR masks from TotalSegmentator's total_mr and vertebrae_mr labels (both engines use this).

total_mr holds the autochthon and the discs but all vertebrae as one label, so the levels come
from vertebrae_mr. The result is what node.pipeline.seg_load reads from mask files: the
`total` numbering of node.labels, the autochthon over the vertebrae, the discs as a mask.
"""

from __future__ import annotations

import numpy as np
from totalsegmentator.map_to_binary import class_map

from node.labels import DISCS_CLASS, MR_CLASS_LABEL

MUSCLES = ("autochthon_left", "autochthon_right")


def node_mr_labels(total_mr: np.ndarray, vertebrae_mr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 in the node's numbering, discs bool) from the two tasks' labels on the same grid."""
    lut = np.zeros(256, dtype=np.uint8)
    for index, name in class_map["vertebrae_mr"].items():
        lut[index] = MR_CLASS_LABEL.get(name, 0)  # cervical vertebrae are not measured
    labels = lut[vertebrae_mr.astype(np.uint8)]
    index_of = {name: index for index, name in class_map["total_mr"].items()}
    for name in MUSCLES:
        labels[total_mr == index_of[name]] = MR_CLASS_LABEL[name]
    return labels, total_mr == index_of[DISCS_CLASS]
