"""``facehub bench fleet``: many devices against one cloud VM, and what each stage can take.

Each row starts a fresh cloud: the dev mosquitto (deployed persistence
settings, :mod:`facehub.dev.servers`), ``facehub run cloud`` as a real process
with ``FACEHUB_SAVER_INSTANCES=K`` and a store (moto's S3, a folder, or
``null://``, which acknowledges and discards: the ceiling of everything before
the store). N simulated devices connect as N real MQTT v5 clients, each with
its own client id (auth is off on the loopback broker, as on every throwaway
broker here), and publish real wire-format faces (10 KB JPEG, user
properties, unique face ids, ``captured-ms`` = publish time) on
``faces/<device>`` at QoS 1.

The devices run in generator processes (this module run as ``python -m
facehub.dev.bench.fleet``, one per :data:`DEVICES_PER_GENERATOR` devices),
each a paho network thread per client and one pacing thread. A generator
reports the faces it published, those PUBACKed, and its own CPU seconds; a
paced row whose generators fell short of the offered rate is marked, so the
generator is never silently the bottleneck.

Two kinds of load: ``flat out`` (each device keeps up to :data:`WINDOW` faces
unacknowledged by the broker, and the generators keep at most :data:`BACKLOG`
faces published but not yet stored: the sustained rate is the cloud's ceiling,
the latency is mostly the queue at the broker) and ``paced`` (R faces/s per
device). Each row ramps for ``ramp`` seconds, then measures a steady window of
``seconds``: stored faces/s and saver CPU from counter and /proc deltas over
the window, latency (capture to stored, as the savers observe it) from the
savers' last samples, RSS at the end. Then the generators stop and the row
waits until every PUBACKed face is counted stored (or a duplicate): ``lost``
is PUBACKed minus that.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

DEVICES_PER_GENERATOR = 250
WINDOW = 10  # faces a device keeps unacknowledged by the broker when it publishes flat out
SAVER_WORKERS = 4  # the saver's default saver.workers: the store sees K * 4 writes at once
DRAIN_SECONDS = 20.0  # a row gives up when no face was stored for this long after its devices stopped
# Flat out: faces published but not yet stored, across all devices (the generators read the savers' stats,
# flushed every second, so the backlog briefly overshoots by about one second of faces)
BACKLOG = 2000


# -- the generator (a child process) ------------------------------------------------------------

def generate(port: int, first: int, count: int, rate: float, ramp: float, seconds: float, out: Path,
             payload_path: Path, tag: str, state_dir: Path | None = None, share: float = 1.0) -> None:
    """Publish from ``count`` devices until ``ramp + seconds`` are over; write a JSON summary to ``out``.

    Flat out (``rate`` 0), the generator also reads the savers' stats in ``state_dir`` and holds its
    ``share`` of :data:`BACKLOG` at most published but not yet stored, so the cloud's queue stays
    bounded: the stored rate is the ceiling and the end of a row drains in seconds.
    """
    from facehub import messages, mqtt
    from facehub.config import BrokerConfig
    from facehub.runtime import read_stats

    payload = payload_path.read_bytes()
    broker = BrokerConfig(port=port)
    devices = [f"{tag}-{index:04d}" for index in range(first, first + count)]
    outstanding = [0] * count
    acked = [0] * count
    connected = threading.Semaphore(0)
    lock = threading.Lock()
    clients = []
    for index, device in enumerate(devices):
        client = mqtt.make_client(broker, device)  # its own client id per device

        def on_publish(client, userdata, mid, reason_code, properties, index=index):
            with lock:
                outstanding[index] -= 1
                if not reason_code.is_failure:
                    acked[index] += 1

        client.on_publish = on_publish
        client.on_connect = lambda *args: connected.release()
        mqtt.start(client, broker, persistent=False)
        clients.append(client)
    for _ in clients:
        if not connected.acquire(timeout=60):
            raise SystemExit("devices did not connect within 60 s")
    started = time.monotonic()
    end = started + ramp + seconds
    published = 0
    sequence = 0
    total_rate = rate * count
    cpu_start = _own_cpu()
    stored_seen, next_read = 0, 0.0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        elapsed = now - started
        if rate <= 0 and state_dir is not None:
            if now >= next_read:
                stored_seen = sum(data.get("counters", {}).get("stored", 0) for name, data in
                                  read_stats(state_dir).items() if name.startswith("saver")) * share
                next_read = now + 0.1
            if published - stored_seen >= BACKLOG * share:
                time.sleep(0.005)
                continue
        if rate > 0:
            # linear ramp to the full rate, then steady: faces due so far across all devices
            due_time = elapsed * elapsed / (2 * ramp) if ramp and elapsed < ramp else elapsed - ramp / 2
            due = int(total_rate * due_time)
        else:
            due = None
        sent_now = 0
        for _ in range(count):
            if due is not None and published >= due:
                break
            index = sequence % count
            sequence += 1
            with lock:
                if outstanding[index] >= WINDOW:
                    continue
                outstanding[index] += 1
            face = messages.Face(payload, devices[index], face_id=uuid.uuid4().hex,
                                 captured_ms=int(time.time() * 1000))
            clients[index].publish(f"faces/{devices[index]}", payload, 1, properties=face.properties())
            published += 1
            sent_now += 1
        if not sent_now:
            time.sleep(0.001)
    cpu = _own_cpu() - cpu_start
    offered = total_rate * (seconds + ramp / 2) if rate > 0 else 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with lock:
            if not any(outstanding):
                break
        time.sleep(0.05)
    for client in clients:
        mqtt.stop(client)
    out.write_text(json.dumps({"devices": count, "published": published, "acked": sum(acked),
                               "offered": offered, "cpu_s": cpu, "wall_s": ramp + seconds}))


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- /proc ------------------------------------------------------------------------------------------

def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, []))
    return pids


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """utime + stime of each live process (seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    result = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            result[pid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return result


def rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return total


# -- one row ------------------------------------------------------------------------------------------

@dataclass
class Row:
    store: str
    devices: int
    savers: int
    rate: float  # per device, 0 = flat out
    seconds: float
    offered: float = 0.0
    published: int = 0
    acked: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    faces_per_s: float = 0.0
    p50: float | None = None
    p99: float | None = None
    cpu_per_1000: float = 0.0
    saver_rss: int = 0
    broker_rss: int = 0
    generator_cpu: float = 0.0  # share of one core
    generator_short: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return max(0, self.acked - self.stored - self.duplicates)

    @property
    def load(self) -> str:
        return "flat out" if not self.rate else f"{self.rate:g}/s each"


def _saver_stats(state_dir: Path) -> dict[str, dict]:
    from facehub.runtime import read_stats

    return {name: data for name, data in read_stats(state_dir).items() if name.startswith("saver")}


def _total(stats: dict[str, dict], key: str) -> int:
    return sum(data.get("counters", {}).get(key, 0) for data in stats.values())


def run_row(store: str, devices: int, savers: int, rate: float, seconds: float, ramp: float, work: Path,
            endpoint: str = "", on_window=None) -> Row:
    """One measurement: a fresh broker and cloud, ``devices`` publishing; see the module's docstring."""
    from facehub.dev.bench.pipeline import S3_ENV, sample_face
    from facehub.dev.servers import Mosquitto, make_bucket, wait_for

    row = Row(store, devices, savers, rate, seconds)
    work.mkdir(parents=True, exist_ok=True)
    payload = work / "face.jpg"
    payload.write_bytes(sample_face(10_000))
    state = work / "state"
    state.mkdir(exist_ok=True)
    if store == "null":
        url = "null://bench"
    elif store == "folder":
        url = str(work / "faces")
    else:
        bucket = f"fleet-{uuid.uuid4().hex[:8]}"
        make_bucket(endpoint, bucket)
        url = f"s3://{bucket}/faces"
    with ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(work / "broker"))
        env = {**os.environ, **S3_ENV, "FACEHUB_CLOUD_PORT": str(broker.port),
               "FACEHUB_SUPERVISOR_STATE_DIR": str(state), "FACEHUB_SAVER_INSTANCES": str(savers),
               "FACEHUB_SAVER_URL": url, "FACEHUB_CONSOLE_ENABLED": "false",
               "FACEHUB_SAVER_ENDPOINT_URL": endpoint if store == "s3" else ""}
        log = stack.enter_context(open(work / "cloud.log", "wb"))
        cloud = subprocess.Popen([sys.executable, "-m", "facehub.cli", "run", "cloud"], env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        stack.callback(_stop, cloud)
        wait_for(lambda: sum(bool(d.get("gauges", {}).get("subscribed")) for d in _saver_stats(state).values())
                 == savers, 90, 0.1, f"{savers} savers subscribed")
        generators = []
        for first in range(0, devices, DEVICES_PER_GENERATOR):
            count = min(DEVICES_PER_GENERATOR, devices - first)
            out = work / f"generator-{first}.json"
            generators.append((subprocess.Popen(
                [sys.executable, "-m", "facehub.dev.bench.fleet", "--generate", str(broker.port), str(first),
                 str(count), str(rate), str(ramp), str(seconds), str(out), str(payload), "dev", str(state),
                 str(count / devices)],
                stdout=log, stderr=subprocess.STDOUT), out))
        time.sleep(ramp + 1.0)  # connections, the ramp, one stats flush
        pids = tree_pids(cloud.pid)
        before, cpu_before, clock = _saver_stats(state), cpu_seconds(pids), time.monotonic()
        if on_window:
            on_window(cloud.pid, seconds)
        else:
            time.sleep(seconds - 1.0)
        pids = tree_pids(cloud.pid)
        after, cpu_after, elapsed = _saver_stats(state), cpu_seconds(pids), time.monotonic() - clock
        row.saver_rss = rss(pids)
        row.broker_rss = rss([broker.proc.pid])
        stored = _total(after, "stored") - _total(before, "stored")
        row.faces_per_s = stored / elapsed
        spent = sum(cpu_after.get(pid, 0) - cpu_before.get(pid, 0) for pid in cpu_after)
        row.cpu_per_1000 = spent / stored * 1000 if stored else 0.0
        decoders = [pid for pid in cpu_after if b"facehub.cloud.decoder" in _cmdline(pid)]
        decoding = sum(cpu_after[pid] - cpu_before.get(pid, 0) for pid in decoders)
        row.extra["decoder_share"] = decoding / spent if spent else 0.0
        latencies = [d.get("percentiles", {}).get("latency_ms", {}) for d in after.values()]
        latencies = [p for p in latencies if p.get("count")]
        if latencies:
            row.p50 = max(p["p50"] for p in latencies)
            row.p99 = max(p["p99"] for p in latencies)
        for proc, out in generators:
            proc.wait(120)
            result = json.loads(out.read_text())
            row.published += result["published"]
            row.acked += result["acked"]
            row.generator_cpu += result["cpu_s"] / result["wall_s"]
        if rate:
            row.offered = rate * devices
            row.generator_short = row.published < 0.95 * rate * devices * (seconds + ramp / 2)
        last, deadline = -1, time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline:
            done = _saver_stats(state)
            settled = _total(done, "stored") + _total(done, "duplicates")
            if settled >= row.acked:
                break
            if settled > last:
                last, deadline = settled, time.monotonic() + DRAIN_SECONDS
            time.sleep(0.2)
        time.sleep(1.2)  # the last flush
        done = _saver_stats(state)
        row.stored, row.duplicates = _total(done, "stored"), _total(done, "duplicates")
        row.rejected = _total(done, "rejected")
    return row


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _stop(proc: subprocess.Popen) -> None:
    from facehub.dev.bench.pipeline import stop_process

    stop_process(proc, 30)


# -- the store alone ---------------------------------------------------------------------------------

def store_ceiling(kind: str, concurrency: int, seconds: float, work: Path, endpoint: str = "") -> float:
    """Faces/s written straight to the store by ``concurrency`` threads: boto3 put_object, or FolderStore."""
    from facehub.cloud.storage import FolderStore
    from facehub.dev.bench.pipeline import sample_face
    from facehub.dev.servers import make_bucket
    from facehub.messages import Face

    payload = sample_face(10_000)
    if kind == "s3":
        import boto3

        bucket = f"plain-{uuid.uuid4().hex[:8]}"
        make_bucket(endpoint, bucket)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="bench", aws_secret_access_key="bench")

        def write(face: Face) -> None:
            client.put_object(Bucket=bucket, Key=f"faces/{face.device_id}/{face.face_id}.jpg", Body=face.image,
                              ContentType=face.content_type, Metadata=face.metadata())
    else:
        store = FolderStore(work / f"plain-{uuid.uuid4().hex[:8]}", "quarantine")

        def write(face: Face) -> None:
            store.put_face(face)
    end = time.monotonic() + seconds
    counts = [0] * concurrency

    def loop(index: int) -> None:
        while time.monotonic() < end:
            write(Face(payload, f"plain-{index}"))
            counts[index] += 1

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(loop, range(concurrency)))
    return sum(counts) / (time.monotonic() - started)


# -- soak -------------------------------------------------------------------------------------------------

def soak(store: str, devices: int, savers: int, rate: float, seconds: float, work: Path,
         endpoint: str = "") -> dict:
    """RSS every 5 s over ``seconds`` at ``rate`` per device: of the whole cloud tree and of each saver
    process (without its decoders); slopes by least squares (MiB/min)."""
    samples: list[tuple[float, int]] = []
    per_saver: dict[int, list[tuple[float, int]]] = {}

    def sample(pid: int, window: float) -> None:
        start = time.monotonic()
        while time.monotonic() - start < window:
            now, pids = time.monotonic() - start, tree_pids(pid)
            samples.append((now, rss(pids)))
            for saver in _saver_pids(pids):
                per_saver.setdefault(saver, []).append((now, rss([saver])))
            time.sleep(5.0)

    row = run_row(store, devices, savers, rate, seconds, 2.0, work, endpoint, on_window=sample)
    saver_slopes = [slope(series) for series in per_saver.values() if len(series) >= 2]
    return {"row": row, "first": samples[0][1] / 2**20, "last": samples[-1][1] / 2**20, "samples": len(samples),
            "slope": slope(samples), "saver_first": [s[0][1] / 2**20 for s in per_saver.values()],
            "saver_last": [s[-1][1] / 2**20 for s in per_saver.values()], "saver_slopes": saver_slopes}


def slope(series: list[tuple[float, int]]) -> float:
    """MiB per minute, the least-squares line through (seconds, bytes) samples."""
    xs, ys = [t / 60 for t, _ in series], [b / 2**20 for _, b in series]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    denominator = sum((x - mean_x) ** 2 for x in xs) or 1.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / denominator


def _saver_pids(pids: list[int]) -> list[int]:
    """The savers among a cloud tree's processes: the parents of decoder processes."""
    savers = set()
    for pid in pids:
        if b"facehub.cloud.decoder" in _cmdline(pid):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                savers.add(int(stat[stat.rindex(")") + 2:].split()[1]))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(savers)


# -- the whole section --------------------------------------------------------------------------------

def main(quick: bool = False, devices: list[int] | None = None, savers: list[int] | None = None,
         rate: float = 0.0, seconds: float | None = None, stores: list[str] | None = None,
         soak_seconds: float | None = None) -> dict:
    """Run the section, print its tables, and return the rows (for the test)."""
    from facehub.dev.bench.pipeline import moto_server

    seconds = seconds or (2.0 if quick else 10.0)
    ramp = 0.5 if quick else 2.0
    stores = stores or (["null", "folder"] if quick else ["null", "folder", "s3"])
    ks = savers or ([1] if quick else [1, 2, 4])
    ns = devices or ([3] if quick else [1, 10, 100, 500])
    middle = 100 if 100 in ns else ns[-1]
    soak_seconds = (0 if quick else 120) if soak_seconds is None else soak_seconds
    result: dict = {"ceiling": [], "devices": [], "paced": [], "plain": {}, "soak": None}
    with tempfile.TemporaryDirectory(prefix="facehub-fleet-") as work, ExitStack() as stack:
        work = Path(work)
        endpoint = stack.enter_context(moto_server(work)) if "s3" in stores else ""
        step = 0

        def next_dir() -> Path:
            nonlocal step
            step += 1
            return work / f"row-{step}"

        def report(row: Row) -> Row:
            print(f"  {row.store} N={row.devices} K={row.savers} {row.load}: {row.faces_per_s:.0f} faces/s, "
                  f"lost {row.lost}", file=sys.stderr, flush=True)
            return row

        # 1. each store's ceiling through the savers: flat out, K = 1, 2, 4
        for store in stores:
            for k in ks:
                result["ceiling"].append(report(run_row(store, middle, k, rate, seconds, ramp, next_dir(),
                                                        endpoint)))
        # 2. devices: N = 1, 10, 100, 500 at K = 2 (or the largest K) on the first store
        k_devices = 2 if 2 in ks else ks[-1]
        for n in ns:
            if n == middle:
                continue
            result["devices"].append(report(run_row(stores[0], n, k_devices, rate, seconds, ramp, next_dir(),
                                                    endpoint)))
        # 3. latency at half each store's measured maximum, N = middle
        for store in stores:
            best = max((r for r in result["ceiling"] if r.store == store and r.savers == k_devices),
                       key=lambda r: r.faces_per_s)
            per_device = max(0.1, round(best.faces_per_s / 2 / middle, 2))
            result["paced"].append(report(run_row(store, middle, k_devices, per_device, seconds, ramp,
                                                  next_dir(), endpoint)))
        # 4. the store alone, same concurrency as K savers x workers
        for store in stores:
            if store == "null":
                continue
            for k in ks:
                result["plain"][(store, k)] = store_ceiling(store, k * SAVER_WORKERS, min(seconds, 5.0),
                                                            next_dir(), endpoint)
        # 5. memory soak at half the maximum
        if soak_seconds:
            store = "folder" if "folder" in stores else stores[0]
            paced = next(r for r in result["paced"] if r.store == store)
            result["soak"] = soak(store, middle, k_devices, paced.rate, soak_seconds, next_dir(), endpoint)
    print_tables(result)
    return result


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def table(rows: list[Row]) -> str:
    lines = ["| store | devices N | savers K | load | offered faces/s | stored faces/s (steady) "
             "| capture->stored ms p50/p99 | saver CPU s per 1000 faces (decoders' share) | saver RSS | broker RSS "
             "| generator CPU (cores) | published | PUBACKed | stored + dup | lost |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        offered = f"{r.offered:.0f}" + (" (short)" if r.generator_short else "") if r.rate else "flat out"
        lines.append(f"| {r.store} | {r.devices} | {r.savers} | {r.load} | {offered} | {r.faces_per_s:.0f} "
                     f"| {_ms(r.p50)}/{_ms(r.p99)} | {r.cpu_per_1000:.2f} ({r.extra.get('decoder_share', 0):.0%}) "
                     f"| {r.saver_rss / 2**20:.0f} MiB "
                     f"| {r.broker_rss / 2**20:.0f} MiB | {r.generator_cpu:.2f} | {r.published} | {r.acked} "
                     f"| {r.stored + r.duplicates} | {r.lost} |")
    return "\n".join(lines)


def print_tables(result: dict) -> None:
    cores = os.cpu_count()
    print(f"\n## Fleet: each store's ceiling through the savers ({cores} cores, 10 KB faces, QoS 1, "
          f"{WINDOW} unacknowledged per device when flat out)\n")
    print(table(result["ceiling"]))
    if result["devices"]:
        print("\n## Fleet: number of devices\n")
        print(table(result["devices"]))
    print("\n## Fleet: latency at half the measured maximum\n")
    print(table(result["paced"]))
    if result["plain"]:
        print("\n## The store alone (same writes, same concurrency: K savers x "
              f"{SAVER_WORKERS} workers)\n")
        print("| store | writers | plain faces/s | through the savers, flat out | share |\n|---|---|---|---|---|")
        for (store, k), plain in result["plain"].items():
            through = next((r.faces_per_s for r in result["ceiling"] if r.store == store and r.savers == k), 0)
            label = "boto3 put_object into moto" if store == "s3" else "FolderStore.put_face (fsync)"
            print(f"| {label} | {k * SAVER_WORKERS} | {plain:.0f} | {through:.0f} | {through / plain:.0%} |")
    if result["soak"]:
        s = result["soak"]
        r = s["row"]
        print(f"\n## Saver memory soak ({r.store}, N={r.devices}, K={r.savers}, {r.rate:g} faces/s each, "
              f"{r.seconds:.0f} s)\n")
        print("| what | samples | RSS first | last | slope | stored faces/s | lost |\n|---|---|---|---|---|---|---|")
        print(f"| cloud tree (supervisor, savers, decoders) | {s['samples']} | {s['first']:.0f} MiB "
              f"| {s['last']:.0f} MiB | {s['slope']:+.2f} MiB/min | {r.faces_per_s:.0f} | {r.lost} |")
        for number, (first, last, each) in enumerate(zip(s["saver_first"], s["saver_last"], s["saver_slopes"])):
            print(f"| saver {number + 1} (without its decoders) | | {first:.0f} MiB | {last:.0f} MiB "
                  f"| {each:+.2f} MiB/min | | |")
    rows = result["ceiling"] + result["devices"] + result["paced"]
    print(f"\nfleet rows={len(rows)} lost={sum(r.lost for r in rows)} "
          f"rejected={sum(r.rejected for r in rows)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="bench fleet: a few seconds, tiny N (for tests)")
    parser.add_argument("--devices", type=int, action="append", help="bench fleet: N (repeatable)")
    parser.add_argument("--savers", type=int, action="append", help="bench fleet: K (repeatable)")
    parser.add_argument("--device-rate", type=float, default=0.0,
                        help="bench fleet: faces/s per device in the ceiling rows (0 = flat out)")
    parser.add_argument("--seconds", type=float, help="bench fleet: steady window per row (default 10)")
    parser.add_argument("--store", action="append", choices=("null", "folder", "s3"),
                        help="bench fleet: store (repeatable; default all three)")
    parser.add_argument("--soak", type=float, help="bench fleet: memory soak seconds (default 120; 0 = none)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--generate":
        a = sys.argv[2:]
        generate(int(a[0]), int(a[1]), int(a[2]), float(a[3]), float(a[4]), float(a[5]), Path(a[6]),
                 Path(a[7]), a[8], Path(a[9]), float(a[10]))
    else:
        parser = argparse.ArgumentParser(prog="python -m facehub.dev.bench.fleet")
        add_arguments(parser)
        args = parser.parse_args()
        main(args.quick, args.devices, args.savers, args.device_rate, args.seconds, args.store, args.soak)
