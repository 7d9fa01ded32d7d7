"""What every result object takes from the source CT: its images, patient and study, character set."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
from highdicom.sr import CodedConcept
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset

from node.pipeline.ct import CTVolume, InputError
from node.pipeline.measure import Software

from . import codes

UTF8 = "ISO_IR 192"
# Type 2 attributes highdicom copies by attribute access; anonymisers often drop them.
TYPE2_DEFAULTS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
                  "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}
# Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study modules:
# every result object carries them as the source has them, so the study reads as one (dcentvfy).
PATIENT_AND_STUDY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientBirthName", "PatientMotherBirthName", "EthnicGroup", "EthnicGroupCodeSequence", "PatientComments",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence",
    "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "QualityControlSubject", "StrainDescription", "StrainNomenclature", "StrainAdditionalInformation",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName", "ClinicalTrialSiteID",
    "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName", "ConsultingPhysicianIdentificationSequence", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "RequestingServiceCodeSequence", "ReferencedStudySequence",
    "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize",
    "PatientSizeCodeSequence", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension",
    "PatientWeight", "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus", "AdditionalPatientHistory",
    "PregnancyStatus", "LastMenstrualDate", "PatientSexNeutered", "ReasonForVisit", "ReasonForVisitCodeSequence",
    "AdmissionID", "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence", "PatientState",
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription", "ConsentForClinicalTrialUseSequence",
)
CHEST = ("", "CHEST", "THORAX", "CHEST_TO_PELVIS", "CHEST_ABDOMEN", "CHESTABDOMEN", "CHESTABDPELVIS")
POSITION_TOLERANCE = 0.5  # of a slice spacing: catches mis-sorted slices, tolerates loader-accepted jitter
ORIENTATION_TOLERANCE = 1e-3


def source_images(ct: CTVolume) -> list[Dataset]:
    """The CT datasets in `hu` order, checked to lie exactly on the CT grid.

    The first one is a copy with missing Type 2 patient/study attributes set empty, because
    highdicom reads them from it; the caller's datasets are not modified.
    """
    if not ct.datasets:
        raise InputError("DICOM results need the source CT series: give a DICOM folder, not a NIfTI file")
    _check_on_grid(ct)
    first = copy.copy(ct.datasets[0])
    for keyword in TYPE2_DEFAULTS:
        if keyword not in first:
            setattr(first, keyword, "")
    return [first, *ct.datasets[1:]]


def _check_on_grid(ct: CTVolume) -> None:
    """Frame k of a derived object must be source image k, pixel for pixel."""
    if len(ct.datasets) != ct.shape[0]:
        raise InputError(f"{len(ct.datasets)} source datasets for {ct.shape[0]} CT slices")
    expected_iop = np.concatenate([ct.direction[:, 0], ct.direction[:, 1]])
    step = ct.direction[:, 2] * ct.spacing[0]
    for k, ds in enumerate(ct.datasets):
        if (int(ds.Rows), int(ds.Columns)) != ct.shape[1:]:
            raise InputError(f"source image {k} is {ds.Rows}x{ds.Columns}, the CT grid {ct.shape[1:]}")
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), expected_iop, atol=ORIENTATION_TOLERANCE):
            raise InputError(f"source image {k} is not oriented like the CT grid: in-plane axes were reordered")
        offset = np.asarray(ds.ImagePositionPatient, float) - (ct.origin + k * step)
        if np.linalg.norm(offset) > POSITION_TOLERANCE * ct.spacing[0]:
            raise InputError(f"source image {k} does not lie on CT slice {k}: datasets are not sorted like the voxels")


def character_set(source: Dataset, own_texts: Iterable[str]) -> str | list[str] | None:
    """Keep the source's character set when it encodes the copied and our own text, else use UTF-8.

    pydicom holds decoded text, so any set that encodes every value writes the same names back;
    keeping the source's set suits PACS that never saw UTF-8.
    """
    declared = source.get("SpecificCharacterSet")
    terms = [declared] if isinstance(declared, str) else list(declared or [])
    own = [text for text in own_texts if not text.isascii()]
    if len(terms) > 1:  # ISO 2022 code extensions encode the source's own values; ours only if ASCII
        return declared if not own else UTF8
    codec = python_encoding.get(terms[0], "ascii") if terms else "ascii"
    try:
        for text in [*_source_texts(source), *own]:
            text.encode(codec)
    except UnicodeEncodeError:
        return UTF8
    return declared


def _source_texts(source: Dataset) -> list[str]:
    texts = []
    for element in source.iterall():
        if element.VR in TEXT_VRS and element.value not in (None, ""):
            values = element.value if element.VM > 1 else [element.value]
            texts.extend(str(value) for value in values)
    return texts


def copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Every patient and study attribute of the source, as it is; none the source lacks.

    highdicom copies a subset; a PACS or dcentvfy comparing the study's instances sees the rest.
    """
    for keyword in PATIENT_AND_STUDY:
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])


def procedure_reported(source: Dataset) -> CodedConcept:
    """The source's own procedure code when it has one; else CT Chest only for a chest (or unnamed) body part."""
    procedure = source.get("ProcedureCodeSequence")
    if procedure and procedure[0].get("CodeValue") and procedure[0].get("CodingSchemeDesignator"):
        item = procedure[0]
        return CodedConcept(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.get("CodeMeaning", "")))
    if str(source.get("BodyPartExamined", "")).upper() in CHEST:
        return codes.PROCEDURE_CT_CHEST
    return codes.PROCEDURE_CT


def software_versions(software: Software) -> list[str]:
    """Both programs that shaped the numbers, for the Software Versions attribute."""
    totalseg = software.totalsegmentator
    return [f"paraspinal-node {software.paraspinal_node}"] + ([f"TotalSegmentator {totalseg}"] if totalseg else [])

