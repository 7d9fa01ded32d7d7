"""How the result objects are encoded: series numbering, descriptions and pixel encoding."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncodeOptions:
    """Defaults keep the node's series out of the way of scanner series (which rarely exceed 9000).

    `jpeg2000` compresses the SEG losslessly (about 30× smaller); `labelmap` writes a LABELMAP
    SEG, far smaller still but unreadable for Slicer and Debian's dciodvfy, hence off.
    """

    seg_series_number: int = 9101
    sr_series_number: int = 9102
    key_image_series_number: int = 9103
    seg_series_description: str = "Paraspinal muscle segmentation T1-T10"
    sr_series_description: str = "Paraspinal muscle measurements T1-T10"
    key_image_series_description: str = "Paraspinal muscle summary (derived, not for diagnosis)"
    low_attenuation_hu: float = 10.0
    jpeg2000: bool = False
    labelmap: bool = False
    manufacturer: str = "paraspinal-node"
    institution_name: str | None = None

    def texts(self) -> tuple[str, ...]:
        """Free text this node writes, which decides whether ASCII suffices."""
        return (self.seg_series_description, self.sr_series_description, self.key_image_series_description,
                self.manufacturer, self.institution_name or "")
