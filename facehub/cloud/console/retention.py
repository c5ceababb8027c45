"""Retention: faces (and quarantined messages) older than ``retention.days`` leave the store.

- **S3**: one lifecycle rule on the bucket, ``facehub-retention-<prefix>``, expiring what
  is under the store's prefix ``days`` days after it was written (S3 rounds to the next
  midnight UTC). It is merged into the bucket's other rules, which are kept as they are;
  ``days = 0`` removes it. S3 itself enforces it, so nothing of ours has to run.
- **Folders**: a sweeper deletes whole day folders (``<device>/<YYYY>/<MM>/<DD>`` and
  ``<quarantine>/<YYYY>/<MM>/<DD>``) dated before today (UTC) minus ``days``, and then
  the month and year folders it emptied; nothing that is not such a day folder is touched.

``facehub run cloud`` runs this module as its ``retention`` child when ``retention.days``
is set (the sweep every ``sweep_interval``, or a check of the S3 rule);
``facehub console apply-retention`` does one round by hand.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from facehub.cloud.storage import S3Store, Store, open_store
from facehub.config import Config
from facehub.runtime import Runtime

log = logging.getLogger(__name__)

YEAR, TWO_DIGITS = re.compile(r"^\d{4}$"), re.compile(r"^\d\d$")


@dataclass
class Sweep:
    cutoff: str  # day folders strictly before this YYYY/MM/DD are deleted
    deleted: list[str] = field(default_factory=list)  # the day folders removed (store keys)


def cutoff_day(days: int, now: datetime | None = None) -> str:
    """The oldest day kept: today (UTC) minus ``days``."""
    now = now or datetime.now(timezone.utc)
    return (now.astimezone(timezone.utc) - timedelta(days=days)).strftime("%Y/%m/%d")


def sweep(store: Store, days: int, now: datetime | None = None) -> Sweep:
    """Delete the day folders older than ``days`` days, and only those, from a folder-like store."""
    if days <= 0:
        raise ValueError("retention.days must be > 0 to sweep")
    result = Sweep(cutoff_day(days, now))
    quarantine = store.quarantine_prefix.strip("/")
    top, _ = store.list_dir("")
    roots = [name for name in top if name != quarantine.split("/")[0]] + [quarantine]
    for root in roots:
        years, _ = store.list_dir(root)
        for year in years:
            if not YEAR.match(year) or year > result.cutoff[:4]:
                continue
            months, _ = store.list_dir(f"{root}/{year}")
            for month in months:
                if not TWO_DIGITS.match(month) or f"{year}/{month}" > result.cutoff[:7]:
                    continue
                day_names, _ = store.list_dir(f"{root}/{year}/{month}")
                for day in day_names:
                    if TWO_DIGITS.match(day) and f"{year}/{month}/{day}" < result.cutoff:
                        store.delete_tree(f"{root}/{year}/{month}/{day}")
                        result.deleted.append(f"{root}/{year}/{month}/{day}")
                _remove_if_empty(store, f"{root}/{year}/{month}")
            _remove_if_empty(store, f"{root}/{year}")
    return result


def _remove_if_empty(store: Store, prefix: str) -> None:
    folders, files = store.list_dir(prefix)
    if not folders and not files:
        try:
            store.delete_tree(prefix)
        except OSError:
            pass  # a saver wrote into it meanwhile: it stays


def rule_id(store: S3Store) -> str:
    prefix = store._key("")
    return f"facehub-retention-{prefix.strip('/') or 'bucket'}"[:255]


def wanted_rule(store: S3Store, days: int) -> dict[str, Any]:
    prefix = store._key("").strip("/")
    return {"ID": rule_id(store), "Filter": {"Prefix": f"{prefix}/" if prefix else ""}, "Status": "Enabled",
            "Expiration": {"Days": days}}


def lifecycle_rules(store: S3Store) -> list[dict[str, Any]]:
    """The bucket's lifecycle rules ([] when it has none)."""
    try:
        answer = store.fs.call_s3("get_bucket_lifecycle_configuration", Bucket=store.bucket)
    except Exception as error:  # s3fs turns "no configuration" into an OSError of its own making
        if "NoSuchLifecycleConfiguration" in f"{error!r} {error}" or "lifecycle configuration does not exist" \
                in str(error).lower():
            return []
        raise
    return answer.get("Rules", [])


def apply_lifecycle(store: S3Store, days: int) -> str:
    """Make the bucket's rule for this store's prefix say ``days`` (0: no rule); 'set', 'removed'
    or 'unchanged'. The bucket's other rules are kept."""
    rules = lifecycle_rules(store)
    ours = [rule for rule in rules if rule.get("ID") == rule_id(store)]
    others = [rule for rule in rules if rule.get("ID") != rule_id(store)]
    if days <= 0:
        if not ours:
            return "unchanged"
        if others:
            store.fs.call_s3("put_bucket_lifecycle_configuration", Bucket=store.bucket,
                             LifecycleConfiguration={"Rules": others})
        else:
            store.fs.call_s3("delete_bucket_lifecycle", Bucket=store.bucket)
        return "removed"
    wanted = wanted_rule(store, days)
    if len(ours) == 1 and _same(ours[0], wanted):
        return "unchanged"
    store.fs.call_s3("put_bucket_lifecycle_configuration", Bucket=store.bucket,
                     LifecycleConfiguration={"Rules": others + [wanted]})
    return "set"


def _same(rule: dict[str, Any], wanted: dict[str, Any]) -> bool:
    prefix = rule.get("Filter", {}).get("Prefix", rule.get("Prefix", ""))
    return (prefix == wanted["Filter"]["Prefix"] and rule.get("Status") == "Enabled"
            and rule.get("Expiration", {}).get("Days") == wanted["Expiration"]["Days"])


def apply(config: Config, store: Store | None = None) -> str:
    """One round of retention for the configured store; a line saying what was done."""
    store = store or open_store(config.saver)
    days = config.retention.days
    if isinstance(store, S3Store):
        outcome = apply_lifecycle(store, days)
        what = f"expire after {days} days" if days else "no expiry"
        return f"retention: S3 lifecycle rule {rule_id(store)} on bucket {store.bucket} ({what}): {outcome}"
    if days <= 0:
        return "retention: retention.days is 0: nothing is deleted"
    result = sweep(store, days)
    return (f"retention: deleted {len(result.deleted)} day folders older than {result.cutoff} from "
            f"{store.describe()}" + (f" ({', '.join(result.deleted[:5])}{'...' if len(result.deleted) > 5 else ''})"
                                     if result.deleted else ""))


def run(config: Config, runtime: Runtime) -> None:
    """The ``retention`` child of ``facehub run cloud``: a round at start, then every ``sweep_interval``."""
    store = open_store(config.saver)
    next_round = 0.0
    while not runtime.stop.is_set():
        if time.monotonic() >= next_round:
            try:
                line = apply(config, store)
                runtime.count("rounds")
                log.info("%s", line)
            except Exception as error:
                runtime.count("errors")
                log.warning("retention round failed (next in %.0fs): %s: %s", config.retention.sweep_interval,
                            type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
            next_round = time.monotonic() + config.retention.sweep_interval
        runtime.beat()
        runtime.wait(min(1.0, config.retention.sweep_interval))
    runtime.flush()
