"""Run the real supervisor over test components.

``python facehub_supervised.py run test STATE_DIR NAME=TARGET...``: the supervisor tests need a
supervisor process they can signal and kill without cameras or brokers. Its command line reads
like ``facehub run ROLE`` (a file named ``facehub*`` followed by ``run test``), so pid and status
files recognise it as a facehub supervisor of role ``test``. Extra ``FACEHUB_*`` settings come
from the environment as usual.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from facehub import config  # noqa: E402
from facehub.process import supervisor  # noqa: E402
from facehub.process.logs import setup_logging  # noqa: E402


def spec(item: str) -> supervisor.ChildSpec:
    """``name=module:function`` or ``name=module:function@other:gauge`` (start after other's gauge)."""
    name, _, rest = item.partition("=")
    target, _, after = rest.partition("@")
    return supervisor.ChildSpec(name, target, tuple(after.split(":")) if after else None)


def step_wall_clock(seconds: float, after: float = 1.0) -> None:
    """Make ``time.time()`` jump by ``seconds`` once ``after`` seconds have passed (an NTP step at boot)."""
    import time

    real, started = time.time, time.monotonic()
    time.time = lambda: real() + (seconds if time.monotonic() - started > after else 0.0)


def main() -> int:
    import os

    if os.environ.get("WALL_CLOCK_STEP_FOR_TEST"):
        step_wall_clock(float(os.environ["WALL_CLOCK_STEP_FOR_TEST"]))
    parser = argparse.ArgumentParser()
    parser.add_argument("run", choices=("run",))
    parser.add_argument("role")
    parser.add_argument("state_dir")
    parser.add_argument("children", nargs="+", help="name=module:function[@other:gauge]")
    parser.add_argument("--daemon", action="store_true")
    parser.add_argument("--pidfile")
    parser.add_argument("--logfile")
    args = parser.parse_args()
    settings = config.load()
    settings.supervisor.state_dir = args.state_dir
    setup_logging(settings.log_level)
    specs = [spec(item) for item in args.children]
    return supervisor.main(settings, args.role, specs, daemon=args.daemon, pidfile=args.pidfile,
                           logfile=args.logfile)


if __name__ == "__main__":
    sys.exit(main())
