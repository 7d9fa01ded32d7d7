"""The two costly generic steps of encoding, done with less work and the same result.

`comprehensive_3d_sr`: highdicom's Comprehensive3DSR constructor deep-copies the whole content
tree, parses the copy back into content items and walks the tree twice more for references,
turning every one of our ~6,000 content items into new objects three times over: about 70 % of
building the SR. Here it is given the report's root container with an empty Content Sequence,
so its document attributes, evidence sequences and checks are its own, and the tree is then
attached as the constructor would have attached it (the very same data element). The one
check of the walk, that every referenced instance is among the evidence, is done here on the
plain datasets.

`encode`: pydicom corrects ambiguous VRs of a dataset created in memory before writing it and
again before writing each of its sequence items, each time over the whole subtree, so an item
at depth d is corrected d times (a third of writing the SR). Here the whole tree is corrected
once, as pydicom's first pass would, and every item created in memory is marked as already
encoded the way it is written, so the writer's repeats are skipped. Two thirds of the SR's
elements lie in code sequences of some 70 distinct values: each distinct flat sequence is
written by pydicom once per object and its bytes stand in, as a raw element, for the others
while the object is written; the elements are put back afterwards.

tests/test_encode_equal.py checks that both give what highdicom and pydicom's plain paths
give, item for item, and that the library details relied on below still hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO

from highdicom.sr import Comprehensive3DSR, ContainerContentItem, ContentSequence
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element

CONTENT_SEQUENCE = 0x0040A730
REFERENCE_VALUE_TYPES = ("IMAGE", "COMPOSITE")  # what highdicom's evidence check looks for
# VRs whose bytes follow from a str or int/float value and the character set alone
FLAT_VRS = frozenset({"AE", "CS", "SH", "LO", "ST", "LT", "UT", "UC", "UR", "US", "UL", "SS", "SL", "FL", "FD"})
FLAT_TYPES = (str, int, float)
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def comprehensive_3d_sr(evidence: Sequence[Dataset], content: ContainerContentItem, **kwargs) -> Comprehensive3DSR:
    """Comprehensive3DSR(evidence=evidence, content=content, **kwargs), without its walks of the tree."""
    missing = referenced_instances(content) - {str(ds.SOPInstanceUID) for ds in evidence}
    if missing:
        raise ValueError(f"no evidence was provided for the referenced instances {', '.join(sorted(missing))}")
    root = Dataset()
    for element in content:
        if element.tag != CONTENT_SEQUENCE:
            root.add(element)
    root.ContentSequence = []
    document = Comprehensive3DSR(evidence=evidence, content=root, **kwargs)
    document[CONTENT_SEQUENCE] = content[CONTENT_SEQUENCE]
    # highdicom keeps the parsed tree for `document.content` in `_content` (0.28: a parsed copy);
    # the tree itself is what it would parse, so `content` reads the same.
    document._content = ContentSequence([content], is_root=True)
    return document


def referenced_instances(content: Dataset) -> set[str]:
    """SOP Instance UIDs of every IMAGE and COMPOSITE content item below `content`."""
    found: set[str] = set()
    pending = [content]
    while pending:
        for item in pending.pop().get("ContentSequence", ()):
            if item.ValueType in REFERENCE_VALUE_TYPES:
                found.add(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            if "ContentSequence" in item:
                pending.append(item)
    return found


def encode(dataset: Dataset) -> bytes:
    """The bytes of dataset.save_as(..., enforce_file_format=True); `dataset` is left as it was."""
    syntax = dataset.file_meta.TransferSyntaxUID
    correct_ambiguous_vr(dataset, syntax.is_little_endian)
    swapped: list[tuple[Dataset, DataElement]] = []
    try:
        _prepare(dataset, syntax.is_implicit_VR, syntax.is_little_endian, swapped)
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()
    finally:
        for item, element in reversed(swapped):
            item[element.tag] = element


def _prepare(dataset: Dataset, implicit: bool, little: bool, swapped: list[tuple[Dataset, DataElement]]) -> None:
    """Mark the items created in memory as encoded the way they are written; swap repeated flat sequences for their bytes.

    pydicom 3 skips its VR correction of a dataset whose original encoding and character set
    (`_character_set`, which it compares) are those it writes with; it then writes a raw
    element's bytes as they are (Dataset.set_original_encoding: "to enable optimized writing").
    Two thirds of the SR's elements are in code sequences of some 70 distinct values.
    """
    cached = not implicit and little
    ours: set[int] = set()
    encoded: dict[tuple, RawDataElement] = {}
    # (item, the character sets its parent passes on): pydicom's write_dataset(item, parent_encoding)
    pending: list[tuple[Dataset, str | list[str]]] = [(dataset, default_encoding)]
    while pending:
        item, parent_encoding = pending.pop()
        elements = list(item.values())
        if id(item) not in ours and item.original_encoding == (None, None) \
                and not any(type(e) is RawDataElement for e in elements):
            item.set_original_encoding(implicit, little, item._character_set)
            ours.add(id(item))
        encoding = item.get("SpecificCharacterSet", parent_encoding)  # what write_dataset writes the item in
        passed_on = convert_encodings(encoding)  # what write_data_element passes on to the items of a sequence
        flat = cached and id(item) in ours
        for element in elements:
            if element.VR != "SQ" or type(element) is RawDataElement:
                continue
            key = _flat_key(element, passed_on, ours) if flat else None
            if key is None:
                pending.extend((child, passed_on) for child in element.value)
                continue
            if key not in encoded:
                for child in element.value:
                    child.set_original_encoding(implicit, little, child._character_set)
                    ours.add(id(child))
                encoded[key] = _raw_sequence(element, encoding)
            swapped.append((item, element))
            item[element.tag] = encoded[key]


def _flat_key(element: DataElement, encodings: list[str], ours: set[int]) -> tuple | None:
    """What decides the bytes of a sequence of flat items created in memory (a code, say); None if it is not one."""
    key: list = [element.tag, element.is_undefined_length, *encodings]
    for item in element.value:
        if id(item) not in ours and item.original_encoding != (None, None):
            return None
        key.append(item.is_undefined_length_sequence_item)
        for field in item.values():
            if type(field) is RawDataElement or field.VR not in FLAT_VRS:
                return None
            value = field.value
            kind = type(value)
            if kind not in FLAT_TYPES:
                return None
            key.append((field.tag, field.VR, kind, value.hex() if kind is float else value))  # -0.0 == 0.0
        key.append(None)  # end of item
    return tuple(key)


def _raw_sequence(element: DataElement, encodings: str | list[str]) -> RawDataElement:
    """The element as pydicom writes it (explicit VR little endian), held as a raw element."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, element, encodings)
    value = fp.getvalue()[12:]  # after tag, VR, reserved bytes and length
    if element.is_undefined_length:
        value = value[: -len(SEQUENCE_DELIMITER)]  # which pydicom writes after a raw element's value
    return RawDataElement(element.tag, "SQ", 0xFFFFFFFF if element.is_undefined_length else len(value), value, 0,
                          False, True)
