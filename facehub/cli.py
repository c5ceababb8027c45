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
    # -c is accepted before or after the command: every subparser has it too, and SUPPRESS keeps
    # a subparser that was not given -c from overwriting the value given before the command
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument("-c", "--config", default=argparse.SUPPRESS,
                               help="TOML config file (default: $FACEHUB_CONFIG)")
    parser = argparse.ArgumentParser(prog="facehub", description=__doc__, parents=[config_option])
    parser.add_argument("--version", action="version", version=f"facehub {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=description or help, parents=[config_option],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    for name in COMPONENT_NAMES:
        command(name, f"run the {name} alone in the foreground (no supervisor; Ctrl-C stops it)")

    run = command("run", "run a role's components under the supervisor",
                  "Run the role's components as supervised child processes: restarted when they crash, "
                  "stopped cleanly on SIGTERM; health in <supervisor.state_dir>, /metrics on metrics.port.")
    run.add_argument("role", choices=("edge", "cloud"),
                     help="edge: forwarder, logger and detector; cloud: saver.instances savers (and the console "
                          "when console.enabled, retention when retention.days)")
    run.add_argument("--daemon", action="store_true",
                     help="detach into the background, for init systems that do not supervise; under systemd "
                          "(Type=notify), K3s or Docker run in the foreground instead")
    run.add_argument("--pidfile", help="pid file (with --daemon)")
    run.add_argument("--logfile", help="log file (with --daemon; without it a detached daemon's logs are discarded)")

    health = command("health", "exit 0 when the supervised role is healthy, 1 when not",
                     "Liveness of the supervised role, from its status file: exit 0 when healthy, 1 when not, "
                     "with a one-line reason. With --delivery, readiness: exit 0 only while faces are moving.")
    health.add_argument("--delivery", action="store_true",
                        help="exit 0 only while faces are moving: healthy, and no broker down, storage failing "
                             "or face waiting for longer than supervisor.delivery_timeout")
    health.add_argument("--json", action="store_true", help="print the whole status, both verdicts, as JSON")

    config = command("config", "configuration tools")
    config.add_argument("action", choices=("check", "reference"),
                        help="check: validate and print the effective configuration (secrets masked); "
                             "reference: print the reference of every key (docs/configuration.md)")

    detect = command("detect", "print the faces found in images, one JSON line each",
                     "Run the configured detector on image files: one JSON line per image with the boxes found, "
                     "to tune a camera setup.")
    detect.add_argument("images", nargs="+", help="image files (JPEG, PNG...)")

    from facehub.cloud.console import cli as console  # light: the server's imports happen when it runs

    console.add_arguments(command("console", "the web console: gallery, fleet, quarantine, retention",
                                  console.__doc__))
    from facehub.dev import bench, demo  # light modules: their heavy imports happen when they run

    bench.add_arguments(command("bench", "measure speed and quality (needs the 'bench' extra for pipeline)",
                                bench.__doc__))
    demo.add_arguments(command("demo", "run the whole pipeline on the built-in sample clip", demo.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None)
    if args.command == "bench":
        from facehub.dev import bench
        return bench.main(args, config_path=args.config)
    if args.command == "config" and args.action == "reference":
        from facehub.config.reference import render
        print(render(), end="")
        return 0
    if args.command == "demo":
        from facehub.dev import demo
        return demo.main(args, config_path=args.config)
    if args.command == "console" and args.action == "hash-password":
        from facehub.cloud.console import cli as console
        return console.hash_password()
    try:
        config = load(args.config)
    except ConfigError as error:
        print(f"facehub: invalid configuration: {error}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)

    if args.command == "config":
        print(json.dumps(config.to_dict(mask_secrets=True), indent=2, sort_keys=True))
        backend, why = config.detector.detection()
        print(f"detector: {backend} ({why})", file=sys.stderr)  # stdout stays one JSON document
        return 0
    if args.command == "console":
        from facehub.cloud.console import cli as console
        return console.main(args, config)
    if args.command == "health":
        from facehub.process import health
        return health.main(config, as_json=args.json, delivery=args.delivery)
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
