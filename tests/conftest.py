"""Shared fixtures: one phantom per session, and its files written once on demand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import phantom as ph
import pytest

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg-example-ct"


@pytest.fixture(scope="session")
def real_ct() -> Path:
    """The real scanner series (JPEG 2000, blank UIDs) from ../shared/data, beside the repo."""
    if not REAL_CT.is_dir():
        pytest.skip(f"the real CT series is not at {REAL_CT}: clone the repo beside shared/")
    return REAL_CT


@pytest.fixture(scope="session")
def phantom() -> ph.Phantom:
    """The default phantom (about 124x128x128 at 2.5/0.9/0.9 mm, seed 0)."""
    return ph.make_phantom()


@pytest.fixture(scope="session")
def phantom_truth(phantom: ph.Phantom) -> dict:
    """truth(phantom) with vertebrae_body; canonical slab indices."""
    return ph.truth(phantom)


@pytest.fixture(scope="session")
def phantom_bone_truth(phantom: ph.Phantom) -> list[dict]:
    """bone_truth(phantom): the "vertebrae" list, T1..T12 and L1, with vertebrae_body."""
    return ph.bone_truth(phantom)


@pytest.fixture(scope="session")
def truncated_phantom(phantom: ph.Phantom) -> ph.Phantom:
    """The phantom with its field of view cut through the middle of T1's body."""
    return phantom.truncated_through("T1")


@pytest.fixture(scope="session")
def phantom_dicom(tmp_path_factory: pytest.TempPathFactory,
                  phantom: ph.Phantom) -> Callable[..., ph.DicomSeries]:
    """`phantom_dicom("flipped", storage="signed")` -> the default phantom as a DICOM series.

    Series are written once per distinct arguments and shared by the session; do not modify
    the files (copy the folder first).
    """
    written: dict[str, ph.DicomSeries] = {}

    def get(layout: str = "axial", **options: object) -> ph.DicomSeries:
        key = f"{layout}-{sorted(options.items())}"
        if key not in written:
            folder = tmp_path_factory.mktemp(f"phantom-dicom-{layout}")
            written[key] = ph.write_dicom_series(phantom, folder, ph.LAYOUTS[layout], **options)
        return written[key]

    return get


@pytest.fixture(scope="session")
def phantom_masks(tmp_path_factory: pytest.TempPathFactory, phantom: ph.Phantom) -> Callable[..., Path]:
    """`phantom_masks("multilabel", orientation="PIR")` -> TotalSegmentator-style masks, written once."""
    written: dict[str, Path] = {}

    def get(form: str = "folder", orientation: str = "RAS", include_body: bool = True) -> Path:
        key = f"{form}-{orientation}-{include_body}"
        if key not in written:
            folder = tmp_path_factory.mktemp(f"phantom-masks-{form}-{orientation}")
            written[key] = ph.write_masks(phantom, folder, form, orientation, include_body)
        return written[key]

    return get


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL server for the session (tests/postgres.py)."""
    import postgres as pg

    server = pg.start_postgres()
    yield server
    pg.remove(server)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.fresh_database()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory):
    """A site CA with server, client, expired and foreign-CA certificates (tests/tls_certs.py), made once."""
    from tls_certs import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))
