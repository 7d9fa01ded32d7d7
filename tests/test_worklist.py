"""`paraspinal-node worklist`: rows from the state database, the flag, --since and both formats."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from node.cli.main import main
from node.labels import MEASURED_LEVELS
from node.state.store import SeriesRecord, open_state
from node.state.worklist import parse_since


def stats(median: float | None, volume: float) -> dict:
    return {"voxels": 0 if median is None else 100, "volume_cm3": volume, "median_hu": median}


def result(level_median: float, total_median: float | None) -> dict:
    levels = [{"level": name, "status": "complete" if i < 9 else "partial", "reasons": [],
               "combined": stats(level_median + i, 10.0 + i)} for i, name in enumerate(MEASURED_LEVELS)]
    return {"levels": levels, "total": {"combined": stats(total_median, 145.0)}}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n[measure]\nlow_attenuation_hu = 10.0\n')
    state = open_state(tmp_path / "state" / "state.sqlite")
    rows = [("1.1", "PID-A", "ACC-A", "20240105", result(30.0, 27.5)),
            ("1.2", "PID-B", "ACC-B", "20240210", result(2.0, 4.0)),
            ("1.3", "PID-C", "ACC-C", "20231201", result(20.0, None))]
    for uid, patient, accession, day, measurements in rows:
        state.record_series(SeriesRecord(uid, "9", patient, accession, day, "CT", "chest", 80, "f", "/x"))
        job = state.add_job(uid, "f", "/x")
        claimed = state.claim("w", 60, 3)
        state.complete(job.id, claimed.token, measurements, [])
    state.record_series(SeriesRecord("1.4", "9", "PID-D", "ACC-D", "20240301", "CT", "chest", 80, "f", "/x"))
    state.add_job("1.4", "f", "/x")  # queued, not processed: not listed
    state.close()
    return path


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_csv_lists_processed_studies_with_levels_and_flag(config_file: Path, capsys) -> None:
    code, out, _ = run(capsys, "worklist", "--config", str(config_file))
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["accession"] for r in rows] == ["ACC-C", "ACC-A", "ACC-B"]
    first = rows[1]
    assert (first["patient_id"], first["study_date"]) == ("PID-A", "2024-01-05")
    assert (first["T1_median_hu"], first["T1_volume_cm3"], first["T1_status"]) == ("30.0", "10.0", "complete")
    assert (first["T10_median_hu"], first["T10_status"]) == ("39.0", "partial")
    assert (first["t1_t10_status"], first["t1_t10_levels"]) == ("partial", "T1-T10 (T10 partial)")
    assert [r["low_attenuation"] for r in rows] == ["", "no", "yes"]


def test_json_since_filters_on_study_date(config_file: Path, capsys) -> None:
    code, out, _ = run(capsys, "worklist", "--config", str(config_file), "--format", "json", "--since", "2024-02-01")
    assert code == 0
    (row,) = json.loads(out)
    assert row["accession"] == "ACC-B" and row["low_attenuation"] is True and row["t1_t10_median_hu"] == 4.0


def test_absent_levels_have_no_figures_and_the_totals_say_what_they_cover(tmp_path: Path, capsys) -> None:
    """T1-T3 outside the field of view: blanks, not a volume of 0, and totals over T4-T10 only."""
    measurements = result(20.0, 5.0)
    for level in measurements["levels"][:3]:
        level["status"], level["combined"] = "absent", stats(None, 0.0)
    path = tmp_path / "node.toml"
    path.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    state = open_state(tmp_path / "state" / "state.sqlite")
    state.record_series(SeriesRecord("2.1", "9", "PID-E", "ACC-E", "20240401", "CT", "chest", 80, "f", "/x"))
    job = state.add_job("2.1", "f", "/x")
    claimed = state.claim("w", 60, 3)
    state.complete(job.id, claimed.token, measurements, [])
    state.close()
    code, out, _ = run(capsys, "worklist", "--config", str(path), "--format", "json")
    (row,) = json.loads(out)
    assert code == 0
    assert (row["T1_status"], row["T1_volume_cm3"], row["T1_median_hu"]) == ("absent", None, None)
    assert (row["t1_t10_status"], row["t1_t10_levels"]) == ("partial", "T4-T10 (T1, T2, T3 absent; T10 partial)")
    assert row["low_attenuation"] is True and row["t1_t10_median_hu"] == 5.0


def test_bad_since_is_a_usage_error(config_file: Path, capsys) -> None:
    code, _, err = run(capsys, "worklist", "--config", str(config_file), "--since", "last tuesday")
    assert code == 2 and "YYYY-MM-DD" in err


@pytest.mark.parametrize(("text", "expected"), [("2024-02-29", "20240229"), ("20240101", "20240101")])
def test_since_accepts_both_date_forms(text: str, expected: str) -> None:
    assert parse_since(text) == expected


def test_since_refuses_impossible_dates() -> None:
    with pytest.raises(ValueError, match="calendar date"):
        parse_since("2023-02-29")
