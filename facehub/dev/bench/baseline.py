"""The typical implementation of this pipeline, kept only as a yardstick for ``facehub bench``.

It is what most face-capture-over-MQTT projects do: convert the whole
full-size frame to grey, run ``detectMultiScale(gray, 1.3, 5)`` on every
frame, PNG-encode every face found and publish each one. No downscaling, no
tracking, no duplicate suppression. The benchmark runs it on the same frames,
in the same run, as FaceHub's detector, so the comparison is fair.

End to end (``facehub bench pipeline``) the typical pipeline is two small
scripts, each run as its own process so its memory can be measured:

    python -m facehub.dev.bench.baseline detector --source CLIP --port EDGE --fps 15 --frames 480 --result OUT.json
    python -m facehub.dev.bench.baseline saver --port CLOUD --endpoint URL --latencies OUT.txt --ready FLAG

The detector publishes each PNG crop at QoS 0 with plain paho; mosquitto's own
bridge carries ``faces/#`` to the cloud broker; the saver, a plain paho
subscriber, writes each payload to S3 with s3fs, one object per message. The
capture time in the topic (``faces/typical/<captured_ms>/<n>``) is the
benchmark's instrumentation (capture to stored latency), not part of the
typical design.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

SCALE_FACTOR = 1.3
MIN_NEIGHBORS = 5
TOPIC = "faces/typical"


class TypicalDetector:
    """Haar on the full grey frame with the usual (1.3, 5) settings."""

    def __init__(self):
        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def detect(self, frame: np.ndarray) -> list[tuple[int, int, int, int]]:
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        return [tuple(map(int, box)) for box in self.cascade.detectMultiScale(gray, SCALE_FACTOR, MIN_NEIGHBORS)]


def encode_all(frame: np.ndarray, boxes) -> list[bytes]:
    """Every face of every frame, PNG-encoded: no suppression of repeats."""
    return [cv2.imencode(".png", frame[y:y + h, x:x + w])[1].tobytes() for (x, y, w, h) in boxes]


# -- end to end: the typical detector and saver as processes ---------------------------------


def paced_frames(source: str, fps: float, count: int) -> Iterator[tuple[np.ndarray, int]]:
    """``count`` frames of ``source`` at ``fps``, replaying the file as needed, as a camera delivers them.

    Yields each frame with its capture time in ms (wall clock, read just after the frame).
    """
    capture = cv2.VideoCapture(source)
    started, read = time.monotonic(), 0
    while read < count:
        ok, frame = capture.read()
        if not ok:  # end of the file: play it again
            capture.release()
            capture = cv2.VideoCapture(source)
            ok, frame = capture.read()
            if not ok:
                break
        read += 1
        yield frame, int(time.time() * 1000)
        time.sleep(max(0.0, started + read / fps - time.monotonic()))
    capture.release()


def run_detector(args: argparse.Namespace) -> None:
    """Detect on every frame and publish every PNG crop at QoS 0; write frames and faces published."""
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="typical-detector")
    client.connect("127.0.0.1", args.port)
    client.loop_start()
    detector = TypicalDetector()
    frames = published = 0
    last = None
    for frame, captured_ms in paced_frames(args.source, args.fps, args.frames):
        frames += 1
        for png in encode_all(frame, detector.detect(frame)):
            info = client.publish(f"{TOPIC}/{captured_ms}/{published}", png, qos=0)
            if info.rc == paho.MQTT_ERR_SUCCESS:
                published, last = published + 1, info
    if last is not None:  # the bench's own hygiene: let the last faces leave before disconnecting
        last.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    Path(args.result).write_text(json.dumps({"frames": frames, "published": published}))


def run_saver(args: argparse.Namespace) -> None:
    """Write every message to S3 as one object, until SIGTERM; one latency (ms) per line to a file."""
    import logging

    import paho.mqtt.client as paho
    import s3fs

    logging.basicConfig(level=logging.WARNING)
    fs = s3fs.S3FileSystem(endpoint_url=args.endpoint)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with open(args.latencies, "a", buffering=1) as latencies:

        def on_message(client, userdata, message) -> None:
            captured_ms = int(message.topic.split("/")[2])
            fs.pipe(f"{args.bucket}/{message.topic.partition('/')[2]}.png", message.payload)
            latencies.write(f"{time.time() * 1000 - captured_ms:.1f}\n")

        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="typical-saver")
        client.suppress_exceptions = True  # a failed store is logged by paho and the saver carries on
        client.enable_logger()
        client.on_connect = lambda c, *_: c.subscribe("faces/#", qos=0)
        client.on_subscribe = lambda *_: Path(args.ready).touch()
        client.on_message = on_message
        client.connect("127.0.0.1", args.port)
        client.loop_start()
        stop.wait()
        client.disconnect()
        client.loop_stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facehub.dev.bench.baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    detector = commands.add_parser("detector", help="detect and publish every face of every frame")
    detector.add_argument("--source", required=True, help="video file, replayed as needed")
    detector.add_argument("--port", type=int, required=True, help="edge broker port on 127.0.0.1")
    detector.add_argument("--fps", type=float, default=15.0, help="frames per second, as a camera")
    detector.add_argument("--frames", type=int, required=True, help="frames to read in all")
    detector.add_argument("--result", required=True, help="JSON file for frames and faces published")
    saver = commands.add_parser("saver", help="store every message in S3 until SIGTERM")
    saver.add_argument("--port", type=int, required=True, help="cloud broker port on 127.0.0.1")
    saver.add_argument("--endpoint", required=True, help="S3 endpoint URL")
    saver.add_argument("--bucket", default="faces")
    saver.add_argument("--latencies", required=True, help="file to append capture->stored ms to")
    saver.add_argument("--ready", required=True, help="file created once subscribed")
    args = parser.parse_args(argv)
    (run_detector if args.command == "detector" else run_saver)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
