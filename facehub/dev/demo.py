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
import shutil
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``facehub demo``, for this module's parser and for the CLI's subparser."""
    parser.add_argument("--out", default="demo-out", help="folder the saver writes into (default: ./demo-out)")
    parser.add_argument("--source", help="video to use instead of the built-in sample clip")
    parser.add_argument("--frames", type=int, default=0,
                        help="use only the first N frames of the clip (0 = all)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (broker logs, spool, status files) instead of removing it")


def main(argv: list[str] | argparse.Namespace | None = None, config_path: str | None = None) -> int:
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        parser = argparse.ArgumentParser(prog="facehub demo", description=__doc__)
        add_arguments(parser)
        args = parser.parse_args(argv)
    from facehub.edge.detection.source import SAMPLE_CLIP

    out = Path(args.out).resolve()
    work = Path(tempfile.mkdtemp(prefix="facehub-demo-"))
    try:
        return run_demo(args, config_path, out, work, Path(args.source or SAMPLE_CLIP))
    finally:
        if args.keep:
            print(f"demo: kept the work folder {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def first_frames(source: Path, count: int, work: Path) -> Path:
    """The first ``count`` frames of ``source`` as a clip of their own."""
    import cv2

    capture = cv2.VideoCapture(str(source))
    fps = capture.get(cv2.CAP_PROP_FPS) or 15.0
    clip = work / "clip.avi"
    writer = None
    for _ in range(count):
        ok, frame = capture.read()
        if not ok:
            break
        if writer is None:
            writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), fps,
                                     (frame.shape[1], frame.shape[0]))
        writer.write(frame)
    capture.release()
    if writer is None:
        raise SystemExit(f"demo: no frames in {source}")
    writer.release()
    return clip


def run_demo(args: argparse.Namespace, config_path: str | None, out: Path, work: Path, source: Path) -> int:
    if args.frames:
        source = first_frames(source, args.frames, work)
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
        "FACEHUB_DETECTOR_SOURCE": str(source),
        "FACEHUB_DETECTOR_LOOP": "false",
        "FACEHUB_FORWARDER_SPOOL_PATH": str(work / "spool.db"),
        "FACEHUB_SAVER_URL": str(out),
    }
    if config_path:
        env["FACEHUB_CONFIG"] = str(Path(config_path).resolve())
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
    progress = Progress()
    while time.monotonic() < deadline:
        for name, proc in roles.items():
            if proc.poll() is not None:
                print(f"demo: the {name} supervisor exited early with code {proc.returncode}")
                return False
        if pipeline_done(work / "edge", work / "cloud"):
            return True
        progress.show(work)
        time.sleep(0.5)
    print(f"demo: gave up waiting after {DEADLINE_SECONDS}s")
    return False


class Progress:
    """How far the demo is: one line that rewrites itself on a terminal, a plain line every 5 s elsewhere."""

    def __init__(self):
        self.tty = sys.stdout.isatty()
        self.last_line = ""
        self.last_print = 0.0

    def show(self, work: Path) -> None:
        edge, cloud = read_stats(work / "edge"), read_stats(work / "cloud")
        line = (f"demo: frames {counter(edge, 'detector', 'frames')}, "
                f"faces published {counter(edge, 'detector', 'faces_published')}, "
                f"forwarded {counter(edge, 'forwarder', 'forwarded')}, "
                f"stored {counter(cloud, 'saver', 'stored')}")
        now = time.monotonic()
        if self.tty:
            print("\r" + line.ljust(len(self.last_line)), end="", flush=True)
        elif line != self.last_line and now - self.last_print >= 5:
            print(line, flush=True)
            self.last_print = now
        self.last_line = line


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
    if ok:
        print(f"look at them: ls {out}/*/*/*/*/ (a JPEG per face, with its metadata in the .json beside it)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
