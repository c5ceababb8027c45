"""``facehub console [ACTION]``: the web console and its tools.

    facehub console                    serve the console (console.host:console.port) in the foreground
    facehub console hash-password      print a password hash for console.password_hash / admin_password_hash
    facehub console apply-retention    one round of retention now (S3: the lifecycle rule; folder: a sweep)
    facehub console ping               exit 0 when the console on this machine answers /healthz (healthchecks)

This module stays light: the command line imports it to build its parser.
"""

from __future__ import annotations

import argparse
import getpass
import sys

ACTIONS = ("serve", "hash-password", "apply-retention", "ping")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="serve", choices=ACTIONS,
                        help="serve (default), hash-password, apply-retention or ping")


def needs_config(args: argparse.Namespace) -> bool:
    return args.action != "hash-password"


def hash_password(stdin=None, stdout=None) -> int:
    """Read a password (twice on a terminal, one line otherwise) and print its hash."""
    from facehub.cloud.console.auth import hash_password as make_hash

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if stdin.isatty():
        password = getpass.getpass("New console password: ")
        if password != getpass.getpass("Again: "):
            print("facehub console: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        print("facehub console: use at least 8 characters", file=sys.stderr)
        return 1
    print(make_hash(password), file=stdout)
    return 0


def main(args: argparse.Namespace, config) -> int:
    if args.action == "hash-password":
        return hash_password()
    if args.action == "apply-retention":
        from facehub.cloud.console import retention

        try:
            print(retention.apply(config))
        except Exception as error:
            print(f"facehub console apply-retention: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        return 0
    if args.action == "ping":
        return ping(config)
    if not (config.console.password_hash or config.console.admin_password_hash or config.console.proxy_user_header):
        print("facehub console: no account: set console.password_hash or console.admin_password_hash "
              "(facehub console hash-password), or console.proxy_user_header", file=sys.stderr)
        return 2
    from facehub.cli import run_foreground

    return run_foreground(config, "console")


def ping(config, timeout: float = 5.0) -> int:
    """GET /healthz of the console on this machine (loopback when it listens on every address)."""
    import ssl
    import urllib.request

    host = config.console.host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    scheme = "https" if config.console.tls_cert else "http"
    url = f"{scheme}://{host if ':' not in host else f'[{host}]'}:{config.console.port}/healthz"
    context = None
    if scheme == "https":  # our own process on this machine: liveness, not identity
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            ok = answer.status == 200
    except OSError as error:
        print(f"console: {url}: {error}")
        return 1
    print(f"console: {url}: {'ok' if ok else 'not ok'}")
    return 0 if ok else 1
