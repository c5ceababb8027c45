"""Regenerate the built-in sample clip ``facehub/samples/astronaut.mp4``.

The clip is made from scikit-image's public-domain NASA portrait of astronaut
Eileen Collins (``skimage.data.astronaut()``), so it can be committed and used
by the demo, the tests and the benchmark without any download. The portrait
pans and zooms over a plain background, leaves the frame for a moment and comes
back mirrored and growing, so detection, tracking, a track ending and duplicate
suppression are all exercised.

    python tools/make_sample_clip.py [--out PATH] [--fps 15] [--seconds 8]

Needs scikit-image (a development dependency), OpenCV and numpy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 640, 480
HEAD = (130, 10, 330, 240)  # x0, y0, x1, y1 of the part of the photo that is used
FACE_CENTRE = (94.0, 103.0)  # the face's centre inside that part
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "facehub" / "samples" / "astronaut.mp4"


def portrait() -> np.ndarray:
    """The astronaut's head and shoulders from the photo, as BGR (a small moving area compresses well)."""
    from skimage import data

    photo = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    return photo[HEAD[1]:HEAD[3], HEAD[0]:HEAD[2]].copy()


def background() -> np.ndarray:
    """A soft vertical gradient: cheap to compress, with no face-like texture."""
    ramp = np.linspace(60, 150, HEIGHT, dtype=np.float32)[:, None, None]
    tint = np.array([1.0, 0.9, 0.75], dtype=np.float32)[None, None, :]
    return np.broadcast_to(ramp * tint, (HEIGHT, WIDTH, 3)).astype(np.uint8).copy()


def paste(canvas: np.ndarray, image: np.ndarray, scale: float, x: float, y: float) -> None:
    """Draw ``image`` scaled by ``scale`` with its top-left corner at (x, y), clipped to the canvas."""
    scaled = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    h, w = scaled.shape[:2]
    x, y = int(round(x)), int(round(y))
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(WIDTH, x + w), min(HEIGHT, y + h)
    if x1 > x0 and y1 > y0:
        canvas[y0:y1, x0:x1] = scaled[y0 - y:y1 - y, x0 - x:x1 - x]


def frame_at(t: float, seconds: float, photo: np.ndarray, mirrored: np.ndarray,
             backdrop: np.ndarray) -> np.ndarray:
    """The frame at time ``t``: a pan and zoom, a short empty gap, then a mirrored zoom-in."""
    canvas = backdrop.copy()
    first_end, second_start = 0.45 * seconds, 0.6 * seconds
    if t < first_end:
        p = t / first_end
        place(canvas, photo, FACE_CENTRE, 0.7 + 0.5 * p, (140 + 360 * p, 220 + 30 * np.sin(2 * np.pi * p)))
    elif t >= second_start:
        p = (t - second_start) / (seconds - second_start)
        centre = (photo.shape[1] - FACE_CENTRE[0], FACE_CENTRE[1])
        place(canvas, mirrored, centre, 0.6 + 0.9 * p, (WIDTH / 2, HEIGHT / 2 - 20))
    return canvas


def place(canvas: np.ndarray, image: np.ndarray, anchor: tuple[float, float], scale: float,
          at: tuple[float, float]) -> None:
    """Draw ``image`` scaled so that its point ``anchor`` lands on the canvas point ``at``."""
    paste(canvas, image, scale, at[0] - anchor[0] * scale, at[1] - anchor[1] * scale)


def write_clip(out: Path, fps: float, seconds: float) -> int:
    photo = portrait()
    mirrored = cv2.flip(photo, 1)
    backdrop = background()
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise SystemExit(f"OpenCV cannot write {out} with the mp4v codec")
    frames = int(round(fps * seconds))
    try:
        for index in range(frames):
            writer.write(frame_at(index / fps, seconds, photo, mirrored, backdrop))
    finally:
        writer.release()
    return frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--fps", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    frames = write_clip(args.out, args.fps, args.seconds)
    print(f"wrote {args.out}: {frames} frames, {WIDTH}x{HEIGHT} at {args.fps:g} fps, "
          f"{args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
