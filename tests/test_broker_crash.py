"""The edge broker crashes while the forwarder is frozen: what the deployed persistence loses.

Real processes throughout: the edge broker is mosquitto with the deployed
autosave settings (``facehub.dev.servers.PERSISTENCE``, the same lines as
roles/facehub_edge and roles/mosquitto), the forwarder is ``facehub forwarder``
in its own process with its persistent session, and a second mosquitto with a
collector stands for the cloud.

The forwarder is frozen (SIGSTOP) and a publisher sends 60 faces/s, each with
its own id, counting a face as published only once the broker's PUBACK
accepted it. Right after the last PUBACK the edge broker is killed with SIGKILL
and started again on the same port and folder, the forwarder is thawed, and
every face the broker accepted must reach the cloud, except at most one save's
worth: ``SAVE_EVERY`` faces, 1 s at 60 faces/s.

The same run with the settings used before (a save every 30 s) must lose more
than that: every face of the outage. It shows the check can fail.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from facehub.dev.bench.persistence import Publisher
from facehub.dev.bench.pipeline import sample_face
from facehub.dev.servers import EDGE_QUEUE_BYTES, PERSISTENCE, SAVE_EVERY, Mosquitto, wait_for
from test_forwarder import collector_factory, forwarder_process, make_config, stats_gauge  # noqa: F401 (a fixture)

RATE = 60.0          # faces/s
OUTAGE = 5.0         # seconds of publishing while the forwarder is frozen
QUIET = 5.0          # after the restart, nothing new for this long: the rest is not coming
BEFORE = "autosave_interval 30\n"


def received_all_or_quiet(collector, expected: set[str], since: float):
    """Every expected id arrived, or the cloud has seen nothing new for QUIET seconds."""
    count = [len(collector.face_ids()), time.monotonic()]

    def check() -> bool:
        ids = collector.face_ids()
        if expected <= set(ids):
            return True
        if len(ids) != count[0]:
            count[:] = [len(ids), time.monotonic()]
        return time.monotonic() - max(count[1], since) > QUIET

    return check


@pytest.mark.parametrize("autosave, deployed", [(PERSISTENCE, True), (BEFORE, False)],
                         ids=["deployed", "before"])
def test_edge_broker_crash_while_the_forwarder_is_frozen(tmp_path, broker_factory, collector_factory,
                                                          autosave, deployed):
    edge = broker_factory("edge", autosave=autosave)
    cloud = broker_factory("cloud")
    collector = collector_factory(cloud)
    config = make_config(tmp_path, edge, cloud)
    proc = forwarder_process(config, tmp_path / "forwarder.log")
    publisher = None
    try:
        wait_for(lambda: stats_gauge(config, "edge_subscribed") and stats_gauge(config, "cloud_connected"),
                 20, message="forwarder connected to both brokers")
        publisher = Publisher(edge.port, sample_face(10_000), device=config.device_id)
        publisher.run(RATE, 1.0)                 # the forwarder is up: straight through
        publisher.wait_acked()
        collector.wait_for_ids(publisher.acked, timeout=30)
        before_freeze = set(publisher.acked)

        os.kill(proc.pid, signal.SIGSTOP)
        publisher.run(RATE, OUTAGE)
        publisher.wait_acked()
        assert publisher.refused == 0
        published = set(publisher.acked)
        edge.kill()                              # right after the last PUBACK
        publisher.close()
        publisher = None
        edge.start()
        os.kill(proc.pid, signal.SIGCONT)
        restarted = time.monotonic()
        wait_for(received_all_or_quiet(collector, published, restarted), 60,
                 message="the faces the edge broker kept")
    finally:
        if publisher:
            publisher.close()
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(20)

    received = set(collector.face_ids())
    lost = published - received
    during = published - before_freeze
    print(f"\nautosave {autosave.strip()!r}: published={len(published)} (while frozen {len(during)}) "
          f"received={len(published & received)} lost={len(lost)} = {len(lost) / RATE:.1f} s at {RATE:g} faces/s")
    assert before_freeze <= received
    if deployed:
        assert len(lost) <= SAVE_EVERY, f"{len(lost)} faces lost, more than one save's worth ({SAVE_EVERY})"
    else:
        assert len(lost) > SAVE_EVERY, "the settings used before lost no more than the deployed ones"


def conf_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_every_broker_saves_with_the_deployed_policy(tmp_path):
    """The edge and cloud brokers as deployed, and the throwaway ones, save after SAVE_EVERY changes."""
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "containers" / "ci"))
    import render

    policy = conf_lines(PERSISTENCE)
    assert policy == ["autosave_on_changes true", f"autosave_interval {SAVE_EVERY}"]
    configmap = next(doc for doc in yaml.safe_load_all(render.render("facehub_edge", "facehub-10-config.yaml"))
                     if doc["metadata"]["name"] == "facehub-mosquitto-config")
    edge = conf_lines(configmap["data"]["mosquitto.conf"])
    cloud = conf_lines(render.render("mosquitto", "mosquitto.conf"))
    for conf in (edge, cloud):
        assert "persistence true" in conf
        assert [line for line in conf if line.startswith("autosave")] == policy
    assert f"max_queued_bytes {EDGE_QUEUE_BYTES}" in edge
    assert any(line.startswith("max_queued_bytes ") for line in cloud)
    Mosquitto(tmp_path / "test-broker").command()
    assert [line for line in conf_lines((tmp_path / "test-broker" / "mosquitto.conf").read_text())
            if line.startswith("autosave")] == policy
