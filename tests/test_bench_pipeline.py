"""``facehub bench pipeline`` end to end, on a two-second clip: the three rows it prints are real outcomes.

Real brokers, moto's S3 server and the real components (FaceHub's and the
typical implementation's) as processes; the clip is cut from the built-in
sample so the run stays short.
"""

from __future__ import annotations

import cv2
import pytest

from facehub.dev.bench import pipeline
from facehub.edge.detection import SAMPLE_CLIP

pytestmark = pytest.mark.timeout(300)

FRAMES = 30  # the sample's face is in view for its first 54 frames


@pytest.fixture
def short_clip(tmp_path):
    """The first FRAMES frames of the built-in sample, at its own frame rate."""
    capture = cv2.VideoCapture(str(SAMPLE_CLIP))
    fps = capture.get(cv2.CAP_PROP_FPS)
    path = tmp_path / "short.mp4"
    writer = None
    for _ in range(FRAMES):
        ok, frame = capture.read()
        assert ok
        if writer is None:
            height, width = frame.shape[:2]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        writer.write(frame)
    writer.release()
    capture.release()
    return path


def test_end_to_end_rows_count_what_was_stored(short_clip, tmp_path):
    result = pipeline.end_to_end(str(short_clip), tmp_path, loops=1)
    assert result["clip"].frames == FRAMES and result["loops"] == 1
    defaults, every, typical = result["rows"]

    # FaceHub's rows play the clip at camera pace with the search in the background: how many faces a
    # search finds before the clip ends depends on the machine's speed, so only the bookkeeping is asserted
    for row in (defaults, every):
        assert row["frames"] + row["skipped"] >= FRAMES, "every frame processed or counted as skipped"
        assert row["stored"] == row["published"] and row["lost"] == 0
        assert (row["publish_latency_ms"] or {}).get("count", 0) == row["published"]
        assert row["peak_rss_edge"] > 0 and row["peak_rss_cloud"] > 0
    assert every["latency_ms"]["count"] == every["stored"]

    assert typical["frames"] == FRAMES
    assert typical["published"] > FRAMES // 2  # the face is in view in every frame of the clip
    assert 0 < typical["stored"] <= typical["published"]
    assert typical["latency_ms"]["count"] == typical["stored"]
    assert typical["publish_latency_ms"] is None
    assert typical["peak_rss_edge"] > 0 and typical["peak_rss_cloud"] > 0


def test_bridge_state_is_read_from_sys_topics(tmp_path):
    from facehub.dev.servers import Mosquitto, bridge_config

    assert pipeline.bridge_name(bridge_config(1883)) == "bench-bridge"
    with Mosquitto(tmp_path / "cloud") as cloud, \
            Mosquitto(tmp_path / "edge", extra=bridge_config(cloud.port)) as edge:
        pipeline.wait_bridge_connected(edge.port, "bench-bridge", timeout=30)
        with pytest.raises(RuntimeError, match="did not connect"):
            pipeline.wait_bridge_connected(edge.port, "no-such-bridge", timeout=1)
