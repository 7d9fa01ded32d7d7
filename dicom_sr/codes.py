"""Coded concepts and display colours shared by the SEG, the SR and the key image.

Standard codes follow ../shared/reference.md (TotalSegmentator's own SNOMED mapping for the
muscle, T11, T12, L1-L5 and the thoracic and lumbar spine; CID 7603 for T1-T10). Concepts DICOM has no code
for (25th/75th percentile, the HU windows, the levels a total includes, QC findings) use the
private scheme PRIVATE_SCHEME, which every object that uses it declares in its Coding Scheme
Identification Sequence.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept

from node.labels import SPINE, Span

PRIVATE_SCHEME = "99PSNODE"
PRIVATE_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="paraspinal-node local codes",
    responsible_organization="paraspinal-node project",
)


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "SCT", meaning)


def _dcm(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "DCM", meaning)


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


ANATOMICAL_STRUCTURE = _sct("123037004", "Anatomical Structure")
DEEP_MUSCLE_OF_BACK = _sct("244849004", "Deep muscle of back")
LATERALITY = {
    "left": _sct("7771000", "Left"),
    "right": _sct("24028007", "Right"),
    "combined": _sct("51440002", "Bilateral"),
}
VERTEBRA = {
    level: _sct(value, f"{level} vertebra")
    for level, value in zip(
        SPINE,
        ("64864005", "53733008", "1626008", "73071006", "56401006", "45296009",
         "62487009", "11068009", "82687006", "7610001", "12989004", "23215003",
         "66794005", "14293000", "36470004", "11994002", "49668003"),
    )
}
THORACIC_SPINE = _sct("122495006", "Thoracic spine")  # what the T1-T10 totals span; no single vertebra
LUMBAR_SPINE = _sct("122496007", "Lumbar spine")  # what the L1-L5 totals span
SPINE_REGION = {"thoracic": THORACIC_SPINE, "lumbar": LUMBAR_SPINE}


def span_site(span: Span) -> CodedConcept:
    return SPINE_REGION[span.region]


def spine_region(level: str) -> CodedConcept:
    """The region a vertebra lies in, for its SEG segment's Anatomic Region."""
    return LUMBAR_SPINE if level.startswith("L") else THORACIC_SPINE

VOLUME = _sct("118565006", "Volume")
ATTENUATION = _dcm("112031", "Attenuation Coefficient")
FAT_FRACTION = _dcm("129100", "Fat fraction")
CUBIC_CENTIMETER = CodedConcept("cm3", "UCUM", "cubic centimeter")
HOUNSFIELD_UNIT = CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
NO_UNITS = CodedConcept("1", "UCUM", "no units")

MEAN = _sct("373098007", "Mean")
MEDIAN = _sct("373099004", "Median")
STANDARD_DEVIATION = _sct("386136009", "Standard Deviation")
PERCENTILE_25 = _private("P25", "25th percentile")
PERCENTILE_75 = _private("P75", "75th percentile")
ALL_VOXELS = _private("ALLHU", "All muscle voxels, no HU window")
LEAN_WINDOW = _private("LEANHU", "Lean muscle HU window")
INCLUDED_LEVEL = _private("INCLEVEL", "Vertebral level included")

# Bone and organs measured from the same CT (TotalSegmentator's SNOMED mapping for the structures).
VERTEBRAL_BODY = _sct("3572006", "Vertebral body")
LIVER = _sct("10200004", "Liver")
SPLEEN = _sct("78961009", "Spleen")
PARENCHYMA = _sct("91772007", "Parenchyma")
TRABECULAR_MASK = _private("TRABHU", "Vertebral body within the body HU window")
WHOLE_VERTEBRA_MASK = _private("WHOLEVHU", "Whole vertebra within the body HU window")
PARENCHYMA_MASK = _private("PARENHU", "Eroded organ within its robust HU window")
COVERED_VOLUME = _private("COVVOL", "Organ volume in the field of view")
LIVER_MINUS_SPLEEN = _private("LMINUSS", "Liver minus spleen attenuation")
SCREENING_FLAG = _private("SCRFLAG", "Screening flag")
FLAG_STATE = {
    "low": _private("LOW", "Low attenuation"),
    "not_low": _private("NOTLOW", "Not low attenuation"),
    "not_assessed": _private("NOTASSESSED", "Not assessed"),
}

# Change over time (README "Change over time"): DICOM has no code for a prior value, a change or a rate.
PRIOR_MEDIAN_HU = _private("PRIORMEDHU", "Median attenuation at prior time point")
CHANGE_MEDIAN_HU = _private("DMEDHU", "Change in median attenuation since prior")
RATE_MEDIAN_HU = _private("DMEDHUYR", "Change in median attenuation per year")
PRIOR_VOLUME = _private("PRIORVOL", "Volume at prior time point")
CHANGE_VOLUME = _private("DVOL", "Change in volume since prior")
RATE_VOLUME = _private("DVOLYR", "Change in volume per year")
PRIOR_INTERVAL = _private("PRIORDAYS", "Interval since prior time point")
CHANGE_COMPARABLE = _private("CHGCOMP", "Comparable with prior acquisition")
SIGNIFICANT_MEDIAN_HU = _private("SIGMEDHU", "Change in median attenuation above least significant change")
SIGNIFICANT_VOLUME = _private("SIGVOL", "Change in volume above least significant change")
YES = _sct("373066001", "Yes")
NO = _sct("373067005", "No")
HU_PER_YEAR = CodedConcept("[hnsf'U]/a", "UCUM", "Hounsfield unit per year")
CUBIC_CENTIMETER_PER_YEAR = CodedConcept("cm3/a", "UCUM", "cubic centimeter per year")
DAYS = CodedConcept("d", "UCUM", "day")
BASELINE = _dcm("121079", "Baseline")  # the event a time point's offset counts from: the first result found
# Acquisition facts in the Image Library entry, read back when the SR is a prior.
KVP = _dcm("113733", "KVP")
KILOVOLT = CodedConcept("kV", "UCUM", "kilovolt")
CONVOLUTION_KERNEL = _private("KERNEL", "Convolution kernel")
CONTRAST_STATUS = _private("CONTRAST", "Contrast status")
CONTRAST = {True: _private("ENHANCED", "Contrast-enhanced"), False: _private("UNENHANCED", "Unenhanced"),
            None: _sct("261665006", "Unknown")}
# MR Dixon fat (node.pipeline.mr_measure): fractions in the SR are percent (UCUM %), measurements.json keeps 0-1.
AREA = _sct("42798000", "Area")
SQUARE_CENTIMETER = CodedConcept("cm2", "UCUM", "square centimeter")
PERCENT = CodedConcept("%", "UCUM", "percent")
FAT_SIGNAL_RATIO = _private("FSF", "Sum of fat signal over sum of fat and water signal")
FAT_AREA_FRACTION = _private("FATAREA", "Fat area fraction, voxels with fat fraction >= 50 %")
DIXON_MUSCLE = _private("DIXONFF", "All muscle voxels, 2-point Dixon fat signal fraction (not PDFF)")
MUSCLE_MASK = _private("MUSCLEVOX", "All muscle voxels")
GOUTALLIER_GRADE = _private("GOUTSIMPL", "Simplified Goutallier grade of the fat area fraction")
GRADE = {
    "normal": _private("GOUT1", "Grade I normal or mild, fat area < 10 %"),
    "moderate": _private("GOUT2", "Grade II moderate, fat area 10-50 %"),
    "severe": _private("GOUT3", "Grade III severe, fat area > 50 %"),
}
NOT_ASSESSED_NO_DIXON = _private("NODIXON", "Not assessed: no Dixon")

PROCEDURE_CT_CHEST = CodedConcept("24627-2", "LN", "CT Chest")
PROCEDURE_MR = _sct("113091000", "Magnetic resonance imaging")  # when the MR source names no procedure
PROCEDURE_CT = _sct("77477000", "CT")  # when the source names neither its procedure nor the chest
ARTIFICIAL_INTELLIGENCE = _dcm("123110", "Artificial Intelligence")
ANALYSIS_QUALITY = _dcm("111693", "Analysis Quality Rating")
QUALITY_ASSESSMENT = _dcm("111050", "Quality Assessment")
LEVEL_STATUS = {
    "complete": _sct("255594003", "Complete"),
    "partial": _sct("255609007", "Partial"),
    "absent": _dcm("121054", "Absent"),
}


def qc_finding(code: str) -> CodedConcept:
    """The measurement's QC codes are the node's own vocabulary, hence private."""
    return _private(code[:16], code.replace("_", " ")[:64])


# RGB 0..255; left takes the level colour, right a darker shade so the sides stay apart.
# T11 and T12 have no muscle segment and so no colour.
LEVEL_RGB: dict[str, tuple[int, int, int]] = dict(zip((*SPINE[:10], *SPINE[12:]), (
    (230, 25, 75), (245, 130, 48), (255, 225, 25), (60, 180, 75), (70, 240, 240),
    (0, 130, 200), (145, 30, 180), (240, 50, 230), (170, 110, 40), (128, 128, 0),
    (250, 190, 212), (170, 255, 195), (255, 215, 180), (0, 128, 128), (220, 190, 255),
)))
RIGHT_SHADE = 0.7
VERTEBRA_RGB = (241, 214, 145)


def side_rgb(level: str, side: str) -> tuple[int, int, int]:
    red, green, blue = LEVEL_RGB[level]
    shade = RIGHT_SHADE if side == "right" else 1.0
    return (round(red * shade), round(green * shade), round(blue * shade))
