"""The config the worker tests share: precomputed masks, two DICOM destinations and a results folder."""

from __future__ import annotations

from pathlib import Path

from node.config import Config, DestinationConfig


def precomputed_worker_config(root: Path, precomputed: Path) -> Config:
    """State under `root`, masks read from `precomputed`, retries without delay."""
    config = Config()
    config.storage.state_dir = root / "state"
    config.segmenter.backend = "precomputed"
    config.segmenter.precomputed_dir = precomputed
    config.destinations = [DestinationConfig("PACS", "127.0.0.1", 11112), DestinationConfig("VNA", "10.0.0.9", 104)]
    config.delivery.results_dir = root / "results"
    config.worker.retry_delay_s = 0.0
    return config
