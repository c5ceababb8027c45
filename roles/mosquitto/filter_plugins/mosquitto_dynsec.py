"""Filters for the broker's accounts: password hashes for the dynamic security plugin, password checks.

``mosquitto_dynsec_password`` hashes a password the way mosquitto's dynamic security
plugin (and ``mosquitto_passwd``) does: PBKDF2-SHA512 over a random 12-byte salt, 64 bytes
of hash, ``iterations`` rounds (mosquitto 2.0's default is 101). A hash that is already
deployed and still verifies for the same password and iteration count is kept, so the
file only changes (and the broker only restarts) when a password does.

``mosquitto_password_problems`` says what is wrong with a set of passwords without ever
showing one: missing, too short, a known placeholder, equal to its user name, or shared
with another account that must not know it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re

SALT_BYTES = 12  # the plugin refuses any other salt length
HASH_BYTES = 64  # SHA-512
DEFAULT_ITERATIONS = 101  # mosquitto 2.0's default (mosquitto_passwd, mosquitto_ctrl)
# Placeholders of inventory/group_vars/all/vault.yml.example and of earlier examples.
PLACEHOLDER = re.compile(r"change[ _-]*me|replace[ _-]*me|placeholder|openssl rand", re.IGNORECASE)


def _pbkdf2(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha512", str(password).encode(), salt, int(iterations), HASH_BYTES)


def _verifies(entry: dict, password: str, iterations: int) -> bool:
    """True when ``entry`` (a client of a dynamic security file) holds a hash of ``password``."""
    try:
        if int(entry.get("iterations", 0)) != int(iterations):
            return False
        salt = base64.b64decode(entry["salt"], validate=True)
        stored = base64.b64decode(entry["password"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        return False
    return len(salt) == SALT_BYTES and hmac.compare_digest(stored, _pbkdf2(password, salt, iterations))


def mosquitto_dynsec_password(password: str, username: str, previous=None,
                              iterations: int = DEFAULT_ITERATIONS) -> dict:
    """``{"password", "salt", "iterations"}`` of a dynamic security client for ``password``.

    ``previous`` is the ``clients`` list of the deployed file (or nothing): the entry of
    ``username`` is returned unchanged when it still verifies, else a new random salt is drawn.
    """
    if not password:
        raise ValueError(f"empty password for mosquitto user {username!r}")
    iterations = int(iterations)
    if iterations < 1:
        raise ValueError("mosquitto_password_iterations must be at least 1")
    for entry in previous or []:
        if isinstance(entry, dict) and entry.get("username") == username and _verifies(entry, password, iterations):
            return {"password": entry["password"], "salt": entry["salt"], "iterations": iterations}
    salt = os.urandom(SALT_BYTES)
    return {"password": base64.b64encode(_pbkdf2(password, salt, iterations)).decode(),
            "salt": base64.b64encode(salt).decode(),
            "iterations": iterations}


def mosquitto_password_problems(passwords: dict, accounts, min_length: int = 16, placeholders=(),
                                shared=()) -> list:
    """One line per refused account (``"cam-1: shorter than 16 characters"``), never a password.

    ``accounts`` are the user names that need a password in ``passwords``;
    ``placeholders`` are values refused as they are (besides anything that reads like one);
    ``shared`` lists accounts allowed to share one password with each other (the savers).
    """
    problems = []
    owners: dict[str, list[str]] = {}
    placeholders = {str(value) for value in placeholders or ()}
    for account in accounts:
        password = (passwords or {}).get(account)
        if password is None or password == "":
            problems.append(f"{account}: no password")
            continue
        password = str(password)
        if len(password) < int(min_length):
            problems.append(f"{account}: shorter than {int(min_length)} characters")
        elif password in placeholders or PLACEHOLDER.search(password):
            problems.append(f"{account}: still the example placeholder")
        elif password == account:
            problems.append(f"{account}: the user name as password")
        else:
            owners.setdefault(password, []).append(account)
    shared = set(shared or ())
    for names in owners.values():
        apart = [name for name in names if name not in shared]
        if len(names) > 1 and apart:
            problems.append(f"{', '.join(names)}: one password for several accounts "
                            "(a device would know another's)")
    return problems


class FilterModule:
    """Ansible entry point."""

    def filters(self):
        return {"mosquitto_dynsec_password": mosquitto_dynsec_password,
                "mosquitto_password_problems": mosquitto_password_problems}
