"""``facehub bench detector``: the camera model, the paced measurement and the line the command ends with."""

import os
import re
import subprocess
import sys
import time

from facehub.dev.bench import detector as bench
from facehub.config import DetectorConfig
from facehub.edge.detection import SAMPLE_CLIP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_camera_model_skips_the_frames_a_busy_consumer_missed():
    run = bench.Latency("test", 1)
    taken = []
    slow = None
    for frame, _ in bench.camera(list(range(20)), 100.0, run):
        taken.append(frame)
        if slow is None and frame >= 2 and frame < 10:  # (a busy machine may itself skip frame 2)
            slow = frame
            time.sleep(0.1)  # the consumer's slow work: ten frame times at 100 fps
    assert slow is not None, f"the camera skipped frames 2 to 9 before any slow work: {taken}"
    assert run.frames == len(taken) and run.frames + run.skipped == 20
    after = taken[taken.index(slow) + 1:]
    assert not after or after[0] >= slow + 9, f"after the slow frame {slow} the newest is delivered: {taken}"
    assert run.skipped >= 9 and taken == sorted(taken), "the newest frame is delivered, never an old one"


def test_paced_run_times_every_published_face(broker):
    """How many frames a loaded machine skips is its business; every frame is taken or counted as skipped,
    the first frame delivered is searched inline (so its face is found on any machine) and every
    published face is timed."""
    frames, _ = bench.read_frames(str(SAMPLE_CLIP), 30)
    cfg = DetectorConfig(backend="haar", search="inline", dedup_interval=0.0, confirm_frames=1)
    run = bench.paced_facehub(frames, cfg, broker.port, 30.0, 0, "every detection")
    assert run.frames + run.skipped == 30 and run.frames >= 1
    assert run.faces >= 1, "the sample's face is in every one of its first 30 frames"
    assert run.ms["count"] == run.faces and run.ms["p50"] > 0


def test_bench_detector_ends_with_the_summary_line():
    result = subprocess.run([sys.executable, "-m", "facehub.cli", "bench", "detector", "--source", str(SAMPLE_CLIP),
                             "--frames", "30", "--rate", "0"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"frames=(\d+) faces=(\d+) fps=([\d.]+)", last)
    assert match, last
    assert int(match[1]) == 30 and 1 <= int(match[2]) <= 30 and float(match[3]) > 0
