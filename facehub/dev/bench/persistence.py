"""Broker persistence: what a broker crash loses while its consumer is away, and what saving costs.

mosquitto keeps queued messages in memory and writes its whole database to
disk at each autosave (a new file, fsynced, renamed over the old one). A
broker killed between two saves loses every face queued since the last one,
and each save rewrites every face still queued, so the cost of a save grows
with the queue.

For each autosave setting (``SETTINGS``), one run on a throwaway broker (the
benchmark's loopback mosquitto) with a consumer holding a persistent QoS 1
session, as the forwarder or a saver does; a publisher sends ``rate`` faces/s
of ``size`` bytes at QoS 1 and notes each face's time from publish to PUBACK:

1. *Steady.* The consumer is there and acknowledges, so nothing queues: what
   the setting costs in normal operation, for ``steady`` s.
2. *Outage.* The consumer goes away for ``seconds`` s while the faces queue.
   The broker's disk writes are ``write_bytes`` of ``/proc/<pid>/io`` (what
   reached the block layer), over the outage and over its last 5 s, where the
   queue is deepest.
3. *Crash.* Right after the last PUBACK the broker is killed with SIGKILL and
   started again on the same folder; the consumer returns and collects what
   the broker kept. Lost = faces the broker acknowledged that never arrive.

    facehub bench persistence [--outage 20] [--face-rate 60] [--setting LABEL ...]
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from facehub import messages, mqtt
from facehub.config import BrokerConfig
from facehub.dev.servers import EDGE_QUEUE_CAP, PERSISTENCE, Mosquitto
from facehub.runtime import percentiles

CONSUMER_ID = "bench-persistence-consumer"
LAST_SECONDS = 5       # the disk rate at the end of the outage, where the queue is deepest
SAVES_LOG = "saves.log"
QUIET = 3.0            # after the restart, the consumer has everything once nothing new came this long

# label -> the autosave lines of mosquitto.conf (persistence itself is always on)
SETTINGS = {
    "every 30 s (before)": "autosave_interval 30\n",
    "every 1 s": "autosave_interval 1\n",
    "every change": "autosave_on_changes true\nautosave_interval 1\n",
    "every 10 changes": "autosave_on_changes true\nautosave_interval 10\n",
    "every 60 changes": PERSISTENCE,
    "every 60 changes, queue capped (deployed edge)": PERSISTENCE + EDGE_QUEUE_CAP,
}


@dataclass
class Run:
    setting: str
    seconds: float
    acked: int = 0
    lost: int = 0
    saves: int = 0
    outage_bytes: int = 0
    last_rate: float = 0.0          # bytes/s over the last LAST_SECONDS of the outage
    db_bytes: int = 0               # the database file at the crash
    drain: float = 0.0              # restart to the last face the consumer got back
    outage_ms: dict = field(default_factory=dict)
    steady_seconds: float = 0.0
    steady_bytes: int = 0
    steady_ms: dict = field(default_factory=dict)


def write_bytes(pid: int) -> int:
    """Bytes the process has caused to be written to storage (``/proc/<pid>/io``)."""
    with open(f"/proc/{pid}/io") as io:
        for line in io:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError(f"no write_bytes in /proc/{pid}/io")


def saves(broker: Mosquitto) -> int:
    """Autosaves the broker logged so far (in its own log file: its stdout is buffered, lost at a kill)."""
    try:
        return (broker.workdir / SAVES_LOG).read_text(errors="replace").count("Saving in-memory database")
    except FileNotFoundError:
        return 0


class Publisher:
    """A QoS 1 publisher that notes which faces the broker acknowledged, and how fast."""

    def __init__(self, port: int, payload: bytes, device: str = "bench"):
        self.payload = payload
        self.device = device
        self.broker = BrokerConfig(port=port)
        self.client = mqtt.make_client(self.broker, f"bench-persistence-publisher-{port}")
        self.state = mqtt.ConnectionState("bench publisher")
        self.state.attach(self.client)
        # paho calls on_publish holding a lock publish() needs: only queue the event here.
        self._done: queue.SimpleQueue[tuple[int, float, bool]] = queue.SimpleQueue()
        self.client.on_publish = lambda client, userdata, mid, reason_code, properties: self._done.put(
            (mid, time.perf_counter(), not reason_code.is_failure))
        self.sent: dict[int, tuple[str, float]] = {}   # mid -> (face id, publish time)
        self.acked: list[str] = []      # faces the broker accepted (PUBACK with a success code)
        self.refused = 0
        self.latency_ms: list[float] = []
        mqtt.start(self.client, self.broker, persistent=False)
        if not self.state.connected.wait(10):
            raise RuntimeError(f"publisher could not connect to 127.0.0.1:{port}")

    def run(self, rate: float, seconds: float, tick=None) -> None:
        """``rate`` faces/s for ``seconds``, each on its own schedule; ``tick()`` once a second."""
        started = time.perf_counter()
        next_tick = started + 1.0
        for n in range(int(rate * seconds)):
            while (now := time.perf_counter()) < started + n / rate:
                time.sleep(min(0.005, started + n / rate - now))
            if tick and now >= next_tick:
                tick()
                next_tick += 1.0
            face = messages.Face(self.payload, self.device)
            info = self.client.publish(f"faces/{self.device}", self.payload, 1, properties=face.properties())
            self.sent[info.mid] = (face.face_id, time.perf_counter())
            self._settle()

    def wait_acked(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self._settle() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _settle(self) -> int:
        """Apply the PUBACKs received so far; the number of faces still unacknowledged."""
        while True:
            try:
                mid, at, accepted = self._done.get_nowait()
            except queue.Empty:
                return len(self.sent)
            face_id, sent_at = self.sent.pop(mid)
            if accepted:
                self.acked.append(face_id)
            else:
                self.refused += 1
            self.latency_ms.append((at - sent_at) * 1000)

    def take_latency(self) -> dict:
        values, self.latency_ms = self.latency_ms, []
        return percentiles(values)

    def close(self) -> None:
        mqtt.stop(self.client)


class Consumer:
    """A persistent QoS 1 session (the forwarder's or a saver's part) that records every face id."""

    def __init__(self, port: int):
        self.broker = BrokerConfig(port=port)
        self.ids: set[str] = set()
        self.last_message = time.monotonic()
        self.subscribed = threading.Event()
        self.client = mqtt.make_client(self.broker, CONSUMER_ID)
        self.client.on_connect = lambda client, *_: client.subscribe("faces/#", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        mqtt.start(self.client, self.broker, persistent=True)
        if not self.subscribed.wait(10):
            raise RuntimeError(f"consumer could not subscribe on 127.0.0.1:{port}")

    def _on_message(self, client, userdata, message) -> None:
        self.ids.add(dict(message.properties.UserProperty)["face-id"])
        self.last_message = time.monotonic()

    def collect(self, expected: set[str], timeout: float = 60.0) -> set[str]:
        """Wait until every expected id arrived, or nothing new came for QUIET s; the ids received."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if expected <= self.ids or time.monotonic() - self.last_message > QUIET:
                break
            time.sleep(0.05)
        return set(self.ids)

    def leave(self) -> None:
        mqtt.stop(self.client)


def measure(setting: str, persistence: str, workdir: Path, seconds: float = 30.0, rate: float = 60.0,
            size: int = 10_000, steady: float = 10.0, payload: bytes | None = None) -> Run:
    """One setting: outage, crash, restart, then steady operation (see the module's docstring)."""
    from facehub.dev.bench.pipeline import sample_face

    payload = payload or sample_face(size)
    run = Run(setting, seconds)
    broker = Mosquitto(workdir, autosave=persistence,
                       extra=f"log_dest file {workdir}/{SAVES_LOG}\nlog_type information").start()
    publisher = consumer = None
    try:
        consumer = Consumer(broker.port)
        publisher = Publisher(broker.port, payload)
        if steady > 0:             # the consumer is there and acknowledges: nothing queues
            before = write_bytes(broker.proc.pid)
            started = time.perf_counter()
            publisher.run(rate, steady)
            publisher.wait_acked()
            run.steady_seconds = time.perf_counter() - started
            run.steady_bytes = write_bytes(broker.proc.pid) - before
            run.steady_ms = publisher.take_latency()
            consumer.collect(set(publisher.acked), timeout=30)
        consumer.leave()           # the session stays, its consumer is away
        consumer = None
        publisher.acked.clear()

        pid = broker.proc.pid
        samples = [write_bytes(pid)]
        saves_before = saves(broker)
        publisher.run(rate, seconds, tick=lambda: samples.append(write_bytes(pid)))
        publisher.wait_acked()
        samples.append(write_bytes(pid))
        run.outage_bytes = samples[-1] - samples[0]
        last = samples[-1 - min(LAST_SECONDS, len(samples) - 1):]
        run.last_rate = (last[-1] - last[0]) / max(1, len(last) - 1)
        run.outage_ms = publisher.take_latency()
        acked = set(publisher.acked)
        run.acked = len(acked)
        broker.kill()              # right after the last PUBACK
        run.saves = saves(broker) - saves_before
        database = workdir / "mosquitto.db"
        run.db_bytes = database.stat().st_size if database.exists() else 0
        publisher.close()
        publisher = None

        restarted = time.monotonic()
        broker.start()
        consumer = Consumer(broker.port)
        received = consumer.collect(acked)
        run.lost = len(acked - received)
        run.drain = max(0.0, consumer.last_message - restarted)
    finally:
        if publisher:
            publisher.close()
        if consumer:
            consumer.leave()
        broker.stop()
    return run


def _ms(values: dict) -> str:
    if not values.get("count"):
        return "n/a"
    return f"{values['p50']:.1f}/{values['p99']:.1f} ({values['max']:.0f})"


def table(runs: list[Run], rate: float) -> str:
    lines = ["| autosave | outage s | faces acked | lost at kill -9 | saves | disk MB/s outage (last 5 s) "
             "| database at crash MB | PUBACK ms p50/p99 (max), outage | restart + drain s | disk KB/s steady "
             "| PUBACK ms p50/p99 (max), steady |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lost_s = f" = {r.lost / rate:.1f} s" if r.lost else ""
        steady = f"{r.steady_bytes / r.steady_seconds / 1e3:.0f}" if r.steady_seconds else "n/a"
        lines.append(f"| {r.setting} | {r.seconds:g} | {r.acked} | {r.lost}{lost_s} | {r.saves} "
                     f"| {r.outage_bytes / r.seconds / 1e6:.1f} ({r.last_rate / 1e6:.1f}) "
                     f"| {r.db_bytes / 1e6:.1f} | {_ms(r.outage_ms)} | {r.drain:.1f} | {steady} "
                     f"| {_ms(r.steady_ms)} |")
    return "\n".join(lines)


def main(seconds: float = 30.0, rate: float = 60.0, size: int = 10_000, steady: float = 10.0,
         settings: list[str] | None = None) -> int:
    """Measure each setting (all of ``SETTINGS`` unless named) and print the table."""
    from facehub.dev.bench.pipeline import sample_face

    logging.getLogger("facehub.mqtt").setLevel(logging.ERROR)  # the publisher's disconnect at each kill
    chosen = {name: SETTINGS[name] for name in (settings or SETTINGS)}
    payload = sample_face(size)
    runs = []
    with tempfile.TemporaryDirectory(prefix="facehub-persist-") as work:
        for index, (name, persistence) in enumerate(chosen.items()):
            runs.append(measure(name, persistence, Path(work) / str(index), seconds, rate, size, steady,
                                payload))
            print(f"  {name}: acked={runs[-1].acked} lost={runs[-1].lost} saves={runs[-1].saves}", flush=True)
    print(f"\n## Broker crash while the consumer is away ({rate:g} faces/s of {len(payload) / 1000:.1f} KB "
          f"at QoS 1, {seconds:g} s outage, then kill -9; {os.cpu_count()} cores)\n")
    print(table(runs, rate))
    return 0
