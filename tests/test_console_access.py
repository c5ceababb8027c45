"""Who gets in: the real console server on a folder store, asked over HTTP.

Anonymous requests are redirected to the login page (pages) or refused with 401 (API,
events, images); wrong passwords are refused, counted and rate-limited per client
address; cookies are HttpOnly and SameSite=Strict; state changes need the CSRF token and
an admin; deletions are audited in one log line; the quarantine is for admins only.
"""

from __future__ import annotations

import logging
import http.client
import time

import pytest

from console_helpers import ADMIN_PASSWORD, PASSWORD, Client, ConsoleThread, console_config, face
from facehub.cloud.console.auth import LoginLimiter, hash_password, verify_password
from facehub.cloud.storage import open_store
from facehub.config import ConfigError, SaverConfig


@pytest.fixture
def served(tmp_path):
    store = open_store(SaverConfig(url=str(tmp_path / "faces")))
    now = int(time.time() * 1000)
    for i in range(5):
        store.put_face(face("cam-a", now - i * 1000, seed=i))
    store.put_quarantine("faces/../x", b"junk", "topic suffix is not a device id", None)
    config = console_config(str(tmp_path / "faces"), tmp_path, login_attempts=3, login_window=600)
    with ConsoleThread(config) as console:
        yield console, store


def test_anonymous_requests_are_sent_to_log_in(served):
    console, _ = served
    client = Client(console.url)
    for path in ("/", "/fleet", "/quarantine", "/face/cam-a/2026/01/01/000000.000-x.jpg"):
        answer = client.get(path)
        assert answer.status == 303, path
        assert answer.headers["Location"].startswith("/login?next="), path
    for path in ("/api/faces", "/api/fleet", "/events", "/image/cam-a/2026/01/01/000000.000-x.jpg"):
        answer = client.get(path)
        assert answer.status == 401, path
    assert client.post("/delete", {"what": "device", "device": "cam-a"}).status == 303  # to the login page
    assert client.get("/healthz").status == 200
    login = client.get("/login")
    assert login.status == 200 and 'name="password"' in login.body
    assert "frame-ancestors 'none'" in login.headers["Content-Security-Policy"]


def test_login_sets_a_strict_http_only_cookie_and_logout_ends_the_session(served):
    console, _ = served
    client = Client(console.url)
    answer = client.login()
    assert answer.status == 303 and answer.headers["Location"] == "/"
    cookie = answer.headers["Set-Cookie"]
    assert "facehub_session=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = client.get("/")
    assert page.status == 200 and page.body.count('class="tile"') == 5
    assert client.get("/api/faces").status == 200
    token = client.csrf()
    assert client.post("/logout", {"csrf": "forged"}).status == 403
    assert client.post("/logout", {"csrf": token}).status == 303
    assert client.get("/").status == 303


def test_secure_cookie_by_default(tmp_path):
    config = console_config(str(tmp_path / "faces"), tmp_path, secure_cookies=True)
    with ConsoleThread(config) as console:
        client = Client(console.url)
        page = client.get("/login")
        assert "Secure" in page.headers["Set-Cookie"]
        token = page.headers["Set-Cookie"].split("facehub_login=", 1)[1].split(";", 1)[0]
        # a cookie jar keeps Secure cookies for HTTPS: send the login cookie by hand over plain HTTP
        answer = client.post("/login", {"csrf": token, "user": "viewer", "password": PASSWORD},
                             headers={"Cookie": f"facehub_login={token}"})
        assert answer.status == 303
        assert all(part in answer.headers["Set-Cookie"] for part in ("facehub_session=", "Secure", "HttpOnly",
                                                                       "SameSite=Strict"))


def test_wrong_passwords_are_refused_counted_and_rate_limited(served, caplog):
    console, _ = served
    client = Client(console.url)
    with caplog.at_level(logging.WARNING):
        for attempt in range(3):
            answer = client.login(password=f"guess-{attempt}")
            assert answer.status == 401 and "Wrong user name or password" in answer.body
            assert "facehub_session" not in answer.headers.get("Set-Cookie", "")
        assert console.runtime.counter("login_failures") == 3
        # the limit is reached: refused even with the right password, and says when to retry
        refused = client.login(password=PASSWORD)
        assert refused.status == 429 and int(refused.headers["Retry-After"]) > 500
        assert console.runtime.counter("login_refused") == 1
        assert client.get("/").status == 303
        assert client.login(user="nobody", password=PASSWORD).status == 429
    assert any("wrong user name or password" in r.getMessage() for r in caplog.records)
    assert any("refused: too many wrong passwords" in r.getMessage() for r in caplog.records)


def test_login_limiter_window():
    now = [1000.0]
    limiter = LoginLimiter(attempts=2, window=60, clock=lambda: now[0])
    assert limiter.blocked_for("a") == 0
    limiter.failed("a")
    now[0] += 30
    limiter.failed("a")
    assert limiter.blocked_for("a") == pytest.approx(30) and limiter.blocked_for("b") == 0
    now[0] += 31  # the first failure left the window
    assert limiter.blocked_for("a") == 0


def test_password_hashes():
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt:16384:8:1:") and stored != hash_password("correct horse")  # salted
    assert verify_password("correct horse", stored) and not verify_password("correct hors", stored)
    assert not verify_password("x", "scrypt:broken")
    with pytest.raises(ConfigError, match="console.password_hash"):
        from facehub.config import Config

        config = Config()
        config.console.password_hash = "plain-text"
        config.validate()


def test_csrf_admin_and_audit_on_deletion(served, caplog):
    console, store = served
    viewer, admin = Client(console.url), Client(console.url)
    viewer.login()
    admin.login("admin", ADMIN_PASSWORD)
    key = admin.get("/").body.split('data-key="', 1)[1].split('"', 1)[0]
    assert viewer.post("/delete", {"csrf": viewer.csrf(), "what": "face", "key": key}).status == 403
    assert admin.post("/delete", {"csrf": "forged", "what": "face", "key": key}).status == 403
    assert admin.post("/delete", {"what": "face", "key": key}).status == 403
    assert viewer.get("/quarantine").status == 403
    quarantine = admin.get("/quarantine")
    assert quarantine.status == 200 and "topic suffix is not a device id" in quarantine.body
    with caplog.at_level(logging.INFO, logger="facehub.audit"):
        assert admin.post("/delete", {"csrf": admin.csrf(), "what": "face", "key": key}).status == 303
        day = key.split("/", 1)[1].rsplit("/", 1)[0].replace("/", "-")
        assert admin.post("/delete", {"csrf": admin.csrf(), "what": "day", "device": "cam-a", "day": day}).status \
            == 303
    lines = [r.getMessage() for r in caplog.records if r.name == "facehub.audit"]
    assert lines == [f"audit: admin deleted face {key}: 1 faces (from 127.0.0.1)",
                     f"audit: admin deleted day {day.replace('-', '/')} of device cam-a: 4 faces (from 127.0.0.1)"]
    assert admin.get("/api/faces").body == '{"faces": [], "next": null}'
    assert admin.post("/delete", {"csrf": admin.csrf(), "what": "face", "key": "../../etc/passwd"}).status == 400


def test_trusted_proxy_header(tmp_path):
    config = console_config(str(tmp_path / "faces"), tmp_path, proxy_user_header="X-Forwarded-User",
                            trusted_proxy="127.0.0.1", proxy_admins="carol")
    with ConsoleThread(config) as console:
        client = Client(console.url)
        assert client.get("/", headers={"X-Forwarded-User": "dave"}).status == 200
        assert client.get("/quarantine", headers={"X-Forwarded-User": "dave"}).status == 403
        assert client.get("/quarantine", headers={"X-Forwarded-User": "carol"}).status == 200
        assert client.get("/").status == 303  # no header: log in as usual
    config = console_config(str(tmp_path / "faces"), tmp_path, proxy_user_header="X-Forwarded-User",
                            trusted_proxy="192.0.2.1")
    with ConsoleThread(config) as console:  # the header from anyone else is ignored
        assert Client(console.url).get("/", headers={"X-Forwarded-User": "dave"}).status == 303


def test_https_with_the_brokers_ca(tmp_path):
    """containers/mosquitto/make-cloud-config.sh signs the console's certificate with the broker's CA:
    the console serves HTTPS with it, a client that trusts that CA connects, `facehub console ping` passes."""
    import os
    import ssl
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "cloud-config"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    made = subprocess.run(["bash", str(root / "containers/mosquitto/make-cloud-config.sh"), str(out), "localhost",
                           "cam-1"], env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    config = console_config(str(tmp_path / "faces"), tmp_path, secure_cookies=True,
                            tls_cert=str(out / "console" / "console.crt"),
                            tls_key=str(out / "console" / "console.key"))
    with ConsoleThread(config):
        context = ssl.create_default_context(cafile=str(out / "mosquitto" / "tls" / "ca.crt"))
        with urllib.request.urlopen(f"https://localhost:{config.console.port}/healthz", context=context,
                                    timeout=10) as answer:
            assert answer.status == 200
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP is not served
            urllib.request.urlopen(f"http://127.0.0.1:{config.console.port}/healthz", timeout=10)
        ping = subprocess.run([sys.executable, "-m", "facehub.cli", "console", "ping"], cwd=root, timeout=60,
                              capture_output=True, text=True,
                              env={**os.environ, "FACEHUB_CONSOLE_PORT": str(config.console.port),
                                   "FACEHUB_CONSOLE_TLS_CERT": config.console.tls_cert,
                                   "FACEHUB_CONSOLE_TLS_KEY": config.console.tls_key})
        assert ping.returncode == 0, ping.stdout + ping.stderr


def test_command_line_hash_and_refusal_without_an_account(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {key: value for key, value in os.environ.items() if not key.startswith("FACEHUB_")}
    env["FACEHUB_SUPERVISOR_STATE_DIR"] = str(tmp_path / "state")
    made = subprocess.run([sys.executable, "-m", "facehub.cli", "console", "hash-password"], input="a long password\n",
                          cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and verify_password("a long password", made.stdout.strip())
    short = subprocess.run([sys.executable, "-m", "facehub.cli", "console", "hash-password"], input="short\n",
                           cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert short.returncode == 1 and "at least 8" in short.stderr
    refused = subprocess.run([sys.executable, "-m", "facehub.cli", "console"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "no account" in refused.stderr
    enabled = subprocess.run([sys.executable, "-m", "facehub.cli", "run", "cloud"], cwd=root, timeout=60,
                             env={**env, "FACEHUB_CONSOLE_ENABLED": "true"}, capture_output=True, text=True)
    assert enabled.returncode == 2 and "console.password_hash" in enabled.stderr
