"""The node's one typed configuration, read from TOML and validated at start.

Every option has a default that works on a single machine; `PARASPINAL_<SECTION>_<KEY>`
environment variables override file values (e.g. PARASPINAL_SEGMENTER_DEVICE=cpu).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from node.labels import SPINE, THORACIC, spine_order


class ConfigError(Exception):
    """A configuration problem; the message names the key and the fix."""


@dataclass
class TlsClientConfig:
    """DICOM TLS towards one peer (a destination, the PACS queried and retrieved from, a priors peer).

    `tls = true` in TOML means these defaults: the system's CAs, no client certificate, host name checked.
    node.tls.client_context turns it into the ssl context; every outgoing DICOM association uses that one function.
    """

    ca_certificates: Path | None = None  # PEM bundle that signed the peer's certificate; absent: the system's CAs
    certificate: Path | None = None  # PEM client certificate (chain) shown to the peer (mutual TLS)
    private_key: Path | None = None  # its unencrypted key; must not be readable by others (chmod 600)
    verify_hostname: bool = True  # the peer's certificate must name `server_name` (default: the host)
    server_name: str = ""  # the name on the peer's certificate when it differs from the host (an IP address, say)


@dataclass
class ReceiverTlsConfig:
    """`[receiver.tls]`: a DICOM TLS listener on its own port (BCP 195 profile, TLS 1.2 or later)."""

    port: int = 2762
    certificate: Path | None = None  # PEM server certificate (chain); required
    private_key: Path | None = None  # its unencrypted key; serve refuses to start if others may read it
    ca_certificates: Path | None = None  # PEM bundle of the CAs whose client certificates are trusted
    require_client_certificate: bool = True  # mutual TLS (IHE ATNA); false: any client, still encrypted
    plain_listener: bool = True  # false: receiver.port does not listen, only the TLS port
    # "AE=name": that calling AE is accepted only with a client certificate whose subject CN or DNS name is `name`.
    calling_ae_certificates: list[str] = field(default_factory=list)

    def certificate_names(self) -> dict[str, str]:
        """calling_ae_certificates as calling AE -> certificate name (validated by load_config)."""
        return {ae.strip(): name.strip() for ae, _, name in (e.partition("=") for e in self.calling_ae_certificates)}


@dataclass
class ReceiverConfig:
    ae_title: str = "PARASPINAL"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    allowed_calling_aes: list[str] = field(default_factory=list)  # empty: accept any
    max_associations: int = 10
    min_free_disk_mb: int = 5000
    accept_other_storage: bool = True  # accept and discard non-CT storage (scouts, dose SRs)
    watch_dir: Path | None = None  # inbox for dropped DICOM files/folders; absent: no watch folder
    watch_rejected_dir: Path | None = None  # non-DICOM drops go here; absent: <watch_dir>-rejected
    watch_stable_s: float = 2.0  # a dropped file is read only after its size/mtime stayed unchanged this long
    watch_close_write: bool = True  # also wait until the writer closed it (inotify close-write; Linux only)
    watch_max_file_mb: int = 64  # larger (or sparse) dropped files are rejected before being read
    # Network bounds (see README "Limits"): what one peer may cost before and after association.
    called_aes: list[str] = field(default_factory=list)  # called AE titles answered; empty: ae_title only
    calling_ae_hosts: list[str] = field(default_factory=list)  # "AE@address" or "AE@network/bits": AE only from there
    max_pdu_size: int = 1048576  # Maximum Length Received announced; longer P-DATA-TF PDUs are aborted
    max_dataset_mb: int = 32  # larger C-STORE data sets are refused (0xA700) without being held in memory
    max_pending_connections: int = 32  # connections not yet associated; the oldest is dropped for a new one
    association_request_timeout_s: float = 10.0  # from connect until the whole A-ASSOCIATE-RQ has arrived
    pdu_timeout_s: float = 30.0  # from a PDU's first byte until its last
    idle_timeout_s: float = 60.0  # an associated peer silent this long is aborted
    tls: ReceiverTlsConfig | None = None  # [receiver.tls]: a DICOM TLS listener; absent: plain DICOM only

    def answered_aes(self) -> list[str]:
        """The called AE titles the receiver answers to."""
        return list(self.called_aes) or [self.ae_title]

    def calling_ae_networks(self) -> dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
        """calling_ae_hosts as AE title -> networks it may connect from (validated by load_config)."""
        networks: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
        for entry in self.calling_ae_hosts:
            title, _, host = entry.rpartition("@")
            networks.setdefault(title.strip(), []).append(ipaddress.ip_network(host.strip(), strict=False))
        return networks


@dataclass
class StateConfig:
    """Where jobs, deliveries and workers are recorded: SQLite in storage.state_dir, or one shared PostgreSQL."""

    database: str = ""  # empty: SQLite at <storage.state_dir>/state.sqlite; "postgresql://user@host:5432/db" to scale out
    password_file: Path | None = None  # the PostgreSQL password, one line (or libpq's ~/.pgpass); never in the TOML
    serve_name: str = ""  # this serve's name in a shared state; empty: <host name>-<receiver.ae_title>

    @property
    def shared(self) -> bool:
        return self.database.startswith(("postgresql://", "postgres://"))


@dataclass
class DestinationConfig:
    ae_title: str = ""
    host: str = ""
    port: int = 104
    tls: TlsClientConfig | None = None  # `tls = true` or a [destinations.tls] table; absent: plain DICOM


@dataclass
class StorageConfig:
    state_dir: Path = Path("./state")
    retention_days: float = 30.0  # settled series' images and results are removed after this; 0 keeps everything
    spool_direct_io: bool = True  # received images written with O_DIRECT where the filesystem takes it

    @property
    def database(self) -> Path:
        return self.state_dir / "state.sqlite"

    @property
    def spool_dir(self) -> Path:
        """Received instances, <StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm, written before acknowledgement."""
        return self.state_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        """Per-job result folders, kept until every delivery of the job is settled and beyond."""
        return self.state_dir / "outbox"

    def job_outbox(self, job_id: int) -> Path:
        """One job's results, attempt by attempt."""
        return self.outbox_dir / f"job-{job_id}"


@dataclass
class SegmenterConfig:
    backend: str = "totalsegmentator"  # or "precomputed"
    weights_dir: Path = Path("./state/weights")  # default: <storage.state_dir>/weights
    device: str = "gpu"  # gpu, cpu or gpu:N
    fast: bool = False
    vertebral_bodies: str = "auto"  # auto: use vertebrae_body when its weights exist; on; off
    precomputed_dir: Path = Path("./state/precomputed")  # default: <storage.state_dir>/precomputed
    timeout_s: int = 3600
    engine: str = "resident"  # or "totalsegmentator": a fresh process per job calling its API (the reference)
    start_timeout_s: int = 900  # the resident engine's model process: start and load every model
    simulated_model_s: float = 0.0  # precomputed backend only: wait this long per job, as a model would (benches)


@dataclass
class MeasureConfig:
    body_hu_min: float = 1.0
    body_hu_max: float = 700.0
    fat_hu_below: float = -29.0
    lean_hu_min: float = -29.0
    lean_hu_max: float = 150.0
    max_slice_thickness_mm: float = 5.0
    min_slices: int = 20
    body_height_min_mm: float = 8.0
    body_height_max_mm: float = 40.0
    low_attenuation_hu: float = 10.0  # T1–T10 median below this raises the screening flag
    bone_flag_level: str = "L1"  # the vertebra whose trabecular median is compared with bone_low_hu
    bone_low_hu: float = 110.0  # trabecular median at or below this raises the low-bone flag (unenhanced CT only)
    # Contrast status from the header; HU flags are assessed only on series known to be unenhanced.
    contrast_image_type: list[str] = field(default_factory=lambda: ["ANGIO", "CTA", "MAT_SPECIFIC", "MAT_REMOVED"])
    contrast_description_unenhanced: str = (
        r"(?i)non[- ]?contrast|without contrast|w/o contrast|\bc-(?![\w-])|\bnati(v|ve)\b|unenhanced|"
        r"non[- ]?enhanced|\bnect\b|\bncct\b|\bohne\s*(km|kontrast)|low[- ]?dose|\bldct\b|"
        r"sans\s*(injection|contraste)|senza\s*(mdc|mezzo\s*di\s*contrasto)|sin\s*contraste"
    )
    contrast_description_enhanced: str = (
        r"(?i)\bc\+|contrast|\bkm\b|\bke\b|kontrast|\bcta\b|angio|arteri|ven(ous|ös|os)|portal|\bpv\b|"
        r"delayed|\bcect\b|\bmit\s*km|avec\s*injection|\bcon\s*mdc\b"
    )
    assume_unenhanced: bool = False  # series without any contrast evidence count as unenhanced (a site's choice)


def _levels(first: str, last: str) -> list[str]:
    return list(SPINE[SPINE.index(first) : SPINE.index(last) + 1])


@dataclass
class ProtocolConfig:
    """Which vertebral levels a kind of series reports; the first protocol whose header rule matches wins.

    `levels` are reported even when absent and totalled per span (T1-T10, L1-L5); `also_levels`
    are reported beside them when complete in the field of view; `bone_levels` are listed in
    `vertebrae` even when absent, and every other vertebra T1-L5 when present.
    """

    name: str = ""
    body_part: str = ""  # regular expression searched in BodyPartExamined; "" matches nothing
    description: str = ""  # searched in SeriesDescription, StudyDescription and ProtocolName; "" matches nothing
    levels: list[str] = field(default_factory=list)
    also_levels: list[str] = field(default_factory=list)
    bone_levels: list[str] = field(default_factory=list)


def default_protocols() -> list[ProtocolConfig]:
    """Chest CT: the MESA levels T1-T10 (and complete lumbar levels); abdominal and lumbar CT: L1-L5."""
    return [
        ProtocolConfig(
            name="chest", body_part=r"(?i)chest|thorax|lung|tspine",
            description=r"(?i)chest|thora|lung|t[hx]orax|poumon|torace|t[oó]rax|\bldct\b",
            levels=_levels("T1", "T10"), also_levels=_levels("L1", "L5"), bone_levels=_levels("T1", "L1"),
        ),
        ProtocolConfig(
            name="abdomen", body_part=r"(?i)abd|pelvis|lspine|lumbar|kidney|liver",
            description=r"(?i)abd|lumb|pelv|l-?spine|\blws\b|bauch|becken|kidney|renal|liver|leber|urogra",
            levels=_levels("L1", "L5"), bone_levels=_levels("L1", "L5"),
        ),
    ]


@dataclass
class BiomarkersConfig:
    """Organs measured from the same CT besides muscle and bone."""

    liver: bool = False  # segment liver and spleen (adds TotalSegmentator part 291) and report their attenuation
    erosion_mm: float = 5.0  # organ border removed, in mm on the CT grid, before the parenchyma window
    window_mad: float = 3.0  # parenchyma: HU within median ± window_mad × 1.4826 × MAD of the eroded organ
    liver_low_hu: float = 40.0  # unenhanced liver parenchyma median below this raises the liver flag
    min_parenchyma_cm3: float = 5.0  # less parenchyma than this: values reported, flag not assessed


@dataclass
class SelectionConfig:
    """Which completed series are worth a segmentation run; the rest are recorded as skipped."""

    modalities: list[str] = field(default_factory=lambda: ["CT"])
    image_type: list[str] = field(default_factory=lambda: ["ORIGINAL", "PRIMARY", "AXIAL"])  # all required
    slice_thickness_min_mm: float = 0.5
    slice_thickness_max_mm: float = 5.0
    min_slices: int = 20
    # Regular expressions (Python syntax, searched anywhere in the value); empty: no rule.
    series_description_include: str = ""
    # Not "dose": low-dose chest CT (lung screening) is exactly what the node is for.
    series_description_exclude: str = r"(?i)scout|topogram|localizer|surview|\bmip\b|\bmpr\b"
    body_part_include: str = ""
    body_part_exclude: str = ""
    kernel_include: str = ""
    kernel_exclude: str = ""


@dataclass
class CompletionConfig:
    release_quiet_s: float = 5.0  # after the association that carried the series was released
    idle_quiet_s: float = 60.0  # after the last instance, when no release was seen
    # A series cut off (aborted association, refused instances) waits for its sender's resend;
    # true: the idle period completes it anyway, and the partial series is processed.
    idle_completes_partial: bool = False
    # MR: a completed Dixon water series waits this long for its fat series (node.ingest.dixon); then it is
    # measured without fat figures. It waits longer while a fat series of its study is still arriving.
    dixon_partner_wait_s: float = 120.0


@dataclass
class WorkerConfig:
    count: int = 1  # worker processes `serve` supervises (0: run `paraspinal-node worker` separately)
    lease_s: float = 120.0  # a job whose worker stops renewing for this long is queued again
    max_attempts: int = 3  # attempts before a repeatedly failing job ends as failed
    retry_delay_s: float = 30.0
    poll_s: float = 1.0
    weights_check_s: float = 60.0  # how often held jobs (weights, precomputed masks) are tried again
    cpu_threads_per_engine: int = 2  # 1: one job at a time; more: load and encode other jobs while the engine runs one
    # auto: read the spool where the series' serve runs on this host, else fetch it over DICOMweb;
    # dicomweb: always fetch (a worker on serve's host that should behave as a remote one).
    series_source: str = "auto"


@dataclass
class DeliveryConfig:
    retry_base_s: float = 10.0  # first retry delay, doubled after each failure
    retry_max_interval_s: float = 900.0
    horizon_s: float = 86400.0  # after this long without success a delivery ends as failed
    timeout_s: float = 60.0  # network timeout of one association
    results_dir: Path | None = None  # also write measurements as JSON and CSV here


@dataclass
class ResultsConfig:
    """How the SEG, SR and key image are numbered, described and encoded (dicom_sr reads it as it is).

    Series numbers stay out of the way of scanner series, which rarely exceed 9000. BINARY
    uncompressed is the default because every reader tested takes it; README "Outputs" lists
    which readers refuse `jpeg2000` and `labelmap`.
    """

    seg_series_number: int = 9101
    sr_series_number: int = 9102
    key_image_series_number: int = 9103
    seg_series_description: str = "Paraspinal muscle segmentation T1-T10"
    sr_series_description: str = "Paraspinal muscle measurements T1-T10"
    key_image_series_description: str = "Paraspinal muscle summary (derived, not for diagnosis)"
    jpeg2000: bool = False
    labelmap: bool = False
    institution_name: str = ""  # empty: not written


@dataclass
class PriorsConfig:
    """Earlier results of the same patient: the node's state always, a PACS when `ae_title` and `host` are set.

    Least significant changes are 2.77 x an assumed precision SD (README "Change over time"):
    measure your own from repeat scans and set them here.
    """

    ae_title: str = ""  # the PACS queried for the node's earlier SRs; empty: only the node's own state
    host: str = ""
    port: int = 104
    tls: TlsClientConfig | None = None  # `tls = true` or a [priors.tls] table; absent: plain DICOM
    retrieve: str = "get"  # get (C-GET, falling back to C-MOVE when refused) or move (C-MOVE to receiver.ae_title)
    timeout_s: float = 5.0  # the whole PACS lookup (query and retrieve); past it the job goes on without
    max_series: int = 10  # SR series retrieved at most per job, newest first
    lsc_muscle_hu: float = 4.2  # 2.77 x 1.5 HU
    lsc_muscle_volume_percent: float = 7.0  # 2.77 x 2.5 %
    lsc_bone_hu: float = 8.3  # 2.77 x 3 HU
    lsc_liver_hu: float = 4.2  # 2.77 x 1.5 HU

    @property
    def pacs(self) -> bool:
        return bool(self.ae_title and self.host)

    @property
    def peer(self) -> DestinationConfig:
        """The PACS as a DICOM peer, as node.query_retrieve asks one."""
        return DestinationConfig(self.ae_title, self.host, self.port, self.tls)


@dataclass
class LoggingConfig:
    level: str = "INFO"
    format: str = "kv"  # kv (key=value) or json


@dataclass
class WebConfig:
    """The status page, /metrics and health checks inside `serve`; read-only but for retry."""

    enabled: bool = True
    bind: str = "127.0.0.1"  # loopback: put a reverse proxy in front to reach it from elsewhere
    port: int = 8780
    auth: str = "none"  # none, basic or bearer; retry needs basic or bearer
    secret_file: Path | None = None  # the password or token, one line; never in the TOML
    show_patient_names: bool = False
    refresh_s: int = 30  # pages reload themselves this often (0: never)


@dataclass
class DicomwebConfig:
    """WADO-RS/STOW-RS between `serve` and workers on other hosts (README "DICOMweb between serve and workers").

    serve reads enabled, bind, port, url, token_file, tls_certificate/tls_private_key and ca_certificates
    (set: workers must show a client certificate it signed). A worker reads token_file, ca_certificates (set:
    serve's certificate must be signed by it; unset: the system's CAs) and client_certificate/client_private_key.
    """

    enabled: bool = False  # serve: listen for remote workers (one host needs nothing of this)
    bind: str = "0.0.0.0"  # the listener exists only for other hosts; the token (and TLS) guard it
    port: int = 8781
    url: str = ""  # serve: how workers reach this serve, e.g. https://recv1.example.org:8781 (required when enabled)
    token_file: Path | None = None  # the worker token, one line, shared by serve and workers; never in the TOML
    tls_certificate: Path | None = None  # serve: PEM certificate (chain); without it the listener speaks plain HTTP
    tls_private_key: Path | None = None
    ca_certificates: Path | None = None  # serve: CA of client certificates (then required); worker: CA of serve's
    client_certificate: Path | None = None  # worker: PEM certificate shown to serve
    client_private_key: Path | None = None
    timeout_s: float = 60.0  # worker: connect and read timeout (no byte for this long); serve: a request's body
    max_stow_mb: int = 512  # serve: larger STOW-RS bodies are refused (413) before being read


@dataclass
class BackfillQueryConfig:
    """What a backfill looks for (`--query-config FILE` holds these keys under [query]); selection.* applies too."""

    modalities_in_study: list[str] = field(default_factory=lambda: ["CT"])
    protocols: list[str] = field(default_factory=lambda: ["chest"])  # [[protocols]] names a series must match
    result_limit: int = 200  # the PACS's C-FIND answer limit: a day with this many studies is split again


@dataclass
class BackfillConfig:
    """`paraspinal-node backfill`: earlier studies pulled from the PACS by serve, throttled (README "Backfill")."""

    pacs: DestinationConfig | None = None  # the PACS queried (C-FIND) and retrieved from; required to backfill
    retrieve: str = "move"  # move: C-MOVE to move_destination (this node); get: C-GET on the query association
    move_destination: str = ""  # the AE title the PACS sends to; empty: receiver.ae_title
    max_associations: int = 1  # retrieves at a time
    studies_per_hour: float = 0.0  # at most this many studies retrieved in any hour; 0: no limit
    # When retrieves may start, local time: "22:00-06:00", "sat-sun", "mon-fri 19:00-07:00"; empty: any time.
    windows: list[str] = field(default_factory=list)
    max_live_queue: int = 10  # paused while more jobs than this are queued or running (live work first)
    send_results: bool = True  # false: backfilled studies get the worklist and CSV only, nothing sent to the PACS
    max_attempts: int = 3  # retrieves of one series (a partial one is retried) before it is failed
    retry_delay_s: float = 300.0
    timeout_s: float = 600.0  # one C-FIND or retrieve association's network timeout
    query: BackfillQueryConfig = field(default_factory=BackfillQueryConfig)


@dataclass
class Config:
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    destinations: list[DestinationConfig] = field(default_factory=list)
    storage: StorageConfig = field(default_factory=StorageConfig)
    state: StateConfig = field(default_factory=StateConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    biomarkers: BiomarkersConfig = field(default_factory=BiomarkersConfig)
    protocols: list[ProtocolConfig] = field(default_factory=default_protocols)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    priors: PriorsConfig = field(default_factory=PriorsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    web: WebConfig = field(default_factory=WebConfig)
    dicomweb: DicomwebConfig = field(default_factory=DicomwebConfig)
    backfill: BackfillConfig = field(default_factory=BackfillConfig)


_VALID_BACKENDS = ("totalsegmentator", "precomputed")
_VALID_WEB_AUTH = ("none", "basic", "bearer")
_VALID_BODY_MODES = ("auto", "on", "off")
_VALID_ENGINES = ("resident", "totalsegmentator")


def load_config(path: Path | None = None, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Read `path` (or only defaults), apply environment overrides, validate."""
    raw = _read_toml(path, "config file", "--config") if path is not None else {}
    config = _build(Config, raw, "")
    environ = os.environ if environ is None else environ
    _apply_environment(config, environ)
    _place_under_state_dir(config, raw.get("segmenter", {}), environ)
    _validate(config)
    return config


def _read_toml(path: Path, what: str, option: str) -> dict:
    """The TOML file given by `option`, or a ConfigError naming it and the fix."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found: pass an existing {option} FILE") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def _place_under_state_dir(config: Config, segmenter: dict, environ: typing.Mapping[str, str]) -> None:
    """Folders not set explicitly live in storage.state_dir, so one setting moves everything."""
    for name in ("weights_dir", "precomputed_dir"):
        if name not in segmenter and f"PARASPINAL_SEGMENTER_{name.upper()}" not in environ:
            setattr(config.segmenter, name, config.storage.state_dir / name.removesuffix("_dir"))


def _build(cls: type, raw: object, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key {_key(where, unknown[0])}: remove it or check its spelling")
    values = {}
    for name, value in raw.items():
        values[name] = _convert(hints[name], value, _key(where, name))
    return cls(**values)


def _convert(hint, value, key: str):
    if _optional_of(hint) is not None:
        return _convert(_optional_of(hint), value, key)
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if value is True and hint is TlsClientConfig:  # `tls = true`: TLS with the defaults
            return hint()
        return _build(hint, value, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a path string")
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, bool, float) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key} must be {hint.__name__}, not {value!r}")
    return value


def _optional_of(hint) -> type | None:
    """The X of `X | None`, else None; TOML has no null, so an absent key means None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _apply_environment(config: Config, environ: typing.Mapping[str, str]) -> None:
    for section in dataclasses.fields(config):
        part = getattr(config, section.name)
        if not dataclasses.is_dataclass(part):
            continue
        hints = typing.get_type_hints(type(part))
        for item in dataclasses.fields(part):
            env = f"PARASPINAL_{section.name}_{item.name}".upper()
            if env in environ:
                setattr(part, item.name, _from_text(hints[item.name], environ[env], env))


def _from_text(hint, text: str, env: str):
    if _optional_of(hint) is not None:
        return _from_text(_optional_of(hint), text, env) if text else None
    try:
        if hint is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if typing.get_origin(hint) is list:
            return [v.strip() for v in text.split(",") if v.strip()]
        return hint(text)
    except ValueError:
        raise ConfigError(f"environment variable {env}={text!r} is not a valid {getattr(hint, '__name__', hint)}") from None


def _validate(config: Config) -> None:
    seg = config.segmenter
    if seg.backend not in _VALID_BACKENDS:
        raise ConfigError(f"segmenter.backend must be one of {', '.join(_VALID_BACKENDS)}, not {seg.backend!r}")
    if seg.vertebral_bodies not in _VALID_BODY_MODES:
        raise ConfigError(f"segmenter.vertebral_bodies must be one of {', '.join(_VALID_BODY_MODES)}")
    if seg.engine not in _VALID_ENGINES:
        raise ConfigError(f"segmenter.engine must be one of {', '.join(_VALID_ENGINES)}, not {seg.engine!r}")
    if not (seg.device in ("gpu", "cpu") or (seg.device.startswith("gpu:") and seg.device[4:].isdigit())):
        raise ConfigError(f"segmenter.device must be gpu, cpu or gpu:N, not {seg.device!r}")
    if not 0 < config.receiver.port < 65536:
        raise ConfigError(f"receiver.port must be 1..65535, not {config.receiver.port}")
    if not 0 < len(config.receiver.ae_title) <= 16:
        raise ConfigError("receiver.ae_title must be 1 to 16 characters")
    for i, dest in enumerate(config.destinations):
        if not dest.ae_title or not dest.host:
            raise ConfigError(f"destinations[{i}] needs ae_title and host")
        if not 0 < len(dest.ae_title) <= 16:
            raise ConfigError(f"destinations[{i}].ae_title must be 1 to 16 characters")
        if not 0 < dest.port < 65536:
            raise ConfigError(f"destinations[{i}].port must be 1..65535, not {dest.port}")
    _validate_receiver_network(config.receiver)
    _validate_tls(config)
    _validate_backfill(config)
    _validate_state(config.state)
    _validate_selection(config.selection)
    _validate_operations(config)
    _validate_biomarkers(config.measure, config.biomarkers)
    _validate_protocols(config.protocols)
    _validate_web(config.web)
    _validate_priors(config.priors)
    _validate_dicomweb(config.dicomweb)
    _validate_positive(config)
    if config.logging.format not in ("kv", "json"):
        raise ConfigError(f"logging.format must be kv or json, not {config.logging.format!r}")
    if config.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"logging.level must be DEBUG, INFO, WARNING or ERROR, not {config.logging.level!r}")


_REGEX_KEYS = tuple(
    f"{part}_{way}" for part in ("series_description", "body_part", "kernel") for way in ("include", "exclude")
)


def _validate_selection(selection: SelectionConfig) -> None:
    for name in _REGEX_KEYS:
        try:
            re.compile(getattr(selection, name))
        except re.error as exc:
            raise ConfigError(f"selection.{name} is not a valid regular expression ({exc}): fix the pattern") from None
    if selection.slice_thickness_min_mm > selection.slice_thickness_max_mm:
        raise ConfigError("selection.slice_thickness_min_mm must not exceed selection.slice_thickness_max_mm")
    if selection.min_slices < 1:
        raise ConfigError("selection.min_slices must be at least 1")


def _validate_state(state: StateConfig) -> None:
    if state.database and not state.shared:
        raise ConfigError(f"state.database must be empty (SQLite in storage.state_dir) or a postgresql:// URL, not "
                          f"{state.database.split('@')[-1]!r}")
    if state.password_file is not None and not state.shared:
        raise ConfigError("state.password_file is only used with a postgresql:// state.database: remove it")


def _validate_priors(priors: PriorsConfig) -> None:
    if bool(priors.ae_title) != bool(priors.host):
        raise ConfigError("[priors] needs both ae_title and host to query a PACS (or neither: the node's state only)")
    if priors.ae_title:
        check_ae_title("priors.ae_title", priors.ae_title)
    if not 0 < priors.port < 65536:
        raise ConfigError(f"priors.port must be 1..65535, not {priors.port}")
    if priors.retrieve not in ("get", "move"):
        raise ConfigError(f"priors.retrieve must be get or move, not {priors.retrieve!r}")
    if not 0 < priors.timeout_s <= 300:
        raise ConfigError(f"priors.timeout_s must be more than 0 and at most 300 seconds, not {priors.timeout_s}")
    if not 1 <= priors.max_series <= 100:
        raise ConfigError(f"priors.max_series must be 1..100, not {priors.max_series}")
    for key in ("lsc_muscle_hu", "lsc_muscle_volume_percent", "lsc_bone_hu", "lsc_liver_hu"):
        if getattr(priors, key) <= 0:
            raise ConfigError(f"priors.{key} must be greater than 0, not {getattr(priors, key)}")


def _validate_web(web: WebConfig) -> None:
    if web.auth not in _VALID_WEB_AUTH:
        raise ConfigError(f"web.auth must be one of {', '.join(_VALID_WEB_AUTH)}, not {web.auth!r}")
    if not 0 < web.port < 65536:
        raise ConfigError(f"web.port must be 1..65535, not {web.port}")
    if not web.bind:
        raise ConfigError("web.bind must be an address, e.g. 127.0.0.1")
    if web.refresh_s < 0:
        raise ConfigError(f"web.refresh_s must be 0 (no refresh) or more, not {web.refresh_s}")
    if web.auth != "none" and web.secret_file is None:
        raise ConfigError(f"web.auth = {web.auth!r} needs web.secret_file: a file holding the password or token")


def _validate_dicomweb(dicomweb: DicomwebConfig) -> None:
    if not 0 < dicomweb.port < 65536:
        raise ConfigError(f"dicomweb.port must be 1..65535, not {dicomweb.port}")
    if dicomweb.timeout_s <= 0 or dicomweb.max_stow_mb < 1:
        raise ConfigError("dicomweb.timeout_s must be greater than 0 and dicomweb.max_stow_mb at least 1")
    for pair in (("tls_certificate", "tls_private_key"), ("client_certificate", "client_private_key")):
        if (getattr(dicomweb, pair[0]) is None) != (getattr(dicomweb, pair[1]) is None):
            raise ConfigError(f"dicomweb.{pair[0]} and dicomweb.{pair[1]} go together: set both or neither")
    if dicomweb.url and not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", dicomweb.url):
        raise ConfigError(f"dicomweb.url {dicomweb.url!r} must be http(s)://host:port, as workers reach this serve")
    if not dicomweb.enabled:
        return
    if not dicomweb.bind:
        raise ConfigError("dicomweb.bind must be an address, e.g. 0.0.0.0 or the interface facing the GPU hosts")
    if dicomweb.token_file is None:
        raise ConfigError("dicomweb.enabled needs dicomweb.token_file: a file holding the worker token on one line")
    if not dicomweb.url:
        raise ConfigError("dicomweb.enabled needs dicomweb.url: how workers reach this serve, e.g. https://recv1:8781")
    tls = dicomweb.tls_certificate is not None
    if dicomweb.url.startswith("https://") != tls:
        raise ConfigError(f"dicomweb.url {dicomweb.url!r} says {'https' if not tls else 'http'} but the listener "
                          f"speaks {'https' if tls else 'plain http'}: make dicomweb.url and dicomweb.tls_certificate agree")
    if dicomweb.ca_certificates is not None and not tls:
        raise ConfigError("dicomweb.ca_certificates (client certificates) needs TLS: set dicomweb.tls_certificate "
                          "and dicomweb.tls_private_key")


def _validate_receiver_network(receiver: ReceiverConfig) -> None:
    """The receiver's AE lists and network bounds, so a typo cannot open the node or lock it out."""
    for key in ("called_aes", "allowed_calling_aes"):
        for title in getattr(receiver, key):
            if not 0 < len(title.strip()) <= 16 or "\\" in title:
                raise ConfigError(f"receiver.{key} entry {title!r} must be an AE title of 1 to 16 characters")
    for entry in receiver.calling_ae_hosts:
        title, at, host = entry.rpartition("@")
        if not at or not 0 < len(title.strip()) <= 16:
            raise ConfigError(f"receiver.calling_ae_hosts entry {entry!r} must be AE@address, e.g. \"CT1@10.0.0.5\"")
        try:
            ipaddress.ip_network(host.strip(), strict=False)
        except ValueError:
            raise ConfigError(
                f"receiver.calling_ae_hosts entry {entry!r}: {host!r} is not an IP address or network (10.0.0.0/24)"
            ) from None
    if not 16384 <= receiver.max_pdu_size <= 64 << 20:
        raise ConfigError(f"receiver.max_pdu_size must be 16384..67108864 bytes, not {receiver.max_pdu_size}")
    if not 1 <= receiver.max_dataset_mb <= 4096:
        raise ConfigError(f"receiver.max_dataset_mb must be 1..4096, not {receiver.max_dataset_mb}")
    if not 1 <= receiver.max_pending_connections <= 1024:
        raise ConfigError(f"receiver.max_pending_connections must be 1..1024, not {receiver.max_pending_connections}")
    for key in ("association_request_timeout_s", "pdu_timeout_s", "idle_timeout_s"):
        if not 0 < getattr(receiver, key) <= 3600:
            raise ConfigError(f"receiver.{key} must be more than 0 and at most 3600 seconds, not {getattr(receiver, key)}")


def _validate_tls(config: Config) -> None:
    """Certificate settings that go together; the files themselves are checked when serve starts."""
    tls = config.receiver.tls
    if tls is not None:
        if tls.certificate is None or tls.private_key is None:
            raise ConfigError("[receiver.tls] needs certificate and private_key (PEM files): see README \"DICOM TLS\"")
        if tls.require_client_certificate and tls.ca_certificates is None:
            raise ConfigError("receiver.tls.require_client_certificate needs receiver.tls.ca_certificates (the CA that "
                              "signed the senders' certificates), or set require_client_certificate = false")
        if not 0 < tls.port < 65536 or (tls.plain_listener and tls.port == config.receiver.port):
            raise ConfigError(f"receiver.tls.port must be 1..65535 and differ from receiver.port, not {tls.port}")
        for entry in tls.calling_ae_certificates:
            title, eq, name = entry.partition("=")
            if not eq or not name.strip():
                raise ConfigError(f"receiver.tls.calling_ae_certificates entry {entry!r} must be AE=name, "
                                  "e.g. \"PACS=pacs.hospital.example\"")
            check_ae_title("receiver.tls.calling_ae_certificates", title.strip())
    peers = [(f"destinations[{i}]", d) for i, d in enumerate(config.destinations)]
    if config.backfill.pacs is not None:
        peers.append(("backfill.pacs", config.backfill.pacs))
    if config.priors.pacs:
        peers.append(("priors", config.priors.peer))
    for key, peer in peers:
        if peer.tls is not None and (peer.tls.certificate is None) != (peer.tls.private_key is None):
            raise ConfigError(f"{key}.tls.certificate and {key}.tls.private_key go together: set both or neither")


def _validate_backfill(config: Config) -> None:
    from node.backfill.windows import WindowError, parse_windows

    backfill = config.backfill
    if backfill.retrieve not in ("move", "get"):
        raise ConfigError(f"backfill.retrieve must be move or get, not {backfill.retrieve!r}")
    pacs = backfill.pacs
    if pacs is not None:
        if not pacs.ae_title or not pacs.host or not 0 < pacs.port < 65536:
            raise ConfigError("backfill.pacs needs ae_title, host and port (1..65535)")
        check_ae_title("backfill.pacs.ae_title", pacs.ae_title)
    if backfill.move_destination:
        check_ae_title("backfill.move_destination", backfill.move_destination)
    if not 1 <= backfill.max_associations <= 8:
        raise ConfigError(f"backfill.max_associations must be 1..8, not {backfill.max_associations}")
    if backfill.studies_per_hour < 0 or backfill.max_live_queue < 0 or backfill.retry_delay_s < 0:
        raise ConfigError("backfill.studies_per_hour, max_live_queue and retry_delay_s must be 0 or more")
    if backfill.max_attempts < 1 or backfill.timeout_s <= 0:
        raise ConfigError("backfill.max_attempts must be at least 1 and backfill.timeout_s greater than 0")
    try:
        parse_windows(backfill.windows)
    except WindowError as exc:
        raise ConfigError(f"backfill.windows: {exc}") from None
    if pacs is not None:  # a site with its own [[protocols]] and no backfill need not name them here
        validate_query(backfill.query, config.protocols, "backfill.query")


def validate_query(query: BackfillQueryConfig, protocols: list[ProtocolConfig], where: str) -> None:
    """A backfill query: known protocols, a positive result limit."""
    names = {p.name for p in protocols}
    unknown = [name for name in query.protocols if name not in names]
    if unknown or not query.protocols:
        raise ConfigError(f"{where}.protocols must name [[protocols]] ({', '.join(sorted(names))}), not {unknown or '[]'}")
    if query.result_limit < 1:
        raise ConfigError(f"{where}.result_limit must be at least 1, not {query.result_limit}")
    if not query.modalities_in_study:
        raise ConfigError(f"{where}.modalities_in_study must list at least one modality, e.g. [\"CT\"]")


def load_query(path: Path, config: Config) -> BackfillQueryConfig:
    """`--query-config FILE`: a [query] table of BackfillQueryConfig keys over the config's backfill.query."""
    raw = _read_toml(path, "query config", "--query-config")
    unknown = sorted(set(raw) - {"query"})
    if unknown:
        raise ConfigError(f"query config {path}: unknown table or key {unknown[0]!r}: put the keys under [query]")
    query = _build(BackfillQueryConfig, {**dataclasses.asdict(config.backfill.query), **raw.get("query", {})}, "query")
    validate_query(query, config.protocols, "query")
    return query


def _validate_biomarkers(measure: MeasureConfig, biomarkers: BiomarkersConfig) -> None:
    if measure.bone_flag_level not in SPINE:
        raise ConfigError(f"measure.bone_flag_level must be one of T1..T12, L1..L5, not {measure.bone_flag_level!r}")
    for name in ("contrast_description_unenhanced", "contrast_description_enhanced"):
        try:
            re.compile(getattr(measure, name))
        except re.error as exc:
            raise ConfigError(f"measure.{name} is not a valid regular expression ({exc}): fix the pattern") from None
    if biomarkers.erosion_mm < 0:
        raise ConfigError(f"biomarkers.erosion_mm must be 0 or more, not {biomarkers.erosion_mm}")
    if biomarkers.window_mad <= 0:
        raise ConfigError(f"biomarkers.window_mad must be greater than 0, not {biomarkers.window_mad}")


def _validate_protocols(protocols: list[ProtocolConfig]) -> None:
    """Names, patterns and levels; muscle levels must lie in a totalled span (T1-T10 or L1-L5)."""
    if not protocols:
        raise ConfigError("[[protocols]] is empty: leave the tables out for the defaults (chest, abdomen)")
    for i, protocol in enumerate(protocols):
        where = f"protocols[{i}]"
        if not protocol.name or not protocol.levels:
            raise ConfigError(f"{where} needs a name and levels")
        for key in ("body_part", "description"):
            try:
                re.compile(getattr(protocol, key))
            except re.error as exc:
                raise ConfigError(f"{where}.{key} is not a valid regular expression ({exc}): fix the pattern") from None
        for key in ("levels", "also_levels", "bone_levels"):
            levels = getattr(protocol, key)
            unknown = [level for level in levels if level not in SPINE]
            if unknown:
                raise ConfigError(f"{where}.{key}: {unknown[0]!r} is not a level (T1..T12, L1..L5)")
            if key != "bone_levels" and any(level in THORACIC[10:] for level in levels):
                raise ConfigError(f"{where}.{key}: T11 and T12 are in no totalled span (T1-T10, L1-L5); "
                                  "they are reported as bone only")
            if tuple(levels) != spine_order(levels):
                raise ConfigError(f"{where}.{key} must list each level once, cranial first")


def check_ae_title(key: str, title: str) -> None:
    """PS3.5 AE: 1 to 16 characters of the default repertoire, no backslash or control character, not all spaces."""
    if not (0 < len(title) <= 16 and title.strip() and all(" " <= c <= "~" and c != "\\" for c in title)):
        raise ConfigError(f"{key} {title!r} is not an AE title: use 1 to 16 letters, digits, spaces or "
                          "punctuation other than a backslash")


def _validate_operations(config: Config) -> None:
    """Every AE title and the numbers that would silently turn a safeguard off."""
    receiver = config.receiver
    check_ae_title("receiver.ae_title", receiver.ae_title)
    for key in ("allowed_calling_aes", "called_aes"):
        for i, title in enumerate(getattr(receiver, key, [])):
            check_ae_title(f"receiver.{key}[{i}]", title)
    for i, dest in enumerate(config.destinations):
        check_ae_title(f"destinations[{i}].ae_title", dest.ae_title)
    at_least = {
        "receiver.max_associations": (receiver.max_associations, 1),
        "receiver.min_free_disk_mb": (receiver.min_free_disk_mb, 0),
        "receiver.watch_max_file_mb": (receiver.watch_max_file_mb, 1),
        "measure.min_slices": (config.measure.min_slices, 1),
        "segmenter.timeout_s": (config.segmenter.timeout_s, 1),
        "results.seg_series_number": (config.results.seg_series_number, 1),
        "results.sr_series_number": (config.results.sr_series_number, 1),
        "results.key_image_series_number": (config.results.key_image_series_number, 1),
    }
    for key, (value, least) in at_least.items():
        if value < least:
            raise ConfigError(f"{key} must be at least {least}, not {value}: set it in the config file")
    if receiver.watch_stable_s <= 0:
        raise ConfigError(f"receiver.watch_stable_s must be greater than 0, not {receiver.watch_stable_s}: "
                          "a file must stay unchanged for some time before it is read")
    measure = config.measure
    for low, high in (("body_hu_min", "body_hu_max"), ("lean_hu_min", "lean_hu_max"),
                      ("body_height_min_mm", "body_height_max_mm")):
        if getattr(measure, low) >= getattr(measure, high):
            raise ConfigError(f"measure.{low} must be less than measure.{high}: swap or correct them")
    for key in ("max_slice_thickness_mm", "body_height_min_mm"):
        if getattr(measure, key) <= 0:
            raise ConfigError(f"measure.{key} must be greater than 0, not {getattr(measure, key)}")


def _validate_positive(config: Config) -> None:
    positive = {
        "completion.release_quiet_s": config.completion.release_quiet_s,
        "completion.idle_quiet_s": config.completion.idle_quiet_s,
        "worker.lease_s": config.worker.lease_s,
        "worker.max_attempts": config.worker.max_attempts,
        "worker.poll_s": config.worker.poll_s,
        "worker.weights_check_s": config.worker.weights_check_s,
        "delivery.retry_base_s": config.delivery.retry_base_s,
        "delivery.retry_max_interval_s": config.delivery.retry_max_interval_s,
        "delivery.horizon_s": config.delivery.horizon_s,
        "delivery.timeout_s": config.delivery.timeout_s,
        "segmenter.start_timeout_s": config.segmenter.start_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be greater than 0, not {value}")
    if config.storage.retention_days < 0:
        raise ConfigError(f"storage.retention_days must be 0 (keep everything) or more, not {config.storage.retention_days}")
    if config.segmenter.simulated_model_s < 0:
        raise ConfigError(f"segmenter.simulated_model_s must be 0 or more, not {config.segmenter.simulated_model_s}")
    if config.worker.count < 0:
        raise ConfigError(f"worker.count must be 0 or more, not {config.worker.count}")
    if config.worker.retry_delay_s < 0:
        raise ConfigError(f"worker.retry_delay_s must be 0 or more, not {config.worker.retry_delay_s}")
    if config.worker.series_source not in ("auto", "dicomweb"):
        raise ConfigError(f"worker.series_source must be auto or dicomweb, not {config.worker.series_source!r}")
    if config.worker.cpu_threads_per_engine < 1:
        raise ConfigError(f"worker.cpu_threads_per_engine must be 1 or more, not {config.worker.cpu_threads_per_engine}: "
                          "set 1 for one job at a time, 2 to overlap jobs")
