"""The console's web server: aiohttp, server-rendered pages, a little JavaScript, server-sent events.

Routes (every one but ``/login``, ``/healthz`` and ``/static/`` needs a session):

=====================  ==============================================================
``GET /``              the gallery: newest faces first, filters, pages, live new faces
``GET /face/<key>``    one face: the crop, its metadata, the other crops of its track
``GET /image/<key>``   a stored face's bytes
``GET /fleet``         one row per device (``?fragment=1``: the table alone)
``GET /quarantine``    rejected messages (admins)
``POST /delete``       delete a face, a device's day or a device (admins; audited)
``GET /events``        server-sent events: ``face`` (a new face), ``fleet`` (a change)
``GET /api/faces``     a gallery page as JSON; ``GET /api/fleet``: the fleet as JSON
=====================  ==============================================================

An anonymous request for a page is redirected to ``/login``; for the API, the events
and images it gets 401. Store calls block, so they run on a thread pool; the event loop
only renders and streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from facehub.cloud.console import auth
from facehub.cloud.console.fleet import FleetWatch, ago, fleet_rows, sparkline
from facehub.cloud.console.gallery import WARM_EVERY, FaceRef, Gallery, iso, parse_range
from facehub.cloud.storage import open_store
from facehub.config import Config
from facehub.runtime import Runtime

log = logging.getLogger(__name__)
audit = logging.getLogger("facehub.audit")

PUBLIC = ("/login", "/healthz", "/static/")
API = ("/api/", "/events", "/image/")
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
SSE_QUEUE = 500
SSE_KEEPALIVE = 15.0
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
SESSION_KEY = web.RequestKey("session", object)


class Console:
    """Everything one console process holds: the gallery, the fleet watch, sessions, subscribers."""

    def __init__(self, config: Config, runtime: Runtime | None = None):
        self.config = config
        self.settings = config.console
        self.runtime = runtime or Runtime("console")
        self.store = open_store(config.saver)
        self.gallery = Gallery(self.store, recent_ttl=max(5.0, 5 * self.settings.poll_interval))
        self.accounts = auth.Accounts(self.settings)
        self.sessions = auth.Sessions(self.settings.session_hours)
        self.limiter = auth.LoginLimiter(self.settings.login_attempts, self.settings.login_window)
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="console")
        self.subscribers: set[asyncio.Queue] = set()
        self.closing = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fleet = FleetWatch(config, self.settings.client_id, on_change=self._fleet_changed)
        self.proxy_admins = {name.strip() for name in self.settings.proxy_admins.split(",") if name.strip()}
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("facehub.cloud.console", "templates"),
            autoescape=jinja2.select_autoescape(default=True, default_for_string=True), trim_blocks=True,
            lstrip_blocks=True)
        self.templates.globals.update(iso=iso, ago=ago, sparkline=sparkline, urlencode=urlencode)

    async def blocking(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    # -- the application ----------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self.headers_middleware, self.auth_middleware],
                              client_max_size=64 * 1024)
        static = resources.files("facehub.cloud.console") / "static"
        app.add_routes([
            web.get("/login", self.login_page), web.post("/login", self.login),
            web.post("/logout", self.logout), web.get("/healthz", self.healthz),
            web.get("/", self.gallery_page), web.get("/api/faces", self.faces_api),
            web.get("/face/{key:.+}", self.face_page), web.get("/image/{key:.+}", self.image),
            web.get("/fleet", self.fleet_page), web.get("/api/fleet", self.fleet_api),
            web.get("/events", self.events), web.post("/delete", self.delete),
            web.get("/quarantine", self.quarantine_page),
            web.get("/quarantine/payload/{stem:.+}", self.quarantine_payload),
            web.static("/static", str(static)),
        ])
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.loop = asyncio.get_running_loop()
        self.fleet.start()
        self._poller = asyncio.create_task(self._poll_store())

    async def _on_shutdown(self, app: web.Application) -> None:
        self.closing.set()
        self._poller.cancel()
        for queue in list(self.subscribers):
            queue.put_nowait(None)

    def close(self) -> None:
        self.fleet.stop()
        self.gallery.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- middlewares --------------------------------------------------------------------------

    @web.middleware
    async def headers_middleware(self, request: web.Request, handler):
        try:
            response = await handler(request)
        except web.HTTPException as error:
            response = error
        for name, value in SECURITY_HEADERS.items():
            if name == "Cache-Control" and name in response.headers:
                continue
            response.headers.setdefault(name, value)
        if isinstance(response, web.HTTPException) and response.status >= 400:
            raise response
        return response

    @web.middleware
    async def auth_middleware(self, request: web.Request, handler):
        if request.path.startswith(PUBLIC):
            return await handler(request)
        session = self.session_of(request)
        if session is None:
            if request.path.startswith(API):
                raise web.HTTPUnauthorized(text=json.dumps({"error": "log in first"}),
                                           content_type="application/json")
            raise web.HTTPSeeOther("/login?" + urlencode({"next": request.path_qs}))
        request[SESSION_KEY] = session
        return await handler(request)

    def client_address(self, request: web.Request) -> str:
        remote = request.remote or "?"
        forwarded = request.headers.get("X-Forwarded-For")
        if self.settings.trusted_proxy and remote == self.settings.trusted_proxy and forwarded:
            return forwarded.split(",")[-1].strip() or remote
        return remote

    def session_of(self, request: web.Request) -> auth.Session | None:
        header = self.settings.proxy_user_header
        if header and self.settings.trusted_proxy and request.remote == self.settings.trusted_proxy:
            user = request.headers.get(header, "").strip()
            if user:
                return self.sessions.for_proxy_user(user[:128], user in self.proxy_admins)
        return self.sessions.get(request.cookies.get(auth.COOKIE))

    # -- logging in ---------------------------------------------------------------------------

    def render(self, template: str, request: web.Request | None = None, status: int = 200,
               **values: Any) -> web.Response:
        session = request.get(SESSION_KEY) if request is not None else None
        body = self.templates.get_template(template).render(session=session, **values)
        return web.Response(text=body, content_type="text/html", charset="utf-8", status=status)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def login_page(self, request: web.Request, message: str = "", status: int = 200) -> web.Response:
        token = request.cookies.get(auth.LOGIN_COOKIE) or auth.secrets.token_urlsafe(24)
        response = self.render("login.html", status=status, token=token, message=message,
                               next=auth.safe_next(request.query.get("next")))
        response.set_cookie(auth.LOGIN_COOKIE, token, httponly=True, secure=self.settings.secure_cookies,
                            samesite="Strict", path="/login", max_age=3600)
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        address = self.client_address(request)
        wait = self.limiter.blocked_for(address)
        if wait:
            self.runtime.count("login_refused")
            log.warning("console: login from %s refused: too many wrong passwords (retry in %.0fs)", address, wait)
            response = await self.login_page(request, f"Too many wrong passwords: try again in {wait:.0f} s.", 429)
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        if not auth.same_token(form.get("csrf"), request.cookies.get(auth.LOGIN_COOKIE)):
            self.runtime.count("csrf_refused")
            return await self.login_page(request, "The form expired: please try again.", 400)
        user, password = str(form.get("user", ""))[:128], str(form.get("password", ""))
        checked = await self.blocking(self.accounts.check, user, password)
        if checked is None:
            failures = self.limiter.failed(address)
            self.runtime.count("login_failures")
            log.warning("console: wrong user name or password for %r from %s (%d in the window)", user, address,
                        failures)
            return await self.login_page(request, "Wrong user name or password.", 401)
        self.limiter.succeeded(address)
        session = self.sessions.start(checked.user, checked.admin)
        self.runtime.count("logins")
        log.info("console: %s logged in from %s%s", session.user, address, " (admin)" if session.admin else "")
        response = web.HTTPSeeOther(auth.safe_next(str(form.get("next", "/"))))
        response.set_cookie(auth.COOKIE, session.token, httponly=True, secure=self.settings.secure_cookies,
                            samesite="Strict", path="/", max_age=int(self.settings.session_hours * 3600))
        response.del_cookie(auth.LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        form = await request.post()
        if not auth.same_token(form.get("csrf"), session.csrf):
            raise web.HTTPForbidden(text="bad CSRF token")
        self.sessions.end(request.cookies.get(auth.COOKIE))
        response = web.HTTPSeeOther("/login")
        response.del_cookie(auth.COOKIE, path="/")
        return response

    # -- the gallery --------------------------------------------------------------------------

    def _filters(self, request: web.Request) -> dict[str, Any]:
        query = request.query
        device = query.get("device") or None
        try:
            start_ms, end_ms = parse_range(query.get("day"), query.get("from"), query.get("to"))
            before = FaceRef.from_cursor(query["before"]) if query.get("before") else None
        except ValueError as error:
            raise web.HTTPBadRequest(text=f"bad filter: {error}")
        return {"device": device, "day": query.get("day", ""), "from": query.get("from", ""),
                "to": query.get("to", ""), "start_ms": start_ms, "end_ms": end_ms, "before": before}

    async def _page(self, filters: dict[str, Any]):
        started = time.perf_counter()
        page = await self.blocking(lambda: self.gallery.page(filters["device"], filters["start_ms"],
                                                             filters["end_ms"], filters["before"],
                                                             self.settings.page_size))
        self.runtime.observe("page_ms", (time.perf_counter() - started) * 1000)
        self.runtime.count("pages")
        return page

    async def gallery_page(self, request: web.Request) -> web.Response:
        filters = self._filters(request)
        page, devices = await asyncio.gather(self._page(filters), self.blocking(self.gallery.devices))
        query = {k: filters[k] for k in ("device", "day", "from", "to") if filters[k]}
        next_url = "/?" + urlencode({**query, "before": page.next_cursor}) if page.next_cursor else None
        return self.render("gallery.html", request, page=page, devices=devices, filters=filters,
                           next_url=next_url, first_url="/?" + urlencode(query), live=filters["before"] is None)

    async def faces_api(self, request: web.Request) -> web.Response:
        page = await self._page(self._filters(request))
        return web.json_response({"faces": [face.as_json() for face in page.faces], "next": page.next_cursor})

    def _ref(self, request: web.Request) -> FaceRef:
        try:
            return FaceRef.from_key(request.match_info["key"])
        except ValueError:
            raise web.HTTPNotFound(text="no such face")

    async def face_page(self, request: web.Request) -> web.Response:
        ref = self._ref(request)
        try:
            meta = await self.blocking(self.gallery.metadata, ref)
        except (FileNotFoundError, ValueError):
            raise web.HTTPNotFound(text="no such face (deleted, or expired by retention?)")
        track = meta.get("track")
        others = await self.blocking(self.gallery.same_track, ref, track) if track else []
        return self.render("face.html", request, face=ref, meta=meta, track=track, others=others,
                           day=ref.day.replace("/", "-"))

    async def image(self, request: web.Request) -> web.Response:
        ref = self._ref(request)
        try:
            data = await self.blocking(self.store.read, ref.key)
        except (FileNotFoundError, ValueError):
            raise web.HTTPNotFound(text="no such face")
        return web.Response(body=data, content_type=CONTENT_TYPES[ref.name.rsplit(".", 1)[1]],
                            headers={"Cache-Control": "private, max-age=86400, immutable"})

    # -- deleting (admins) --------------------------------------------------------------------

    async def delete(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        form = await request.post()
        if not auth.same_token(form.get("csrf"), session.csrf):
            self.runtime.count("csrf_refused")
            raise web.HTTPForbidden(text="bad CSRF token")
        if not session.admin:
            raise web.HTTPForbidden(text="only an admin may delete faces")
        what = form.get("what")
        try:
            if what == "face":
                ref = FaceRef.from_key(str(form.get("key", "")))
                count = await self.blocking(self.gallery.delete_face, ref)
                target, back = f"face {ref.key}", "/?" + urlencode({"device": ref.device})
            elif what == "day":
                device, day = self._device(form), str(form.get("day", "")).replace("-", "/")
                FaceRef.from_key(f"{device}/{day}/000000.000-x.jpg")  # validates both
                count = await self.blocking(self.gallery.delete_day, device, day)
                target, back = f"day {day} of device {device}", "/?" + urlencode({"device": device})
            elif what == "device":
                device = self._device(form)
                count = await self.blocking(self.gallery.delete_device, device)
                target, back = f"device {device} (every day)", "/"
            else:
                raise ValueError(f"unknown deletion {str(what)[:20]!r}")
        except ValueError as error:
            raise web.HTTPBadRequest(text=str(error))
        self.runtime.count("deleted_faces", count)
        audit.info("audit: %s deleted %s: %d faces (from %s)", session.user, target, count,
                   self.client_address(request))
        return web.HTTPSeeOther(back)

    @staticmethod
    def _device(form) -> str:
        device = str(form.get("device", ""))
        FaceRef.from_key(f"{device}/2000/01/01/000000.000-x.jpg")  # a valid device id, else ValueError
        return device

    # -- the fleet ----------------------------------------------------------------------------

    async def _fleet_rows(self) -> list[dict[str, Any]]:
        def collect():
            devices = self.gallery.devices()
            summaries = dict(zip(devices, self.gallery._pool.map(self.gallery.device_summary, devices)))
            return devices, summaries

        devices, summaries = await self.blocking(collect)
        return fleet_rows(devices, summaries, self.fleet.snapshot(), self.settings.offline_after, time.time())

    async def fleet_page(self, request: web.Request) -> web.Response:
        rows = await self._fleet_rows()
        template = "fleet_table.html" if request.query.get("fragment") else "fleet.html"
        return self.render(template, request, rows=rows, broker=self.fleet.state.connected.is_set(),
                           now=time.time())

    async def fleet_api(self, request: web.Request) -> web.Response:
        rows = await self._fleet_rows()
        for row in rows:
            row["last_face"] = row["last_face"].key if row["last_face"] is not None else None
        return web.json_response({"devices": rows, "broker_connected": self.fleet.state.connected.is_set()})

    def _fleet_changed(self, device: str) -> None:
        """From the MQTT thread: tell the browsers (on the event loop)."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.broadcast, "fleet", {"device": device})

    # -- quarantine (admins) ------------------------------------------------------------------

    async def quarantine_page(self, request: web.Request) -> web.Response:
        session = request[SESSION_KEY]
        if not session.admin:
            raise web.HTTPForbidden(text="only an admin may see the quarantine")
        prefix = self.store.quarantine_prefix.strip("/")

        def collect(wanted: str | None):
            days = []
            for year in sorted(self.store.list_dir(prefix)[0], reverse=True):
                for month in sorted(self.store.list_dir(f"{prefix}/{year}")[0], reverse=True):
                    days += [f"{year}/{month}/{day}" for day in
                             sorted(self.store.list_dir(f"{prefix}/{year}/{month}")[0], reverse=True)]
            day = wanted if wanted in days else (days[0] if days else None)
            items = []
            if day:
                files = self.store.list_dir(f"{prefix}/{day}")[1]
                for name in sorted((n for n in files if n.endswith(".json")), reverse=True)[:200]:
                    stem = f"{prefix}/{day}/{name[:-5]}"
                    try:
                        record = self.store.read_record(stem)
                    except (OSError, ValueError):
                        record = {"reason": "(record unreadable)"}
                    items.append({"stem": stem, "record": record})
                items.sort(key=lambda item: item["record"].get("received-ms", 0), reverse=True)
            return days, day, items

        days, day, items = await self.blocking(collect, request.query.get("day"))
        return self.render("quarantine.html", request, days=days, day=day, items=items)

    async def quarantine_payload(self, request: web.Request) -> web.Response:
        session = request[SESSION_KEY]
        if not session.admin:
            raise web.HTTPForbidden(text="only an admin may see the quarantine")
        stem = request.match_info["stem"]
        if not stem.startswith(self.store.quarantine_prefix.strip("/") + "/"):
            raise web.HTTPNotFound()
        try:
            data = await self.blocking(self.store.read, f"{stem}.bin")
        except (FileNotFoundError, ValueError):
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="application/octet-stream",
                            headers={"Content-Disposition": f'attachment; filename="{stem.rsplit("/", 1)[-1]}.bin"'})

    # -- live: server-sent events ---------------------------------------------------------------

    def broadcast(self, event: str, data: dict[str, Any]) -> None:
        message = f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:  # a client that does not read: drop it, its browser reconnects
                self.subscribers.discard(queue)

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue: asyncio.Queue = asyncio.Queue(SSE_QUEUE)
        self.subscribers.add(queue)
        self.runtime.gauge("live_clients", len(self.subscribers))
        try:
            await response.write(b"retry: 2000\n: connected\n\n")
            while not self.closing.is_set():
                try:
                    message = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE)
                except asyncio.TimeoutError:
                    message = b": keep-alive\n\n"
                if message is None or queue not in self.subscribers:
                    break
                await response.write(message)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.subscribers.discard(queue)
            self.runtime.gauge("live_clients", len(self.subscribers))
        return response

    async def _poll_store(self) -> None:
        """Look for new faces every ``poll_interval``; each one becomes a ``face`` event."""
        known: dict = {}
        prime, warmed = True, 0.0
        while not self.closing.is_set():
            started = time.perf_counter()
            try:
                if time.monotonic() - warmed >= WARM_EVERY:
                    warmed = time.monotonic()
                    await self.blocking(self.gallery.warm, self.settings.page_size)
                new = await self.blocking(self.gallery.poll, known, prime)
                prime = False
                for ref in new[-200:]:
                    self.broadcast("face", {**ref.as_json(), "url": f"/face/{ref.key}",
                                            "image": f"/image/{ref.key}"})
                if new:
                    self.runtime.count("faces_seen", len(new))
                    self.broadcast("fleet", {"device": "*"})
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.runtime.count("poll_errors")
                log.warning("console: cannot look for new faces in %s: %s: %s", self.store.describe(),
                            type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
            self.runtime.observe("poll_ms", (time.perf_counter() - started) * 1000)
            try:
                await asyncio.wait_for(self.closing.wait(), self.settings.poll_interval)
            except asyncio.TimeoutError:
                pass


def ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.console.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.console.tls_cert, config.console.tls_key)
    return context


def url_of(config: Config) -> str:
    scheme = "https" if config.console.tls_cert else "http"
    return f"{scheme}://{config.console.host}:{config.console.port}/"


async def serve(config: Config, runtime: Runtime) -> None:
    """Serve until ``runtime.stop`` is set, beating the heartbeat meanwhile."""
    console = Console(config, runtime)
    app = console.make_app()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=3.0)
    await runner.setup()
    site = web.TCPSite(runner, config.console.host, config.console.port, ssl_context=ssl_context(config),
                       reuse_address=True)
    try:
        await site.start()
        log.info("console on %s (store %s, status topics %s/+/availability|stats)", url_of(config),
                 console.store.describe(), config.console.status_prefix)
        runtime.gauge("serving", True)
        while not runtime.stop.is_set():
            runtime.beat()
            runtime.gauge("live_clients", len(console.subscribers))
            await asyncio.sleep(0.5)
    finally:
        runtime.gauge("serving", False)
        await runner.cleanup()
        console.close()
        runtime.flush()


def run(config: Config, runtime: Runtime) -> None:
    """The ``console`` component: ``facehub console``, or a child of ``facehub run cloud``."""
    asyncio.run(serve(config, runtime))
