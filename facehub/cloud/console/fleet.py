"""The fleet: every device's availability and stats from the cloud broker, and its faces from the store.

A device may publish, retained, on the cloud broker:

- ``<status_prefix>/<device>/availability``: ``online`` or ``offline`` (a last will, or a
  clean goodbye);
- ``<status_prefix>/<device>/stats``: a JSON object; the console shows ``spool_depth`` and
  ``fps`` (or ``detector_fps``), and keeps the rest (``frames``, ``faces``...) for the API.

Where a device publishes neither, it counts as online while its last face is younger than
``console.offline_after`` and as offline after that; a device known only from the broker
appears too. The broker client is made by :mod:`facehub.mqtt` like every other one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from facehub import mqtt
from facehub.config import Config

log = logging.getLogger(__name__)

MAX_STATS_BYTES = 16_384


@dataclass
class DeviceStatus:
    availability: str | None = None  # "online" / "offline" as published
    availability_at: float | None = None  # wall time it was received
    stats: dict[str, Any] = field(default_factory=dict)
    stats_at: float | None = None


class FleetWatch:
    """A persistent subscriber to the devices' availability and stats (thread-safe).

    The cloud broker refuses retained messages, so the state of a device is what it last said;
    the persistent session (fixed client id ``console.client_id``) keeps what was said while
    the console restarted.
    """

    def __init__(self, config: Config, client_id: str, on_change: Callable[[str], None] | None = None):
        self.prefix = config.console.status_prefix.rstrip("/")
        self.broker = config.cloud
        self.client_id = client_id
        self.on_change = on_change
        self.devices: dict[str, DeviceStatus] = {}
        self._lock = threading.Lock()
        self.client = None
        self.state = mqtt.ConnectionState(f"console cloud broker {config.cloud.host}:{config.cloud.port}")
        self.subscribed = threading.Event()

    def start(self) -> None:
        client = mqtt.make_client(self.broker, self.client_id)
        topics = [(f"{self.prefix}/+/availability", 1), (f"{self.prefix}/+/stats", 0)]

        def on_connect(client, userdata, flags, reason_code, properties):
            if not reason_code.is_failure:
                client.subscribe(topics)

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            if all(not code.is_failure for code in reason_codes):
                self.subscribed.set()
            else:
                log.warning("console: the cloud broker refused %s: %s", [t for t, _ in topics],
                            ", ".join(str(code) for code in reason_codes))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = self._on_message
        self.state.attach(client)
        self.client = client
        # not persistent: the retained messages are the state, re-sent at every subscription
        mqtt.start(client, self.broker, persistent=True)

    def stop(self) -> None:
        if self.client is not None:
            mqtt.stop(self.client)

    def _on_message(self, client, userdata, message) -> None:
        try:
            self.handle(message.topic, message.payload)
        except Exception:  # never let foreign input kill paho's network thread
            log.exception("console: cannot handle a message on %r", getattr(message, "topic", "?")[:128])

    def handle(self, topic: str, payload: bytes, now: float | None = None) -> None:
        """Take one availability or stats message (also callable from tests)."""
        now = time.time() if now is None else now
        parts = topic.split("/")
        if len(parts) != len(self.prefix.split("/")) + 2:
            return
        device, kind = parts[-2], parts[-1]
        if not device or len(device) > 128:
            return
        with self._lock:
            status = self.devices.setdefault(device, DeviceStatus())
            if kind == "availability":
                text = payload[:32].decode("utf-8", "replace").strip().lower()
                if not payload:  # a cleared retained message: no longer known
                    status.availability, status.availability_at = None, None
                else:
                    status.availability = text if text in ("online", "offline") else "unknown"
                    status.availability_at = now
            elif kind == "stats":
                if not payload:
                    status.stats, status.stats_at = {}, None
                elif len(payload) <= MAX_STATS_BYTES:
                    try:
                        data = json.loads(payload)
                    except ValueError:
                        data = None
                    if isinstance(data, dict):
                        status.stats, status.stats_at = data, now
            else:
                return
        if self.on_change:
            self.on_change(device)

    def snapshot(self) -> dict[str, DeviceStatus]:
        with self._lock:
            return {name: DeviceStatus(s.availability, s.availability_at, dict(s.stats), s.stats_at)
                    for name, s in self.devices.items()}


def number(stats: dict[str, Any], *names: str) -> float | None:
    """The first of ``names`` in ``stats`` that is a number (also inside a "gauges" object)."""
    for source in (stats, stats.get("gauges") if isinstance(stats.get("gauges"), dict) else {}):
        for name in names:
            value = source.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
    return None


def fleet_rows(devices: list[str], summaries: dict[str, dict[str, Any]], statuses: dict[str, DeviceStatus],
               offline_after: float, now: float) -> list[dict[str, Any]]:
    """One row per device (from the store or the broker): state, last face, faces today, stats, sparkline."""
    rows = []
    for device in sorted(set(devices) | set(statuses)):
        summary = summaries.get(device, {"faces_today": 0, "per_hour": [0] * 24, "last_face": None})
        status = statuses.get(device, DeviceStatus())
        last = summary.get("last_face")
        last_ms = last.captured_ms if last is not None else None
        quiet_for = now - last_ms / 1000 if last_ms is not None else None
        if status.availability in ("online", "offline"):
            state, source = status.availability, "availability"
        else:
            state = "online" if quiet_for is not None and quiet_for < offline_after else "offline"
            source = "last face"
        rows.append({
            "device": device, "state": state, "state_source": source, "last_face": last,
            "last_face_ms": last_ms, "quiet_for": quiet_for, "faces_today": summary["faces_today"],
            "per_hour": summary["per_hour"],
            "spool_depth": number(status.stats, "spool_depth"),
            "fps": number(status.stats, "fps", "detector_fps"),
            "stats": status.stats, "stats_at": status.stats_at,
        })
    # offline devices first: a device that went quiet is the first thing seen
    rows.sort(key=lambda row: (row["state"] != "offline", row["device"]))
    return rows


def sparkline(values: list[int], width: int = 120, height: int = 24) -> str:
    """Faces per hour as an inline SVG polyline (no script, no style: fine under the console's CSP)."""
    if not values:
        return ""
    top = max(values) or 1
    step = width / max(1, len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values))
    total = sum(values)
    return (f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{total} faces in the last 24 hours, at most {max(values)} in an hour">'
            f'<title>{total} faces in 24 h (max {max(values)}/h)</title>'
            f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{points}"/></svg>')


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"
