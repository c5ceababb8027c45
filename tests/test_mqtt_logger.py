"""The shared MQTT client setup and the logger, against real mosquitto brokers."""

import subprocess
import sys
import threading

from facehub import messages, mqtt
from facehub.config import BrokerConfig, Config
from facehub.edge.face_logger import describe
from facehub.runtime import Runtime
from facehub.dev.servers import Mosquitto, free_port, wait_for

JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 100 + b"\xff\xd9"


def test_broker_down_at_start_is_retried(tmp_path):
    """A client started before its broker connects once the broker comes up."""
    port = free_port()
    client = mqtt.make_client(BrokerConfig(port=port, reconnect_min=1, reconnect_max=1), "late-client")
    state = mqtt.ConnectionState("late")
    state.attach(client)
    mqtt.start(client, BrokerConfig(port=port))
    try:
        assert not state.connected.is_set()  # nothing listens on the port yet
        broker = Mosquitto(tmp_path / "late", port=port).start()
        try:
            assert state.connected.wait(15), "client never connected after the broker came up"
        finally:
            broker.kill()
    finally:
        mqtt.stop(client)


def test_clients_send_without_nagle_delay(broker):
    """Small packets (acknowledgements, faces) must not wait for the peer's delayed ACK."""
    import socket

    client = mqtt.make_client(BrokerConfig(port=broker.port), "nodelay-client")
    state = mqtt.ConnectionState("nodelay")
    state.attach(client)
    mqtt.start(client, BrokerConfig(port=broker.port), persistent=False)
    try:
        assert state.connected.wait(10)
        assert client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        mqtt.stop(client)


def test_describe_lines():
    face = messages.Face(JPEG, "cam-1", face_id="abc", box=(1, 2, 3, 4), frame=7, score=0.5)
    line = describe("faces/cam-1", face.image, face.properties(), 10_000, "faces")
    assert line == f"face device=cam-1 id=abc bytes={len(JPEG)} box=1,2,3,4 frame=7 score=0.50"
    assert describe("faces/cam-1", b"junk", None, 10_000, "faces").startswith("malformed message")


def test_logger_logs_each_face(broker, tmp_path):
    config = Config(device_id="cam-1")
    config.local.port = broker.port
    config.supervisor.state_dir = str(tmp_path)
    runtime = Runtime("logger", state_dir=tmp_path)
    from facehub.edge import face_logger as logger

    thread = threading.Thread(target=logger.run, args=(config, runtime), daemon=True)
    thread.start()
    publisher = mqtt.make_client(config.local, "test-publisher")
    connected = mqtt.ConnectionState("publisher")
    connected.attach(publisher)
    mqtt.start(publisher, config.local, persistent=False)
    try:
        assert connected.connected.wait(10)
        # The logger subscribes after connecting: probe with malformed messages until it sees one,
        # so that the faces below are all published after its subscription exists.
        def probe() -> bool:
            publisher.publish("faces/cam-1", b"probe", 1).wait_for_publish(5)
            return runtime.stats["malformed"] > 0

        wait_for(probe, 15, interval=0.2, message="logger subscribed")
        for i in range(20):
            face = messages.Face(JPEG, "cam-1", face_id=f"face-{i}")
            publisher.publish("faces/cam-1", JPEG, 1, properties=face.properties()).wait_for_publish(5)
        wait_for(lambda: runtime.stats["logged"] == 20, 10, message="20 faces logged")
    finally:
        runtime.stop.set()
        thread.join(5)
        mqtt.stop(publisher)
    assert not thread.is_alive()


def test_logger_command_prints_faces_to_stdout(broker, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "FACEHUB_LOCAL_PORT": str(broker.port), "FACEHUB_DEVICE_ID": "cam-9",
           "FACEHUB_SUPERVISOR_STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-u", "-m", "facehub.cli", "logger"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        image = write(tmp_path / "f.jpg", JPEG)
        stats = tmp_path / "logger.stats.json"

        def publish_until_logged():
            subprocess.run(["mosquitto_pub", "-V", "mqttv5", "-p", str(broker.port), "-t", "faces/cam-9",
                            "-D", "publish", "user-property", "face-id", "printed-face",
                            "-D", "publish", "user-property", "captured-ms", "1",
                            "-f", str(image)], check=True)
            return stats.exists() and '"logged"' in stats.read_text()

        wait_for(publish_until_logged, 20, interval=0.5, message="logger logged a face")
    finally:
        proc.terminate()
        out, err = proc.communicate(10)
    assert proc.returncode == 0, err
    assert "face device=cam-9 id=printed-face" in out


def write(path, data):
    path.write_bytes(data)
    return path
