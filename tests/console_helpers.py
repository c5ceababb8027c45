"""Helpers for the console tests: faces in a store, a console serving in a thread, an HTTP client with cookies."""

from __future__ import annotations

import http.cookiejar
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import cv2
import numpy as np

from facehub.cloud.console.auth import hash_password
from facehub.config import Config
from facehub.dev.servers import free_port, port_open, wait_for
from facehub.messages import Face
from facehub.runtime import Runtime

PASSWORD = "viewer-password"
ADMIN_PASSWORD = "admin-password"
# made once: hashing is deliberately slow
HASHES = {"viewer": hash_password(PASSWORD), "admin": hash_password(ADMIN_PASSWORD)}


def jpeg(seed: int = 0, side: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    return cv2.imencode(".jpg", rng.integers(0, 255, (side, side, 3), dtype=np.uint8))[1].tobytes()


def face(device: str, captured_ms: int, seed: int = 0, track: int | None = None, frame: int = 0) -> Face:
    return Face(image=jpeg(seed), device_id=device, captured_ms=captured_ms, frame=frame, box=(10, 20, 30, 40),
                score=0.875, track=track)


def console_config(url: str, tmp_path, **console) -> Config:
    config = Config()
    config.saver.url = url
    config.supervisor.state_dir = str(tmp_path / "state")
    config.console.port = free_port()
    config.console.secure_cookies = False
    config.console.password_hash = HASHES["viewer"]
    config.console.admin_password_hash = HASHES["admin"]
    config.console.poll_interval = 0.2
    config.cloud.port = free_port()  # no broker unless a test starts one there
    for key, value in console.items():
        setattr(config.console, key, value)
    return config.validate()


class ConsoleThread:
    """The real console component (``app.run``) serving in a thread of this process."""

    def __init__(self, config: Config):
        from facehub.cloud.console import app

        self.config = config
        self.runtime = Runtime("console")
        self.thread = threading.Thread(target=app.run, args=(config, self.runtime), daemon=True)
        self.url = f"http://127.0.0.1:{config.console.port}"

    def __enter__(self) -> "ConsoleThread":
        self.thread.start()
        wait_for(lambda: port_open("127.0.0.1", self.config.console.port) or not self.thread.is_alive(), 20,
                 message="console listening")
        assert self.thread.is_alive(), "the console thread died"
        return self

    def __exit__(self, *exc) -> None:
        self.runtime.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the console did not stop"


@dataclass
class Answer:
    status: int
    body: str
    headers: dict
    url: str


class Client:
    """urllib with a cookie jar; redirects are not followed, so they can be asserted."""

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), self._NoRedirect())

    def request(self, path: str, data: dict | None = None, headers: dict | None = None) -> Answer:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        request = urllib.request.Request(self.base + path, data=body, headers=headers or {})
        try:
            with self.opener.open(request, timeout=30) as answer:
                return Answer(answer.status, answer.read().decode("utf-8", "replace"), dict(answer.headers),
                              answer.url)
        except urllib.error.HTTPError as error:
            return Answer(error.code, error.read().decode("utf-8", "replace"), dict(error.headers), error.url)

    def get(self, path: str, **kwargs) -> Answer:
        return self.request(path, **kwargs)

    def post(self, path: str, data: dict, **kwargs) -> Answer:
        return self.request(path, data=data, **kwargs)

    def login(self, user: str = "viewer", password: str = PASSWORD) -> Answer:
        page = self.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.body).group(1)
        return self.post("/login", {"csrf": token, "user": user, "password": password, "next": "/"})

    def csrf(self, path: str = "/") -> str:
        return re.search(r'name="csrf" value="([^"]+)"', self.get(path).body).group(1)
