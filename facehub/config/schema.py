"""The configuration schema: one dataclass per section, with defaults and validation.

Each section validates itself and raises :class:`ConfigError` naming the key,
so a typo fails at start instead of deep inside a child process. How values
get here (file, environment) is ``loader.py``'s business; ``reference.py``
turns these classes into the reference of every key (docs/configuration.md),
reading each field's trailing ``#`` comment as its description.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# keys whose whole value is secret (saver.key is an access key id: not a password, but no business of a log)
SECRET_KEYS = {"password", "secret", "key_secret", "secret_access_key", "key", "password_hash",
               "admin_password_hash"}
MASK = "********"
SESSION_NEVER_EXPIRES = 0xFFFFFFFF  # MQTT v5: the broker keeps the session until the client ends it
SEARCH_MODES = ("auto", "background", "inline")
BACKENDS = ("auto", "haar", "yunet")
# where the image and the edge role put the OpenCV model zoo's YuNet model: backend "auto" uses it when present
DEFAULT_YUNET_MODEL = "/opt/facehub/models/face_detection_yunet_2023mar.onnx"
DEDUP_POLICIES = ("better", "largest", "first")


class ConfigError(ValueError):
    """An invalid setting; the message names the key."""


@dataclass
class BrokerConfig:
    """How to reach one MQTT broker (the local edge one or the cloud one).

    A lost connection is retried with exponential backoff from ``reconnect_min``
    up to ``reconnect_max`` seconds, each delay shortened by a random fraction
    (up to a quarter) so a fleet does not come back in lockstep. The short cap
    (4 s) is what brings every client back within 5 s of its broker's return;
    a broker that stays down sees one TCP connect per client every 3-4 s.
    """

    host: str = "127.0.0.1"  # broker host name or address
    port: int = 1883  # broker port (8883 is the usual TLS port)
    username: str = ""  # MQTT user name (cloud broker: the device id; "{client_id}" is replaced by the client id)
    password: str = ""  # MQTT password (secret: set it in the environment)
    # file holding the MQTT password, read at start (surrounding whitespace stripped); instead of password
    password_file: str = ""
    tls: bool = False  # connect with TLS
    ca_file: str = ""  # CA certificate that signed the broker's certificate
    cert_file: str = ""  # client certificate, for brokers that require one
    key_file: str = ""  # client certificate's key
    tls_insecure: bool = False  # skip the host name check (tests only)
    keepalive: int = 30  # seconds between MQTT pings; a dead link is noticed in 1.5x this
    qos: int = 1  # MQTT QoS of faces: 0, 1 (at least once, the default) or 2
    session_expiry: int = 86400  # seconds the broker keeps a persistent session of an absent client
    client_id: str = ""  # MQTT client id (default: derived from the component and device id)
    reconnect_min: float = 0.5  # first reconnect delay, seconds
    reconnect_max: float = 4.0  # longest reconnect delay, seconds (4: back within 5 s of the broker)

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
        if self.password_file:
            self.read_password_file(section)

    def read_password_file(self, section: str) -> None:
        """Take ``password`` from ``password_file``: one pod template for many devices names each
        device's own file (a Secret mounted as files, picked by node name), which a single
        environment variable cannot."""
        key = f"{section}.password_file"
        try:
            password = Path(self.password_file).read_text().strip()
        except FileNotFoundError:
            raise ConfigError(f"{key}: file not found: {self.password_file}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{key}: cannot read {self.password_file}: {error}") from None
        _check(bool(password), key, f"{self.password_file} is empty")
        # A validated configuration already holds the file's password: validating it again is fine.
        _check(not self.password or self.password == password, key,
               f"set {section}.password or {section}.password_file, not both")
        self.password = password


@dataclass
class DetectorConfig:
    """Camera source, detection backend and what to send per face.

    ``backend = "auto"`` runs YuNet when its model file is there
    (``model_path``, or where the image and the edge role put it), Haar
    otherwise; ``facehub config check`` and the detector's first log line say
    which runs and why. Haar (see facehub/edge/detection/haar.py): proposals
    from ``cascade`` at ``scale_factor`` (``still_scale_factor`` for a single
    image)/``min_neighbors``, each confirmed by the ``verify_cascades``
    agreeing at least ``verify_score`` (0 = off), and
    by a middle with some contrast (``min_contrast``: dark or flat patches
    fire both cascades once contrast-equalised, a face has features).
    ``min_size`` is in pixels of the detection image (frames are shrunk to
    ``detect_width``, or enlarged by up to ``upscale`` when narrower).
    ``score_threshold`` and ``nms_threshold`` are YuNet's. A new face is sent
    once seen in ``confirm_frames`` frames (1: at once; more holds back
    clutter that flickers, but on a slow CPU the frames it needs are far apart
    and moving faces are lost before they are confirmed). Duplicates: at most one crop per track per ``dedup_interval``
    seconds (0 = every detection), chosen by ``dedup_policy`` (see
    facehub/edge/detection/tracker.py: "better" sends a later crop only when it
    is clearly larger than those sent, "largest" holds the largest of each
    interval, "first" refreshes once per interval); a track ends when unseen
    for ``track_timeout`` seconds. ``search``: where the full search runs
    ("background" on its own thread while every frame follows the tracked
    faces, "inline" on the frame itself; "auto" = inline, the better of the
    two on a slow CPU: see ``search_in_background`` in
    facehub/edge/detection/finder.py).
    """

    # camera index or /dev/videoN, video file, rtsp:// or http:// URL, GStreamer pipeline, or 'sample'
    source: str = "0"
    loop: bool = False  # replay a video file when it ends
    width: int = 0  # frame width requested from a camera (0 = camera default)
    height: int = 0  # frame height requested from a camera (0 = camera default)
    # frames per second requested from a camera; for a file, play it at this pace (0 = as fast as possible)
    fps: float = 0.0
    # 'auto' (YuNet when its model file is there, else Haar), 'haar' (OpenCV's bundled cascades) or 'yunet'
    backend: str = "auto"
    cascade: str = "haarcascade_frontalface_default.xml"  # Haar cascade that proposes faces
    # Haar cascades that must agree on each proposal (comma-separated)
    verify_cascades: str = ("haarcascade_frontalface_default.xml,haarcascade_frontalface_alt.xml,"
                            "haarcascade_frontalface_alt2.xml")
    # Haar: agreement a proposal needs, the geometric mean of (1 + hits) of verify_cascades (0 = no verification)
    verify_score: float = 22.0
    # Haar: a box whose middle is flatter than this (grey standard deviation, 0-255) is not a face (0 = off)
    min_contrast: float = 10.0
    model_path: str = ""  # YuNet ONNX model file (empty: /opt/facehub/models/face_detection_yunet_2023mar.onnx)
    scale_factor: float = 1.2  # Haar image pyramid step for camera frames
    still_scale_factor: float = 1.05  # Haar image pyramid step for a single image (facehub detect), searched once
    min_neighbors: int = 2  # Haar overlapping detections a face needs
    min_size: int = 20  # smallest face, in pixels of the detection image
    detect_width: int = 640  # frames wider than this are shrunk for detection (0 = full size)
    upscale: float = 1.0  # narrower frames may be enlarged by up to this factor (1 = never)
    score_threshold: float = 0.8  # YuNet score a face needs
    nms_threshold: float = 0.3  # YuNet non-maximum suppression overlap
    margin: float = 0.2  # margin around the box in the crop, as a share of the box size
    jpeg_quality: int = 90  # JPEG quality of the crops
    detect_every: int = 8  # a full search every N frames; the frames between only follow tracked faces
    search: str = "auto"  # where the full search runs: 'auto', 'background' or 'inline'
    dedup_interval: float = 1.0  # seconds between two crops of one face (0 = every detection)
    dedup_policy: str = "better"  # which crops of a face are sent: 'better', 'largest' or 'first'
    track_iou: float = 0.3  # overlap that links a detection to a track
    track_timeout: float = 1.0  # seconds a track lives unseen
    confirm_frames: int = 1  # a new face is sent once seen in this many frames (1 = at once)
    queue_size: int = 1000  # faces waiting for the broker; when full the oldest is dropped and counted
    threads: int = 0  # OpenCV threads (0 = one per core, up to 4)
    reopen_min: float = 0.5  # first delay before reopening a failed source, seconds
    reopen_max: float = 30.0  # longest delay before reopening a failed source, seconds

    @property
    def yunet_model(self) -> str:
        """The YuNet model file: ``model_path``, or the default place of the image and the edge role."""
        return self.model_path or DEFAULT_YUNET_MODEL

    def detection(self) -> tuple[str, str]:
        """``(backend, why)``: the backend that runs, and the reason, in words."""
        if self.backend != "auto":
            return self.backend, "set by detector.backend"
        if Path(self.yunet_model).is_file():
            return "yunet", f"backend 'auto' and the YuNet model is at {self.yunet_model}"
        return "haar", f"backend 'auto' and no YuNet model at {self.yunet_model}"

    def validate(self, section: str = "detector") -> None:
        _check(self.backend in BACKENDS, f"{section}.backend", "must be " + " or ".join(map(repr, BACKENDS)))
        _check(self.backend != "yunet" or Path(self.yunet_model).is_file(), f"{section}.model_path",
               f"the yunet backend needs its model file (not found: {self.yunet_model})")
        _check(not self.model_path or Path(self.model_path).is_file(), f"{section}.model_path",
               f"file not found: {self.model_path}")
        _check(self.scale_factor > 1.0, f"{section}.scale_factor", "must be > 1.0")
        _check(self.min_neighbors >= 0, f"{section}.min_neighbors", "must be >= 0")
        _check(self.still_scale_factor > 1.0, f"{section}.still_scale_factor", "must be > 1.0")
        _check(self.verify_score >= 0, f"{section}.verify_score", "must be >= 0 (0 = no verification)")
        _check(self.min_size >= 1, f"{section}.min_size", "must be >= 1")
        _check(0 <= self.min_contrast < 128, f"{section}.min_contrast", "must be between 0 and 128")
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
        _check(self.confirm_frames >= 1, f"{section}.confirm_frames", "must be >= 1 (1 = send at once)")
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

    # SQLite spool file (default: /var/lib/facehub/spool.db as root, else the user's state folder)
    spool_path: str = field(default_factory=lambda: default_spool_path())
    spool_max_messages: int = 100_000  # faces the spool holds; beyond it the oldest are dropped and counted
    spool_max_bytes: int = 1_000_000_000  # bytes the spool holds; beyond it the oldest are dropped and counted
    spool_max_age: float = 7 * 86400.0  # seconds a face may wait in the spool before it is dropped and counted
    fsync: str = "full"  # 'full' (survives power loss), 'normal' or 'off'
    inflight: int = 100  # faces sent to the cloud broker and not yet acknowledged
    # refusals for good (not authorized, invalid topic or payload) before a face moves to the dead letters
    max_refusals: int = 3
    dead_letters_max: int = 10_000  # faces kept in the dead letters; beyond it the oldest are dropped and counted
    stats_interval: float = 60.0  # seconds between two stats messages to the cloud (0 = none)

    def validate(self, section: str = "forwarder") -> None:
        _check(self.max_refusals >= 1, f"{section}.max_refusals", "must be >= 1")
        _check(self.dead_letters_max >= 0, f"{section}.dead_letters_max", "must be >= 0")
        _check(self.stats_interval >= 0, f"{section}.stats_interval", "must be >= 0 (0 = no stats)")
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

    url: str = "./faces"  # where faces go: s3://bucket/prefix, or a folder (an s3fs-fuse mount)
    endpoint_url: str = ""  # S3 endpoint of an S3-compatible store (default: AWS)
    key: str = ""  # S3 access key id (default: the AWS credential chain)
    secret: str = ""  # S3 secret access key (secret)
    region: str = ""  # S3 region
    max_bytes: int = 2_000_000  # largest payload accepted; larger ones are counted and dropped
    quarantine_prefix: str = "quarantine"  # where rejected messages are kept, under the store's prefix
    share_group: str = "savers"  # MQTT shared-subscription group of the savers
    instances: int = 1  # savers run by `facehub run cloud`
    workers: int = 4  # storage writes at once per saver
    inflight: int = 100  # unacknowledged faces the broker may push to a saver (MQTT v5 Receive Maximum)
    timeout: float = 30.0  # seconds one storage call may take
    retry_min: float = 0.5  # first delay before retrying a failed write, seconds
    retry_max: float = 30.0  # longest delay before retrying a failed write, seconds
    max_pixels: int = 4096 * 4096  # largest image accepted, in pixels its header declares (read before decoding)
    decoders: int = 1  # decoder processes per saver (each about 60 MiB plus up to decode_memory while decoding)
    # bytes a decoder process may allocate beyond its idle size (RLIMIT_AS); an image of max_pixels needs up to
    # 8 bytes a pixel (a WebP with alpha), so at least that plus 32 MiB
    decode_memory: int = 192 * 1024 * 1024
    decode_timeout: float = 10.0  # seconds one decode may take; a late decoder is killed and replaced
    # attempts at one message that may end in a saver or decoder crash or timeout; then it is quarantined
    # without its payload and acknowledged
    max_attempts: int = 3
    queue_size: int = 1000  # messages waiting in memory for a worker; QoS 0 messages beyond it are dropped, counted
    queue_bytes: int = 16_000_000  # payload bytes waiting in memory; QoS 0 messages beyond it are dropped, counted
    quarantine_max_messages: int = 1000  # rejected messages kept per device per UTC day (0 = no limit)
    quarantine_max_bytes: int = 20_000_000  # bytes of rejected messages kept per device per UTC day (0 = no limit)
    quarantine_rate: float = 1.0  # rejected messages kept per second per device, sustained (0 = no limit)
    quarantine_burst: int = 60  # rejected messages a device may have kept in a burst before quarantine_rate applies
    # bytes of rejected messages kept per UTC day by one saver for all devices together (0 = no limit)
    quarantine_total_bytes: int = 200_000_000
    quarantine_reserve: float = 0.1  # share of a folder store's volume that quarantine copies leave free for faces

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
        _check(self.max_pixels >= 1, f"{section}.max_pixels", "must be >= 1")
        _check(1 <= self.decoders <= 64, f"{section}.decoders", "must be 1..64")
        _check(self.decode_memory >= 8 * self.max_pixels + 32 * 1024 * 1024, f"{section}.decode_memory",
               f"must be >= 8 bytes per pixel of max_pixels plus 32 MiB ({8 * self.max_pixels + 32 * 1024 * 1024})")
        _check(self.decode_timeout > 0, f"{section}.decode_timeout", "must be > 0")
        _check(self.max_attempts >= 1, f"{section}.max_attempts", "must be >= 1")
        _check(self.queue_size >= 1, f"{section}.queue_size", "must be >= 1")
        _check(self.queue_bytes >= self.max_bytes, f"{section}.queue_bytes", "must be >= max_bytes")
        for key in ("quarantine_max_messages", "quarantine_max_bytes", "quarantine_total_bytes",
                    "quarantine_burst"):
            _check(getattr(self, key) >= 0, f"{section}.{key}", "must be >= 0 (0 = no limit)")
        _check(self.quarantine_rate >= 0, f"{section}.quarantine_rate", "must be >= 0 (0 = no limit)")
        _check(not self.quarantine_rate or self.quarantine_burst >= 1, f"{section}.quarantine_burst",
               "must be >= 1 when quarantine_rate is set")
        _check(0 <= self.quarantine_reserve < 1, f"{section}.quarantine_reserve", "must be >= 0 and < 1")


@dataclass
class SupervisorConfig:
    """Restart policy and health bookkeeping for the process supervisor.

    ``delivery_timeout`` is for ``facehub health --delivery`` (see
    facehub/process/health.py): faces count as not moving once a broker has been
    unreachable, storage has been failing, or the oldest face not yet handed on
    has waited for longer than this many seconds.
    """

    max_restarts: int = 5  # crashes of one child within restart_window before the supervisor gives up (exit 3)
    restart_window: float = 60.0  # seconds over which crashes are counted
    backoff_min: float = 1.0  # delay before the first restart, seconds; doubles per crash
    backoff_max: float = 30.0  # longest delay before a restart, seconds
    startsecs: float = 1.0  # seconds a child must live to count as RUNNING
    heartbeat_timeout: float = 30.0  # seconds without a heartbeat before a child counts as stuck and is restarted
    stop_timeout: float = 10.0  # seconds a child gets to stop before SIGKILL
    status_interval: float = 1.0  # seconds between status file writes
    # folder of the status and stats files that `facehub health` reads (default: /run/facehub as root,
    # else $XDG_RUNTIME_DIR/facehub); created 0700, and refused when it is not the user's own
    state_dir: str = field(default_factory=lambda: default_state_dir())
    # seconds after which `facehub health --delivery` fails: a broker unreachable, storage failing, or the
    # oldest face not yet handed on waiting, for longer than this
    delivery_timeout: float = 60.0

    def validate(self, section: str = "supervisor") -> None:
        _check(self.max_restarts >= 0, f"{section}.max_restarts", "must be >= 0")
        _check(self.restart_window > 0, f"{section}.restart_window", "must be > 0")
        _check(0 < self.backoff_min <= self.backoff_max, f"{section}.backoff_min",
               "must be > 0 and <= backoff_max")
        _check(self.heartbeat_timeout > 0, f"{section}.heartbeat_timeout", "must be > 0")
        _check(self.stop_timeout > 0, f"{section}.stop_timeout", "must be > 0")
        _check(self.status_interval > 0, f"{section}.status_interval", "must be > 0")
        _check(self.delivery_timeout > 0, f"{section}.delivery_timeout", "must be > 0 seconds")


@dataclass
class MetricsConfig:
    """Prometheus ``/metrics``, served by the supervisor of ``facehub run ROLE`` for all its children."""

    port: int = 0  # port of /metrics (0 = off)
    host: str = "0.0.0.0"  # address to listen on (0.0.0.0 = every interface, for a scraper in the cluster)

    def validate(self, section: str = "metrics") -> None:
        _check(0 <= self.port < 65536, f"{section}.port", "must be 0 (off) or 1..65535")


@dataclass
class ConsoleConfig:
    """The web console (``facehub console``, or a child of ``facehub run cloud`` when ``enabled``):
    gallery, fleet and quarantine of the store in ``saver.url``; see docs/console.md.

    Two accounts: ``user`` may look, ``admin_user`` may also delete faces and see the
    quarantine; a password hash comes from ``facehub console hash-password``, an empty one
    turns the account off. Behind a reverse proxy that logs people in, ``proxy_user_header``
    names the header carrying the user name, honoured only from ``trusted_proxy``.
    """

    enabled: bool = False  # run the console as a child of `facehub run cloud`
    # MQTT client id of the fleet watcher: fixed, so the cloud broker can bind it to a status-reader account,
    # with a persistent session so availability messages sent while the console restarts are not missed
    client_id: str = "facehub-console"
    host: str = "127.0.0.1"  # address to listen on (0.0.0.0 only behind TLS: a proxy, or tls_cert)
    port: int = 8443  # port to listen on
    tls_cert: str = ""  # server certificate (PEM, chain first) to serve HTTPS; empty: plain HTTP for a proxy
    tls_key: str = ""  # its private key
    user: str = "viewer"  # name of the account that sees the gallery and the fleet
    password_hash: str = ""  # its password hash (facehub console hash-password); empty: no such account
    admin_user: str = "admin"  # name of the account that may also delete faces and see the quarantine
    admin_password_hash: str = ""  # its password hash; empty: no such account
    proxy_user_header: str = ""  # header with the user name set by a trusted reverse proxy (e.g. X-Forwarded-User)
    proxy_admins: str = ""  # comma-separated user names from the proxy header that are admins
    trusted_proxy: str = ""  # address of the reverse proxy: its user header and X-Forwarded-For are believed
    secure_cookies: bool = True  # session cookie only over HTTPS (turn off only for plain-HTTP tests)
    session_hours: float = 12.0  # a login lasts this long
    login_attempts: int = 5  # wrong passwords one client address may try per login_window
    login_window: float = 300.0  # seconds over which wrong passwords are counted
    page_size: int = 60  # faces per gallery page
    poll_interval: float = 1.0  # seconds between looks for new faces (live gallery, fleet)
    offline_after: float = 600.0  # without availability messages, a device is offline after this long without a face
    status_prefix: str = "facehub"  # devices' retained <prefix>/<device>/availability and /stats topics

    def validate(self, section: str = "console") -> None:
        _check(0 < self.port < 65536, f"{section}.port", "must be 1..65535")
        _check(bool(self.tls_cert) == bool(self.tls_key), f"{section}.tls_cert", "tls_cert and tls_key go together")
        for key in ("tls_cert", "tls_key"):
            path = getattr(self, key)
            _check(not path or Path(path).is_file(), f"{section}.{key}", f"file not found: {path}")
        for key in ("password_hash", "admin_password_hash"):
            value = getattr(self, key)
            _check(not value or value.startswith("scrypt:") and value.count(":") == 5, f"{section}.{key}",
                   "must be made by `facehub console hash-password` (scrypt:...)")
        _check(self.user != self.admin_user, f"{section}.user", "must differ from admin_user")
        _check(not self.enabled or bool(self.password_hash or self.admin_password_hash or self.proxy_user_header),
               f"{section}.password_hash", "the console needs an account: set password_hash or admin_password_hash "
               "(facehub console hash-password), or proxy_user_header")
        _check(not self.proxy_user_header or bool(self.trusted_proxy), f"{section}.trusted_proxy",
               "must be set with proxy_user_header (the header is believed only from that address)")
        _check(self.session_hours > 0, f"{section}.session_hours", "must be > 0")
        _check(self.login_attempts >= 1, f"{section}.login_attempts", "must be >= 1")
        _check(self.login_window > 0, f"{section}.login_window", "must be > 0")
        _check(1 <= self.page_size <= 500, f"{section}.page_size", "must be 1..500")
        _check(self.poll_interval > 0, f"{section}.poll_interval", "must be > 0")
        _check(self.offline_after > 0, f"{section}.offline_after", "must be > 0")
        _check(bool(self.status_prefix) and not any(c in self.status_prefix for c in "#+"),
               f"{section}.status_prefix", "must be a topic prefix without wildcards")


@dataclass
class RetentionConfig:
    """How long the store in ``saver.url`` keeps faces and quarantined messages (0 = for ever).

    On S3 a lifecycle rule of the bucket expires them (set by ``facehub console apply-retention``
    and by the retention child of ``facehub run cloud``); in a folder that child deletes day
    folders older than the limit every ``sweep_interval``.
    """

    days: int = 0  # days a face is kept after the day it was captured (0 = keep for ever)
    sweep_interval: float = 3600.0  # seconds between two sweeps of a folder store (and checks of the S3 rule)

    def validate(self, section: str = "retention") -> None:
        _check(0 <= self.days <= 36500, f"{section}.days", "must be 0 (keep for ever) or 1..36500")
        _check(self.sweep_interval > 0, f"{section}.sweep_interval", "must be > 0")


@dataclass
class Config:
    """The whole effective configuration of one FaceHub process tree."""

    # this device's id, in topics and storage keys (default: the host name)
    device_id: str = field(default_factory=lambda: _safe_name(socket.gethostname()))
    topic_prefix: str = "faces"  # faces are published on <topic_prefix>/<device_id>
    status_prefix: str = "facehub"  # availability and stats go to <status_prefix>/<device_id>/...
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR
    # the edge broker keeps the forwarder's queue however long the forwarder is down (bounded by the
    # broker's max_queued_messages), so faces published meanwhile still reach the cloud
    local: BrokerConfig = field(default_factory=lambda: BrokerConfig(session_expiry=SESSION_NEVER_EXPIRES))
    cloud: BrokerConfig = field(default_factory=lambda: BrokerConfig(port=1884))
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    forwarder: ForwarderConfig = field(default_factory=ForwarderConfig)
    saver: SaverConfig = field(default_factory=SaverConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)

    @property
    def topic(self) -> str:
        """The topic this device publishes its faces on."""
        return f"{self.topic_prefix}/{self.device_id}"

    @property
    def topic_filter(self) -> str:
        """The filter matching every device's faces."""
        return f"{self.topic_prefix}/#"

    @property
    def status_topic(self) -> str:
        """Where this device says how it is: ``<status_prefix>/<device_id>`` + /availability, /stats."""
        return f"{self.status_prefix}/{self.device_id}"

    def validate(self) -> "Config":
        _check(bool(self.device_id) and _safe_name(self.device_id) == self.device_id
               and self.device_id[0].isalnum() and len(self.device_id) <= 128, "device_id",
               "must be 1-128 letters, digits, '-', '_' or '.', starting with a letter or digit")
        _check(bool(self.topic_prefix) and not any(c in self.topic_prefix for c in "#+")
               and not self.topic_prefix.startswith("$") and not self.topic_prefix.endswith("/"),
               "topic_prefix", "must be non-empty, without wildcards, '$' start or trailing '/'")
        _check(bool(self.status_prefix) and not any(c in self.status_prefix for c in "#+")
               and not self.status_prefix.startswith("$") and not self.status_prefix.endswith("/"),
               "status_prefix", "must be non-empty, without wildcards, '$' start or trailing '/'")
        _check(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
               "must be DEBUG, INFO, WARNING or ERROR")
        self.local.validate("local")
        self.cloud.validate("cloud")
        self.detector.validate()
        self.forwarder.validate()
        self.saver.validate()
        self.supervisor.validate()
        self.metrics.validate()
        self.console.validate()
        self.retention.validate()
        return self

    def to_dict(self, mask_secrets: bool = True) -> dict[str, Any]:
        """The configuration as plain data; secrets masked unless asked otherwise."""
        data = dataclasses.asdict(self)
        if mask_secrets:
            mask(data)
        return data


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def default_state_dir() -> str:
    """A private runtime folder: never a predictable path in a world-writable /tmp."""
    if os.geteuid() == 0:
        return "/run/facehub"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "facehub")
    return os.path.join(os.path.expanduser("~"), ".local", "state", "facehub", "run")


def default_spool_path() -> str:
    """``/var/lib/facehub`` for root (services, containers), the user's state folder otherwise."""
    if os.geteuid() == 0:
        return "/var/lib/facehub/spool.db"
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "facehub", "spool.db")


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "device"


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):(?P<password>[^@/\s]*)@")


def redact_credentials(text: str) -> str:
    """Hide the password of every ``scheme://user:password@`` in ``text`` (URLs, GStreamer pipelines)."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)


def mask(data: dict[str, Any]) -> None:
    """Mask secrets in place: secret keys whole, and passwords inside any URL-like value."""
    for key, value in data.items():
        if isinstance(value, dict):
            mask(value)
        elif key in SECRET_KEYS and value:
            data[key] = MASK
        elif isinstance(value, str):
            data[key] = redact_credentials(value)
