"""Seconds to build and write the SEG, the SR and the key image for a 512x512x400 CT, and peak RSS.

Target on the 2-core CI machine: <= 4 s in total, peak RSS <= 3 GB.
Run: .venv/bin/python bench/encode.py [--slices 400] [--jpeg2000]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import phantom as ph  # noqa: E402

from dicom_sr.biomarker_seg import append_bone_and_organ_segments  # noqa: E402
from dicom_sr.encoding import encode  # noqa: E402
from dicom_sr.keyimage import build_key_image  # noqa: E402
from dicom_sr.options import EncodeOptions  # noqa: E402
from dicom_sr.results import gc_paused, warm_up  # noqa: E402
from dicom_sr.seg import build_seg, segment_map  # noqa: E402
from dicom_sr.sr import build_sr  # noqa: E402
from node.config import MeasureConfig, ResultsConfig  # noqa: E402
from node.pipeline.ct import CTVolume  # noqa: E402
from node.pipeline.measure import MeasurementResult, measure  # noqa: E402
from node.pipeline.segmentation import Segmentation  # noqa: E402


def ct_from_phantom(phantom: ph.Phantom) -> CTVolume:
    """The phantom as load_ct would give it for the standard axial layout, without writing files."""
    datasets = []
    for k in range(phantom.shape[0]):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Bench", "BENCH", "19600101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = phantom.study_uid, "1.2.826.0.1.3680043.8.498.1"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", f"1.2.826.0.1.3680043.8.498.3.{k + 1}"
        ds.Modality, ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "CT", "20240102", "1015", "B1", "1"
        ds.ReferringPhysicianName, ds.BodyPartExamined = "", "CHEST"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(v) for v in phantom.position(k, 0, 0)]
        ds.PixelSpacing = [phantom.spacing[1], phantom.spacing[2]]
        ds.SliceThickness = phantom.spacing[0]
        ds.Rows, ds.Columns = phantom.shape[1:]
        datasets.append(ds)
    return CTVolume(hu=phantom.hu, spacing=phantom.spacing, origin=np.array(phantom.origin),
                    direction=np.eye(3), slice_thickness=phantom.spacing[0], datasets=datasets)


def timed(label: str, timings: dict[str, tuple[float, float]], function, *args):
    """Wall and CPU seconds: on a shared CI machine the CPU figure shows what contention hides."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = function(*args)
    timings[label] = (time.perf_counter() - wall, time.process_time() - cpu)
    return value


def write(dataset: Dataset, path: Path) -> None:
    """As write_results writes (encode, then the bytes), without its fsync."""
    path.write_bytes(encode(dataset))


def encode_once(ct: CTVolume, seg: Segmentation, result: MeasurementResult,
                options: EncodeOptions) -> tuple[dict[str, tuple[float, float]], dict[str, int], int]:
    """One job's encoding as write_results does it, timed per step; also the file sizes and the SEG's frame count."""
    timings: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as out, gc_paused():  # as write_results does
        segments = timed("segment map", timings, segment_map, seg, result)
        seg_object = timed("SEG build", timings, build_seg, ct, segments, result, options)
        timed("SEG bone, organs", timings, append_bone_and_organ_segments, seg_object, ct, seg, result, options,
              segments.boxes)
        timed("SEG write", timings, write, seg_object, Path(out) / "seg.dcm")
        sr = timed("SR build", timings, build_sr, ct, seg_object, result, options)
        timed("SR write", timings, write, sr, Path(out) / "sr.dcm")
        key_image = timed("key image build", timings, build_key_image, ct, segments, result, options)
        timed("key image write", timings, write, key_image, Path(out) / "keyimage.dcm")
        sizes = {p.name: p.stat().st_size for p in Path(out).iterdir()}
    return timings, sizes, int(seg_object.NumberOfFrames)


def _sum(timings: dict[str, tuple[float, float]]) -> tuple[float, float]:
    return sum(t[0] for t in timings.values()), sum(t[1] for t in timings.values())


def _pair(times: tuple[float, float]) -> str:
    return f"{times[0]:.2f} ({times[1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=400)
    parser.add_argument("--jpeg2000", action="store_true", help="compress the SEG with JPEG 2000 lossless")
    parser.add_argument("--labelmap", action="store_true", help="write a LABELMAP SEG instead of BINARY")
    args = parser.parse_args()
    phantom = ph.make_phantom(shape=(args.slices, 512, 512))
    ct = ct_from_phantom(phantom)
    seg = Segmentation(phantom.labels, phantom.body == ph.BODY, "2.18.0")
    result = measure(ct, seg, MeasureConfig())
    options = EncodeOptions(ResultsConfig(jpeg2000=args.jpeg2000, labelmap=args.labelmap))
    cold = encode_once(ct, seg, result, options)
    warm_up()  # as a worker does when it starts
    runs = [cold, encode_once(ct, seg, result, options)]
    (first, sizes, frames), (later, _, _) = runs
    print(f"CT {ct.shape[2]}x{ct.shape[1]}x{ct.shape[0]}, SEG {frames} frames "
          f"({'LABELMAP' if args.labelmap else 'BINARY'}, {'JPEG 2000' if args.jpeg2000 else 'uncompressed'})")
    print(f"{'':16s} {'first job':>10s} {'later jobs':>11s}   (wall s; cpu s in brackets)")
    for label in first:
        print(f"{label:16s} {_pair(first[label]):>10s} {_pair(later[label]):>11s}")
    print(f"{'total':16s} {_pair(_sum(first)):>10s} {_pair(_sum(later)):>11s}   target <= 4 s")
    print("'first job': a fresh process that has not paid the encoders' one-time costs (highdicom's tables")
    print("of the standard, fonts); a worker pays them when it starts (warm_up), so its jobs cost 'later jobs'.")
    print("sizes: " + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sorted(sizes.items())))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mb:.0f} MB (target <= 3072 MB; includes the phantom and the measurement)")


if __name__ == "__main__":
    main()
