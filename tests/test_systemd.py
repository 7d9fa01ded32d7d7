"""systemd units: `systemd-analyze verify` where available, and the hardening the issue requires."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import load_config
from node.service.serve import SHUTDOWN_GRACE_S

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
NODE, WORKER, GPU_HOST = "paraspinal-node.service", "paraspinal-worker@.service", "paraspinal-gpu-worker@.service"
CONFIG = {NODE: "node.toml", WORKER: "node.toml", GPU_HOST: "worker.toml"}
INSTALLED_BINARY = "/opt/paraspinal-node/bin/paraspinal-node"


def parse(name: str) -> dict[str, dict[str, list[str]]]:
    """Unit file as section -> key -> values (systemd keys may repeat)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"), dict_type=_MultiDict)
    parser.optionxform = str
    parser.read(UNITS / name)
    return {section: {key: value.split("\n") for key, value in parser[section].items()}
            for section in parser.sections()}


class _MultiDict(dict):
    def __setitem__(self, key, value):
        if isinstance(value, list) and key in self:
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


@pytest.mark.parametrize("name", [NODE, WORKER, GPU_HOST])
def test_units_are_hardened_and_restart_on_failure(name: str) -> None:
    service = parse(name)["Service"]
    state_dir = str(load_config(ROOT / "config" / "node.toml", environ={}).storage.state_dir)
    assert service["User"] == ["paraspinal"] and service["Group"] == ["paraspinal"]
    assert service["ProtectSystem"] == ["strict"]
    assert state_dir in " ".join(service["ReadWritePaths"]).split()  # state, spool and outbox live there
    assert service["NoNewPrivileges"] == ["true"] and service["PrivateTmp"] == ["true"]
    assert service["Restart"] == ["on-failure"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert f"--config /etc/paraspinal-node/{CONFIG[name]}" in service["ExecStart"][0]


def test_node_runs_serve_and_worker_template_pins_its_gpu() -> None:
    assert parse(NODE)["Service"]["ExecStart"][0].split()[1] == "serve"
    worker = parse(WORKER)
    assert worker["Service"]["ExecStart"][0].split()[1] == "worker"
    assert "PARASPINAL_SEGMENTER_DEVICE=gpu:%i" in worker["Service"]["Environment"]
    assert worker["Service"]["PrivateNetwork"] == ["true"]
    load_config(None, environ={"PARASPINAL_SEGMENTER_DEVICE": "gpu:3"})  # what %i=3 gives is valid


def test_gpu_host_worker_reaches_the_network_and_reads_worker_toml() -> None:
    service = parse(GPU_HOST)["Service"]
    assert service["ExecStart"][0].split()[1] == "worker"
    assert "PrivateNetwork" not in service and "AF_INET" in service["RestrictAddressFamilies"][0].split()
    config = load_config(ROOT / "config" / "worker.toml", environ={})
    assert config.state.shared and config.dicomweb.token_file is not None
    assert not config.destinations  # delivery stays with the serves


def test_node_stop_timeout_covers_the_slowest_orderly_shutdown() -> None:
    # Service.shutdown: receiver grace, worker grace, then the send in progress (its timeout plus a grace).
    delivery_timeout_s = load_config(ROOT / "config" / "node.toml", environ={}).delivery.timeout_s
    slowest_s = SHUTDOWN_GRACE_S + SHUTDOWN_GRACE_S + delivery_timeout_s + SHUTDOWN_GRACE_S
    (timeout,) = parse(NODE)["Service"]["TimeoutStopSec"]
    assert int(timeout) > slowest_s


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # verify insists that ExecStart exists; point it at this interpreter instead of the install path.
    for name in (NODE, WORKER, GPU_HOST):
        text = (UNITS / name).read_text().replace(INSTALLED_BINARY, sys.executable)
        (tmp_path / name).write_text(text)
    units = [str(tmp_path / NODE), str(tmp_path / "paraspinal-worker@0.service"),
             str(tmp_path / "paraspinal-gpu-worker@0.service")]
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ignoring" not in result.stderr and "Unknown" not in result.stderr, result.stderr
