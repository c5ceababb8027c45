"""The console in a real browser (Debian's chromium driven by chromedriver through Selenium).

The faces are stored by the real pipeline: ``facehub run edge`` (detector, forwarder) on
the first frames of the sample clip, and ``facehub run cloud`` with the saver and the
console as supervised children, writing into and reading from one folder; a second
device's faces are published to the cloud broker in the wire format, so the same saver
stores them. Scenarios: log in, thumbnails, filters by device and day, a face's page, a
new face appearing without a reload, and the fleet table turning a device offline when
its retained availability says so. Screenshots of the gallery and of the fleet are kept
in the test's folder (and written to docs/images with DOCS_SCREENSHOTS=1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from console_helpers import ADMIN_PASSWORD, HASHES, face
from facehub import mqtt
from facehub.config import BrokerConfig
from facehub.dev.demo import first_frames, pipeline_done
from facehub.dev.servers import free_port, port_open, wait_for

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
EDGE_DEVICE, OTHER_DEVICE = "front-door", "lobby-cam"
DAY_MS = 86_400_000

pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="chromium and chromium-driver are not installed (make system-deps)")


class Publisher:
    """Publishes to the cloud broker like a device would, waiting for each acknowledgement."""

    def __init__(self, port: int):
        self.client = mqtt.make_client(BrokerConfig(port=port), f"browser-test-{os.getpid()}")
        state = mqtt.ConnectionState("publisher")
        state.attach(self.client)
        mqtt.start(self.client, BrokerConfig(port=port), persistent=False)
        assert state.connected.wait(10)

    def face(self, item) -> None:
        self.client.publish(f"faces/{item.device_id}", item.image, qos=1,
                            properties=item.properties()).wait_for_publish(10)

    def retained(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        mqtt.stop(self.client)


def run_role(role: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "facehub.cli", "run", role], env=env, cwd=ROOT,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def stored_faces(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, request):
    """Brokers, the edge on 60 frames of the sample clip, the cloud role with its console; all real."""
    from facehub.dev.servers import Mosquitto
    from facehub.edge.detection import SAMPLE_CLIP

    work = tmp_path_factory.mktemp("console-browser")
    edge_broker = Mosquitto(work / "edge-broker").start()
    cloud_broker = Mosquitto(work / "cloud-broker").start()
    faces = work / "faces"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FACEHUB_LOCAL_PORT": str(edge_broker.port),
           "FACEHUB_CLOUD_PORT": str(cloud_broker.port), "FACEHUB_SAVER_URL": str(faces),
           "FACEHUB_FORWARDER_SPOOL_PATH": str(work / "spool.db")}
    cloud_env = {**env, "FACEHUB_DEVICE_ID": "cloud", "FACEHUB_SUPERVISOR_STATE_DIR": str(work / "cloud"),
                 "FACEHUB_CONSOLE_ENABLED": "true", "FACEHUB_CONSOLE_PORT": str(port),
                 "FACEHUB_CONSOLE_SECURE_COOKIES": "false", "FACEHUB_CONSOLE_POLL_INTERVAL": "0.3",
                 "FACEHUB_CONSOLE_PASSWORD_HASH": HASHES["viewer"],
                 "FACEHUB_CONSOLE_ADMIN_PASSWORD_HASH": HASHES["admin"]}
    clip = first_frames(Path(SAMPLE_CLIP), 60, work)
    # a short keepalive, so the broker sends the forwarder's last will soon after the edge dies; no stats
    # of its own, so the figures the test publishes are the ones shown
    edge_env = {**env, "FACEHUB_DEVICE_ID": EDGE_DEVICE, "FACEHUB_SUPERVISOR_STATE_DIR": str(work / "edge"),
                "FACEHUB_DETECTOR_SOURCE": str(clip), "FACEHUB_CLOUD_KEEPALIVE": "5",
                "FACEHUB_FORWARDER_STATS_INTERVAL": "0"}
    procs = [run_role("cloud", cloud_env, work / "cloud.log"), run_role("edge", edge_env, work / "edge.log")]
    publisher = None
    try:
        wait_for(lambda: port_open("127.0.0.1", port), 60, message="console listening")
        wait_for(lambda: pipeline_done(work / "edge", work / "cloud"), 120, interval=0.5,
                 message="the edge's faces stored")
        edge_faces = stored_faces(faces)
        assert len(edge_faces) >= 3, "the sample clip should give several faces"
        publisher = Publisher(cloud_broker.port)
        now = int(time.time() * 1000)
        crops = [path.read_bytes() for path in edge_faces]  # real crops, as if a second camera saw them
        others = [dataclasses.replace(face(OTHER_DEVICE, now - 60_000 * i - 500, track=100 + i // 3, frame=i),
                                      image=crops[i % len(crops)]) for i in range(6)]
        others.append(dataclasses.replace(face(OTHER_DEVICE, now - DAY_MS, track=7), image=crops[0]))  # yesterday
        for item in others:
            publisher.face(item)
        wait_for(lambda: len(stored_faces(faces)) == len(edge_faces) + len(others), 30,
                 message="the other device's faces stored")
        for device in (EDGE_DEVICE, OTHER_DEVICE):
            publisher.retained(f"facehub/{device}/availability", b"online")
        publisher.retained(f"facehub/{EDGE_DEVICE}/stats",
                           json.dumps({"frames": 60, "faces": len(edge_faces), "spool_depth": 3,
                                       "fps": 14.9}).encode())
        yield {"url": f"http://127.0.0.1:{port}", "faces": faces, "publisher": publisher, "others": others,
               "edge_faces": edge_faces, "work": work, "edge": procs[1]}
    finally:
        if publisher:
            for device in (EDGE_DEVICE, OTHER_DEVICE):
                publisher.retained(f"facehub/{device}/availability", b"")
            publisher.close()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        edge_broker.stop()
        cloud_broker.stop()
        if request.session.testsfailed:
            for name in ("cloud.log", "edge.log"):
                print(f"--- {name}\n" + (work / name).read_text()[-4000:])


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def until(driver, condition, timeout: float = 20, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message)


def tiles(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#gallery a.tile")


def keys(driver) -> list[str]:
    return [tile.get_attribute("data-key") for tile in tiles(driver)]


def log_in(driver, url: str, user: str = "admin", password: str = ADMIN_PASSWORD) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    until(driver, lambda d: "/login" in d.current_url, message="redirected to the login page")
    driver.find_element(By.ID, "user").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()


def screenshot(driver, name: str, work: Path) -> Path:
    path = work / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    if os.environ.get("DOCS_SCREENSHOTS") == "1":
        shutil.copy(path, ROOT / "docs" / "images" / f"{name}.png")
    return path


def test_gallery_login_thumbnails_filters_face_and_live(pipeline, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, driver = pipeline["url"], browser
    log_in(driver, url, "viewer", "not-the-password")
    until(driver, lambda d: d.find_elements(By.ID, "login-error"), message="wrong password refused")
    assert "Wrong user name or password" in driver.find_element(By.ID, "login-error").text
    driver.find_element(By.ID, "user").clear()
    log_in(driver, url)
    until(driver, lambda d: d.current_url == url + "/" and tiles(d), message="the gallery after logging in")

    # thumbnails of every stored face, newest first, each image loaded
    stored = {p.relative_to(pipeline["faces"]).as_posix() for p in stored_faces(pipeline["faces"])}
    shown = keys(driver)
    assert set(shown) == stored
    assert shown == sorted(shown, key=lambda key: (key.split("/", 1)[1], key.split("/", 1)[0]), reverse=True)
    until(driver, lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                                 img) for img in d.find_elements(By.CSS_SELECTOR, "#gallery img")),
          message="every thumbnail loaded")
    edge_keys = [k for k in shown if k.startswith(EDGE_DEVICE + "/")]
    assert len(edge_keys) == len(pipeline["edge_faces"])

    # filter by device
    Select(driver.find_element(By.ID, "device")).select_by_visible_text(OTHER_DEVICE)
    driver.find_element(By.ID, "apply").click()
    until(driver, lambda d: "device=" + OTHER_DEVICE in d.current_url, message="device filter applied")
    assert keys(driver) and all(k.startswith(OTHER_DEVICE + "/") for k in keys(driver))
    assert len(keys(driver)) == len(pipeline["others"])

    # and by day: yesterday holds one face of that device
    yesterday = pipeline["others"][-1]
    day = datetime.fromtimestamp(yesterday.captured_ms / 1000, timezone.utc).strftime("%Y-%m-%d")
    driver.get(f"{url}/?device={OTHER_DEVICE}&day={day}")
    assert [k.rsplit("-", 1)[-1] for k in keys(driver)] == [f"{yesterday.face_id}.jpg"]
    assert driver.find_element(By.ID, "day").get_attribute("value") == day

    # a face's page: the crop, its metadata, the other crops of its track
    driver.get(f"{url}/?device={OTHER_DEVICE}")
    newest = pipeline["others"][0]
    target = next(t for t in tiles(driver) if newest.face_id in t.get_attribute("data-key"))
    target.click()
    until(driver, lambda d: "/face/" in d.current_url, message="the face page")
    assert driver.find_element(By.ID, "meta-device").text == OTHER_DEVICE
    assert driver.find_element(By.ID, "meta-box").text == "10,20,30,40"
    assert driver.find_element(By.ID, "meta-score").text == "0.8750"
    assert driver.find_element(By.ID, "meta-track").text == str(newest.track)
    assert driver.find_element(By.ID, "meta-id").text == newest.face_id
    assert driver.execute_script("const i = document.getElementById('crop'); return i.complete && i.naturalWidth")
    same_track = {o.face_id for o in pipeline["others"] if o.track == newest.track and o is not newest}
    shown_track = {a.get_attribute("href").rsplit("-", 1)[-1][:-4]
                   for a in driver.find_elements(By.CSS_SELECTOR, "#track a.tile")}
    assert shown_track == same_track and len(same_track) == 2

    # live: a new face appears at the top without a reload
    driver.get(url + "/")
    until(driver, lambda d: d.execute_script("return document.getElementById('live-status').classList.contains('on')"),
          message="the live stream connected")
    driver.execute_script("window.notReloaded = true")
    fresh = dataclasses.replace(face(OTHER_DEVICE, int(time.time() * 1000), track=999),
                                image=pipeline["edge_faces"][-1].read_bytes())
    pipeline["publisher"].face(fresh)
    until(driver, lambda d: keys(d) and fresh.face_id in keys(d)[0], timeout=30, message="the new face, live")
    assert driver.execute_script("return window.notReloaded === true")
    until(driver, lambda d: d.execute_script(
        "const i = document.querySelector('#gallery img'); return i.complete && i.naturalWidth > 0"))
    screenshot(driver, "console-gallery", pipeline["work"])


def test_fleet_shows_a_device_going_offline(pipeline, browser):
    from selenium.webdriver.common.by import By

    url, driver = pipeline["url"], browser
    driver.get(url + "/fleet")
    if "/login" in driver.current_url:
        log_in(driver, url)
        driver.get(url + "/fleet")

    def state(device: str) -> str | None:
        rows = driver.find_elements(By.CSS_SELECTOR, f'#fleet-table tr[data-device="{device}"]')
        return rows[0].get_attribute("data-state") if rows else None

    until(driver, lambda d: state(EDGE_DEVICE) == "online" and state(OTHER_DEVICE) == "online",
          message="both devices online")
    row = driver.find_element(By.CSS_SELECTOR, f'#fleet-table tr[data-device="{EDGE_DEVICE}"]')
    cells = [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "td")]
    assert cells[2] == str(len(pipeline["edge_faces"]))  # faces today
    assert cells[3] == "3" and cells[4] == "14.9"  # spool depth and detector fps from its stats
    assert row.find_elements(By.CSS_SELECTOR, "svg.spark polyline")
    driver.execute_script("window.notReloaded = true")
    pipeline["publisher"].retained(f"facehub/{OTHER_DEVICE}/availability", b"offline")
    until(driver, lambda d: state(OTHER_DEVICE) == "offline", timeout=30, message="the device shown offline")
    assert driver.execute_script("return window.notReloaded === true")
    assert state(EDGE_DEVICE) == "online"
    first = driver.find_element(By.CSS_SELECTOR, "#fleet-table tbody tr")
    assert first.get_attribute("data-device") == OTHER_DEVICE  # the quiet device comes first
    assert "offline" in first.find_element(By.CSS_SELECTOR, ".badge").text
    screenshot(driver, "console-fleet", pipeline["work"])

    # The edge box dies (supervisor and forwarder killed): the forwarder's last will marks it offline.
    status = json.loads((pipeline["work"] / "edge" / "supervisor-edge.json").read_text())
    forwarder_pid = status["children"]["forwarder"]["pid"]
    pipeline["edge"].send_signal(signal.SIGKILL)
    os.kill(forwarder_pid, signal.SIGKILL)
    until(driver, lambda d: state(EDGE_DEVICE) == "offline", timeout=30, message="the killed edge shown offline")
