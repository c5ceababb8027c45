"""The two-core comparison of ``facehub bench detector``: the process pool searches the shared frames right."""

import cv2

from facehub.dev.bench import cores
from facehub.config import DetectorConfig
from facehub.edge.detection import SAMPLE_CLIP


def test_process_pool_finds_what_one_process_finds():
    capture = cv2.VideoCapture(str(SAMPLE_CLIP))
    frames = [capture.read()[1] for _ in range(4)]
    capture.release()
    runs = cores.compare(frames, DetectorConfig(), 2)
    assert [run.searches for run in runs] == [4, 4, 4]
    assert runs[0].faces == 4, "the sample's face is in each of its first frames"
    assert {run.faces for run in runs} == {4}, "frames read from shared memory give the same faces"
    assert runs[2].copy_ms > 0
    assert "| process pool (2, shared memory) | 4 | 4 |" in cores.table(runs)
