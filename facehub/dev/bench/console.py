"""``facehub bench console``: how fast the console's gallery pages come, on a big folder store and on S3.

A folder store gets ``folder_faces`` faces (10 devices x 10 days, the layout and sidecars
the saver writes) and a bucket of moto's S3 server gets ``s3_faces`` (5 devices x 2 days,
metadata as object metadata). The real console serves each (in a thread of this process)
and a logged-in client times whole HTTP requests for the gallery's HTML:

- **first page, cold**: the first request after the console started (nothing cached);
- **first page, warm**: the same page again (median of ``REPEATS``), as a user sees it;
- **page N**: the 20th page (or the last, if fewer), following the "older" links (median);
- **one device**: the first page filtered to one device (median).
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import statistics
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np

from facehub.config import Config
from facehub.dev.servers import MotoS3, free_port, make_bucket, port_open, wait_for
from facehub.runtime import Runtime

REPEATS = 15
PASSWORD = "bench-password"
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def tiny_jpeg() -> bytes:
    rng = np.random.default_rng(3)
    return cv2.imencode(".jpg", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))[1].tobytes()


def layout(count: int, devices: int, days: int, now: datetime | None = None):
    """(device, captured_ms, face id) for ``count`` faces spread over devices, days and the hours of each day."""
    now = now or datetime.now(timezone.utc)
    per = max(1, count // (devices * days))
    made = 0
    for day in range(days):
        start = (now - timedelta(days=day)).replace(hour=0, minute=0, second=0, microsecond=0)
        step = 86_400_000 // per
        for device in range(devices):
            for i in range(per):
                if made == count:
                    return
                made += 1
                yield f"cam-{device:02d}", int(start.timestamp() * 1000) + i * step + device * 7, \
                    f"{day:02d}{device:02d}{i:08d}0000000000000000"


def stem(device: str, ms: int, face_id: str) -> str:
    when = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return f"{device}/{when:%Y/%m/%d}/{when:%H%M%S}.{ms % 1000:03d}-{face_id}"


def fill_folder(root: Path, count: int) -> None:
    """The saver's folder layout, written plainly (no fsync: this is test data, 2 files a face)."""
    image = tiny_jpeg()
    made_dirs: set[Path] = set()
    for device, ms, face_id in layout(count, devices=10, days=10):
        path = root / f"{stem(device, ms, face_id)}.jpg"
        if path.parent not in made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(path.parent)
        meta = {"device": device, "face-id": face_id, "captured-ms": str(ms), "frame": "0", "box": "0,0,32,32",
                "schema": "1", "content-type": "image/jpeg"}
        path.with_suffix(".json").write_text(json.dumps(meta))
        path.write_bytes(image)


def fill_bucket(endpoint: str, bucket: str, prefix: str, count: int) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    image = tiny_jpeg()

    def put(item):
        device, ms, face_id = item
        client.put_object(Bucket=bucket, Key=f"{prefix}/{stem(device, ms, face_id)}.jpg", Body=image,
                          ContentType="image/jpeg", Metadata={"device": device, "face-id": face_id,
                                                             "captured-ms": str(ms), "box": "0,0,32,32"})

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, layout(count, devices=5, days=2)))


class Browser:
    """A logged-in HTTP client that times whole requests."""

    def __init__(self, base: str):
        self.base = base
        jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        page = self.opener.open(base + "/login", timeout=30).read().decode()
        token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        data = urllib.parse.urlencode({"csrf": token, "user": "viewer", "password": PASSWORD,
                                       "next": "/healthz"}).encode()  # not the gallery: the first one is timed
        self.opener.open(base + "/login", data=data, timeout=30).read()

    def get(self, path: str) -> tuple[float, str]:
        started = time.perf_counter()
        with self.opener.open(self.base + path, timeout=60) as answer:
            body = answer.read().decode()
            assert answer.status == 200 and "/login" not in answer.url, f"{path}: not logged in"
        return (time.perf_counter() - started) * 1000, body


def measure(url: str, work: Path, endpoint: str = "") -> dict:
    from facehub.cloud.console import app
    from facehub.cloud.console.auth import hash_password

    config = Config()
    config.saver.url = url
    config.saver.endpoint_url = endpoint
    config.supervisor.state_dir = str(work / "state")
    config.console.port = free_port()
    config.console.secure_cookies = False
    config.console.password_hash = hash_password(PASSWORD)
    config.cloud.port = free_port()  # no broker: the fleet part stays empty
    runtime = Runtime("console")
    thread = threading.Thread(target=app.run, args=(config.validate(), runtime), daemon=True)
    thread.start()
    try:
        wait_for(lambda: port_open("127.0.0.1", config.console.port), 30, message="console listening")
        browser = Browser(f"http://127.0.0.1:{config.console.port}")
        cold, body = browser.get("/")
        tiles = body.count('class="tile"')
        warm = [browser.get("/")[0] for _ in range(REPEATS)]
        path, page = "/", 1
        while page < 20:
            older = re.search(r'href="(/\?[^"]*before=[^"]+)" id="older"', body)
            if not older:
                break
            path, page = older.group(1).replace("&amp;", "&"), page + 1
            body = browser.get(path)[1]
        deep = [browser.get(path)[0] for _ in range(REPEATS)]
        device = [browser.get("/?device=cam-03")[0] for _ in range(REPEATS)]
    finally:
        runtime.stop.set()
        thread.join(20)
    return {"cold": cold, "warm": statistics.median(warm), "deep": statistics.median(deep), "page": page,
            "device": statistics.median(device), "tiles": tiles}


def run(folder_faces: int = 100_000, s3_faces: int = 10_000) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="facehub-bench-console-") as temp:
        work = Path(temp)
        started = time.perf_counter()
        fill_folder(work / "faces", folder_faces)
        filled = time.perf_counter() - started
        rows.append({"store": "folder", "faces": folder_faces, "fill_s": filled,
                     **measure(str(work / "faces"), work)})
        if s3_faces:
            import os

            saved = {key: os.environ.get(key) for key in S3_ENV}
            os.environ.update(S3_ENV)
            server = MotoS3(work / "moto").start(timeout=30)
            try:
                make_bucket(server.endpoint_url, "bench")
                started = time.perf_counter()
                fill_bucket(server.endpoint_url, "bench", "faces", s3_faces)
                filled = time.perf_counter() - started
                rows.append({"store": "moto S3", "faces": s3_faces, "fill_s": filled,
                             **measure("s3://bench/faces", work, server.endpoint_url)})
            finally:
                server.stop()
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| store | faces | first page, cold | first page, warm (p50) | page N (p50) | one device (p50) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['store']} | {row['faces']:,} | {row['cold']:.0f} ms | {row['warm']:.1f} ms | "
                     f"{row['deep']:.1f} ms (page {row['page']}) | {row['device']:.1f} ms |")
    return "\n".join(lines)
