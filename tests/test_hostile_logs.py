"""Hostile peers against the log of a real `serve` process, in both log formats (issue 22).

A peer chooses its AE titles and the UIDs it proposes; pynetdicom and pydicom quote them in their
own messages and Python warnings. Whatever a peer sends, every line on stderr must be one made by
the node's formatter, with no field or line a peer added, and one association's negotiation may
not write more than `NEGOTIATION_LINES` lines however many items it proposes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_peers import free_port
from support import wait_until

from node.logs import fields

ROOT = Path(__file__).resolve().parents[1]
AE_TITLE = "NODE"
NEGOTIATION_LINES = 100
LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
FORGED_AE = b"Z\nevent=forged\x00X"  # 16 bytes: the whole calling AE field
FORGED_ABSTRACT = b"1.2 level=ERROR event=forged7"
FORGED_SYNTAX = b"1.2\nlevel=ERROR event=forged6"
CT_IMAGE_STORAGE = b"1.2.840.10008.5.1.4.1.1.2"


class Serve:
    """`paraspinal-node serve` in its own process, stderr in a file."""

    def __init__(self, root: Path, log_format: str) -> None:
        self.format = log_format
        self.port = free_port()
        self.log = root / "serve.log"
        self.config = root / "node.toml"
        self.config.write_text(f"""
[receiver]
ae_title = "{AE_TITLE}"
port = {self.port}
bind_address = "127.0.0.1"
min_free_disk_mb = 1
[storage]
state_dir = "{root / 'state'}"
[worker]
count = 0
[web]
enabled = false
[logging]
format = "{log_format}"
""")
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "node.cli.main", "serve", "--config", str(self.config)],
                                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                            stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: "node_started" in self.log.read_text(), "node start", 60)

    def lines(self) -> list[str]:
        return self.log.read_text(encoding="utf-8", errors="replace").splitlines()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)


@pytest.fixture(params=["kv", "json"])
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Serve]:
    node = Serve(tmp_path, request.param)
    try:
        yield node
    finally:
        node.stop()


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(calling: bytes = b"HOSTILE", abstract: bytes = CT_IMAGE_STORAGE,
                 syntaxes: tuple[bytes, ...] | list[bytes] = (b"1.2.840.10008.1.2",)) -> bytes:
    """An A-ASSOCIATE-RQ with exactly these bytes in its fields (pynetdicom's encoder would refuse them)."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract) + b"".join(_item(0x40, s) for s in syntaxes))
    user = _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + AE_TITLE.encode().ljust(16) + calling.ljust(16)[:16] + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def negotiate(port: int, request: bytes) -> int:
    """Send one A-ASSOCIATE-RQ, read the answer's PDU type (0: none), then drop the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        try:
            answer = sock.recv(6)
        except OSError:
            return 0
    return answer[0] if answer else 0


def parsed(line: str, log_format: str) -> dict[str, str]:
    """The fields of one line as a log shipper reads them; fails the test if the line is not the formatter's."""
    if log_format == "json":
        payload = json.loads(line)
        assert isinstance(payload, dict), line
        return payload
    assert line.startswith("ts="), f"a raw line reached stderr: {line!r}"
    return fields(line)


def test_forged_ae_titles_and_uids_add_no_field_or_line(serve: Serve) -> None:
    answers = [negotiate(serve.port, associate_rq(calling=FORGED_AE)),
               negotiate(serve.port, associate_rq(abstract=FORGED_ABSTRACT, syntaxes=(FORGED_SYNTAX,)))]
    wait_until(lambda: sum("association_" in line for line in serve.lines()) >= 2, "both associations logged", 30)
    serve.stop()

    assert all(answer in (0x02, 0x03, 0x07) for answer in answers)
    lines = serve.lines()
    records = [parsed(line, serve.format) for line in lines]
    assert not [r for r in records if "forged" in str(r.get("event", "")) or r.get("level") not in LEVELS]
    assert not [line for line in lines if "\x00" in line]
    loggers = {r["logger"] for r in records}
    assert {"pynetdicom.utils", "py.warnings"} <= loggers, "the library lines did not come through the formatter"
    messages = [r["message"] for r in records if r["logger"].startswith("pynetdicom")]
    assert any(FORGED_AE.decode() in m for m in messages) and any(FORGED_SYNTAX.decode() in m for m in messages)


def test_one_negotiation_with_6000_bogus_transfer_syntaxes_writes_at_most_100_lines(serve: Serve) -> None:
    before = len(serve.lines())
    request = associate_rq(syntaxes=[b"x"] * 6000)
    assert len(request) < 32 << 10

    assert negotiate(serve.port, request) == 0x02  # accepted, its one context refused: no syntax is one the node takes
    wait_until(lambda: any("association_aborted" in line for line in serve.lines()), "the association's end", 60)
    serve.stop()

    records = [parsed(line, serve.format) for line in serve.lines()[before:]]
    end = next(n for n, r in enumerate(records) if r.get("event") == "association_aborted")
    assert end + 1 <= NEGOTIATION_LINES
    held = [int(r["reason"].split()[2].replace(",", "")) for r in records if r.get("event") == "log_lines_held_back"]
    assert sum(held) > 20_000, "the lines held back were not counted"
