"""Start-up time and resident memory of `serve` (no workers), for this tree and a peer tree.

The receiving process should carry only what receiving needs. This starts `paraspinal-node serve`
from each source tree in turn (alternating, so machine load affects both alike), waits for its
`node_started` event, reads VmRSS from /proc and stops it. The peer is normally the same project
before a change, checked out with `git worktree add /tmp/before <commit>`.

    .venv/bin/python bench/serve_footprint.py --peer /tmp/before [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from dicom_peers import free_port  # noqa: E402


def start_once(tree: Path, work: Path) -> tuple[float, float]:
    """(seconds from exec to node_started, VmRSS in MB once started) for one serve from `tree`."""
    config = work / "node.toml"
    config.write_text(f"""
[receiver]
ae_title = "NODE"
port = {free_port()}
bind_address = "127.0.0.1"
min_free_disk_mb = 1
[storage]
state_dir = "{work / 'state'}"
[worker]
count = 0
""")
    log_path = work / "node.log"
    module = "node.cli.main" if (tree / "node" / "cli" / "main.py").exists() else "node.cli"
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", module, "serve", "--config", str(config)], cwd=tree,
                                   env={**os.environ, "PYTHONPATH": str(tree)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        while "event=node_started" not in log_path.read_text():
            if process.poll() is not None or time.monotonic() - started > 120:
                raise RuntimeError(f"serve from {tree} did not start: see {log_path}")
            time.sleep(0.01)
        elapsed = time.monotonic() - started
        rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    return elapsed, rss_kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", type=Path, required=True, help="another source tree of the node")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trees = {"this tree": ROOT, f"peer {args.peer}": args.peer.resolve()}
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            with tempfile.TemporaryDirectory() as work:
                figures[name].append(start_once(tree, Path(work)))
    medians = {name: (statistics.median(s for s, _ in runs), statistics.median(m for _, m in runs))
               for name, runs in figures.items()}
    for name, (start_s, rss_mb) in medians.items():
        print(f"{name}: start {start_s:.2f} s, RSS {rss_mb:.0f} MB (medians of {args.rounds})")
    (this_s, this_mb), (peer_s, peer_mb) = medians.values()
    print(f"this/peer start time: {this_s / peer_s:.2f}; RSS: {this_mb / peer_mb:.2f}")


if __name__ == "__main__":
    main()
