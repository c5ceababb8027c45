"""Command line: argument parsing only; each command hands off to its module."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from facehub import __version__
from facehub.config import ConfigError, load
from facehub.process.logs import setup_logging

COMPONENT_NAMES = ("detector", "forwarder", "logger", "saver")
log = logging.getLogger("facehub")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facehub", description=__doc__)
    parser.add_argument("--version", action="version", version=f"facehub {__version__}")
    parser.add_argument("-c", "--config", help="TOML config file (default: $FACEHUB_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name in COMPONENT_NAMES:
        commands.add_parser(name, help=f"run the {name} alone in the foreground")

    run = commands.add_parser("run", help="run a role's components under the supervisor")
    run.add_argument("role", choices=("edge", "cloud"))
    run.add_argument("--daemon", action="store_true", help="detach into the background")
    run.add_argument("--pidfile", help="pid file (with --daemon)")
    run.add_argument("--logfile", help="log file (with --daemon; without it a detached daemon's logs are discarded)")

    health = commands.add_parser("health", help="exit 0 when the supervised role is healthy, 1 when not")
    health.add_argument("--json", action="store_true", help="print the whole status as JSON")

    config = commands.add_parser("config", help="configuration tools")
    config.add_argument("action", choices=("check", "reference"),
                        help="check: validate and print the effective configuration (secrets masked); "
                             "reference: print the reference of every key (docs/configuration.md)")

    detect = commands.add_parser("detect", help="print the faces found in images, one JSON line each")
    detect.add_argument("images", nargs="+")

    bench = commands.add_parser("bench", help="measure detector and pipeline speed")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)

    demo = commands.add_parser("demo", help="run the whole pipeline on the built-in sample")
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from facehub.dev import bench
        return bench.main(args.bench_args, config_path=args.config)
    if args.command == "config" and args.action == "reference":
        from facehub.config.reference import render
        print(render(), end="")
        return 0
    if args.command == "demo":
        from facehub.dev import demo
        return demo.main(args.demo_args)
    try:
        config = load(args.config)
    except ConfigError as error:
        print(f"facehub: invalid configuration: {error}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)

    if args.command == "config":
        print(json.dumps(config.to_dict(mask_secrets=True), indent=2, sort_keys=True))
        return 0
    if args.command == "health":
        from facehub.process import health
        return health.main(config, as_json=args.json)
    if args.command == "detect":
        from facehub.edge import detector
        return detector.detect_command(config, args.images)
    if args.command == "run":
        from facehub import roles
        from facehub.process import supervisor
        return supervisor.main(config, args.role, roles.role_specs(config, args.role), daemon=args.daemon,
                               pidfile=args.pidfile, logfile=args.logfile, summary_gauges=roles.SUMMARY_GAUGES)
    return run_foreground(config, args.command)


def run_foreground(config, name: str) -> int:
    """Run one component in this process until SIGINT/SIGTERM."""
    from facehub.roles import component_target
    from facehub.runtime import Runtime

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    runtime = Runtime(name, stop=stop, state_dir=config.supervisor.state_dir)
    try:
        component_target(name)(config, runtime)
    except KeyboardInterrupt:
        pass
    finally:
        runtime.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
