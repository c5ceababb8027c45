"""Who may use the console: password hashes, sessions, CSRF tokens, the login rate limit.

- **Passwords** are never stored, only ``scrypt:N:r:p:<salt>:<hash>`` (hashlib's scrypt,
  a random 16-byte salt, base64), made by ``facehub console hash-password``; checking
  one takes tens of milliseconds and runs off the event loop.
- **Sessions** live in this process's memory: a random token in a cookie that is
  ``HttpOnly``, ``SameSite=Strict`` and ``Secure`` (configurable for plain-HTTP tests).
  A restart logs everyone out, and logging out really ends the session.
- **CSRF**: every state-changing form carries the session's token, compared in constant
  time; the login form carries a token bound to a pre-login cookie.
- **Rate limit**: wrong passwords are counted per client address; after
  ``login_attempts`` within ``login_window`` that address is refused (HTTP 429) until
  the oldest failure leaves the window, even with the right password.
- **Reverse proxy** (off by default): with ``proxy_user_header`` set, a request from
  ``trusted_proxy`` carrying that header is that user; from anywhere else the header
  is ignored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from facehub.config import ConsoleConfig

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES = 16
MAX_PASSWORD = 1024  # longer inputs are refused before hashing (no CPU to burn)
COOKIE = "facehub_session"
LOGIN_COOKIE = "facehub_login"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt:N:r:p:<salt>:<hash>`` for ``password`` with a random salt."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return ":".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored`` (a hash_password result); constant-time compare."""
    try:
        kind, n, r, p, salt, digest = stored.split(":")
        if kind != "scrypt" or len(password) > MAX_PASSWORD:
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected), maxmem=128 * int(r) * int(n) * 2 + 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


@dataclass
class Session:
    user: str
    admin: bool
    csrf: str
    expires: float  # monotonic
    token: str = ""


@dataclass
class Accounts:
    """The configured accounts: name -> (password hash, admin)."""

    config: ConsoleConfig
    _dummy: str = field(default_factory=lambda: hash_password(secrets.token_hex(8)))

    def check(self, user: str, password: str) -> Session | None:
        """A new session for the right user name and password, else None (same work either way)."""
        accounts = {}
        if self.config.password_hash:
            accounts[self.config.user] = (self.config.password_hash, False)
        if self.config.admin_password_hash:
            accounts[self.config.admin_user] = (self.config.admin_password_hash, True)
        stored, admin = accounts.get(user, (self._dummy, False))
        ok = verify_password(password, stored) and user in accounts
        return Session(user=user, admin=admin, csrf="", expires=0.0) if ok else None

    @property
    def any(self) -> bool:
        return bool(self.config.password_hash or self.config.admin_password_hash or self.config.proxy_user_header)


class Sessions:
    """Server-side sessions by random token (thread-safe)."""

    def __init__(self, hours: float):
        self.lifetime = hours * 3600
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def start(self, user: str, admin: bool) -> Session:
        session = Session(user=user, admin=admin, csrf=secrets.token_urlsafe(32),
                          expires=time.monotonic() + self.lifetime, token=secrets.token_urlsafe(32))
        with self._lock:
            now = time.monotonic()
            for token in [t for t, s in self._sessions.items() if s.expires < now]:
                del self._sessions[token]
            self._sessions[session.token] = session
        return session

    def for_proxy_user(self, user: str, admin: bool) -> Session:
        """The session of a user the reverse proxy vouches for: one per user, so CSRF tokens hold."""
        token = f"proxy:{user}"
        with self._lock:
            session = self._sessions.get(token)
            if session is None or session.expires < time.monotonic() or session.admin != admin:
                session = Session(user=user, admin=admin, csrf=secrets.token_urlsafe(32),
                                  expires=time.monotonic() + self.lifetime, token=token)
                self._sessions[token] = session
            return session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            session = self._sessions.get(token)
            if session and session.expires < time.monotonic():
                del self._sessions[token]
                return None
            return session

    def end(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)


class LoginLimiter:
    """Wrong passwords per client address in a sliding window (thread-safe)."""

    def __init__(self, attempts: int, window: float, clock=time.monotonic):
        self.attempts = attempts
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, address: str) -> deque[float]:
        now = self.clock()
        failures = self._failures.setdefault(address, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures

    def blocked_for(self, address: str) -> float:
        """Seconds until ``address`` may try again (0 = it may now)."""
        with self._lock:
            failures = self._recent(address)
            if len(failures) < self.attempts:
                return 0.0
            return max(0.0, failures[0] + self.window - self.clock())

    def failed(self, address: str) -> int:
        """Count a wrong password; returns the failures of ``address`` in the window."""
        with self._lock:
            failures = self._recent(address)
            failures.append(self.clock())
            if len(self._failures) > 10_000:  # bounded memory under a spray of addresses
                for key in [k for k, v in self._failures.items() if not v][:5000]:
                    del self._failures[key]
            return len(failures)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)


def same_token(given: str | None, expected: str | None) -> bool:
    return bool(given and expected) and hmac.compare_digest(given.encode(), expected.encode())


def safe_next(target: str | None) -> str:
    """A local path to go to after logging in (never another site: no '//' or scheme)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
