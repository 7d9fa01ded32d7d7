"""The DICOM Segmentation: per-level left/right paraspinal muscle, then the vertebrae T1..T10 present.

Segment numbers are fixed for the muscle (T1 left = 1, T1 right = 2, ... T10 right = 20) so
the SR's group i is SEG segment i, as 3D Slicer's QuantitativeReporting assumes. Vertebrae
follow as 21, 22, ... in T1..T10 order, only those present.

BINARY viewers need non-overlapping segments, but adjacent slabs may share a slice, which the
method counts in both levels. In the SEG a shared slice belongs to the upper (more cranial)
level only; the SR keeps the method's numbers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.seg import SegmentAlgorithmTypeValues, SegmentationTypeValues, SegmentDescription
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from scipy import ndimage

from node import __version__
from node.labels import AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, MEASURED_LEVELS, VERTEBRA_LABEL
from node.pipeline.ct import CTVolume
from node.pipeline.segmentation import Segmentation

from . import codes
from .options import EncodeOptions
from .study import character_set, software_versions, source_images

SIDES = ("left", "right")
SIDE_LABEL = {"left": AUTOCHTHON_LEFT, "right": AUTOCHTHON_RIGHT}
MUSCLE_SEGMENTS = 2 * len(MEASURED_LEVELS)


@dataclass(frozen=True)
class SegmentSpec:
    number: int
    level: str
    side: str | None  # None for a vertebra


def muscle_segment_number(level: str, side: str) -> int:
    return 2 * MEASURED_LEVELS.index(level) + 1 + SIDES.index(side)


@dataclass(frozen=True)
class SegmentMap:
    """The SEG's segments and, on the CT grid, the segment number of every voxel (0 = none)."""

    specs: list[SegmentSpec]
    numbers: np.ndarray  # uint8 [k, r, c]


def segment_map(seg: Segmentation, result: dict) -> SegmentMap:
    """Only slab slices and vertebra bounding boxes are visited: a full pass over 10^8 voxels costs seconds."""
    boxes = ndimage.find_objects(seg.labels, max_label=max(VERTEBRA_LABEL.values()))
    present = [level for level in MEASURED_LEVELS if boxes[VERTEBRA_LABEL[level] - 1] is not None]
    specs = [SegmentSpec(muscle_segment_number(level, side), level, side) for level in MEASURED_LEVELS for side in SIDES]
    specs += [SegmentSpec(MUSCLE_SEGMENTS + 1 + i, level, None) for i, level in enumerate(present)]
    numbers = np.zeros(seg.labels.shape, dtype=np.uint8)
    _paint_muscle(numbers, seg.labels, result)
    for spec in specs[MUSCLE_SEGMENTS:]:
        box = boxes[VERTEBRA_LABEL[spec.level] - 1]
        numbers[box][seg.labels[box] == VERTEBRA_LABEL[spec.level]] = spec.number
    return SegmentMap(specs, numbers)


def _paint_muscle(numbers: np.ndarray, labels: np.ndarray, result: dict) -> None:
    """Upper levels are painted last and so win slices shared by two slabs."""
    slabs = {level["level"]: level["slab"] for level in result["levels"] if level.get("slab")}
    for level in reversed(MEASURED_LEVELS):
        if level not in slabs:
            continue
        k = slice(slabs[level]["first_slice"], slabs[level]["last_slice"] + 1)
        part, target = labels[k], numbers[k]
        for side in SIDES:
            target[part == SIDE_LABEL[side]] = muscle_segment_number(level, side)


def build_seg(ct: CTVolume, segments: SegmentMap, result: dict, options: EncodeOptions) -> hd.seg.Segmentation:
    """One SEG in the source study; frame i is derived from source image i (empty frames left out)."""
    sources = source_images(ct)
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=segments.numbers,
        segmentation_type=SegmentationTypeValues.LABELMAP if options.labelmap else SegmentationTypeValues.BINARY,
        segment_descriptions=[_describe(spec, result) for spec in segments.specs],
        series_instance_uid=hd.UID(),
        series_number=options.seg_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=options.manufacturer,
        manufacturer_model_name="paraspinal-node",
        software_versions=software_versions(result),
        device_serial_number="none",
        content_label="PARASPINAL",
        content_description="Paraspinal muscle per level T1-T10 and vertebrae",
        series_description=options.seg_series_description,
        institution_name=options.institution_name,
        transfer_syntax_uid=JPEG2000Lossless if options.jpeg2000 else ExplicitVRLittleEndian,
        omit_empty_frames=True,
        specific_character_set=character_set(sources[0], options.texts()),
    )


def _describe(spec: SegmentSpec, result: dict) -> SegmentDescription:
    if spec.side is None:
        label, property_type, rgb = f"{spec.level} vertebra", codes.VERTEBRA[spec.level], codes.VERTEBRA_RGB
    else:
        label = f"{spec.level} paraspinal muscle {spec.side}"
        property_type, rgb = codes.DEEP_MUSCLE_OF_BACK, codes.side_rgb(spec.level, spec.side)
    description = SegmentDescription(
        segment_number=spec.number,
        segment_label=label,
        segmented_property_category=codes.ANATOMICAL_STRUCTURE,
        segmented_property_type=copy.deepcopy(property_type),  # the modifier below must not reach the shared code
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithms(result, with_node=spec.side is not None),
        tracking_id=label,
        tracking_uid=hd.UID(),
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )
    if spec.side is not None:
        modifier = [codes.LATERALITY[spec.side]]
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = modifier
    return description


def _algorithms(result: dict, with_node: bool) -> hd.AlgorithmIdentificationSequence:
    """TotalSegmentator drew the masks; for the muscle this node cut them into level slabs.

    One item only: highdicom's reader refuses more, although the standard allows them.
    """
    software = result.get("software", {})
    totalseg = f"TotalSegmentator {software.get('totalsegmentator') or 'unknown'}"
    node = f"paraspinal-node {software.get('paraspinal_node') or __version__}"
    if not with_node:
        return hd.AlgorithmIdentificationSequence(
            name="TotalSegmentator", family=codes.ARTIFICIAL_INTELLIGENCE,
            version=software.get("totalsegmentator") or "unknown", source=node, parameters={"task": "total"},
        )
    return hd.AlgorithmIdentificationSequence(
        name="paraspinal-node", family=codes.ARTIFICIAL_INTELLIGENCE,
        version=software.get("paraspinal_node") or __version__, source=totalseg,
        parameters={"segmentation": f"{totalseg} task total", "slab": _slab_rule(result),
                    "shared slice": "upper level only"},
    )


def _slab_rule(result: dict) -> str:
    return str(result.get("method", {}).get("parameters", {}).get("slab", "per level"))
