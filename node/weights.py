"""Which TotalSegmentator model folders the node needs, whether they are installed, and how to install them.

The node never lets TotalSegmentator download: every folder it would fetch must already be in
`segmenter.weights_dir`. An admin fetches the release zips elsewhere and installs them offline.
Which folders depend on selection.modalities: CT needs `total` (+ `vertebrae_body`), MR needs
`total_mr` and `vertebrae_mr`; a CT-only site never needs the MR folders.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

from node.config import SegmenterConfig

# totalsegmentator.libs.download_pretrained_weights builds its URLs from this base (a local there).
RELEASE_URL = "https://github.com/wasserth/TotalSegmentator/releases/download"
# python_api.totalsegmentator crops roi_subset runs with the 6 mm model and this trainer (hard-coded there).
CROP_TASK_ID = 298
CROP_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
# On an MR task it always crops with the 3 mm total_mr model ("6mm too bad results"), this trainer.
MR_CROP_TASK_ID = 852
MR_CROP_TRAINER = "nnUNetTrainer_2000epochs_NoMirroring"
CT_ONLY: tuple[str, ...] = ("CT",)  # what selection.modalities holds by default
PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
MODEL_FILES = ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth")


@dataclass(frozen=True)
class Model:
    """One nnU-Net model folder as TotalSegmentator looks it up."""

    task_id: int
    trainer: str

    @property
    def folder(self) -> str:
        return str(TASK_ID_WEIGHTS_CONFIGS[self.task_id]["foldername"])

    @property
    def url(self) -> str:
        return f"{RELEASE_URL}/{TASK_ID_WEIGHTS_CONFIGS[self.task_id]['version']}/{self.folder}.zip"

    def model_dir(self, weights_dir: Path) -> Path:
        return Path(weights_dir) / self.folder / f"{self.trainer}__{PLANS}__{CONFIGURATION}"

    def is_installed(self, weights_dir: Path) -> bool:
        model_dir = self.model_dir(weights_dir)
        return all((model_dir / name).is_file() for name in MODEL_FILES)


def total_models(fast: bool) -> list[Model]:
    """Every folder `totalsegmentator(task="total", roi_subset=...)` checks before it runs.

    The API checks all parts of the mode (not only those holding ROI classes) plus the crop model.
    """
    mode = TASK_CONFIGS["total"]["sub_modes"]["fast" if fast else "default"]
    task_ids = mode["task_id"] if isinstance(mode["task_id"], list) else [mode["task_id"]]
    return [Model(task_id, mode["trainer"]) for task_id in task_ids] + [Model(CROP_TASK_ID, CROP_TRAINER)]


def body_model() -> Model:
    return _task_model("vertebrae_body")


def total_mr_models(fast: bool) -> list[Model]:
    """Every folder `totalsegmentator(task="total_mr", roi_subset=...)` checks: the mode's parts and the 3 mm crop model."""
    mode = TASK_CONFIGS["total_mr"]["sub_modes"]["fast" if fast else "default"]
    task_ids = mode["task_id"] if isinstance(mode["task_id"], list) else [mode["task_id"]]
    models = [Model(task_id, mode["trainer"]) for task_id in task_ids]
    crop = Model(MR_CROP_TASK_ID, MR_CROP_TRAINER)
    return models + ([crop] if crop not in models else [])


def vertebrae_mr_model() -> Model:
    return _task_model("vertebrae_mr")


def mr_models(fast: bool) -> list[Model]:
    """total_mr (autochthon, discs) and vertebrae_mr (each vertebra): what an MR series needs."""
    return [*total_mr_models(fast), vertebrae_mr_model()]


def selects(modalities: Sequence[str], modality: str) -> bool:
    """Whether selection.modalities lets `modality` through, so its models are required."""
    return modality in {selected.upper() for selected in modalities}


def _task_model(task_name: str) -> Model:
    task = TASK_CONFIGS[task_name]
    return Model(task["task_id"], task["trainer"])


def runs_vertebral_bodies(config: SegmenterConfig) -> bool:
    """"auto" runs the vertebrae_body task only when its weights are installed."""
    if config.vertebral_bodies == "auto":
        return body_model().is_installed(config.weights_dir)
    return config.vertebral_bodies == "on"


def _required(config: SegmenterConfig, modalities: Sequence[str]) -> list[Model]:
    """CT's models whenever CT is selected (the default), MR's when MR is."""
    models = []
    if selects(modalities, "CT"):
        models += total_models(config.fast) + ([body_model()] if config.vertebral_bodies == "on" else [])
    if selects(modalities, "MR"):
        models += mr_models(config.fast)
    return models


def required_models(config: SegmenterConfig, modalities: Sequence[str] = CT_ONLY) -> list[str]:
    """Folder names that must be in weights_dir for a run with these options and selection.modalities."""
    return [model.folder for model in _required(config, modalities)]


def missing_models(config: SegmenterConfig, modalities: Sequence[str] = CT_ONLY) -> list[str]:
    """Required folder names that are absent or lack plans.json, dataset.json or fold_0/checkpoint_final.pth."""
    return [model.folder for model in _required(config, modalities) if not model.is_installed(config.weights_dir)]


def _optional(config: SegmenterConfig, modalities: Sequence[str]) -> list[Model]:
    return [body_model()] if selects(modalities, "CT") and config.vertebral_bodies == "auto" else []


@dataclass(frozen=True)
class ModelState:
    """One model folder this config uses: whether the run needs it and whether it is installed."""

    model: Model
    required: bool
    present: bool


def inventory(config: SegmenterConfig, modalities: Sequence[str] = CT_ONLY) -> list[ModelState]:
    """Every folder a run with these options needs (required) or uses when present (optional)."""
    return [ModelState(m, True, m.is_installed(config.weights_dir)) for m in _required(config, modalities)] + [
        ModelState(m, False, m.is_installed(config.weights_dir)) for m in _optional(config, modalities)]



class InstallError(Exception):
    """A zip that cannot be installed; the message names the file and the fix."""


def install_zip(archive: Path, weights_dir: Path) -> list[str]:
    """Unpack one release zip into weights_dir; each model folder appears whole or not at all."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=weights_dir))
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InstallError(f"{archive} is not a readable zip ({exc}): download it again") from None
        folders = sorted(p for p in staging.iterdir() if p.is_dir() and p.name.startswith("Dataset"))
        if not folders:
            raise InstallError(
                f"{archive} holds no DatasetNNN_... model folder: use a TotalSegmentator release zip "
                f"(e.g. {Model(292, 'x').folder}.zip)"
            )
        for folder in folders:
            _verify_layout(folder, archive)
        for folder in folders:
            _move_into_place(folder, weights_dir / folder.name, staging)
        return [folder.name for folder in folders]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _expected_trainer(folder_name: str) -> str | None:
    known = {m.folder: m.trainer for m in total_models(False) + total_models(True) + [body_model()]
             + mr_models(False) + mr_models(True)}
    return known.get(folder_name)


def _verify_layout(folder: Path, archive: Path) -> None:
    model_dirs = [p for p in folder.iterdir() if p.is_dir() and p.name.endswith(f"__{PLANS}__{CONFIGURATION}")]
    trainer = _expected_trainer(folder.name)
    if trainer is not None:
        model_dirs = [p for p in model_dirs if p.name == f"{trainer}__{PLANS}__{CONFIGURATION}"]
    if not model_dirs:
        wanted = f"{trainer or '<trainer>'}__{PLANS}__{CONFIGURATION}"
        raise InstallError(f"{archive}: {folder.name} lacks {wanted}/: the zip is not a TotalSegmentator release zip")
    for model_dir in model_dirs:
        absent = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
        if absent:
            raise InstallError(
                f"{archive}: {folder.name}/{model_dir.name} lacks {', '.join(absent)}: the zip is incomplete, download it again"
            )


def _move_into_place(new: Path, target: Path, staging: Path) -> None:
    """Rename within one filesystem, so TotalSegmentator never sees a half-written folder."""
    old = staging / f"replaced-{target.name}"
    if target.exists():
        target.rename(old)
    new.rename(target)


def zips_in(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    if source.is_dir():
        return sorted(source.glob("*.zip"))
    raise InstallError(f"{source} does not exist: pass a folder of TotalSegmentator release zips or one zip")
