"""``make demo``: the whole pipeline on one machine, on the built-in sample clip.

Two real mosquitto brokers (edge and cloud, each on its own free port), the
edge role (detector + forwarder + logger) reading the sample clip once, and the
cloud role (saver) writing into ``./demo-out``. When every published face is
stored, or after a deadline, it prints what each stage counted and stops
everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from facehub.dev.servers import BrokerError, Mosquitto, free_port
from facehub.runtime import read_stats

DEADLINE_SECONDS = 180


def counter(stats: dict, component: str, key: str) -> int:
    """Sum a counter over a component's instances (saver-1, saver-2...)."""
    return sum(data.get("counters", {}).get(key, 0) for name, data in stats.items()
               if name == component or name.startswith(component + "-"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facehub demo", description=__doc__)
    parser.add_argument("--out", default="demo-out", help="folder the saver writes into")
    parser.add_argument("--source", help="video to use instead of the built-in sample clip")
    args = parser.parse_args(argv)
    from facehub.edge.detector import SAMPLE_CLIP

    out = Path(args.out).resolve()
    work = Path(tempfile.mkdtemp(prefix="facehub-demo-"))
    edge_port, cloud_port = free_port(), free_port()
    print(f"demo: edge broker 127.0.0.1:{edge_port}, cloud broker 127.0.0.1:{cloud_port}, "
          f"work folder {work}", flush=True)
    try:
        brokers = [Mosquitto(work / "edge-broker", port=edge_port).start(),
                   Mosquitto(work / "cloud-broker", port=cloud_port).start()]
    except (BrokerError, TimeoutError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    env = {
        **os.environ,
        "FACEHUB_DEVICE_ID": "demo-cam",
        "FACEHUB_LOCAL_PORT": str(edge_port),
        "FACEHUB_CLOUD_PORT": str(cloud_port),
        "FACEHUB_DETECTOR_SOURCE": str(args.source or SAMPLE_CLIP),
        "FACEHUB_DETECTOR_LOOP": "false",
        "FACEHUB_FORWARDER_SPOOL_PATH": str(work / "spool.db"),
        "FACEHUB_SAVER_URL": str(out),
    }
    roles = {
        "cloud": subprocess.Popen([sys.executable, "-m", "facehub.cli", "run", "cloud"],
                                  env={**env, "FACEHUB_SUPERVISOR_STATE_DIR": str(work / "cloud")}),
        "edge": subprocess.Popen([sys.executable, "-m", "facehub.cli", "run", "edge"],
                                 env={**env, "FACEHUB_SUPERVISOR_STATE_DIR": str(work / "edge")}),
    }
    try:
        wait_until_stored(work, roles)
    finally:
        for proc in roles.values():
            proc.send_signal(signal.SIGTERM)
        for proc in roles.values():
            proc.wait(30)
        for broker in brokers:
            broker.stop()
    stats = {**read_stats(work / "edge"), **read_stats(work / "cloud")}
    return summarise(stats, out)


def wait_until_stored(work: Path, roles: dict[str, subprocess.Popen]) -> bool:
    """Poll the components' counters until the clip is done and every published face is stored."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        for name, proc in roles.items():
            if proc.poll() is not None:
                print(f"demo: the {name} supervisor exited early with code {proc.returncode}")
                return False
        if pipeline_done(work / "edge", work / "cloud"):
            return True
        time.sleep(0.5)
    print(f"demo: gave up waiting after {DEADLINE_SECONDS}s")
    return False


def pipeline_done(edge_dir: Path, cloud_dir: Path) -> bool:
    """The detector has finished its (non-looped) source and every face it published is stored."""
    try:
        status = json.loads((edge_dir / "supervisor-edge.json").read_text())
    except (OSError, ValueError):
        return False
    if status["children"].get("detector", {}).get("state") != "EXITED":
        return False
    published = counter(read_stats(edge_dir), "detector", "faces_published")
    cloud = read_stats(cloud_dir)
    return counter(cloud, "saver", "stored") + counter(cloud, "saver", "duplicates") >= published


def summarise(stats: dict, out: Path) -> int:
    detected = counter(stats, "detector", "faces_detected")
    published = counter(stats, "detector", "faces_published")
    suppressed = counter(stats, "detector", "faces_suppressed")
    forwarded = counter(stats, "forwarder", "forwarded")
    logged = counter(stats, "logger", "logged")
    stored = counter(stats, "saver", "stored")
    files = sorted(p for p in out.rglob("*.jpg")) if out.exists() else []
    print()
    print(f"frames read          {counter(stats, 'detector', 'frames')}")
    print(f"faces detected       {detected}")
    print(f"  suppressed repeats {suppressed}")
    print(f"faces published      {published}")
    print(f"faces forwarded      {forwarded}")
    print(f"faces logged         {logged}")
    print(f"faces stored         {stored}")
    print(f"stored under         {out} ({len(files)} .jpg files in total)")
    for path in files[:3]:
        print(f"  e.g. {path.relative_to(out.parent)}")
    ok = published > 0 and stored >= published
    print("demo: OK, every published face is stored" if ok else "demo: FAILED, see the log above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
