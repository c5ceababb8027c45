"""Two network namespaces joined by a veth pair: an edge host and a cloud host on one machine.

The chaos test needs a network link it can cut without touching the
machine's own network. ``ip netns`` gives each side its own loopback and
routing table; a veth pair is the cable between them, with addresses that
exist only inside the two namespaces (``10.231.0.1/30`` on the edge side,
``10.231.0.2/30`` on the cloud side). Setting the edge end down cuts the
cable; setting it up restores it, and the kernel re-adds the route.

Namespaces are named ``fh-edge-<pid>-<n>`` and ``fh-cloud-<pid>-<n>`` so a
later run can recognise what a crashed run left behind (the pid is no longer
alive) and remove it. Removing a pair first kills every process still inside
it: a namespace only disappears when the last process in it is gone.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

from facehub.process.pids import pid_alive

PREFIX = "fh-"
_NAME = re.compile(rf"^{PREFIX}(edge|cloud|probe)-(\d+)-(\d+)$")
_counter = itertools.count(1)

EDGE_IF, CLOUD_IF = "veth-edge", "veth-cloud"
EDGE_ADDR, CLOUD_ADDR = "10.231.0.1", "10.231.0.2"


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message carries its output."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None when they can (creates and removes a probe)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "the 'ip' command (iproute2) is not installed"
    probe = f"{PREFIX}probe-{os.getpid()}-0"
    try:
        ip("netns", "add", probe)
    except NetnsError as error:
        return f"'ip netns' is unavailable: {error}"
    ip("netns", "delete", probe, check=False)
    return None


def namespaces() -> list[str]:
    """Every named network namespace (``ip netns list`` prints 'name (id: N)')."""
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pids_in(ns: str) -> list[int]:
    out = ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_all_in(ns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process inside ``ns`` and wait until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = pids_in(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise NetnsError(f"processes {pids} in namespace {ns} survive SIGKILL")
        time.sleep(0.1)


def remove(ns: str) -> None:
    """Kill what runs inside ``ns`` and delete it (its end of the veth pair goes with it)."""
    kill_all_in(ns)
    ip("netns", "delete", ns, check=False)


def remove_leftovers() -> list[str]:
    """Delete namespaces of earlier runs whose test process is gone; their names."""
    removed = []
    for ns in namespaces():
        match = _NAME.match(ns)
        if match and int(match.group(2)) != os.getpid() and not pid_alive(int(match.group(2))):
            remove(ns)
            removed.append(ns)
    return removed


@dataclass
class NetnsPair:
    """An edge namespace and a cloud namespace joined by one veth pair."""

    edge: str
    cloud: str
    edge_addr: str = EDGE_ADDR
    cloud_addr: str = CLOUD_ADDR

    @classmethod
    def create(cls) -> NetnsPair:
        """Create both namespaces, the cable, the addresses; loopback and cable up."""
        n = next(_counter)
        pair = cls(edge=f"{PREFIX}edge-{os.getpid()}-{n}", cloud=f"{PREFIX}cloud-{os.getpid()}-{n}")
        try:
            ip("netns", "add", pair.edge)
            ip("netns", "add", pair.cloud)
            # Both ends are created directly inside their namespaces: no name clash in ours.
            ip("-n", pair.edge, "link", "add", EDGE_IF, "type", "veth",
               "peer", "name", CLOUD_IF, "netns", pair.cloud)
            ip("-n", pair.edge, "addr", "add", f"{pair.edge_addr}/30", "dev", EDGE_IF)
            ip("-n", pair.cloud, "addr", "add", f"{pair.cloud_addr}/30", "dev", CLOUD_IF)
            for ns, dev in ((pair.edge, EDGE_IF), (pair.cloud, CLOUD_IF)):
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "link", "set", dev, "up")
        except Exception:
            pair.destroy()
            raise
        return pair

    def exec_prefix(self, ns: str) -> list[str]:
        """The command prefix that runs a program inside ``ns``."""
        return ["ip", "netns", "exec", ns]

    def cut(self) -> None:
        """Cut the cable: the edge end goes down, the edge loses its route to the cloud."""
        ip("-n", self.edge, "link", "set", EDGE_IF, "down")

    def restore(self) -> None:
        ip("-n", self.edge, "link", "set", EDGE_IF, "up")

    def destroy(self) -> None:
        """Kill everything inside both namespaces and delete them; safe to call twice."""
        existing = set(namespaces())
        for ns in (self.edge, self.cloud):
            if ns in existing:
                remove(ns)
