"""The ``mosquitto_passwd`` filter: a password hashed as mosquitto_passwd writes it.

Mosquitto 2 reads ``user:$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>``.
The salt is derived from the user name and the password, so the same inputs give the
same line: the password file only changes (and the broker only restarts) when a
password does.
"""

from __future__ import annotations

import base64
import hashlib

SALT_BYTES = 12
HASH_BYTES = 64


def mosquitto_passwd(password: str, username: str, iterations: int = 101) -> str:
    """Return the ``$7$`` hash of ``password`` for ``username``."""
    if not password:
        raise ValueError(f"empty password for mosquitto user {username!r}")
    seed = f"mosquitto-salt:{username}:{password}".encode()
    salt = hashlib.sha512(seed).digest()[:SALT_BYTES]
    digest = hashlib.pbkdf2_hmac("sha512", str(password).encode(), salt, int(iterations), HASH_BYTES)
    return "$7${}${}${}".format(int(iterations), base64.b64encode(salt).decode(),
                                base64.b64encode(digest).decode())


class FilterModule:
    """Ansible entry point."""

    def filters(self):
        return {"mosquitto_passwd": mosquitto_passwd}
