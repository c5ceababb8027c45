"""The typical implementation of this pipeline, kept only as a yardstick for ``facehub bench``.

It is what most face-capture-over-MQTT projects do: read a frame, convert the
whole full-size frame to grey, run ``detectMultiScale(gray, 1.3, 5)`` on every
frame, PNG-encode every face found and publish each one (QoS 0). No
downscaling, no tracking, no duplicate suppression. The benchmark runs it on
the same input, in the same run, so the comparison is fair.
"""

from __future__ import annotations

import time

import cv2


def run(source: str, max_frames: int = 0, width: int = 0, height: int = 0, publish=None) -> dict:
    """Process ``source`` the typical way; returns frames, faces, fps and seconds per stage."""
    capture = cv2.VideoCapture(source)
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    stages = {"capture": 0.0, "detect": 0.0, "encode": 0.0, "publish": 0.0}
    frames = faces = 0
    started = time.perf_counter()
    while not max_frames or frames < max_frames:
        t0 = time.perf_counter()
        ok, frame = capture.read()
        if not ok:
            break
        if width and height and frame.shape[:2] != (height, width):
            frame = cv2.resize(frame, (width, height))
        t1 = time.perf_counter()
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        boxes = cascade.detectMultiScale(gray, 1.3, 5)
        t2 = time.perf_counter()
        crops = [cv2.imencode(".png", frame[y:y + h, x:x + w])[1].tobytes() for (x, y, w, h) in boxes]
        t3 = time.perf_counter()
        for crop in crops:
            if publish is not None:
                publish(crop)
        t4 = time.perf_counter()
        frames += 1
        faces += len(crops)
        for stage, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            stages[stage] += seconds
    capture.release()
    elapsed = time.perf_counter() - started
    return {"frames": frames, "faces": faces, "seconds": elapsed,
            "fps": frames / elapsed if elapsed else 0.0, "stages": stages}


if __name__ == "__main__":
    import sys

    result = run(sys.argv[1])
    print(f"baseline frames={result['frames']} faces={result['faces']} fps={result['fps']:.1f}")
