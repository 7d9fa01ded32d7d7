"""What looking up priors costs per job, beside the job's own finish stage without priors.

A local Orthanc (Debian's, as the tests start it) holds `--priors` earlier SRs of the phantom
patient. The later phantom's finish stage (measure, encode) runs `--rounds` times without priors,
then the lookup alone runs `--rounds` times for each way: the node's state only, the PACS by
C-FIND + C-GET, the PACS by C-FIND + C-MOVE into a running receiver, and the PACS when the state
already holds the SR (C-FIND only). Median seconds are printed.

    .venv/bin/python bench/priors.py [--priors 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import phantom as ph  # noqa: E402
from dicom_peers import free_port  # noqa: E402
from orthanc import Modality, Orthanc  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from node.config import Config, PriorsConfig, ReceiverConfig  # noqa: E402
from node.ingest.receiver import Receiver  # noqa: E402
from node.ingest.spool import Spool  # noqa: E402
from node.pipeline.ct_load import load_ct  # noqa: E402
from node.pipeline.seg_load import load_segmentation  # noqa: E402
from node.priors.inbox import PriorsInbox  # noqa: E402
from node.priors.lookup import PriorSources  # noqa: E402
from node.run import Segmented, finish  # noqa: E402
from node.state.store import SeriesRecord, State  # noqa: E402

NODE_AE = "PARASPINAL"


class _Quiet:
    def instance_stored(self, instance) -> None: ...
    def association_released(self, association_id: str) -> None: ...
    def association_aborted(self, association_id: str) -> None: ...
    def instance_refused(self, association_id: str, series_uid, sop_instance_uid) -> None: ...


def study(phantom: ph.Phantom, masks: Path, folder: Path, date: str) -> Segmented:
    ph.write_dicom_series(phantom, folder, study_uid=str(generate_uid()),
                          header={"StudyDate": date, "ContrastBolusAgent": "none"})
    ct = load_ct(folder)
    return Segmented(ct, load_segmentation(masks, ct))


def median_s(action, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--priors", type=int, default=2, help="earlier SRs at the PACS (default 2)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-priors-"))
    phantom = ph.make_phantom()
    masks = ph.write_masks(phantom, root / "masks")
    config = Config()
    config.storage.state_dir = root / "node"
    priors = [finish(study(phantom, masks, root / f"prior{i}", f"20{20 + i}0101"), root / f"out{i}", config)
              for i in range(args.priors)]
    later = study(phantom, masks, root / "later", "20240601")
    port = free_port()
    orthanc = Orthanc(root / "orthanc", {"node": Modality(NODE_AE, port)})
    orthanc.start()
    orthanc.upload([result.files["sr"] for result in priors])
    config.receiver = ReceiverConfig(ae_title=NODE_AE, port=port, bind_address="127.0.0.1", min_free_disk_mb=1)
    config.priors = PriorsConfig(ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port)
    receiver = Receiver(config.receiver, Spool(root / "spool"), _Quiet(), priors_inbox=PriorsInbox.from_config(config))
    receiver.start()
    try:
        job_s = median_s(lambda: finish(later, root / "job", Config()), args.rounds)
        current = finish(later, root / "job", Config(), dicom=False).measurement.to_dict()
        empty, held = State(root / "empty.sqlite"), State(root / "held.sqlite")
        for i, result in enumerate(priors):
            record(held, result.measurement.to_dict(), i)
        no_pacs = copy.deepcopy(config)
        no_pacs.priors = PriorsConfig()
        move = copy.deepcopy(config)
        move.priors = dataclasses.replace(config.priors, retrieve="move")
        ways = {"state only": PriorSources.from_config(no_pacs, held),
                "PACS, C-FIND + C-GET": PriorSources.from_config(config, empty),
                "PACS, C-FIND + C-MOVE": PriorSources.from_config(move, empty),
                "PACS, SRs already in the state (C-FIND only)": PriorSources.from_config(config, held)}
        print(f"finish stage without priors (measure + encode): {job_s:.3f} s")
        for name, sources in ways.items():
            found = sources.look_up(current)
            assert len(found.priors) == args.priors, (name, found.to_dict()["priors"])
            print(f"priors lookup, {args.priors} priors, {name}: {median_s(lambda s=sources: s.look_up(current), args.rounds):.3f} s")
    finally:
        receiver.stop(grace_s=2)
        orthanc.stop()
    return 0


def record(state: State, result: dict, i: int) -> None:
    series = result["source"]["series_instance_uid"]
    state.record_series(SeriesRecord(series, result["source"]["study_instance_uid"], "PHANTOM-0", "A", "2020",
                                     "CT", "phantom", 1, "f", "/x"))
    job = state.add_job(series, "f", "/x")
    claimed = state.claim("bench", 60, 3)
    state.complete(job.id, claimed.token, result, [])


if __name__ == "__main__":
    sys.exit(main())
