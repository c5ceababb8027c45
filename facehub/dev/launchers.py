"""Throwaway mosquitto brokers on 127.0.0.1, for the demo and the benchmarks.

Not for production (the deployment configures mosquitto with TLS, passwords
and ACLs): these listen on loopback only, allow anonymous clients and keep
their files in a folder the caller removes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class BrokerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_binary() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):
        raise BrokerError("mosquitto is not installed: 'make demo' installs Debian's mosquitto, "
                          "or run 'apt-get install mosquitto'")
    return binary


class LocalBroker:
    """One mosquitto process; ``extra`` is appended to its configuration (e.g. a bridge)."""

    def __init__(self, workdir: Path, port: int | None = None, extra: str = ""):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "LocalBroker":
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                        f"set_tcp_nodelay true\npersistence_location {self.workdir}/\nmax_queued_messages 100000\n"
                        f"log_dest file {self.workdir}/mosquitto.log\n{self.run_as()}{self.extra}\n")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited at start; see {self.workdir}/mosquitto.log")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout:.0f}s")

    @staticmethod
    def run_as() -> str:
        """As root, mosquitto would switch to its own user, which cannot write into our folder."""
        return "user root\n" if os.geteuid() == 0 else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def bridge_config(remote_port: int, topic: str = "faces/#", qos: int = 1) -> str:
    """mosquitto's own bridge to another local broker: the yardstick for the forwarder."""
    return (f"connection bench-bridge\naddress 127.0.0.1:{remote_port}\n"
            f"topic {topic} out {qos}\ncleansession false\nbridge_protocol_version mqttv50\n")
