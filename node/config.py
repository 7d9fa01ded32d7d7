"""The node's one typed configuration, read from TOML and validated at start.

Every option has a default that works on a single machine; `PARASPINAL_<SECTION>_<KEY>`
environment variables override file values (e.g. PARASPINAL_SEGMENTER_DEVICE=cpu).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(Exception):
    """A configuration problem; the message names the key and the fix."""


@dataclass
class ReceiverConfig:
    ae_title: str = "PARASPINAL"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    allowed_calling_aes: list[str] = field(default_factory=list)  # empty: accept any
    max_associations: int = 10
    min_free_disk_mb: int = 5000
    accept_other_storage: bool = True  # accept and discard non-CT storage (scouts, dose SRs)


@dataclass
class DestinationConfig:
    ae_title: str = ""
    host: str = ""
    port: int = 104


@dataclass
class StorageConfig:
    state_dir: Path = Path("./state")


@dataclass
class SegmenterConfig:
    backend: str = "totalsegmentator"  # or "precomputed"
    weights_dir: Path = Path("./state/weights")
    device: str = "gpu"  # gpu, cpu or gpu:N
    fast: bool = False
    vertebral_bodies: str = "auto"  # auto: use vertebrae_body when its weights exist; on; off
    precomputed_dir: Path = Path("./state/precomputed")
    timeout_s: int = 3600


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


@dataclass
class Config:
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    destinations: list[DestinationConfig] = field(default_factory=list)
    storage: StorageConfig = field(default_factory=StorageConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)


_VALID_BACKENDS = ("totalsegmentator", "precomputed")
_VALID_BODY_MODES = ("auto", "on", "off")


def load_config(path: Path | None = None, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Read `path` (or only defaults), apply environment overrides, validate."""
    raw: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found: pass an existing --config FILE") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    config = _build(Config, raw, "")
    _apply_environment(config, os.environ if environ is None else environ)
    _validate(config)
    return config


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
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
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
    if not (seg.device in ("gpu", "cpu") or (seg.device.startswith("gpu:") and seg.device[4:].isdigit())):
        raise ConfigError(f"segmenter.device must be gpu, cpu or gpu:N, not {seg.device!r}")
    if not 0 < config.receiver.port < 65536:
        raise ConfigError(f"receiver.port must be 1..65535, not {config.receiver.port}")
    if not 0 < len(config.receiver.ae_title) <= 16:
        raise ConfigError("receiver.ae_title must be 1 to 16 characters")
    for i, dest in enumerate(config.destinations):
        if not dest.ae_title or not dest.host:
            raise ConfigError(f"destinations[{i}] needs ae_title and host")
