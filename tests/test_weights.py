"""`paraspinal-node weights check/install/urls` and the required-folder rules, with stand-in release zips."""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import pytest
from standin_weights import write_model, write_standin_weights

from node import weights
from node.cli import weights as weights_cli
from node.config import SegmenterConfig

PART2 = "Dataset292_TotalSegmentator_part2_vertebrae_1532subj"
CROP = "Dataset298_TotalSegmentator_total_6mm_1559subj"
FAST = "Dataset297_TotalSegmentator_total_3mm_1559subj"
BODY = "Dataset305_vertebrae_discs_1559subj"
MR_PARTS = ["Dataset850_TotalSegMRI_part1_organs_1088subj", "Dataset851_TotalSegMRI_part2_muscles_1088subj"]
MR_3MM = "Dataset852_TotalSegMRI_total_3mm_1088subj"
VERTEBRAE_MR = "Dataset756_mri_vertebrae_1076subj"


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="paraspinal-node")
    weights_cli.add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.handler(args))


def release_zips(tmp_path: Path, task_ids: list[int]) -> Path:
    """One zip per model folder, laid out like TotalSegmentator's release assets."""
    built, zips = tmp_path / "built", tmp_path / "zips"
    zips.mkdir()
    for task_id in task_ids:
        model_dir = write_model(built, task_id)
        folder = model_dir.parent
        with zipfile.ZipFile(zips / f"{folder.name}.zip", "w") as zf:
            for path in sorted(folder.rglob("*")):
                zf.write(path, path.relative_to(built))
    return zips


def test_required_models_follow_the_totalsegmentator_api():
    default = weights.required_models(SegmenterConfig())
    assert default == [
        "Dataset291_TotalSegmentator_part1_organs_1559subj",
        PART2,
        "Dataset293_TotalSegmentator_part3_cardiac_1559subj",
        "Dataset294_TotalSegmentator_part4_muscles_1559subj",
        "Dataset295_TotalSegmentator_part5_ribs_1559subj",
        CROP,
    ]
    assert weights.required_models(SegmenterConfig(fast=True)) == [FAST, CROP]
    assert weights.required_models(SegmenterConfig(fast=True, vertebral_bodies="on")) == [FAST, CROP, BODY]


def test_mr_models_are_required_only_when_mr_is_selected():
    """total_mr with roi_subset checks its parts and always crops with the 3 mm model; vertebrae_mr is one folder."""
    ct = weights.required_models(SegmenterConfig())
    assert weights.required_models(SegmenterConfig(), ["CT"]) == ct
    assert weights.required_models(SegmenterConfig(), ["CT", "mr"]) == [*ct, *MR_PARTS, MR_3MM, VERTEBRAE_MR]
    assert weights.required_models(SegmenterConfig(), ["MR"]) == [*MR_PARTS, MR_3MM, VERTEBRAE_MR]
    assert weights.required_models(SegmenterConfig(fast=True), ["MR"]) == [MR_3MM, VERTEBRAE_MR]
    assert [model.url.rsplit("/", 2)[1] for model in weights.mr_models(False)] == ["v2.5.0-weights"] * 4


def test_weights_cli_follows_selection_modalities(tmp_path, capsys):
    toml = tmp_path / "node.toml"
    toml.write_text('[selection]\nmodalities = ["CT", "MR"]\n[segmenter]\nfast = true\nvertebral_bodies = "off"\n')
    assert run_cli("weights", "urls", "--config", str(toml)) == 0
    names = [line.rsplit("/", 1)[1] for line in capsys.readouterr().out.split()]
    assert names == [f"{FAST}.zip", f"{CROP}.zip", f"{MR_3MM}.zip", f"{VERTEBRAE_MR}.zip"]
    zips = release_zips(tmp_path, [297, 298, 852, 756])
    target = tmp_path / "weights"
    assert run_cli("weights", "install", "--from", str(zips), "--config", str(toml), "--weights-dir", str(target)) == 0
    capsys.readouterr()
    assert run_cli("weights", "check", "--config", str(toml), "--weights-dir", str(target)) == 0
    assert f"present  {VERTEBRAE_MR}" in capsys.readouterr().out


def test_missing_models_counts_an_incomplete_folder_as_missing(tmp_path):
    write_standin_weights(tmp_path, fast=False, vertebrae_body=False)
    config = SegmenterConfig(weights_dir=tmp_path)
    assert weights.missing_models(config) == []
    checkpoint = next((tmp_path / PART2).rglob("checkpoint_final.pth"))
    checkpoint.unlink()
    assert weights.missing_models(config) == [PART2]


def test_auto_vertebral_bodies_run_only_when_installed(tmp_path):
    config = SegmenterConfig(weights_dir=tmp_path, vertebral_bodies="auto")
    assert not weights.runs_vertebral_bodies(config)
    write_model(tmp_path, 305)
    assert weights.runs_vertebral_bodies(config)
    assert not weights.runs_vertebral_bodies(SegmenterConfig(weights_dir=tmp_path, vertebral_bodies="off"))


def test_check_lists_missing_folders_with_their_urls(tmp_path, capsys):
    assert run_cli("weights", "check", "--weights-dir", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert f"MISSING  {PART2}" in out
    assert f"https://github.com/wasserth/TotalSegmentator/releases/download/v2.0.0-weights/{PART2}.zip" in out
    assert "weights install --from" in out


def test_urls_lists_every_zip_for_the_config(tmp_path, capsys):
    toml = tmp_path / "node.toml"
    toml.write_text('[segmenter]\nfast = true\nvertebral_bodies = "auto"\n')
    assert run_cli("weights", "urls", "--config", str(toml)) == 0
    names = [line.rsplit("/", 1)[1] for line in capsys.readouterr().out.split()]
    assert names == [f"{FAST}.zip", f"{CROP}.zip", f"{BODY}.zip"]


def test_install_from_release_zips_then_check_passes(tmp_path, capsys):
    zips = release_zips(tmp_path, [291, 292, 293, 294, 295, 298])
    target = tmp_path / "weights"
    assert run_cli("weights", "install", "--from", str(zips), "--weights-dir", str(target)) == 0
    out = capsys.readouterr().out
    assert f"installed {PART2} from {PART2}.zip" in out
    assert sorted(p.name for p in target.iterdir()) == sorted(weights.required_models(SegmenterConfig()))
    assert run_cli("weights", "check", "--weights-dir", str(target)) == 0


def test_install_of_one_zip_replaces_an_older_copy(tmp_path):
    zips = release_zips(tmp_path, [298])
    target = tmp_path / "weights"
    (target / CROP / "stale").mkdir(parents=True)
    assert run_cli("weights", "install", "--from", str(zips / f"{CROP}.zip"), "--weights-dir", str(target)) == 0
    assert not (target / CROP / "stale").exists()
    assert weights.Model(298, weights.CROP_TRAINER).is_installed(target)
    assert [p.name for p in target.iterdir()] == [CROP]  # no staging folder left behind


def test_install_refuses_an_incomplete_zip_and_installs_nothing(tmp_path, capsys):
    zips = release_zips(tmp_path, [292])
    archive = zips / f"{PART2}.zip"
    with zipfile.ZipFile(archive) as zf:
        kept = [(i, zf.read(i)) for i in zf.infolist() if not i.filename.endswith("checkpoint_final.pth")]
    with zipfile.ZipFile(archive, "w") as zf:
        for info, data in kept:
            zf.writestr(info, data)
    target = tmp_path / "weights"
    assert run_cli("weights", "install", "--from", str(archive), "--weights-dir", str(target)) == 2
    assert "lacks fold_0/checkpoint_final.pth" in capsys.readouterr().err
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("content", [b"not a zip", None])
def test_install_refuses_what_is_not_a_release_zip(tmp_path, capsys, content):
    archive = tmp_path / "weights.zip"
    if content is None:
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("readme.txt", "hello")
    else:
        archive.write_bytes(content)
    assert run_cli("weights", "install", "--from", str(archive), "--weights-dir", str(tmp_path / "w")) == 2
    assert str(archive) in capsys.readouterr().err


def test_install_from_a_missing_path_says_what_to_pass(tmp_path, capsys):
    assert run_cli("weights", "install", "--from", str(tmp_path / "nope"), "--weights-dir", str(tmp_path)) == 2
    assert "folder of TotalSegmentator release zips" in capsys.readouterr().err
