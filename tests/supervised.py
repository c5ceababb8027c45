"""Run the real supervisor over test components: ``python supervised.py STATE_DIR NAME=TARGET...``.

Used by the supervisor tests, which need a supervisor process they can signal
and kill without depending on cameras or brokers. Extra ``FACEHUB_*`` settings
come from the environment as usual.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from facehub import cli, config, supervisor  # noqa: E402


def spec(item: str) -> supervisor.ChildSpec:
    """``name=module:function`` or ``name=module:function@other:gauge`` (start after other's gauge)."""
    name, _, rest = item.partition("=")
    target, _, after = rest.partition("@")
    return supervisor.ChildSpec(name, target, tuple(after.split(":")) if after else None)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir")
    parser.add_argument("children", nargs="+", help="name=module:function[@other:gauge]")
    parser.add_argument("--daemon", action="store_true")
    parser.add_argument("--pidfile")
    parser.add_argument("--logfile")
    args = parser.parse_args()
    settings = config.load()
    settings.supervisor.state_dir = args.state_dir
    cli.setup_logging(settings.log_level)
    specs = [spec(item) for item in args.children]
    return supervisor.main(settings, "test", daemon=args.daemon, pidfile=args.pidfile,
                           logfile=args.logfile, specs=specs)


if __name__ == "__main__":
    sys.exit(main())
