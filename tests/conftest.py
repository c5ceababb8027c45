"""Shared fixtures: real brokers, a real S3 endpoint, the shared face photos."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from facehub.dev.servers import S3_ENV, Mosquitto, MotoS3, make_bucket  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FACEHUB_SHARED", ROOT.parent / "shared"))
FACES = SHARED / "faces"
YUNET_MODEL = SHARED / "models" / "face_detection_yunet.onnx"


@pytest.fixture
def broker_factory(tmp_path):
    """Start any number of real mosquitto brokers; all are stopped at the end."""
    started = []

    def start(name: str = "broker", extra: str = "", **kwargs) -> Mosquitto:
        broker = Mosquitto(tmp_path / name, extra=extra, **kwargs).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.kill()


@pytest.fixture
def broker(broker_factory):
    return broker_factory("broker")


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """moto's S3 server on a free port with credentials in the environment."""
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    server = MotoS3(tmp_path / "s3").start(timeout=30)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """One moto S3 server for the tests that do not stop it (each test gets its own bucket)."""
    server = MotoS3(tmp_path_factory.mktemp("moto")).start(timeout=30)
    yield server
    server.kill()


@pytest.fixture
def bucket(moto):
    name = f"faces-{uuid.uuid4().hex[:12]}"
    make_bucket(moto.endpoint_url, name)
    return name


@pytest.fixture
def s3_bucket(s3_server):
    make_bucket(s3_server.endpoint_url, "faces")
    return "faces"


@pytest.fixture(scope="session")
def shared_faces() -> Path:
    if not (FACES / "training.xml").is_file():
        pytest.skip(f"shared face photos not found at {FACES}")
    return FACES


@pytest.fixture(scope="session")
def photo():
    """A photo-like colour image made here (no ../shared needed): smooth shading, shapes and grain,
    so its JPEG crops are real, decodable and about 10 KB, like a face crop."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(7)
    height, width = 300, 400
    y, x = np.mgrid[0:height, 0:width]
    image = np.dstack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))]).astype(np.uint8)
    for _ in range(12):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(image, centre, int(rng.integers(10, 60)), colour, -1)
    grain = rng.normal(0, 12, image.shape)
    return np.clip(image + grain, 0, 255).astype(np.uint8)
