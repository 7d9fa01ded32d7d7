"""The GPU check kit (issue 23): the wheelhouse fits the device, installs offline, and the benches' modules import.

The device's python3 is CPython 3.12 with torch. Here only Python 3.11 has a torch (the CPU build on
disk; PyPI's cp312 torch is the CUDA build, several GB), so the full dry run (install with
--no-index, then import every module the benches need beside torch) runs on 3.11 against a
stand-in of the device: a venv that holds only the .venv's packages that the device also holds.
The real cp312 wheelhouse is checked for size and tags, and installed offline into a Python 3.12
venv where one exists here, importing what needs no numpy or torch.
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(ROOT / "scripts" / name))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    sys.modules[loader.name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


kit = _load("gpu-kit")
check = _load("gpu-check")


def _kit(dest: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu-kit"), "--dest", str(dest), *extra],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def wheelhouse_312(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    dest = tmp_path_factory.mktemp("whl312")
    return dest, _kit(dest)


@pytest.fixture(scope="session")
def wheelhouse_here(tmp_path_factory) -> Path:
    """The same kit for this Python, for the dry run against the stand-in device."""
    dest = tmp_path_factory.mktemp("whl-here")
    answer = _kit(dest, "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}")
    assert answer.returncode == 0, answer.stdout + answer.stderr
    return dest


@pytest.fixture(scope="session")
def device_python(tmp_path_factory) -> Path:
    """A venv holding only what the device holds of this .venv (linked, not copied): torch, numpy, scipy, pip..."""
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dir = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    for dist in importlib.metadata.distributions():
        if kit.canonical(dist.metadata["Name"]) not in kit.DEVICE_HOLDS:
            continue
        source = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if (source / top).exists() and not (site_dir / top).exists():
                (site_dir / top).symlink_to(source / top)
    return python


def _dry_run(python: Path, wheelhouse: Path, venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), str(ROOT / "scripts" / "gpu-check"), "--dry-run", "--wheelhouse", str(wheelhouse),
                           "--venv", str(venv)], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_kit_builds_a_wheelhouse_under_the_device_limit(wheelhouse_312):
    dest, answer = wheelhouse_312
    assert answer.returncode == 0, answer.stdout + answer.stderr
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    shipped = {kit.canonical(name.split("-")[0]) for name in wheels}
    assert shipped == {kit.canonical(name) for name in kit.SHIP}
    total = sum(p.stat().st_size for p in dest.glob("*.whl")) + kit.tree_bytes()
    assert total <= kit.LIMIT_MIB * 2**20, answer.stdout
    for name in wheels:
        python_tag, abi, platform = name[:-4].split("-")[-3:]
        assert platform == "any" or (platform.startswith("manylinux") and "x86_64" in platform
                                     and (python_tag == "cp312" or abi == "abi3")), name
    assert f"(limit {kit.LIMIT_MIB} MiB)" in answer.stdout


def test_kit_ships_nothing_the_device_holds():
    assert not {kit.canonical(n) for n in kit.SHIP} & kit.DEVICE_HOLDS


def _python_312() -> str | None:
    for candidate in [shutil.which("python3.12"), *glob.glob("/root/.pyenv/versions/3.12*/bin/python3.12")]:
        if candidate and subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(_python_312() is None, reason="no Python 3.12 here to install the cp312 wheelhouse into")
def test_cp312_wheelhouse_installs_offline_into_python_312(wheelhouse_312, tmp_path):
    dest, answer = wheelhouse_312
    assert answer.returncode == 0, answer.stdout + answer.stderr
    venv = tmp_path / "venv312"
    subprocess.run([_python_312(), "-m", "venv", "--without-pip", str(venv)], check=True)
    target = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    install = subprocess.run([_python_312(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", target,
                              *map(str, dest.glob("*.whl"))], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    # what imports without numpy or torch, which the device holds and this Python lacks
    imported = subprocess.run([str(venv / "bin" / "python"), "-c", "import SimpleITK, pydicom, retrying"],
                              capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr


def test_dry_run_installs_offline_and_every_bench_module_imports(device_python, wheelhouse_here, tmp_path):
    answer = _dry_run(device_python, wheelhouse_here, tmp_path / "venv")
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert f"{len(check.MODULES)} modules and the nnU-Net trainers import" in answer.stdout
    assert "torch" in answer.stdout.splitlines()[0]


def test_dry_run_fails_naming_a_missing_wheel(device_python, wheelhouse_here, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(wheelhouse_here, partial, ignore=shutil.ignore_patterns("nibabel-*"))
    answer = _dry_run(device_python, partial, tmp_path / "venv")
    assert answer.returncode == 1
    assert "nibabel" in answer.stderr and "add the missing distribution to SHIP" in answer.stderr


GPU_OUTPUT = """stand-in weights (real architecture, patch 128): 20.1 s
roi_subset+vertebrae_body, resident engine start (process + every model loaded): 12.3 s
roi_subset+vertebrae_body, resident job 1/2: 11.50 s per CT
    forward passes                                   8.00 s
    outside them                                     3.50 s (44% of the model's time)
    peak GPU memory: 7.25 GiB; labels [0, 1]
roi_subset+vertebrae_body, resident job 2/2: 9.00 s per CT
    forward passes                                   8.00 s
    outside them                                     1.00 s (12% of the model's time)
    peak GPU memory: 7.50 GiB; labels [0, 1]
fast, resident engine start (process + every model loaded): 5.0 s
fast, resident job 1/2: 3.00 s per CT
    outside them                                     1.00 s (50% of the model's time)
"""

THROUGHPUT_OUTPUT = """1 worker(s) x 1 CPU thread(s) per engine (one job at a time), 6 CTs:
    jobs: {'done': 6}
    60.0 s, 10.0 s per study, 360.0 studies/hour
    GPU utilisation: mean 70 %, median 80 %, max 100 %, busy (>0 %) 90 % of 100 samples
1 worker(s) x 2 CPU thread(s) per engine (overlap), 6 CTs:
    jobs: {'done': 6}
    50.0 s, 8.3 s per study, 432.0 studies/hour
    GPU utilisation: mean 85 %, median 90 %, max 100 %, busy (>0 %) 95 % of 90 samples
"""


def test_figures_are_read_off_the_benches_output():
    gpu = check.parse_gpu(GPU_OUTPUT)
    assert gpu["roi_subset+vertebrae_body"]["per_ct_warm_s"] == 9.0
    assert gpu["roi_subset+vertebrae_body"]["peak_gpu_gib"] == 7.5
    assert gpu["fast"]["per_ct_s"] == [3.0]
    segment = check.parse_segment("        resident:    9.10 s per CT (n=2; 9.00, 9.20), forward passes   8.00 s, "
                                  "outside them    1.10 s\nresident/totalsegmentator time per CT: 0.20; labels identical: yes\n")
    assert segment["resident"] == {"per_ct_s": 9.1, "forward_s": 8.0, "outside_s": 1.1}
    assert segment["labels_identical"] is True
    throughput = check.parse_throughput(THROUGHPUT_OUTPUT)
    plan = check.stages(Path("/tmp"))
    plan[0].figures, plan[2].figures = gpu, throughput
    head = check.headline({"card": "NVIDIA H100 80GB HBM3"}, plan)
    assert head == {"card": "NVIDIA H100 80GB HBM3", "segmentation_s_per_ct": 9.0, "overhead_pct": 12.0,
                    "peak_gpu_gib": 7.5, "studies_per_hour_overlap": 432.0}
    assert check.last_line(head, 400, 480).startswith("gpu-check on NVIDIA H100 80GB HBM3: segmentation 9 s per CT")


def test_stages_are_skipped_with_a_line_when_the_budget_is_short(tmp_path, capsys):
    plan = check.stages(tmp_path)
    check.run_stages(Path(sys.executable), plan, budget_s=100, started=check.time.monotonic(), out=tmp_path)
    assert all(stage.status.startswith("skipped") for stage in plan)
    assert capsys.readouterr().out.count("skipped") == len(plan)
