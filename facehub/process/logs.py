"""One log format for the supervisor and its children.

Children write straight to the stderr they inherit (a terminal, the container's
log, or ``--logfile`` in daemon mode), each line tagged with the child's name
(``%(processName)s``). No shared queue or lock sits between them: a child that
is frozen or killed mid-write cannot hold up the others or the supervisor.
"""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Log to stderr at ``level``, replacing any handler set before (a child inherits none)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
