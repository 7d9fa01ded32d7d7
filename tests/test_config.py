"""Config: the commented example covers every option, errors name the key, environment overrides."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dicom_peers import free_port
from support import wait_until

from node.cli.main import main
from node.config import Config, ConfigError, DestinationConfig, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "node.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_example_loads_and_mentions_every_option() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.destinations == []  # the example names one only in comments: no default PACS
    text = EXAMPLE.read_text()
    for section in dataclasses.fields(Config):
        part = getattr(config, section.name)
        table = DestinationConfig if isinstance(part, list) else part
        assert re.search(rf"^(# )?\[\[?{section.name}\]\]?$", text, re.M), section.name
        for option in dataclasses.fields(table):
            pattern = rf"^#? ?({option.name} = |\[{section.name}\.{option.name}\]$)"
            assert re.search(pattern, text, re.M), f"{section.name}.{option.name}"


def test_example_values_are_the_defaults_where_they_are_active() -> None:
    example, defaults = load_config(EXAMPLE, environ={}), Config()
    assert example.selection == defaults.selection
    assert example.completion == defaults.completion
    assert example.worker == defaults.worker
    assert example.measure == defaults.measure
    assert example.logging == defaults.logging


@pytest.mark.parametrize(("text", "message"), [
    ("[worker]\ncuont = 2\n", "unknown key worker.cuont"),
    ("[worker]\ncount = \"two\"\n", "worker.count must be int"),
    ("[completion]\nrelease_quiet_s = 0\n", "completion.release_quiet_s must be greater than 0"),
    ("[selection]\nkernel_include = \"B[\"\n", "selection.kernel_include is not a valid regular expression"),
    ("[selection]\nslice_thickness_min_mm = 6.0\n", "slice_thickness_min_mm must not exceed"),
    ("[logging]\nformat = \"xml\"\n", "logging.format must be kv or json"),
    ("[[destinations]]\nae_title = \"A_VERY_LONG_AE_TITLE\"\nhost = \"h\"\n", "destinations[0].ae_title"),
    ("[[destinations]]\nae_title = \"PACS\"\nhost = \"h\"\nport = 0\n", "destinations[0].port"),
    ("[delivery]\nresults_dir = 5\n", "delivery.results_dir must be a path string"),
    ("[storage]\nretention_days = -1\n", "storage.retention_days must be 0 (keep everything) or more"),
    ("[storage\n", "not valid TOML"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={})
    assert message in str(caught.value)


def test_environment_overrides_file_values(tmp_path: Path) -> None:
    path = write(tmp_path, "[segmenter]\ndevice = \"gpu\"\n[worker]\ncount = 1\n")
    config = load_config(path, environ={"PARASPINAL_SEGMENTER_DEVICE": "gpu:1", "PARASPINAL_WORKER_COUNT": "0",
                                        "PARASPINAL_DELIVERY_RESULTS_DIR": "/srv/results",
                                        "PARASPINAL_SELECTION_MODALITIES": "CT, PT"})
    assert config.segmenter.device == "gpu:1" and config.worker.count == 0
    assert config.delivery.results_dir == Path("/srv/results")
    assert config.selection.modalities == ["CT", "PT"]


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="PARASPINAL_WORKER_LEASE_S='soon'"):
        load_config(None, environ={"PARASPINAL_WORKER_LEASE_S": "soon"})


def test_config_check_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "check", "--config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "weights missing" in out
    with_pacs = write(tmp_path, '[[destinations]]\nae_title = "PACS"\nhost = "pacs.example.org"\nport = 104\n')
    assert main(["config", "check", "--config", str(with_pacs)]) == 0
    assert "PACS@pacs.example.org:104" in capsys.readouterr().out
    assert main(["config", "check", "--config", str(write(tmp_path, "[worker]\ncount = -1\n"))]) == 2
    assert "worker.count must be 0 or more" in capsys.readouterr().err
    assert main(["config", "check", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "pass an existing --config FILE" in capsys.readouterr().err


def test_model_folders_follow_the_state_dir_unless_set(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('[storage]\nstate_dir = "/srv/node"\n[segmenter]\nprecomputed_dir = "/data/seg"\n')
    config = load_config(path, environ={})
    assert config.segmenter.weights_dir == Path("/srv/node/weights")
    assert config.segmenter.precomputed_dir == Path("/data/seg")
    overridden = load_config(path, environ={"PARASPINAL_SEGMENTER_WEIGHTS_DIR": "/opt/weights"})
    assert overridden.segmenter.weights_dir == Path("/opt/weights")


@pytest.mark.parametrize(("text", "message"), [
    ("[receiver]\nmax_associations = 0\n", "receiver.max_associations must be at least 1"),
    ("[receiver]\nmin_free_disk_mb = -1\n", "receiver.min_free_disk_mb must be at least 0"),
    ("[receiver]\nwatch_stable_s = 0\n", "receiver.watch_stable_s must be greater than 0"),
    ("[receiver]\nwatch_max_file_mb = 0\n", "receiver.watch_max_file_mb must be at least 1"),
    ("[receiver]\nae_title = \"A\\\\B\"\n", "receiver.ae_title 'A\\\\B' is not an AE title"),
    ("[receiver]\nae_title = \"   \"\n", "receiver.ae_title '   ' is not an AE title"),
    ("[receiver]\nallowed_calling_aes = [\"CT1\", \"SEVENTEEN_CHARS_X\"]\n", "SEVENTEEN_CHARS_X"),
    ("[[destinations]]\nae_title = \"PA\\u0007CS\"\nhost = \"h\"\n", "destinations[0].ae_title"),
    ("[measure]\nbody_hu_min = 800.0\n", "measure.body_hu_min must be less than measure.body_hu_max"),
    ("[measure]\nmax_slice_thickness_mm = 0.0\n", "measure.max_slice_thickness_mm must be greater than 0"),
    ("[segmenter]\ntimeout_s = 0\n", "segmenter.timeout_s must be at least 1"),
    ("[results]\nsr_series_number = 0\n", "results.sr_series_number must be at least 1"),
])
def test_numbers_and_ae_titles_that_would_turn_a_safeguard_off_are_refused(tmp_path: Path, text: str,
                                                                          message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={})
    assert message in str(caught.value)


def test_config_check_warns_when_any_host_may_send_under_any_ae(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "check", "--config", str(write(tmp_path, "[receiver]\nbind_address = \"0.0.0.0\"\n"))]) == 0
    assert "accepts any calling AE: set receiver.allowed_calling_aes" in capsys.readouterr().out
    closed = write(tmp_path, "[receiver]\nbind_address = \"0.0.0.0\"\nallowed_calling_aes = [\"PACS\"]\n")
    assert main(["config", "check", "--config", str(closed)]) == 0
    assert "accepts any calling AE" not in capsys.readouterr().out


def test_config_check_warns_about_exposure_word_for_word_as_serve(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    exposed = write(tmp_path, f"""
[receiver]
bind_address = "0.0.0.0"
port = {free_port()}
[storage]
state_dir = "{tmp_path / 'state'}"
[worker]
count = 0
[web]
bind = "0.0.0.0"
port = {free_port()}
[logging]
format = "json"
""")
    readable = write(tmp_path, exposed.read_text().replace('[web]\n', f'[web]\nauth = "basic"\nsecret_file = "{secret}"\n'))

    for config in (exposed, readable):
        assert main(["config", "check", "--config", str(config)]) == 0
        printed = capsys.readouterr().out.splitlines()
        checked = {line.removeprefix("  warning: ") for line in printed if "warning:" in line and "weights" not in line}
        assert checked == serve_warnings(config, tmp_path)
        assert len(checked) == 2  # the open receiver, then the open pages or the readable secret


def serve_warnings(config: Path, tmp_path: Path) -> set[str]:
    """The reasons a real `serve` with this config logs at start about exposure."""
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "node.cli.main", "serve", "--config", str(config)],
                                   cwd=EXAMPLE.parents[1], env={**os.environ, "PYTHONPATH": str(EXAMPLE.parents[1])},
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "node_started" in log.read_text(), "serve started", 60)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    exposure = {"receiver_open_to_all", "web_unprotected", "web_secret_readable"}
    return {r["reason"] for r in records if r.get("event") in exposure}


@pytest.mark.parametrize("text, message", [
    ('[receiver.tls]\nport = 2762\n', "needs certificate and private_key"),
    ('[receiver.tls]\ncertificate = "c"\nprivate_key = "k"\n', "needs receiver.tls.ca_certificates"),
    ('[receiver.tls]\ncertificate = "c"\nprivate_key = "k"\nrequire_client_certificate = false\nport = 11112\n',
     "differ from receiver.port"),
    ('[[destinations]]\nae_title = "P"\nhost = "h"\ntls = { certificate = "c" }\n', "go together"),
    ('[priors]\nae_title = "P"\nhost = "h"\n[priors.tls]\nprivate_key = "k"\n', "priors.tls.certificate and"),
    ('[backfill]\nwindows = ["25:00-06:00"]\n', "not a time of day"),
    ('[backfill.pacs]\nae_title = "P"\nhost = "h"\n[backfill.query]\nprotocols = ["neck"]\n', "must name"),
])
def test_tls_and_backfill_settings_are_checked(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), environ={})


def test_tls_true_means_tls_with_the_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[[destinations]]\nae_title = "P"\nhost = "h"\ntls = true\n'), environ={})
    assert config.destinations[0].tls is not None and config.destinations[0].tls.verify_hostname
