"""Destination kinds, each with one typed handler: its key, what a job sends it, how to deliver.

A delivery row names its destination by the handler's key (`AE@host:port` for a DICOM peer,
`folder` for the results folder), so pending rows survive a restart and a config change. As in
mercure's target registry, the loop never branches on the kind: `handler_for` turns a key back
into its handler, and the handler delivers a batch and answers one outcome per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from node.config import Config, DestinationConfig
from node.durable import write_atomic
from node.state.store import Delivery

if TYPE_CHECKING:  # the sender (pynetdicom) is imported where deliveries are sent, not where they are planned
    from node.delivery.sender import SendOutcome

RESULTS_FOLDER = "folder"  # the key of the results folder destination (delivery.results_dir)
DICOM_RESULTS = ("seg", "sr", "keyimage")

Sender = Callable[[DestinationConfig, list[Path], str, float], "list[SendOutcome]"]


@dataclass(frozen=True)
class Outcome:
    """What became of one delivery row in one attempt."""

    delivery: Delivery
    ok: bool
    message: str = ""  # empty on success; otherwise the reason, in one line


@dataclass(frozen=True)
class Context:
    """What a handler needs from the loop: the node's AE title, the send timeout, job lookups."""

    calling_ae: str
    timeout_s: float
    sender: Sender
    series_uid_of: Callable[[int], str]


class Handler(Protocol):
    event: ClassVar[str]  # the log event of a successful delivery

    @property
    def key(self) -> str: ...

    def files_for(self, results: dict[str, Path], out_dir: Path) -> list[Path]: ...

    def deliver(self, batch: list[Delivery], context: Context) -> list[Outcome]: ...


@dataclass(frozen=True)
class DicomPeer:
    """A C-STORE SCP (the PACS): receives the SEG, the SR and the key image."""

    config: DestinationConfig
    event: ClassVar[str] = "delivered"

    @property
    def key(self) -> str:
        """`AE@host:port`, with `+tls` for a TLS peer: a stored row never goes out in clear text to a TLS peer."""
        tls = "+tls" if self.config.tls is not None else ""
        return f"{self.config.ae_title}@{self.config.host}:{self.config.port}{tls}"

    @classmethod
    def from_key(cls, key: str) -> DicomPeer:
        """`AE@host:port`, as delivery rows store it and as `echo` takes a peer; ValueError names the form."""
        ae_title, at, address = key.partition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and 0 < len(ae_title) <= 16 and host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{key!r} is not AE@host:port: write it like PACS@10.0.0.5:104")
        return cls(DestinationConfig(ae_title=ae_title, host=host, port=int(port)))

    def files_for(self, results: dict[str, Path], out_dir: Path) -> list[Path]:
        return [results[name] for name in DICOM_RESULTS if name in results]

    def deliver(self, batch: list[Delivery], context: Context) -> list[Outcome]:
        """One association for the batch; a file the peer never answered counts as failed."""
        by_file = {Path(d.file): d for d in batch}
        sent = context.sender(self.config, list(by_file), context.calling_ae, context.timeout_s)
        answered = {Path(o.path): o for o in sent}
        return [Outcome(d, answered[f].ok, answered[f].message) if f in answered
                else Outcome(d, False, "no answer from the destination") for f, d in by_file.items()]


@dataclass(frozen=True)
class ResultsFolder:
    """`delivery.results_dir`: receives measurements.json and .csv as <SeriesUID>.json/.csv."""

    path: Path | None
    key: str = RESULTS_FOLDER
    event: ClassVar[str] = "results_written"

    def files_for(self, results: dict[str, Path], out_dir: Path) -> list[Path]:
        return [out_dir]

    def deliver(self, batch: list[Delivery], context: Context) -> list[Outcome]:
        return [self._export(delivery, context) for delivery in batch]

    def _export(self, delivery: Delivery, context: Context) -> Outcome:
        try:
            if self.path is None:
                raise OSError("delivery.results_dir is no longer set: set it again or retry the job")
            export_results(Path(delivery.file), self.path, context.series_uid_of(delivery.job_id))
        except OSError as exc:
            return Outcome(delivery, False, f"results folder: {exc}")
        return Outcome(delivery, True)


def configured(config: Config) -> list[Handler]:
    """Where every finished job's results go under this config."""
    handlers: list[Handler] = [DicomPeer(d) for d in config.destinations]
    if config.delivery.results_dir is not None:
        handlers.append(ResultsFolder(config.delivery.results_dir))
    return handlers


def handler_for(key: str, config: Config) -> Handler:
    """The handler for a stored key, even when its destination has left the config since (plain DICOM peers
    only: a TLS peer's CA and certificate are in the config alone); ValueError if unreadable."""
    if key == RESULTS_FOLDER:
        return ResultsFolder(config.delivery.results_dir)
    for destination in config.destinations:
        if DicomPeer(destination).key == key:
            return DicomPeer(destination)
    if key.endswith("+tls"):
        raise ValueError(f"TLS destination {key.removesuffix('+tls')} is no longer in the config: add it back with "
                         "its tls settings to send what is pending")
    return DicomPeer.from_key(key)


def export_results(out_dir: Path, results_dir: Path, series_uid: str) -> list[Path]:
    """Copy a job's measurements into the results folder as <SeriesUID>.json and .csv (UIDs, no names)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in ("json", "csv"):
        source = out_dir / f"measurements.{suffix}"
        target = results_dir / f"{series_uid}.{suffix}"
        write_atomic(target, source.read_bytes())
        written.append(target)
    return written
