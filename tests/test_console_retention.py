"""Retention: the folder sweeper removes the day folders older than the limit and only those; on S3 the
lifecycle rule is set as it should be, next to the bucket's other rules, and removed again."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3

from console_helpers import face
from facehub.cloud.console import retention
from facehub.cloud.storage import open_store
from facehub.config import Config, SaverConfig
from facehub.dev.servers import S3_ENV

NOW = datetime(2026, 3, 10, 9, 30, tzinfo=timezone.utc)
ROOT = Path(__file__).resolve().parent.parent


def ms(day: datetime) -> int:
    return int(day.timestamp() * 1000)


def test_folder_sweep_deletes_only_day_folders_older_than_the_limit(tmp_path):
    store = open_store(SaverConfig(url=str(tmp_path / "faces")))
    ages = (0, 1, 2, 3, 4, 40, 400)  # days before NOW
    for age in ages:
        for device in ("cam-a", "cam-b"):
            store.put_face(face(device, ms(NOW - timedelta(days=age))))
        store.put_quarantine("faces/x", b"junk", "not an image", None, received_ms=ms(NOW - timedelta(days=age)))
    root = tmp_path / "faces"
    (root / "cam-a" / "notes.txt").write_text("not a day folder")  # never touched
    (root / "cam-a" / "2026" / "01" / "scratch").mkdir(parents=True)  # not a day name: never touched
    before = {p.relative_to(root).as_posix() for p in root.rglob("*")}

    result = retention.sweep(store, days=3, now=NOW)

    assert result.cutoff == "2026/03/07"
    expected_gone = {f"{top}/{(NOW - timedelta(days=age)):%Y/%m/%d}" for age in (4, 40, 400)
                     for top in ("cam-a", "cam-b", "quarantine")}
    assert set(result.deleted) == expected_gone
    after = {p.relative_to(root).as_posix() for p in root.rglob("*")}
    removed = before - after
    assert all(any(path == gone or path.startswith(gone + "/") for gone in expected_gone)
               or path.count("/") <= 2 for path in removed), sorted(removed)
    for age in (0, 1, 2, 3):  # kept: the limit's days and today, every device and the quarantine
        for top in ("cam-a", "cam-b", "quarantine"):
            assert (root / top / f"{(NOW - timedelta(days=age)):%Y/%m/%d}").is_dir()
    assert (root / "cam-a" / "notes.txt").exists() and (root / "cam-a" / "2026" / "01" / "scratch").is_dir()
    assert not (root / "cam-a" / "2025").exists()  # the year it emptied went with its last day
    assert retention.sweep(store, days=3, now=NOW).deleted == []  # nothing more the second time


def test_s3_lifecycle_rule_is_set_merged_and_removed(moto, bucket, monkeypatch):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1")
    other = {"ID": "logs-expire", "Filter": {"Prefix": "logs/"}, "Status": "Enabled", "Expiration": {"Days": 7}}
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [other]})
    store = open_store(SaverConfig(url=f"s3://{bucket}/site-1/faces", endpoint_url=moto.endpoint_url))

    assert retention.apply_lifecycle(store, 30) == "set"
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert set(rules) == {"logs-expire", "facehub-retention-site-1/faces"}
    ours = rules["facehub-retention-site-1/faces"]
    assert ours["Filter"] == {"Prefix": "site-1/faces/"} and ours["Status"] == "Enabled"
    assert ours["Expiration"] == {"Days": 30}
    assert rules["logs-expire"]["Expiration"] == {"Days": 7}

    assert retention.apply_lifecycle(store, 30) == "unchanged"
    assert retention.apply_lifecycle(store, 14) == "set"
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert rules["facehub-retention-site-1/faces"]["Expiration"] == {"Days": 14} and len(rules) == 2

    assert retention.apply_lifecycle(store, 0) == "removed"
    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert [r["ID"] for r in rules] == ["logs-expire"]


def test_apply_retention_command_sets_the_rule_on_a_bare_bucket(moto, bucket, tmp_path):
    env = {**os.environ, **S3_ENV, "FACEHUB_SAVER_URL": f"s3://{bucket}/faces",
           "FACEHUB_SAVER_ENDPOINT_URL": moto.endpoint_url, "FACEHUB_RETENTION_DAYS": "9",
           "FACEHUB_SUPERVISOR_STATE_DIR": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-m", "facehub.cli", "console", "apply-retention"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "facehub-retention-faces" in done.stdout and ": set" in done.stdout
    s3 = boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1", **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"})
    (rule,) = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rule["Expiration"] == {"Days": 9} and rule["Filter"] == {"Prefix": "faces/"}


def test_retention_child_runs_only_when_days_are_set():
    from facehub.roles import role_specs

    config = Config()
    assert [spec.name for spec in role_specs(config, "cloud")] == ["saver-1"]
    config.retention.days = 30
    config.console.enabled = True
    config.console.admin_password_hash = "scrypt:16384:8:1:c2FsdA==:aGFzaA=="
    assert [spec.name for spec in role_specs(config.validate(), "cloud")] == ["saver-1", "console", "retention"]
