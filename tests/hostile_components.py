"""A saver that a marked message kills outright (SIGKILL), as an unknown decoder or library bug would.

Run under the real supervisor by tests/test_hostile_saver.py through tests/facehub_supervised.py: the
supervisor restarts it, the broker redelivers the message to the new life from the persistent session,
and the saver's attempt records must end the loop.
"""

import os
import signal

from facehub.cloud import saver

MARK = b"KILLS-THE-SAVER"


def killed_by_mark(config, runtime):
    check = saver.check_image

    def check_or_die(content_type, data, *args, **kwargs):
        if MARK in data:
            os.kill(os.getpid(), signal.SIGKILL)
        return check(content_type, data, *args, **kwargs)

    saver.check_image = check_or_die
    saver.run(config, runtime)
