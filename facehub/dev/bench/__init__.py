"""``facehub bench``: speed and quality figures, printed as Markdown tables.

    facehub bench                      everything below, on the built-in clip
    facehub bench detector [--source PATH] [--threads N] [--rate FPS]
    facehub bench quality  [--faces DIR] [--model YUNET.onnx]
    facehub bench pipeline [--source PATH] [--loops N]
    facehub bench persistence [--outage SECONDS] [--face-rate N] [--setting LABEL ...]
    facehub bench console  [--console-faces N] [--console-s3-faces N]
    facehub bench motion   [--faces DIR] [--model YUNET.onnx] [--motion pan:2 ...] [--split NAME] [--quarter-core]
    facehub bench fleet    [--quick] [--devices N] [--savers K] [--device-rate R] [--seconds S]
                           [--store null|folder|s3] [--soak SECONDS]

Every figure is measured in the run that prints it, with the typical
implementation (``bench/baseline.py``) measured beside FaceHub on the same
input. ``bench detector`` measures throughput (frames fed flat out) and
latency at a camera's rate (``--rate``), and ends with ``frames=N faces=N
fps=X`` for FaceHub on the given source. ``bench persistence`` kills a broker
with SIGKILL after its consumer was away for ``--outage`` seconds, for each
autosave setting, and prints what was lost and what saving cost. ``bench
motion`` scores what each detector setting publishes from clips panning and
zooming over the labelled photos at camera pace (``--quarter-core`` runs them
again in a cgroup limited to a quarter of one CPU, which needs root).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

from facehub.config import ConfigError, load
from facehub.dev import MissingExtra, require_extra

DEFAULT_MOTIONS = ("pan:2", "pan:5", "pan:10", "zoom:4")  # bench motion clips: px per frame
CROWD_PHOTO = "2007_007763.jpg"  # seven faces: the busy scene of the detector benchmark
CORES_FRAMES = 40  # full searches per way of using the cores
LATENCY_FRAMES = 300  # 10 s at 30 fps per latency row
# the labelled photos beside a source checkout (../shared), or wherever FACEHUB_SHARED says
SHARED = Path(os.environ.get("FACEHUB_SHARED", Path(__file__).resolve().parents[4] / "shared"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facehub bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``facehub bench``, for this module's parser and for the CLI's subparser."""
    parser.add_argument("what", nargs="?", default="all",
                        choices=("all", "detector", "quality", "pipeline", "persistence", "console", "motion",
                                 "fleet"),
                        help="the section to run (default: all of them, about 20 minutes)")
    parser.add_argument("--source", help="video file, camera index or URL (default: the built-in clip)")
    parser.add_argument("--threads", type=int, action="append",
                        help="OpenCV threads (repeatable; default: 1 and 2, or the one given)")
    parser.add_argument("--frames", type=int, default=0, help="read at most this many frames (0 = all)")
    parser.add_argument("--faces", type=Path, default=SHARED / "faces",
                        help="folder with training.xml and photos for precision/recall")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "face_detection_yunet.onnx",
                        help="YuNet ONNX model for the quality table")
    parser.add_argument("--no-publish", action="store_true", help="time detection without a broker")
    parser.add_argument("--loops", type=int,
                        help="times bench pipeline plays the clip (default: about 30 s of video)")
    parser.add_argument("--console-faces", type=int, default=100_000,
                        help="faces in the folder store of bench console (default 100000)")
    parser.add_argument("--console-s3-faces", type=int, default=10_000,
                        help="faces in moto's S3 for bench console (default 10000; 0 = skip S3)")
    parser.add_argument("--rate", type=float, default=30.0,
                        help="camera rate (frames/s) for the latency table (0 = skip it)")
    parser.add_argument("--outage", type=float, default=20.0,
                        help="bench persistence: seconds the consumer is away before the broker is killed")
    parser.add_argument("--face-rate", type=float, default=60.0,
                        help="bench persistence: faces/s published (10 KB each)")
    parser.add_argument("--setting", action="append",
                        help="bench persistence: only this autosave setting (repeatable; default: all)")
    parser.add_argument("--motion", action="append",
                        help="bench motion: a clip, pan:SPEED or zoom:SPEED in px/frame (repeatable; "
                             "default: " + " ".join(DEFAULT_MOTIONS) + ")")
    parser.add_argument("--split", action="append", choices=("tuned", "held-back"),
                        help="bench motion: photos to make clips of (default: both, reported apart)")
    parser.add_argument("--quarter-core", action="store_true",
                        help="bench motion: also run every detector in a cgroup limited to a quarter of one CPU")
    from facehub.dev.bench import fleet

    fleet.add_arguments(parser)


def main(argv: list[str] | argparse.Namespace | None = None, config_path: str | None = None) -> int:
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    try:
        config = load(config_path)
    except ConfigError as error:
        print(f"facehub bench: invalid configuration: {error}")
        return 2
    from facehub.edge.detection import SAMPLE_CLIP

    source = args.source or str(SAMPLE_CLIP)
    if args.what in ("all", "pipeline", "console", "fleet"):
        try:
            require_extra("moto", "boto3")  # the pipeline and console sections store into moto's S3 server
        except MissingExtra as error:
            print(f"facehub bench pipeline {error}")
            return 2
    if args.what in ("all", "quality"):
        bench_quality(config, args)
    if args.what in ("all", "pipeline"):
        bench_pipeline(source, args.loops)
    if args.what in ("all", "console"):
        bench_console(args.console_faces, args.console_s3_faces)
    if args.what in ("all", "fleet"):
        from facehub.dev.bench import fleet

        fleet.main(args.quick, args.devices, args.savers, args.device_rate, args.seconds, args.store, args.soak)
        if args.what == "fleet":
            return 0
    if args.what in ("all", "persistence"):
        from facehub.dev.bench import persistence

        if args.setting and not set(args.setting) <= set(persistence.SETTINGS):
            print(f"facehub bench: --setting is one of: {', '.join(persistence.SETTINGS)}")
            return 2
        persistence.main(seconds=args.outage, rate=args.face_rate, settings=args.setting)
        if args.what == "persistence":
            return 0
    if args.what in ("all", "motion"):
        status = bench_motion(config, args)
        if args.what == "motion":
            return status
    if args.what in ("all", "detector"):
        if not args.source:
            bench_crowd(config, args)
        return bench_detector(config, args, source, given=bool(args.source),
                              threads=args.threads or ([1] if args.source else [1, 2]))
    return 0


def bench_crowd(config, args) -> None:
    """The detector on a busy scene too: a clip panning over the labelled group photo, when it is there."""
    from facehub.dev.bench import detector as bench

    photo = args.faces / CROWD_PHOTO
    if not photo.is_file():
        print(f"\n(no {photo}: crowd clip skipped)")
        return
    with tempfile.TemporaryDirectory(prefix="facehub-crowd-") as work:
        clip = bench.crowd_clip(photo, Path(work) / "crowd.mp4")
        bench_detector(config, args, str(clip), given=True, threads=args.threads or [1, 2],
                       label=f"crowd clip panning over {photo}")


def bench_detector(config, args, source: str, given: bool, threads: list[int], label: str = "") -> int:
    """Throughput and latency tables for ``source``: at its own size when ``given``, else 640x480 and 1280x720."""
    from facehub.dev.servers import Mosquitto
    from facehub.dev.bench import detector as bench

    frames, capture_s = bench.read_frames(source, args.frames)
    fps = 15.0
    native = frames[0].shape[1::-1]
    resolutions = [tuple(native)] if given else [(640, 480), (1280, 720)]
    minimum = 0 if given or args.frames else 300  # the built-in clip is looped to 300 frames unless --frames
    runs, latency = [], []
    with tempfile.TemporaryDirectory(prefix="facehub-bench-") as work:
        broker = None if args.no_publish else Mosquitto(Path(work) / "broker").start()
        publisher = bench.Publisher(broker.port) if broker else None
        try:
            for width, height in resolutions:
                sized = bench.at_resolution(frames, width, height, minimum=minimum)
                for count in threads:
                    config.detector.threads = count
                    with bench.on_cores(1 if count == 1 else 0):
                        runs.append(bench.run_baseline(sized, count, publisher, capture_s))
                        runs.append(bench.run_facehub(sized, config.detector, publisher, fps, capture_s))
            if publisher and args.rate > 0:
                paced = bench.at_resolution(frames, *resolutions[0], minimum=minimum)[:LATENCY_FRAMES]
                latency = bench.latency_runs(paced, config.detector, broker.port, publisher, args.rate, threads)
        finally:
            if publisher:
                publisher.close()
            if broker:
                broker.stop()
    print(f"\n## Detector speed ({label or source}, {os.cpu_count()} cores)\n")
    print(bench.table(runs))
    if latency:
        width, height = resolutions[0]
        print(f"\n## Detector latency at camera rate ({width}x{height}, {args.rate:g} fps, "
              f"local broker, QoS 1 acknowledged; typical: QoS 0 handed to the client)\n")
        print(bench.latency_table(latency, args.rate))
    cores = max(threads)
    if cores > 1 and len(os.sched_getaffinity(0)) >= cores:
        from facehub.dev.bench import cores as two_cores

        width, height = resolutions[0]
        sample = bench.at_resolution(frames, width, height, minimum=0)[:CORES_FRAMES]
        print(f"\n## {cores} cores for the full search ({width}x{height}, {len(sample)} frames)\n")
        print(two_cores.table(two_cores.compare(sample, config.detector, cores)))
    for width, height in resolutions:
        for count in threads:
            ours = next(r for r in runs if r.name == "facehub" and (r.width, r.height, r.threads) == (width, height, count))
            typical = next(r for r in runs if r.name == "typical" and (r.width, r.height, r.threads) == (width, height, count))
            print(f"speed-up {width}x{height} threads={count}: {ours.fps / typical.fps:.1f}x "
                  f"({ours.fps:.1f} vs {typical.fps:.1f} fps); faces sent per frame "
                  f"{ours.sent / ours.frames:.2f} vs {typical.sent / typical.frames:.2f}")
    typical = next(r for r in runs if r.name == "typical")
    print(f"typical frames={typical.frames} faces={typical.sent} fps={typical.fps:.1f}")
    final = next(r for r in runs if r.name == "facehub")
    print(f"frames={final.frames} faces={final.sent} fps={final.fps:.1f}")
    return 0


def bench_quality(config, args) -> None:
    from facehub.edge.detection import make_backend
    from facehub.dev.bench import baseline, quality

    if not (args.faces / "training.xml").is_file():
        print(f"\n(no labelled photos at {args.faces}: quality table skipped; pass --faces DIR)")
        return
    haar = dataclasses.replace(config.detector, backend="haar")
    rows = [("typical: Haar detectMultiScale(gray, 1.3, 5)", baseline.TypicalDetector().detect),
            ("facehub: haar, searched as a still image", quality.still(make_backend(haar))),
            ("facehub: haar, searched as a camera frame", make_backend(haar).detect)]
    if args.model.is_file():
        rows.append(("facehub: yunet", quality.still(make_backend(dataclasses.replace(
            config.detector, backend="yunet", model_path=str(args.model))))))
    print(f"\n## Detection quality ({args.faces}, match at IoU >= {quality.MATCH_IOU})\n")
    print("All photos as they are, then each split (the defaults were chosen on the tuned photos only) with its "
          "half of dogs.jpg, as is and in 8 variants (as is, x0.8, x1.3, darker, brighter, noise, blur, JPEG q30).\n")
    print("| detector | photos | labelled | found | false | recall | precision |\n|---|---|---|---|---|---|---|")
    for name, detect in rows:
        scores = [("all, as they are", quality.score(detect, args.faces))]
        for split in quality.SPLITS:
            scores.append((f"{split}, as they are", quality.score_split(detect, args.faces, split, augment=False)))
            scores.append((f"{split}, 8 variants", quality.score_split(detect, args.faces, split)))
        for photos, s in scores:
            print(f"| {name} | {photos} | {s.labelled} | {s.hits} | {s.false} | {s.recall:.2f} | {s.precision:.2f} |")
    dogs = args.faces / "dogs.jpg"
    if dogs.is_file():
        import cv2

        image = cv2.imread(str(dogs))
        print("\nfalse faces on dogs.jpg: " + ", ".join(f"{short_name(name)} {len(detect(image))}"
                                                         for name, detect in rows))
    from facehub.dev.bench import verification

    verification.main(args.faces, haar)


def bench_motion(config, args) -> int:
    """Coverage, false and off-centre crops from a moving camera, per split, for each detector setting."""
    from facehub.dev.bench import motion

    if not (args.faces / "training.xml").is_file():
        print(f"\n(no labelled photos at {args.faces}: motion table skipped; pass --faces DIR)")
        return 0
    motions = tuple(args.motion or DEFAULT_MOTIONS)
    rows = motion.settings(args.model if args.model.is_file() else None, config.detector)
    limits = [False, True] if args.quarter_core else [False]
    for quarter in limits:
        where = (f"a quarter of one core (cgroup cpu quota {motion.QuarterCore.QUOTA}/{motion.QuarterCore.PERIOD}, "
                 "one cpuset CPU)" if quarter else f"this machine ({os.cpu_count()} cores)")
        for split in args.split or list(motion.SPLITS):
            try:
                results = motion.measure(args.faces, split, motions, rows, quarter_core=quarter)
            except motion.CgroupError as error:
                print(f"facehub bench motion --quarter-core: {error}")
                return 2
            photos = ", ".join(motion.SPLITS[split])
            print(f"\n## Motion quality, {split} photos ({photos}), 640x480 at {motion.RATE:g} fps "
                  f"camera pace, on {where}\n")
            print(motion.table(results, motions))
    costs = motion.search_cost(args.faces, args.model)
    print("\nOne full search of a 640x480 frame of these clips, one thread on one core (median ms): "
          + ", ".join(f"{name} {ms:.1f}" for name, ms in costs.items()))
    keep, carry = motion.trail_cost(args.faces)
    print(f"\nCarrying the faces of a background search to the frame at hand (640x480, one thread): "
          f"{keep:.2f} ms per frame while a search runs (a grey copy at 320 px), then {carry:.2f} ms per "
          f"frame kept to carry 7 faces through them when it ends.")
    return 0


def short_name(row: str) -> str:
    """'facehub: yunet' -> 'yunet', 'facehub: haar, searched as ...' -> 'haar (searched as ...)', 'typical: ...' -> 'typical'."""
    kind, _, detail = row.partition(": ")
    if kind == "typical":
        return kind
    name, _, how = detail.partition(", ")
    return f"{name.split(' ')[0]} ({how})" if how else name.split(" ")[0]


def bench_console(folder_faces: int, s3_faces: int) -> None:
    from facehub.dev.bench import console

    rows = console.run(folder_faces, s3_faces)
    print(f"\n## Console gallery ({os.cpu_count()} cores; whole HTTP requests of the gallery's HTML, "
          f"{console.REPEATS} repeats)\n")
    print(console.table(rows))
    for row in rows:
        print(f"console {row['store']}: faces={row['faces']} first_page_ms={row['warm']:.1f} "
              f"cold_ms={row['cold']:.0f} page{row['page']}_ms={row['deep']:.1f} tiles={row['tiles']}")


def bench_pipeline(source: str, loops: int | None = None) -> None:
    from facehub.dev.bench import pipeline

    with tempfile.TemporaryDirectory(prefix="facehub-bench-") as work:
        work = Path(work)
        relays = [pipeline.relay_throughput(kind, work) for kind in ("bridge", "forwarder")]
        saver = pipeline.saver_throughput(work)
        e2e = pipeline.end_to_end(source, work, loops)
    print("\n## Relay and storage throughput (10 KB faces, QoS 1, loopback brokers)\n")
    print("| hop | messages | seconds | messages/s |\n|---|---|---|---|")
    names = {"bridge": "mosquitto bridge (typical)", "forwarder": "facehub forwarder (durable spool)",
             "saver": "facehub saver into moto S3"}
    for row in relays + [saver]:
        print(f"| {names[row['kind']]} | {row['messages']} | {row['seconds']:.1f} | {row['rate']:.0f} |")
    print_end_to_end(e2e)


def print_end_to_end(e2e: dict) -> None:
    """One Markdown table: FaceHub (defaults, every detection) and the typical pipeline, same clip and pacing."""
    clip = e2e["clip"]
    print(f"\n## End to end ({clip.source}: {clip.frames} frames at {clip.fps:g} fps like a camera, "
          f"played {e2e['loops']}x; two brokers; moto S3)\n")
    print("| pipeline | frames | faces published | faces stored | lost | seconds | faces/s "
          "| capture->published ms p50/p95/p99 | capture->stored ms p50/p95/p99 (n) "
          "| peak RSS edge | peak RSS cloud |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for row in e2e["rows"]:
        publish = _pcts(row["publish_latency_ms"]) if row["publish_latency_ms"] is not None else "n/a"
        print(f"| {row['name']} | {row['frames']} | {row['published']} | {row['stored']} | {row['lost']} | "
              f"{row['seconds']:.1f} | {row['faces_per_s']:.1f} | {publish} | "
              f"{_pcts(row['latency_ms'], samples=True)} | {row['peak_rss_edge'] / 2**20:.0f} MiB | "
              f"{row['peak_rss_cloud'] / 2**20:.0f} MiB |")
    print("\nPeak RSS per side: its mosquitto plus its components' process trees (the typical relay is "
          "mosquitto's bridge); FaceHub's components run without the supervisor here.")


def _pcts(values: dict, samples: bool = False) -> str:
    if not values.get("count"):
        return "n/a"
    text = f"{values['p50']:.0f}/{values['p95']:.0f}/{values['p99']:.0f}"
    return f"{text} ({values['count']})" if samples else text
