"""SEG segments for what the node measures besides muscle: each vertebra's trabecular bone and organ parenchyma.

They follow the muscle and vertebra segments, numbered on from the last, and hold exactly the
voxels their SR groups measured (the same mask functions make both). A trabecular mask lies
inside its vertebra's segment, so the SEG's segments overlap (SegmentsOverlap YES). Their frames
are made by highdicom, in a SEG of their own from the same source images (hence the same
dimension index values for each position), and appended to the main SEG renumbered.

A LABELMAP SEG cannot hold overlapping segments; it carries the muscle and vertebrae only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.seg import SegmentAlgorithmTypeValues, SegmentationTypeValues, SegmentDescription
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from scipy import ndimage

from node.labels import AUTOCHTHON_RIGHT, LIVER, SPLEEN, VERTEBRA_LABEL
from node.pipeline.bone import trabecular_mask
from node.pipeline.ct import CTVolume
from node.pipeline.liver import OrganResult, parenchyma_mask
from node.pipeline.measure import MeasurementResult
from node.pipeline.segmentation import Segmentation
from node.screening import LevelStatus

from . import codes
from .options import EncodeOptions
from .seg import seg_equipment
from .study import source_images

BONE_RGB = (250, 250, 210)
ORGAN_RGB = {"liver": (221, 130, 101), "spleen": (157, 108, 162)}
REFERENCED_SEGMENT_NUMBER = 0x0062000B


def trabecular_label(level: str) -> str:
    """The segment label and the SR group's tracking identifier: how the SR finds the segment."""
    return f"{level} vertebral body trabecular bone"


def parenchyma_label(organ: str) -> str:
    return f"{organ} parenchyma"


@dataclass(frozen=True)
class _Extra:
    label: str
    property_type: CodedConcept
    region: CodedConcept
    rgb: tuple[int, int, int]


def append_bone_and_organ_segments(main: Dataset, ct: CTVolume, seg: Segmentation, result: MeasurementResult,
                                   options: EncodeOptions, boxes: list | None = None) -> None:
    """Add the trabecular and parenchyma segments to `main` (a BINARY SEG built by build_seg).

    `boxes`: ndimage.find_objects(seg.labels) through AUTOCHTHON_RIGHT at least (SegmentMap.boxes),
    to spare a pass over the volume.
    """
    if options.results.labelmap:
        return
    extras, numbers = _label_map(ct, seg, result, boxes)
    if not extras or not numbers.any():
        return
    other = hd.seg.Segmentation(
        source_images=source_images(ct),
        pixel_array=numbers,
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=[_describe(i + 1, extra, result) for i, extra in enumerate(extras)],
        series_instance_uid=main.SeriesInstanceUID,
        series_number=main.SeriesNumber,
        sop_instance_uid=hd.UID(),
        **seg_equipment(result.software),
        transfer_syntax_uid=main.file_meta.TransferSyntaxUID,
        omit_empty_frames=True,
    )
    _merge(main, other, offset=len(main.SegmentSequence))


def _label_map(ct: CTVolume, seg: Segmentation, result: MeasurementResult,
               boxes: list | None) -> tuple[list[_Extra], np.ndarray]:
    """Trabecular masks and organ parenchyma never overlap each other: one label map holds them all."""
    if boxes is None or len(boxes) < AUTOCHTHON_RIGHT:
        boxes = ndimage.find_objects(seg.labels, max_label=AUTOCHTHON_RIGHT)
    numbers = np.zeros(ct.shape, np.uint8)
    extras: list[_Extra] = []
    low, high = float(result.method.parameters["body_hu_min"]), float(result.method.parameters["body_hu_max"])
    for vertebra in result.vertebrae:
        box = boxes[VERTEBRA_LABEL[vertebra.level] - 1]
        if vertebra.status is LevelStatus.ABSENT or box is None:
            continue
        extras.append(_Extra(trabecular_label(vertebra.level), codes.VERTEBRAL_BODY, codes.VERTEBRA[vertebra.level], BONE_RGB))
        numbers[box][trabecular_mask(ct, seg, vertebra.level, box, low, high)] = len(extras)
    if result.liver is not None:
        erosion = float(result.method.parameters["organ_erosion_mm"])
        for name, label, site, organ in (("liver", LIVER, codes.LIVER, result.liver),
                                         ("spleen", SPLEEN, codes.SPLEEN, result.liver.spleen)):
            if _has_parenchyma(organ) and boxes[label - 1] is not None:
                extras.append(_Extra(parenchyma_label(name), codes.PARENCHYMA, site, ORGAN_RGB[name]))
                box = boxes[label - 1]
                numbers[box][parenchyma_mask(ct, seg, label, box, erosion, organ.window_hu)] = len(extras)
    return extras, numbers


def _has_parenchyma(organ: OrganResult) -> bool:
    return organ.window_hu is not None and organ.parenchyma.voxels > 0


def _describe(number: int, extra: _Extra, result: MeasurementResult) -> SegmentDescription:
    node, totalseg = f"paraspinal-node {result.software.paraspinal_node}", result.software.totalsegmentator or "unknown"
    return SegmentDescription(
        segment_number=number,
        segment_label=extra.label,
        segmented_property_category=codes.ANATOMICAL_STRUCTURE,
        segmented_property_type=copy.deepcopy(extra.property_type),
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="paraspinal-node", family=codes.ARTIFICIAL_INTELLIGENCE, version=result.software.paraspinal_node,
            source=f"TotalSegmentator {totalseg}", parameters={"mask": "the voxels the SR group measured", "by": node}),
        tracking_id=extra.label,
        tracking_uid=hd.UID(),
        anatomic_regions=[copy.deepcopy(extra.region)],
        display_color=hd.color.CIELabColor.from_rgb(*extra.rgb),
    )


def _merge(main: Dataset, other: Dataset, offset: int) -> None:
    """Append `other`'s segments and frames to `main` with segment numbers shifted by `offset`.

    The appended segments number after every segment of `main`, so frames stay in segment-major order.
    """
    pointers = [int(item.DimensionIndexPointer) for item in main.DimensionIndexSequence]
    segment_axis = pointers.index(REFERENCED_SEGMENT_NUMBER)
    for item in other.SegmentSequence:
        item.SegmentNumber = int(item.SegmentNumber) + offset
        main.SegmentSequence.append(item)
    for item in other.PerFrameFunctionalGroupsSequence:
        reference = item.SegmentIdentificationSequence[0]
        reference.ReferencedSegmentNumber = int(reference.ReferencedSegmentNumber) + offset
        values = list(item.FrameContentSequence[0].DimensionIndexValues)
        values[segment_axis] = int(values[segment_axis]) + offset
        item.FrameContentSequence[0].DimensionIndexValues = values
        main.PerFrameFunctionalGroupsSequence.append(item)
    main.PixelData = _joined_pixels(main, other)
    main.NumberOfFrames = int(main.NumberOfFrames) + int(other.NumberOfFrames)
    main.SegmentsOverlap = "YES"


def _joined_pixels(main: Dataset, other: Dataset) -> bytes:
    """Encapsulated frames side by side; native single-bit frames are packed without padding between them."""
    counts = int(main.NumberOfFrames), int(other.NumberOfFrames)
    if main.file_meta.TransferSyntaxUID.is_encapsulated:
        frames = [*generate_frames(main.PixelData, number_of_frames=counts[0]),
                  *generate_frames(other.PixelData, number_of_frames=counts[1])]
        return encapsulate(frames, has_bot=True)
    pixels = int(main.Rows) * int(main.Columns)
    bits = [np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")[: n * pixels]
            for ds, n in ((main, counts[0]), (other, counts[1]))]
    data = np.packbits(np.concatenate(bits), bitorder="little").tobytes()
    return data + b"\0" * (len(data) % 2)
