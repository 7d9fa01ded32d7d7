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
encoded the way it is written, so the writer's repeats are skipped.

tests/test_encode_equal.py checks that both give what highdicom and pydicom's plain paths
give, item for item, and that the library details relied on below still hold.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from io import BytesIO

from highdicom.sr import Comprehensive3DSR, ContainerContentItem, ContentSequence
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr

CONTENT_SEQUENCE = 0x0040A730
REFERENCE_VALUE_TYPES = ("IMAGE", "COMPOSITE")  # what highdicom's evidence check looks for


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
    """The bytes of dataset.save_as(..., enforce_file_format=True)."""
    syntax = dataset.file_meta.TransferSyntaxUID
    correct_ambiguous_vr(dataset, syntax.is_little_endian)
    for item in _datasets(dataset):
        if item.original_encoding == (None, None) and not any(isinstance(e, RawDataElement) for e in item.elements()):
            # pydicom 3 skips its correction of a dataset whose original encoding and character
            # set (`_character_set`, what it writes text in) are those it is written with.
            item.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian, item._character_set)
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _datasets(dataset: Dataset) -> Iterator[Dataset]:
    """`dataset` and every sequence item in it, at any depth."""
    pending = [dataset]
    while pending:
        item = pending.pop()
        yield item
        for element in item.elements():
            if element.VR == "SQ" and not isinstance(element, RawDataElement):
                pending.extend(element.value)
