"""Configuration: file + environment overrides, validation errors name the key, secrets masked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from facehub.config import MASK, Config, ConfigError, load


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "facehub.toml"
    path.write_text('device_id = "cam-01"\n[detector]\nsource = "video.mp4"\nscale_factor = 1.2\n'
                    '[cloud]\nport = 8883\n')
    config = load(path, env={"FACEHUB_DETECTOR_SCALE_FACTOR": "1.05", "FACEHUB_CLOUD_TLS": "true"})
    assert config.device_id == "cam-01"
    assert config.detector.source == "video.mp4"
    assert config.detector.scale_factor == 1.05
    assert config.cloud.port == 8883 and config.cloud.tls is True
    assert config.topic == "faces/cam-01"


def test_config_file_from_environment(tmp_path):
    path = tmp_path / "facehub.toml"
    path.write_text('topic_prefix = "site1/faces"\n')
    assert load(env={"FACEHUB_CONFIG": str(path)}).topic_filter == "site1/faces/#"


@pytest.mark.parametrize("env, key", [
    ({"FACEHUB_LOCAL_PORT": "abc"}, "local.port"),
    ({"FACEHUB_LOCAL_PORT": "70000"}, "local.port"),
    ({"FACEHUB_CLOUD_QOS": "3"}, "cloud.qos"),
    ({"FACEHUB_DETECTOR_BACKEND": "magic"}, "detector.backend"),
    ({"FACEHUB_DETECTOR_BACKEND": "yunet"}, "detector.model_path"),
    ({"FACEHUB_DEVICE_ID": "a/b"}, "device_id"),
    ({"FACEHUB_TOPIC_PREFIX": "faces/#"}, "topic_prefix"),
    ({"FACEHUB_SAVER_SHARE_GROUP": "a/b"}, "saver.share_group"),
    ({"FACEHUB_NO_SUCH_THING": "1"}, "FACEHUB_NO_SUCH_THING"),
    ({"FACEHUB_FORWARDER_FSYNC": "sometimes"}, "forwarder.fsync"),
    ({"FACEHUB_SUPERVISOR_DELIVERY_TIMEOUT": "0"}, "supervisor.delivery_timeout"),
    ({"FACEHUB_SUPERVISOR_DELIVERY_TIMEOUT": "soon"}, "supervisor.delivery_timeout"),
    ({"FACEHUB_CLOUD_RECONNECT_MAX": "0.1"}, "cloud.reconnect_min"),
])
def test_invalid_values_name_their_key(env, key):
    with pytest.raises(ConfigError) as error:
        load(env=env)
    assert key in str(error.value)


def test_invalid_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[detector\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad, env={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[detector]\nsauce = 1\n")
    with pytest.raises(ConfigError, match="detector.sauce: unknown setting"):
        load(unknown, env={})
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.toml", env={})


def test_config_check_prints_masked_secrets():
    env = {"FACEHUB_CLOUD_PASSWORD": "hunter2", "FACEHUB_SAVER_SECRET": "s3cr3t", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "facehub.cli", "config", "check"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cloud"]["password"] == MASK and data["saver"]["secret"] == MASK
    assert "hunter2" not in result.stdout and "s3cr3t" not in result.stdout


def test_auto_backend_is_yunet_where_its_model_is(monkeypatch, tmp_path):
    from conftest import YUNET_MODEL

    from facehub.config import schema
    from facehub.edge.detection import make_backend

    monkeypatch.setattr(schema, "DEFAULT_YUNET_MODEL", str(tmp_path / "absent.onnx"))
    config = load(env={})
    assert config.detector.backend == "auto"
    assert config.detector.detection() == ("haar", f"backend 'auto' and no YuNet model at {tmp_path / 'absent.onnx'}")
    assert make_backend(config.detector).name == "haar"
    if not YUNET_MODEL.is_file():
        pytest.skip(f"YuNet model not found at {YUNET_MODEL}")
    monkeypatch.setattr(schema, "DEFAULT_YUNET_MODEL", str(YUNET_MODEL))  # where the image puts it
    assert make_backend(load(env={}).detector).name == "yunet"
    given = load(env={"FACEHUB_DETECTOR_MODEL_PATH": str(YUNET_MODEL)}).detector
    assert given.detection()[0] == "yunet" and make_backend(given).name == "yunet"
    forced = load(env={"FACEHUB_DETECTOR_MODEL_PATH": str(YUNET_MODEL), "FACEHUB_DETECTOR_BACKEND": "haar"}).detector
    assert forced.detection() == ("haar", "set by detector.backend") and make_backend(forced).name == "haar"


def test_config_check_says_which_detector_runs_and_why():
    from conftest import YUNET_MODEL

    env = {"PATH": "/usr/bin:/bin", "FACEHUB_DETECTOR_MODEL_PATH": str(YUNET_MODEL)}
    if not YUNET_MODEL.is_file():
        pytest.skip(f"YuNet model not found at {YUNET_MODEL}")
    result = subprocess.run([sys.executable, "-m", "facehub.cli", "config", "check"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["detector"]["backend"] == "auto"
    assert f"detector: yunet (backend 'auto' and the YuNet model is at {YUNET_MODEL})" in result.stderr


def test_config_check_reports_bad_key():
    env = {"FACEHUB_DETECTOR_JPEG_QUALITY": "101", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "facehub.cli", "config", "check"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "detector.jpeg_quality" in result.stderr


def test_forwarder_session_on_the_edge_broker_never_expires():
    """Faces published while the forwarder is down stay queued for it however long the outage lasts."""
    from facehub import mqtt

    config = Config()
    assert mqtt.connect_properties(config.local).SessionExpiryInterval == 0xFFFFFFFF
    assert mqtt.connect_properties(config.cloud).SessionExpiryInterval == 86400
    config.local.session_expiry = 2 ** 32
    with pytest.raises(ConfigError, match="local.session_expiry"):
        config.validate()


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from the schema; regenerate with `facehub config reference`."""
    from facehub.config.reference import render

    current = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert current == render(), "docs/configuration.md is stale: run facehub config reference > docs/configuration.md"


def test_every_configuration_key_is_documented():
    from facehub.config.reference import render

    undocumented = [line for line in render().splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert undocumented == []


def test_config_check_masks_every_secret():
    env = {"FACEHUB_DETECTOR_SOURCE": "rtsp://admin:cam-pass@10.0.0.5/stream",
           "FACEHUB_SAVER_ENDPOINT_URL": "https://user:store-pass@s3.example.org",
           "FACEHUB_SAVER_KEY": "AKIAEXAMPLE", "FACEHUB_SAVER_SECRET": "s3-secret", "FACEHUB_CLOUD_PASSWORD": "mqtt-pass"}
    text = json.dumps(load(env=env).to_dict(mask_secrets=True))
    for secret in ("cam-pass", "store-pass", "AKIAEXAMPLE", "s3-secret", "mqtt-pass"):
        assert secret not in text
    assert "rtsp://admin:********@10.0.0.5/stream" in text


def test_stream_and_pipeline_labels_hide_passwords():
    from facehub.edge.detection.source import parse_source

    assert "cam-pass" not in parse_source("rtsp://admin:cam-pass@10.0.0.5/stream").label
    assert "cam-pass" not in parse_source("rtspsrc location=rtsp://admin:cam-pass@h ! decodebin ! appsink").label


def test_cloud_password_from_a_file(tmp_path):
    """One pod template for a fleet: each device reads its own password file, named by its id."""
    (tmp_path / "cam-07").write_text("  the-cam-07-password\n")
    env = {"FACEHUB_DEVICE_ID": "cam-07", "FACEHUB_CLOUD_PASSWORD_FILE": str(tmp_path / "cam-07")}
    config = load(env=env)
    assert config.cloud.password == "the-cam-07-password"
    assert config.cloud.password_file == str(tmp_path / "cam-07")
    assert config.validate().cloud.password == "the-cam-07-password", "validating twice keeps it"
    shown = json.dumps(config.to_dict(mask_secrets=True))
    assert "the-cam-07-password" not in shown and config.to_dict()["cloud"]["password"] == MASK


def test_config_check_masks_a_password_read_from_a_file(tmp_path):
    (tmp_path / "password").write_text("file-pass-123\n")
    env = {"FACEHUB_CLOUD_PASSWORD_FILE": str(tmp_path / "password"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "facehub.cli", "config", "check"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "file-pass-123" not in result.stdout
    assert json.loads(result.stdout)["cloud"]["password"] == MASK


@pytest.mark.parametrize("case, message", [
    ("missing", "file not found"),
    ("folder", "cannot read"),
    ("empty", "is empty"),
    ("also-password", "not both"),
])
def test_cloud_password_file_errors_name_the_key(tmp_path, case, message):
    path = tmp_path / "password"
    env = {"FACEHUB_CLOUD_PASSWORD_FILE": str(path)}
    if case == "folder":
        path.mkdir()
    elif case == "empty":
        path.write_text(" \n")
    elif case == "also-password":
        path.write_text("from-the-file\n")
        env["FACEHUB_CLOUD_PASSWORD"] = "from-the-environment"
    with pytest.raises(ConfigError) as error:
        load(env=env)
    assert "cloud.password_file" in str(error.value) and message in str(error.value)
    assert "from-the-file" not in str(error.value) and "from-the-environment" not in str(error.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_cloud_password_file(tmp_path):
    path = tmp_path / "password"
    path.write_text("secret-pass\n")
    path.chmod(0)
    with pytest.raises(ConfigError, match="cloud.password_file: cannot read"):
        load(env={"FACEHUB_CLOUD_PASSWORD_FILE": str(path)})
