"""A plain ``pip install .`` (no extras) gives a facehub whose product commands work.

The developer tools need the ``bench`` extra and say so by name. The install runs
with uv from its cache (filled by ``make venv``), pinned by requirements/constraints.txt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from facehub.dev.servers import Mosquitto, wait_for

ROOT = Path(__file__).resolve().parent.parent
UV = Path(sys.executable).parent / "uv"


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory) -> Path:
    """A fresh venv with ``facehub`` installed from a copy of the source tree, no extras."""
    if not UV.exists():
        pytest.fail(f"uv not found at {UV}: make venv installs it")
    work = tmp_path_factory.mktemp("install")
    subprocess.run([str(UV), "venv", "-q", "-p", sys.executable, str(work / "venv")], check=True)
    python = work / "venv" / "bin" / "python"
    subprocess.run([str(UV), "pip", "install", "-q", "--python", str(python), "-c",
                    str(ROOT / "requirements" / "constraints.txt"), str(ROOT)], check=True, timeout=600)
    return work / "venv" / "bin"


def facehub(bin_dir: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run([str(bin_dir / "facehub"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.mark.slow
def test_plain_install_runs_the_product_commands(plain_install, tmp_path):
    assert subprocess.run([str(plain_install / "python"), "-c", "import moto"],
                          capture_output=True).returncode != 0, "moto must not come with a plain install"
    assert facehub(plain_install, "--help").returncode == 0
    check = facehub(plain_install, "config", "check", env={"FACEHUB_CLOUD_PASSWORD": "hunter2"})
    assert check.returncode == 0 and "hunter2" not in check.stdout

    image = np.full((240, 320, 3), 127, np.uint8)
    cv2.imwrite(str(tmp_path / "grey.jpg"), image)
    detect = facehub(plain_install, "detect", str(tmp_path / "grey.jpg"), cwd=tmp_path)
    assert detect.returncode == 0 and '"faces": []' in detect.stdout

    state = tmp_path / "state"
    assert facehub(plain_install, "health", env={"FACEHUB_SUPERVISOR_STATE_DIR": str(state)}).returncode == 1

    with Mosquitto(tmp_path / "broker") as broker:
        env = {**os.environ, "FACEHUB_CLOUD_PORT": str(broker.port), "FACEHUB_SAVER_URL": str(tmp_path / "faces"),
               "FACEHUB_SUPERVISOR_STATE_DIR": str(state)}
        cloud = subprocess.Popen([str(plain_install / "facehub"), "run", "cloud"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: facehub(plain_install, "health", env=env).returncode == 0, 60,
                     interval=0.5, message="facehub run cloud healthy")
        finally:
            cloud.send_signal(signal.SIGTERM)
            assert cloud.wait(60) == 0


@pytest.mark.slow
def test_developer_tools_name_their_extra(plain_install):
    bench = facehub(plain_install, "bench", "pipeline")
    assert bench.returncode == 2
    assert "'bench' extra" in bench.stdout + bench.stderr
