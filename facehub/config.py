"""Settings: one TOML file plus ``FACEHUB_*`` environment overrides.

A container should need nothing but environment variables, so every key of the
file can also be set as ``FACEHUB_<SECTION>_<KEY>`` (``FACEHUB_DETECTOR_SOURCE``,
``FACEHUB_CLOUD_PASSWORD``); top-level keys are ``FACEHUB_<KEY>``
(``FACEHUB_DEVICE_ID``). Values are validated once, here, and an invalid value
raises :class:`ConfigError` naming the key, so a typo fails at start instead of
deep inside a child process.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "FACEHUB_"
SECRET_KEYS = {"password", "secret", "key_secret", "secret_access_key"}
MASK = "********"
SESSION_NEVER_EXPIRES = 0xFFFFFFFF  # MQTT v5: the broker keeps the session until the client ends it
SEARCH_MODES = ("auto", "background", "inline")
DEDUP_POLICIES = ("better", "largest", "first")


class ConfigError(ValueError):
    """An invalid setting; the message names the key."""


@dataclass
class BrokerConfig:
    """How to reach one MQTT broker (the local edge one or the cloud one)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_insecure: bool = False
    keepalive: int = 30
    qos: int = 1
    session_expiry: int = 86400
    client_id: str = ""
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0

    def validate(self, section: str) -> None:
        _check(0 < self.port < 65536, f"{section}.port", "must be 1..65535")
        _check(self.qos in (0, 1, 2), f"{section}.qos", "must be 0, 1 or 2")
        _check(self.keepalive >= 5, f"{section}.keepalive", "must be >= 5 seconds")
        _check(0 <= self.session_expiry <= SESSION_NEVER_EXPIRES, f"{section}.session_expiry",
               f"must be 0..{SESSION_NEVER_EXPIRES} seconds ({SESSION_NEVER_EXPIRES} = never expires)")
        _check(0 < self.reconnect_min <= self.reconnect_max, f"{section}.reconnect_min",
               "must be > 0 and <= reconnect_max")
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            _check(not path or Path(path).is_file(), f"{section}.{key}", f"file not found: {path}")


@dataclass
class DetectorConfig:
    """Camera source, detection backend and what to send per face.

    Haar defaults (see facehub/detection/haar.py): proposals from
    ``cascade`` at ``scale_factor``/``min_neighbors``, each confirmed by
    ``verify_cascade`` firing at least ``verify_hits`` times (0 = off).
    ``min_size`` is in pixels of the detection image (frames are shrunk to
    ``detect_width``, or enlarged by up to ``upscale`` when narrower).
    ``score_threshold`` and ``nms_threshold`` are YuNet's. Duplicates: at most
    one crop per track per ``dedup_interval`` seconds (0 = every detection),
    chosen by ``dedup_policy`` (see facehub/detection/tracker.py: "better" sends
    a later crop only when it is clearly larger than those sent, "largest"
    holds the largest of each interval, "first" refreshes once per interval); a
    track ends when unseen for ``track_timeout`` seconds. ``search``: where the
    full search runs ("background" on its own thread while every frame follows
    the tracked faces, "inline" on the frame itself, "auto" = background for
    live or paced sources, inline for a file read as fast as possible).
    """

    source: str = "0"
    loop: bool = False
    width: int = 0
    height: int = 0
    fps: float = 0.0
    backend: str = "haar"
    cascade: str = "haarcascade_frontalface_default.xml"
    verify_cascade: str = "haarcascade_frontalface_alt.xml"
    verify_hits: int = 3
    model_path: str = ""
    scale_factor: float = 1.1
    min_neighbors: int = 1
    min_size: int = 20
    detect_width: int = 640
    upscale: float = 1.0
    score_threshold: float = 0.8
    nms_threshold: float = 0.3
    margin: float = 0.2
    jpeg_quality: int = 90
    detect_every: int = 15
    search: str = "auto"
    dedup_interval: float = 1.0
    dedup_policy: str = "better"
    track_iou: float = 0.3
    track_timeout: float = 1.0
    queue_size: int = 1000
    threads: int = 0
    reopen_min: float = 0.5
    reopen_max: float = 30.0

    def validate(self, section: str = "detector") -> None:
        _check(self.backend in ("haar", "yunet"), f"{section}.backend", "must be 'haar' or 'yunet'")
        _check(self.backend != "yunet" or bool(self.model_path), f"{section}.model_path",
               "is required for the yunet backend")
        _check(not self.model_path or Path(self.model_path).is_file(), f"{section}.model_path",
               f"file not found: {self.model_path}")
        _check(self.scale_factor > 1.0, f"{section}.scale_factor", "must be > 1.0")
        _check(self.min_neighbors >= 0, f"{section}.min_neighbors", "must be >= 0")
        _check(self.verify_hits >= 0, f"{section}.verify_hits", "must be >= 0 (0 = no verification)")
        _check(self.min_size >= 1, f"{section}.min_size", "must be >= 1")
        _check(self.detect_width >= 0, f"{section}.detect_width", "must be >= 0 (0 = full size)")
        _check(self.upscale >= 1, f"{section}.upscale", "must be >= 1 (1 = never enlarge)")
        _check(0 < self.score_threshold < 1, f"{section}.score_threshold", "must be between 0 and 1")
        _check(0 < self.nms_threshold < 1, f"{section}.nms_threshold", "must be between 0 and 1")
        _check(0 <= self.margin <= 1, f"{section}.margin", "must be between 0 and 1")
        _check(1 <= self.jpeg_quality <= 100, f"{section}.jpeg_quality", "must be 1..100")
        _check(self.detect_every >= 1, f"{section}.detect_every", "must be >= 1")
        _check(self.search in SEARCH_MODES, f"{section}.search", "must be " + " or ".join(map(repr, SEARCH_MODES)))
        _check(self.dedup_policy in DEDUP_POLICIES, f"{section}.dedup_policy",
               "must be " + " or ".join(map(repr, DEDUP_POLICIES)))
        _check(self.dedup_interval >= 0, f"{section}.dedup_interval", "must be >= 0 (0 = send all)")
        _check(0 < self.track_iou <= 1, f"{section}.track_iou", "must be > 0 and <= 1")
        _check(self.track_timeout > 0, f"{section}.track_timeout", "must be > 0")
        _check(self.queue_size >= 1, f"{section}.queue_size", "must be >= 1")
        _check(self.threads >= 0, f"{section}.threads", "must be >= 0 (0 = one per CPU core, up to 4)")
        _check(0 < self.reopen_min <= self.reopen_max, f"{section}.reopen_min",
               "must be > 0 and <= reopen_max")
        _check(self.width >= 0 and self.height >= 0 and self.fps >= 0, f"{section}.width",
               "width, height and fps must be >= 0 (0 = camera default)")


def opencv_threads(threads: int) -> int:
    """OpenCV worker threads for a ``detector.threads`` setting (0 = one per core, at most 4).

    Not passed to OpenCV as 0: ``cv2.setNumThreads(0)`` turns its threading off.
    """
    return threads or max(1, min(4, os.cpu_count() or 1))


@dataclass
class ForwarderConfig:
    """The durable spool between the edge broker and the cloud broker."""

    spool_path: str = field(default_factory=lambda: default_spool_path())
    spool_max_messages: int = 100_000
    spool_max_bytes: int = 1_000_000_000
    spool_max_age: float = 7 * 86400.0
    fsync: str = "full"
    inflight: int = 100

    def validate(self, section: str = "forwarder") -> None:
        _check(self.fsync in ("full", "normal", "off"), f"{section}.fsync", "must be full, normal or off")
        _check(self.spool_max_messages >= 1, f"{section}.spool_max_messages", "must be >= 1")
        _check(self.spool_max_bytes >= 1024, f"{section}.spool_max_bytes", "must be >= 1024")
        _check(self.spool_max_age > 0, f"{section}.spool_max_age", "must be > 0")
        _check(self.inflight >= 1, f"{section}.inflight", "must be >= 1")


@dataclass
class SaverConfig:
    """Where faces are stored: an fsspec URL (``s3://bucket/prefix`` or a folder).

    ``workers`` storage writes run at once; ``inflight`` caps the unacknowledged
    messages the broker may push (MQTT v5 Receive Maximum), which bounds memory
    while storage is down; ``timeout`` bounds one storage call, and a write
    stuck for longer than a few timeouts stops the heartbeat.
    """

    url: str = "./faces"
    endpoint_url: str = ""
    key: str = ""
    secret: str = ""
    region: str = ""
    max_bytes: int = 2_000_000
    quarantine_prefix: str = "quarantine"
    share_group: str = "savers"
    instances: int = 1
    workers: int = 4
    inflight: int = 100
    timeout: float = 30.0
    retry_min: float = 0.5
    retry_max: float = 30.0

    def validate(self, section: str = "saver") -> None:
        _check(bool(self.url), f"{section}.url", "must not be empty")
        _check(self.max_bytes >= 1024, f"{section}.max_bytes", "must be >= 1024")
        _check(self.instances >= 1, f"{section}.instances", "must be >= 1")
        _check("/" not in self.share_group and bool(self.share_group)
               and not any(c in self.share_group for c in "#+"), f"{section}.share_group",
               "must be a non-empty name without '/', '#' or '+'")
        _check(bool(self.quarantine_prefix) and all(part not in ("", ".", "..")
                                                    for part in self.quarantine_prefix.split("/")),
               f"{section}.quarantine_prefix", "must be a non-empty relative path without '.' or '..'")
        _check(1 <= self.workers <= 64, f"{section}.workers", "must be 1..64")
        _check(1 <= self.inflight <= 65535, f"{section}.inflight", "must be 1..65535")
        _check(self.timeout > 0, f"{section}.timeout", "must be > 0")
        _check(0 < self.retry_min <= self.retry_max, f"{section}.retry_min",
               "must be > 0 and <= retry_max")


@dataclass
class SupervisorConfig:
    """Restart policy and health bookkeeping for the process supervisor."""

    max_restarts: int = 5
    restart_window: float = 60.0
    backoff_min: float = 1.0
    backoff_max: float = 30.0
    startsecs: float = 1.0
    heartbeat_timeout: float = 30.0
    stop_timeout: float = 10.0
    status_interval: float = 1.0
    state_dir: str = "/tmp/facehub"

    def validate(self, section: str = "supervisor") -> None:
        _check(self.max_restarts >= 0, f"{section}.max_restarts", "must be >= 0")
        _check(self.restart_window > 0, f"{section}.restart_window", "must be > 0")
        _check(0 < self.backoff_min <= self.backoff_max, f"{section}.backoff_min",
               "must be > 0 and <= backoff_max")
        _check(self.heartbeat_timeout > 0, f"{section}.heartbeat_timeout", "must be > 0")
        _check(self.stop_timeout > 0, f"{section}.stop_timeout", "must be > 0")
        _check(self.status_interval > 0, f"{section}.status_interval", "must be > 0")


@dataclass
class Config:
    """The whole effective configuration of one FaceHub process tree."""

    device_id: str = field(default_factory=lambda: _safe_name(socket.gethostname()))
    topic_prefix: str = "faces"
    log_level: str = "INFO"
    # the edge broker keeps the forwarder's queue however long the forwarder is down (bounded by the
    # broker's max_queued_messages), so faces published meanwhile still reach the cloud
    local: BrokerConfig = field(default_factory=lambda: BrokerConfig(session_expiry=SESSION_NEVER_EXPIRES))
    cloud: BrokerConfig = field(default_factory=lambda: BrokerConfig(port=1884))
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    forwarder: ForwarderConfig = field(default_factory=ForwarderConfig)
    saver: SaverConfig = field(default_factory=SaverConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)

    @property
    def topic(self) -> str:
        """The topic this device publishes its faces on."""
        return f"{self.topic_prefix}/{self.device_id}"

    @property
    def topic_filter(self) -> str:
        """The filter matching every device's faces."""
        return f"{self.topic_prefix}/#"

    def validate(self) -> "Config":
        _check(bool(self.device_id) and _safe_name(self.device_id) == self.device_id
               and self.device_id[0].isalnum() and len(self.device_id) <= 128, "device_id",
               "must be 1-128 letters, digits, '-', '_' or '.', starting with a letter or digit")
        _check(bool(self.topic_prefix) and not any(c in self.topic_prefix for c in "#+")
               and not self.topic_prefix.startswith("$") and not self.topic_prefix.endswith("/"),
               "topic_prefix", "must be non-empty, without wildcards, '$' start or trailing '/'")
        _check(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
               "must be DEBUG, INFO, WARNING or ERROR")
        self.local.validate("local")
        self.cloud.validate("cloud")
        self.detector.validate()
        self.forwarder.validate()
        self.saver.validate()
        self.supervisor.validate()
        return self

    def to_dict(self, mask_secrets: bool = True) -> dict[str, Any]:
        """The configuration as plain data; secrets masked unless asked otherwise."""
        data = dataclasses.asdict(self)
        if mask_secrets:
            _mask(data)
        return data


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the file (if any), apply ``FACEHUB_*`` overrides, validate, return the result.

    The file defaults to ``$FACEHUB_CONFIG`` when no path is given.
    """
    env = os.environ if env is None else env
    path = path or env.get(ENV_PREFIX + "CONFIG") or None
    config = Config()
    if path:
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
        _apply_mapping(config, data, prefix="")
    _apply_env(config, env)
    return config.validate()


def _apply_mapping(target: Any, data: Mapping[str, Any], prefix: str) -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in data.items():
        label = _close(f"{prefix}{key}")
        if key not in known:
            raise ConfigError(f"{label}: unknown setting")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{label}: must be a table of settings")
            _apply_mapping(current, value, prefix=f"{prefix}{key}.")
        else:
            setattr(target, key, _coerce(label, value, type(current)))


def _apply_env(config: Config, env: Mapping[str, str]) -> None:
    sections = {f.name for f in fields(config) if dataclasses.is_dataclass(getattr(config, f.name))}
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        rest = var[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section in sections and key:
            _apply_mapping(getattr(config, section), {key: raw}, prefix=f"{var} ({section}.")
        else:
            _apply_mapping(config, {rest: raw}, prefix=f"{var} (")


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Turn a file or environment value into the setting's type, or name the key."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None


def _close(name: str) -> str:
    """Close the '(' opened for environment variable names in error messages."""
    return name + ")" if "(" in name and not name.endswith(")") else name


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _mask(data: dict[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            _mask(value)
        elif key in SECRET_KEYS and value:
            data[key] = MASK


def default_spool_path() -> str:
    """``/var/lib/facehub`` for root (services, containers), the user's state folder otherwise."""
    if os.geteuid() == 0:
        return "/var/lib/facehub/spool.db"
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "facehub", "spool.db")


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "device"
