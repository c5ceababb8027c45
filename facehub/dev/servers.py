"""Throwaway real servers for the tests, the demo and the benchmarks: mosquitto and moto's S3.

Each is the real thing, started as a child process on 127.0.0.1 (or inside a
network namespace the caller made) and stopped when its user is done. A server
can be stopped and started again on the same port, which the fault tests use to
cut a hop and restore it.

Not for production: these brokers listen on loopback only, allow anonymous
clients and keep their files in a folder the caller removes; the deployment
configures mosquitto with TLS, passwords and ACLs. moto is in the ``bench`` extra.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

# How the deployed brokers keep their queues on disk (roles/mosquitto, roles/facehub_edge; docs/pipeline.md,
# "Broker crashes", says why): a save after every SAVE_EVERY changes (a message queued for an absent
# consumer, a delivery acknowledged), so a broker that crashes while its consumer is away loses at most
# that many. The throwaway brokers here save the same way.
SAVE_EVERY = 60
PERSISTENCE = f"autosave_on_changes true\nautosave_interval {SAVE_EVERY}\n"
# The deployed edge broker's queue for the forwarder, capped so that one save stays small (about 50 s of
# faces at 60 faces/s); beyond it mosquitto drops new faces for the forwarder. Not applied to the
# throwaway brokers, whose tests and benchmarks queue more on purpose.
EDGE_QUEUE_BYTES = 32_000_000
EDGE_QUEUE_CAP = f"max_queued_bytes {EDGE_QUEUE_BYTES}\n"


class BrokerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05,
             message: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Server:
    """A child process listening on one port; start/stop/kill keep the port."""

    def __init__(self, name: str, workdir: Path, host: str = "127.0.0.1", port: int | None = None,
                 netns: str | None = None):
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.netns = netns
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / f"{name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 15.0) -> "Server":
        cmd = self.command()
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     start_new_session=True)
        log.close()
        wait_for(self._ready, timeout, message=f"{self.name} on port {self.port}")
        return self

    def _ready(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                               f"{self.log_path.read_text()[-2000:]}")
        if self.netns:
            probe = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c",
                                    f"import socket; socket.create_connection(('{self.host}', {self.port}), 0.2)"],
                                   capture_output=True)
            return probe.returncode == 0
        return port_open(self.host, self.port)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return bool(self.proc and self.proc.poll() is None)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Mosquitto(Server):
    """A real mosquitto broker. ``extra`` lines are appended to its configuration.

    With ``persistence`` it saves its sessions and queues in its folder, with the
    deployed autosave policy unless ``autosave`` gives other lines.
    """

    def __init__(self, workdir: Path, extra: str = "", persistence: bool = True, autosave: str = PERSISTENCE,
                 **kwargs):
        super().__init__("mosquitto", workdir, **kwargs)
        self.extra = extra
        self.persistence = persistence
        self.autosave = autosave
        self.conf_path = self.workdir / "mosquitto.conf"

    def command(self) -> list[str]:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "set_tcp_nodelay true",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to its own user and cannot write here
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/", self.autosave.strip()]
        self.conf_path.write_text("\n".join(lines) + "\n" + self.extra + "\n")
        if not os.path.exists(MOSQUITTO):
            raise BrokerError("mosquitto is not installed: 'make demo' installs Debian's mosquitto, "
                              "or run 'apt-get install mosquitto'")
        return [MOSQUITTO, "-c", str(self.conf_path)]


def bridge_config(remote_port: int, topic: str = "faces/#", qos: int = 1) -> str:
    """mosquitto's own bridge to another local broker: the yardstick for the forwarder."""
    return (f"connection bench-bridge\naddress 127.0.0.1:{remote_port}\n"
            f"topic {topic} out {qos}\ncleansession false\nbridge_protocol_version mqttv50\n")


class MotoS3(Server):
    """moto's S3 server, a real HTTP S3 endpoint, as s3fs's own test suite uses."""

    def __init__(self, workdir: Path, **kwargs):
        super().__init__("moto-s3", workdir, **kwargs)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


def make_bucket(endpoint_url: str, bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)


def list_objects(endpoint_url: str, bucket: str, prefix: str = "") -> dict[str, dict]:
    """Every object under ``prefix``: key -> {"size", "metadata"}."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    result = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            result[item["Key"]] = {"size": item["Size"]}
    return result


class MjpegCamera:
    """An IP camera on 127.0.0.1: the frames of a video served once as an MJPEG stream over HTTP.

    The first request gets every frame, at ``fps`` (0 = as fast as the socket
    takes them), then the stream ends, as when a camera goes away; later
    requests are refused with 503, so the frames a detector sees come from one
    stream only.
    """

    def __init__(self, video: str | os.PathLike, fps: float = 30.0):
        import http.server
        import threading

        import cv2

        capture = cv2.VideoCapture(str(video))
        self.frames = []
        while (read := capture.read())[0]:
            self.frames.append(cv2.imencode(".jpg", read[1])[1].tobytes())
        capture.release()
        self.fps = fps
        self.served = threading.Event()
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if camera.served.is_set():
                    self.send_error(503, "camera gone")
                    return
                camera.served.set()
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                camera.stream(self.wfile)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stream(self, out) -> None:
        started = time.monotonic()
        try:
            for index, jpeg in enumerate(self.frames):
                if self.fps:
                    time.sleep(max(0.0, started + index / self.fps - time.monotonic()))  # the camera's clock
                out.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg))
                out.write(jpeg + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
