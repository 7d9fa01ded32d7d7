"""The DICOM Segmentation: per-level left/right paraspinal muscle, then the vertebrae of those levels present.

Segment numbers follow the measurement's reported levels, two per level (on chest CT fixed:
T1 left = 1, T1 right = 2, ... T10 right = 20; on abdominal CT L1 left = 1 ... L5 right = 10;
complete lumbar levels of a chest CT follow T10 as 21, 22, ...), so the SR's group i is SEG
segment i, as 3D Slicer's QuantitativeReporting assumes. Vertebrae follow in level order, only
those present. An absent level's two segments are described but hold no voxel: nothing was
measured there, and the numbering stays fixed.

Every muscle segment carries its level as Anatomic Region (the vertebra, CID 7603) and its
side as a type modifier, so a reader that knows only codes tells the 20 segments apart.

Each muscle segment holds exactly the voxels its SR groups measured. Adjacent slabs may share a
slice, which the method counts in both levels, so in a BINARY SEG those two segments overlap
(SegmentsOverlap YES): the shared slice's frame is stored once per level. Readers that merge
all segments into one label map must keep them apart (dcmqi's --mergeSegments writes an extra
label file, highdicom's combine_segments refuses). A LABELMAP SEG cannot overlap: there the
shared slice goes to the upper (more cranial) level only, and the lower level's segment holds
fewer voxels than its SR group measured.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.seg import SegmentAlgorithmTypeValues, SegmentationTypeValues, SegmentDescription
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from scipy import ndimage

from node.labels import AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, LIVER, MEASURED_LEVELS, SPLEEN, VERTEBRA_LABEL
from node.pipeline.ct import CTVolume
from node.pipeline.measure import MeasurementResult, Software
from node.pipeline.segmentation import Segmentation

from . import codes
from .options import MANUFACTURER, EncodeOptions
from .study import character_set, copy_patient_and_study, software_versions, source_images

SIDES = ("left", "right")
SIDE_LABEL = {"left": AUTOCHTHON_LEFT, "right": AUTOCHTHON_RIGHT}
MUSCLE_SEGMENTS = 2 * len(MEASURED_LEVELS)  # on chest CT without lumbar levels
REFERENCED_SEGMENT_NUMBER = 0x0062000B
BOXED_LABELS = max(*VERTEBRA_LABEL.values(), AUTOCHTHON_LEFT, AUTOCHTHON_RIGHT, LIVER, SPLEEN)


@dataclass(frozen=True)
class SegmentSpec:
    number: int
    level: str
    side: str | None  # None for a vertebra


@dataclass(frozen=True)
class SharedSlice:
    """Slice k lies in the slabs of `level` and of the more cranial `owner`, which draws it in `numbers`."""

    k: int
    level: str
    owner: str


def muscle_segment_number(level: str, side: str, levels: tuple[str, ...] = MEASURED_LEVELS) -> int:
    """`levels`: the measurement's reported levels, in order (chest CT: T1..T10)."""
    return 2 * levels.index(level) + 1 + SIDES.index(side)


def muscle_levels(result: MeasurementResult) -> tuple[str, ...]:
    """The levels with muscle segments, in segment order: the measurement's reported levels."""
    return tuple(level.level for level in result.levels)


@dataclass(frozen=True)
class SegmentMap:
    """The SEG's segments and, on the CT grid, the segment number of every voxel (0 = none).

    `numbers` gives a shared slice to its upper level; `shared` lists what the lower levels
    also hold there; `levels` are the muscle levels in segment order; `boxes` are
    ndimage.find_objects of the labels (label i at i - 1) through every label the SEG uses.
    """

    specs: list[SegmentSpec]
    numbers: np.ndarray  # uint8 [k, r, c]
    shared: list[SharedSlice]
    levels: tuple[str, ...]
    boxes: list[tuple[slice, ...] | None]


def segment_map(seg: Segmentation, result: MeasurementResult) -> SegmentMap:
    """Only slab slices and vertebra bounding boxes are visited: a full pass over 10^8 voxels costs seconds."""
    levels = muscle_levels(result)
    boxes = ndimage.find_objects(seg.labels, max_label=BOXED_LABELS)  # one pass, whatever the number of labels
    present = [level for level in levels if boxes[VERTEBRA_LABEL[level] - 1] is not None]
    specs = [SegmentSpec(muscle_segment_number(level, side, levels), level, side) for level in levels for side in SIDES]
    specs += [SegmentSpec(2 * len(levels) + 1 + i, level, None) for i, level in enumerate(present)]
    numbers = np.zeros(seg.labels.shape, dtype=np.uint8)
    shared = _paint_muscle(numbers, seg.labels, result, levels)
    for spec in specs[2 * len(levels):]:
        box = boxes[VERTEBRA_LABEL[spec.level] - 1]
        numbers[box][seg.labels[box] == VERTEBRA_LABEL[spec.level]] = spec.number
    return SegmentMap(specs, numbers, shared, levels, boxes)


def _paint_muscle(numbers: np.ndarray, labels: np.ndarray, result: MeasurementResult,
                  levels: tuple[str, ...]) -> list[SharedSlice]:
    """Upper levels are painted last and so win slices shared by two slabs."""
    owner: dict[int, str] = {}
    for level in result.levels:  # cranial first: the first level to claim a slice owns it
        if level.slab is not None:
            for k in range(level.slab.first_slice, level.slab.last_slice + 1):
                owner.setdefault(k, level.level)
    shared = []
    for level in reversed(result.levels):
        if level.slab is None:
            continue
        k = slice(level.slab.first_slice, level.slab.last_slice + 1)
        part, target = labels[k], numbers[k]
        for side in SIDES:
            target[part == SIDE_LABEL[side]] = muscle_segment_number(level.level, side, levels)
        shared += [SharedSlice(j, level.level, owner[j]) for j in range(k.start, k.stop) if owner[j] != level.level]
    return shared


def seg_equipment(software: Software) -> dict[str, object]:
    """The Enhanced General Equipment values every SEG instance of the node carries (highdicom's keywords)."""
    return {"instance_number": 1, "manufacturer": MANUFACTURER, "manufacturer_model_name": "paraspinal-node",
            "software_versions": software_versions(software), "device_serial_number": "none"}


def build_seg(ct: CTVolume, segments: SegmentMap, result: MeasurementResult, options: EncodeOptions,
              tasks: str = "total") -> hd.seg.Segmentation:
    """One SEG in the source study; frame i is derived from source image i (empty frames left out).

    `tasks`: the TotalSegmentator tasks that drew the masks (MR: "total_mr + vertebrae_mr").
    """
    sources = source_images(ct)
    settings = options.results
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=segments.numbers,
        segmentation_type=SegmentationTypeValues.LABELMAP if settings.labelmap else SegmentationTypeValues.BINARY,
        segment_descriptions=[_describe(spec, result.software, tasks) for spec in segments.specs],
        series_instance_uid=hd.UID(),
        series_number=settings.seg_series_number,
        sop_instance_uid=hd.UID(),
        **seg_equipment(result.software),
        content_label="PARASPINAL",
        content_description=f"Paraspinal muscle per level {', '.join(t.span.name for t in result.totals)} and vertebrae",
        series_description=settings.seg_series_description,
        institution_name=options.institution_name,
        transfer_syntax_uid=JPEG2000Lossless if settings.jpeg2000 else ExplicitVRLittleEndian,
        omit_empty_frames=True,
        specific_character_set=character_set(sources[0], options.texts()),
    )
    copy_patient_and_study(ct.datasets[0], seg)
    if not settings.labelmap:
        _add_shared_frames(seg, segments, [str(ds.SOPInstanceUID) for ds in sources])
    return seg


def _add_shared_frames(seg: Dataset, segments: SegmentMap, source_uids: list[str]) -> None:
    """Store a shared slice's frame again under the lower level's segment, keeping segment-major order.

    On a shared slice both levels hold all of a side's muscle, so the lower level's frame is the
    upper level's frame, bit for bit; only its segment number differs.
    """
    frames, shared = list(seg.PerFrameFunctionalGroupsSequence), segments.shared
    if not shared or not frames:
        return
    pointers = [int(item.DimensionIndexPointer) for item in seg.DimensionIndexSequence]
    segment_axis = pointers.index(REFERENCED_SEGMENT_NUMBER)
    index = {(_segment_of(item), _source_of(item)): i for i, item in enumerate(frames)}
    order = list(range(len(frames)))
    for cut in shared:
        for side in SIDES:
            found = index.get((muscle_segment_number(cut.owner, side, segments.levels), source_uids[cut.k]))
            if found is None:  # no muscle of this side on the slice
                continue
            item = copy.deepcopy(frames[found])
            number = muscle_segment_number(cut.level, side, segments.levels)
            item.SegmentIdentificationSequence[0].ReferencedSegmentNumber = number
            values = list(item.FrameContentSequence[0].DimensionIndexValues)
            values[segment_axis] = number
            item.FrameContentSequence[0].DimensionIndexValues = values
            frames.append(item)
            order.append(found)
    ranked = sorted(range(len(frames)), key=lambda i: tuple(frames[i].FrameContentSequence[0].DimensionIndexValues))
    seg.PerFrameFunctionalGroupsSequence = [frames[i] for i in ranked]
    seg.PixelData = _reordered_pixels(seg, [order[i] for i in ranked])
    seg.NumberOfFrames = len(ranked)
    seg.SegmentsOverlap = "YES"


def _segment_of(item: Dataset) -> int:
    return int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)


def _source_of(item: Dataset) -> str:
    return str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)


def _reordered_pixels(seg: Dataset, order: list[int]) -> bytes:
    """Frame i of the result is stored frame order[i]: encapsulated frames as they are, native bits repacked."""
    stored = int(seg.NumberOfFrames)
    if seg.file_meta.TransferSyntaxUID.is_encapsulated:
        frames = list(generate_frames(seg.PixelData, number_of_frames=stored))
        return encapsulate([frames[i] for i in order], has_bot=True)
    pixels = int(seg.Rows) * int(seg.Columns)
    if pixels % 8 == 0:  # frames start on byte boundaries
        size = pixels // 8
        data = b"".join(seg.PixelData[i * size : (i + 1) * size] for i in order)
    else:
        bits = np.unpackbits(np.frombuffer(seg.PixelData, np.uint8), bitorder="little")[: stored * pixels]
        data = np.packbits(bits.reshape(stored, pixels)[order].ravel(), bitorder="little").tobytes()
    return data + b"\0" * (len(data) % 2)


def _describe(spec: SegmentSpec, software: Software, tasks: str) -> SegmentDescription:
    if spec.side is None:
        label, property_type, rgb = f"{spec.level} vertebra", codes.VERTEBRA[spec.level], codes.VERTEBRA_RGB
        region = codes.spine_region(spec.level)
    else:
        label = f"{spec.level} paraspinal muscle {spec.side}"
        property_type, rgb = codes.DEEP_MUSCLE_OF_BACK, codes.side_rgb(spec.level, spec.side)
        region = codes.VERTEBRA[spec.level]
    description = SegmentDescription(
        segment_number=spec.number,
        segment_label=label,
        segmented_property_category=codes.ANATOMICAL_STRUCTURE,
        segmented_property_type=copy.deepcopy(property_type),  # the modifier below must not reach the shared code
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithms(software, spec.side is not None, tasks),
        tracking_id=label,
        tracking_uid=hd.UID(),
        anatomic_regions=[region],
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )
    if spec.side is not None:
        modifier = [codes.LATERALITY[spec.side]]
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = modifier
    return description


def _algorithms(software: Software, with_node: bool, tasks: str) -> hd.AlgorithmIdentificationSequence:
    """TotalSegmentator drew the masks; for the muscle this node cut them into level slabs.

    One item only: highdicom's reader refuses more, although the standard allows them.
    """
    totalseg_version = software.totalsegmentator or "unknown"
    totalseg = f"TotalSegmentator {totalseg_version}"
    node = f"paraspinal-node {software.paraspinal_node}"
    if not with_node:
        return hd.AlgorithmIdentificationSequence(
            name="TotalSegmentator", family=codes.ARTIFICIAL_INTELLIGENCE,
            version=totalseg_version, source=node, parameters={"task": tasks},
        )
    return hd.AlgorithmIdentificationSequence(
        name="paraspinal-node", family=codes.ARTIFICIAL_INTELLIGENCE,
        version=software.paraspinal_node, source=totalseg,
        parameters={"segmentation": f"{totalseg} task {tasks}", "slab": "min..max axial slice of the level's body mask",
                    "shared slice": "in both levels"},
    )
