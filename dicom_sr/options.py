"""What the encoder takes from the node's configuration, as the configuration types themselves."""

from __future__ import annotations

from dataclasses import dataclass, field

from node.config import Config, MeasureConfig, ResultsConfig

MANUFACTURER = "paraspinal-node"


@dataclass(frozen=True)
class EncodeOptions:
    """`[results]` as configured, and the screening threshold the key image prints."""

    results: ResultsConfig = field(default_factory=ResultsConfig)
    low_attenuation_hu: float = MeasureConfig.low_attenuation_hu

    @classmethod
    def from_config(cls, config: Config) -> EncodeOptions:
        return cls(config.results, config.measure.low_attenuation_hu)

    @property
    def institution_name(self) -> str | None:
        return self.results.institution_name or None

    def texts(self) -> tuple[str, ...]:
        """Free text this node writes, which decides whether ASCII suffices."""
        results = self.results
        return (results.seg_series_description, results.sr_series_description, results.key_image_series_description,
                MANUFACTURER, results.institution_name)
