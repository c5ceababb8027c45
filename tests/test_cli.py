"""The command line as a user types it: options before or after the command, useful help, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from facehub import cli

ROOT = Path(__file__).resolve().parent.parent


def facehub(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facehub.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd or ROOT)


@pytest.mark.parametrize("argv", [["-c", "x.toml", "config", "check"], ["config", "check", "-c", "x.toml"],
                                  ["config", "-c", "x.toml", "check"]])
def test_config_option_before_or_after_the_command(argv):
    assert cli.build_parser().parse_args(argv).config == "x.toml"


@pytest.mark.parametrize("argv, expected", [(["bench", "--frames", "5"], ("all", 5)),
                                            (["bench", "detector", "--frames", "5"], ("detector", 5))])
def test_bench_takes_leading_options(argv, expected):
    args = cli.build_parser().parse_args(argv)
    assert (args.what, args.frames) == expected


def test_demo_takes_its_options():
    args = cli.build_parser().parse_args(["demo", "--out", "somewhere", "--frames", "20", "--keep"])
    assert (args.out, args.frames, args.keep) == ("somewhere", 20, True)


@pytest.mark.parametrize("command", ["run", "health", "config", "detect", "bench", "demo", "detector"])
def test_every_command_has_useful_help(command):
    result = facehub(command, "--help")
    assert result.returncode == 0
    assert "usage: facehub " + command in result.stdout
    assert "-c CONFIG" in result.stdout
    assert len(result.stdout.splitlines()) >= 6


def test_bad_option_is_named_and_exits_2():
    result = facehub("run", "edge", "--no-such-option")
    assert result.returncode == 2
    assert "--no-such-option" in result.stderr


def test_missing_config_file_exits_2_naming_it():
    result = facehub("config", "check", "-c", "/nonexistent/facehub.toml")
    assert result.returncode == 2
    assert "/nonexistent/facehub.toml" in result.stderr


def test_bench_detector_with_few_frames_prints_its_summary():
    result = facehub("bench", "detector", "--frames", "5", "--rate", "0", "--threads", "1", "--no-publish")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("frames=5 ")


def test_demo_with_out_and_frames_stores_faces(tmp_path):
    out = tmp_path / "faces"
    result = facehub("demo", "--out", str(out), "--frames", "45", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo: OK" in result.stdout
    assert list(out.rglob("*.jpg")), "the demo stored no face"
