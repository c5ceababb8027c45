"""systemd's notify protocol (``sd_notify``), a no-op without ``NOTIFY_SOCKET``.

Under a ``Type=notify`` unit with ``WatchdogSec=``, the supervisor says
``READY=1`` once every child is up, ``WATCHDOG=1`` while all are healthy,
``STATUS=...`` lines and ``STOPPING=1``; systemd then restarts a hung daemon.
The protocol is one datagram per message on a unix socket, so no library is
needed for it.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends notify messages to ``$NOTIFY_SOCKET`` when it is set."""

    def __init__(self, address: str | None = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        self.sock: socket.socket | None = None
        if address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def notify(self, message: str) -> bool:
        """Send one message; False when disabled or the socket is gone (never raises)."""
        if self.sock is None:
            return False
        try:
            self.sock.sendto(message.encode(), self.address)
            return True
        except OSError as error:
            log.debug("sd_notify %r failed: %s", message, error)
            return False
