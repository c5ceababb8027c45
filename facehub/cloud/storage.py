"""Where the saver puts faces: an fsspec URL, S3 or a folder.

Layout under the URL's prefix (all times UTC)::

    <device>/<YYYY>/<MM>/<DD>/<HHMMSS.mmm>-<face id>.<ext>     the face (JPEG by default)
    <device>/<YYYY>/<MM>/<DD>/<HHMMSS.mmm>-<face id>.json      sidecar metadata (folders only)
    <quarantine>/<YYYY>/<MM>/<DD>/<sha256>.bin                 a rejected message's payload
    <quarantine>/<YYYY>/<MM>/<DD>/<sha256>.json                why it was rejected, topic, properties

A payload that is dangerous in itself (an image bomb, a message that crashed
its decoder) is not kept: its record alone is written, with the payload's
size, sha256 and first bytes. How much the quarantine may hold is the saver's
business (``facehub.cloud.guards.QuarantineQuota``); a folder store also
refuses quarantine copies once its volume is down to ``saver.quarantine_reserve``
free, so faces keep the last of the space.

A face's key derives only from the face (device, capture time, face id), so a
redelivered message maps to the same key and is not written twice: storage is
idempotent, which turns at-least-once delivery into one object per face.
Quarantine keys are the hash of the message, so a redelivered bad message is
kept once too.

- ``s3://bucket/prefix`` (s3fs): the metadata travels as S3 object metadata
  (``x-amz-meta-*``); writes are conditional (``If-None-Match: *``) so even two
  savers racing on one face leave one object. Stores that do not implement
  conditional writes fall back to a HEAD before each write. PUTs go without
  ``Expect: 100-continue`` (see :func:`session_without_expect_continue`).
- a folder (plain path or ``file://``, e.g. an s3fs-fuse mount): a sidecar
  ``.json`` beside each face, written first; every file is written to a hidden
  temporary name, fsynced and renamed, so readers never see half a file and a
  write has reached the disk before the saver acknowledges the message.
- any other fsspec URL (``gcs://``, ``memory://``...): sidecar JSON, written
  through fsspec; durability is whatever that backend gives.
- ``null://``: a benchmark aid (``facehub bench fleet``) that acknowledges every
  write, counts it and keeps nothing, to measure the broker and the savers
  without a store. Never for real faces.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec

from facehub.config import SaverConfig
from facehub.files import write_atomic
from facehub.messages import Face

log = logging.getLogger(__name__)

QUARANTINE_MAX_USER_PROPERTIES = 100
QUARANTINE_MAX_TEXT = 1024
QUARANTINE_HEAD_BYTES = 64  # first bytes of a payload that is not kept, in its record


def _utc(ms: int) -> tuple[datetime, int]:
    seconds, millis = divmod(ms, 1000)
    return datetime.fromtimestamp(seconds, tz=timezone.utc), millis


def face_stem(face: Face) -> str:
    """The face's key without extension, relative to the store's prefix."""
    when, millis = _utc(face.captured_ms)
    return f"{face.device_id}/{when:%Y/%m/%d}/{when:%H%M%S}.{millis:03d}-{face.face_id}"


def face_key(face: Face) -> str:
    """``<device>/<YYYY>/<MM>/<DD>/<HHMMSS.mmm>-<face id>.<ext>``, from the face alone."""
    return f"{face_stem(face)}.{face.extension}"


def quarantine_stem(quarantine_prefix: str, topic: str, payload: bytes, record: dict[str, Any],
                    received_ms: int) -> str:
    """``<quarantine>/<YYYY>/<MM>/<DD>/<sha256 of the message>`` (same message, same key)."""
    digest = hashlib.sha256()
    for part in (topic.encode("utf-8", "replace"), payload,
                 json.dumps(record, sort_keys=True).encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    when, _ = _utc(received_ms)
    return f"{quarantine_prefix.strip('/')}/{when:%Y/%m/%d}/{digest.hexdigest()}"


def properties_record(props: Any) -> dict[str, Any]:
    """MQTT v5 properties as bounded, JSON-safe data for a quarantine record.

    A hostile message may carry thousands of user properties or huge values;
    the record keeps the first few, truncated, and says how many there were.
    """
    if props is None:
        return {}
    try:
        raw = props.json() if hasattr(props, "json") else dict(props)
    except Exception as error:  # a foreign object we cannot read; note it, keep going
        return {"unreadable": f"{type(error).__name__}: {error}"[:QUARANTINE_MAX_TEXT]}
    record: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "UserProperty":
            pairs = list(value or [])
            record["UserProperty"] = [[_text(p) for p in pair][:2] if isinstance(pair, (list, tuple))
                                      else [_text(pair)] for pair in pairs[:QUARANTINE_MAX_USER_PROPERTIES]]
            record["UserPropertyCount"] = len(pairs)
        elif isinstance(value, (int, float, bool)) or value is None:
            record[name] = value
        elif isinstance(value, (list, tuple)):
            record[name] = [v if isinstance(v, (int, float)) else _text(v) for v in value[:100]]
        else:
            record[name] = _text(value)
    return record


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).hex()
    text = str(value)
    return text if len(text) <= QUARANTINE_MAX_TEXT else text[:QUARANTINE_MAX_TEXT] + "...(truncated)"


class Store:
    """Common shape of a store: ``put_face`` and ``put_quarantine``.

    Both return True when they wrote something and False when the key was
    already there (a redelivery). Any exception means "not stored": the saver
    retries and does not acknowledge the message meanwhile.
    """

    def __init__(self, url: str, quarantine_prefix: str):
        self.url = url
        self.quarantine_prefix = quarantine_prefix

    def put_face(self, face: Face) -> bool:
        stem = face_stem(face)
        return self._put(stem, face.extension, face.image, face.content_type, face.metadata())

    def put_quarantine(self, topic: str, payload: bytes, reason: str, props: Any,
                       received_ms: int | None = None, keep_payload: bool = True) -> bool:
        return self.put_quarantine_entry(self.quarantine_entry(topic, payload, reason, props, received_ms,
                                                               keep_payload))

    def quarantine_entry(self, topic: str, payload: bytes, reason: str, props: Any,
                         received_ms: int | None = None, keep_payload: bool = True) -> "QuarantineEntry":
        """What quarantining this message would write (its size is what a quota charges)."""
        received_ms = int(time.time() * 1000) if received_ms is None else received_ms
        properties = properties_record(props)
        stem = quarantine_stem(self.quarantine_prefix, topic, payload, properties, received_ms)
        record = {"reason": reason, "topic": topic, "size": len(payload), "received-ms": received_ms,
                  "received": _utc(received_ms)[0].isoformat().replace("+00:00", "Z"),
                  "properties": properties}
        if not keep_payload:
            record["payload"] = {"kept": False, "sha256": hashlib.sha256(payload).hexdigest(),
                                 "head": bytes(payload[:QUARANTINE_HEAD_BYTES]).hex()}
        return QuarantineEntry(stem, _json_bytes(record), bytes(payload) if keep_payload else None)

    def put_quarantine_entry(self, entry: "QuarantineEntry") -> bool:
        """Write a quarantine entry: payload and record, or the record alone; False if already there."""
        if entry.payload is None:
            return self._put_record_only(entry.stem, entry.record)
        return self._put_with_record(entry.stem, "bin", entry.payload, "application/octet-stream",
                                     json.loads(entry.record))

    def room_for_quarantine(self, size: int) -> str:
        """'' if a quarantine entry of ``size`` bytes may be written, else why not (a nearly full volume)."""
        return ""

    def _put_record_only(self, stem: str, record: bytes) -> bool:
        raise NotImplementedError

    def _put(self, stem: str, ext: str, data: bytes, content_type: str, metadata: dict[str, str]) -> bool:
        """Store a face; by default as data plus a sidecar JSON of its metadata."""
        return self._put_with_record(stem, ext, data, content_type,
                                     dict(metadata, **{"content-type": content_type}))

    def _put_with_record(self, stem: str, ext: str, data: bytes, content_type: str,
                         record: dict[str, Any]) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        return self.url

    # -- reading, for the console: keys are relative to the store's prefix, '/'-separated --------

    def list_dir(self, prefix: str, start_after: str = "") -> tuple[list[str], list[str]]:
        """(folders, files) right under ``prefix`` ("" = the top), names only, sorted; files
        whose name sorts after ``start_after`` only. One folder's listing, never a whole tree."""
        raise NotImplementedError

    def read(self, key: str) -> bytes:
        raise NotImplementedError

    def read_record(self, stem: str) -> dict[str, Any]:
        """The sidecar JSON ``<stem>.json`` (a face's metadata in folders, a quarantine record)."""
        return json.loads(self.read(f"{stem}.json"))

    def read_metadata(self, key: str) -> dict[str, str]:
        """A stored face's metadata (``device``, ``face-id``, ``captured-ms``, ``box``...)."""
        return self.read_record(key.rsplit(".", 1)[0])

    def delete(self, keys: list[str]) -> int:
        """Delete faces (with their sidecars); returns how many of ``keys`` were there."""
        raise NotImplementedError

    def delete_tree(self, prefix: str) -> None:
        """Delete everything under the folder ``prefix`` (a day folder, for retention)."""
        raise NotImplementedError


class FolderStore(Store):
    """A local folder (or a FUSE mount such as s3fs-fuse), written durably."""

    def __init__(self, root: str | os.PathLike, quarantine_prefix: str, quarantine_reserve: float = 0.0):
        super().__init__(str(root), quarantine_prefix)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantine_reserve = quarantine_reserve

    def room_for_quarantine(self, size: int) -> str:
        if not self.quarantine_reserve:
            return ""
        try:
            stats = os.statvfs(self.root)
        except OSError:
            return ""
        total, free = stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize
        if total and free - size < total * self.quarantine_reserve:
            return (f"the store's volume has {free} of {total} bytes free and the last "
                    f"{self.quarantine_reserve:.0%} are kept for faces")
        return ""

    def _put_record_only(self, stem, record) -> bool:
        target = self.root / f"{stem}.json"
        if target.exists():
            return False
        write_atomic(target, record, durable=True)
        return True

    def _put_with_record(self, stem, ext, data, content_type, record) -> bool:
        target, sidecar = self.root / f"{stem}.{ext}", self.root / f"{stem}.json"
        if target.exists() and sidecar.exists():
            return False
        # The sidecar first: the data file's presence is what marks the face stored. Both files are
        # fsynced, then one fsync of their folder makes both renames durable before this returns
        # (and the saver acknowledges): three fsyncs a face, not four. Should the power go before
        # it, a redelivered face whose sidecar did not survive is written again.
        write_atomic(sidecar, _json_bytes(record), durable=True, sync_folder=False)
        write_atomic(target, data, durable=True)
        return True

    def list_dir(self, prefix: str, start_after: str = "") -> tuple[list[str], list[str]]:
        folders, files = [], []
        try:
            with os.scandir(self.root / prefix if prefix else self.root) as entries:
                for entry in entries:
                    if entry.name.startswith("."):  # temporary files of writes in progress
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.name)
                    elif entry.name > start_after:
                        files.append(entry.name)
        except (FileNotFoundError, NotADirectoryError):
            pass
        return sorted(folders), sorted(files)

    def changed_ns(self, prefix: str) -> int:
        """The folder's modification time (ns; 0 when absent): a listing is current while it stays the same."""
        try:
            return os.stat(self.root / prefix).st_mtime_ns
        except OSError:
            return 0

    def read(self, key: str) -> bytes:
        return (self.root / _safe_relative(key)).read_bytes()

    def delete(self, keys: list[str]) -> int:
        removed = 0
        for key in keys:
            path = self.root / _safe_relative(key)
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            path.with_suffix(".json").unlink(missing_ok=True)
        return removed

    def delete_tree(self, prefix: str) -> None:
        import shutil

        shutil.rmtree(self.root / _safe_relative(prefix), ignore_errors=False)


def _safe_relative(key: str) -> str:
    """``key`` if it is a plain relative key (no '..', no absolute path), else ValueError."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"not a store key: {key[:200]!r}")
    return key


class FsspecStore(Store):
    """Any other fsspec filesystem: data plus sidecar JSON, through fsspec."""

    def __init__(self, url: str, quarantine_prefix: str, fs: Any = None, root: str | None = None):
        super().__init__(url, quarantine_prefix)
        if fs is None:
            fs, root = fsspec.core.url_to_fs(url)
        self.fs = fs
        self.root = (root or "").rstrip("/")

    def _path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if self.root else relative

    def _exists(self, path: str) -> bool:
        try:
            self.fs.info(path)
            return True
        except FileNotFoundError:
            return False

    def _put_with_record(self, stem, ext, data, content_type, record) -> bool:
        target = self._path(f"{stem}.{ext}")
        if self._exists(target):
            return False
        self.fs.pipe_file(self._path(f"{stem}.json"), _json_bytes(record))
        self.fs.pipe_file(target, data)
        return True

    def list_dir(self, prefix: str, start_after: str = "") -> tuple[list[str], list[str]]:
        base = self._path(prefix).rstrip("/")
        try:
            entries = self.fs.ls(base, detail=True, refresh=True)
        except FileNotFoundError:
            return [], []
        folders, files = [], []
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] == "directory":
                folders.append(name)
            elif name > start_after and not name.startswith("."):
                files.append(name)
        return sorted(folders), sorted(files)

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(_safe_relative(key)))

    def delete(self, keys: list[str]) -> int:
        present = [key for key in keys if self._exists(self._path(_safe_relative(key)))]
        paths = [self._path(key) for key in present]
        sidecars = [self._path(key.rsplit(".", 1)[0] + ".json") for key in present]
        existing_sidecars = [path for path in sidecars if self._exists(path)]
        if paths or existing_sidecars:
            self.fs.rm(paths + existing_sidecars)
        return len(present)

    def delete_tree(self, prefix: str) -> None:
        self.fs.rm(self._path(_safe_relative(prefix)), recursive=True)
    def _put_record_only(self, stem, record) -> bool:
        target = self._path(f"{stem}.json")
        if self._exists(target):
            return False
        self.fs.pipe_file(target, record)
        return True


class S3Store(FsspecStore):
    """S3 or an S3-compatible store through s3fs, metadata as object metadata."""

    def __init__(self, config: SaverConfig):
        import s3fs

        options: dict[str, Any] = {
            "skip_instance_cache": True,
            "config_kwargs": {"connect_timeout": min(config.timeout, 10.0), "read_timeout": config.timeout,
                              "retries": {"max_attempts": 2, "mode": "standard"}},
        }
        if config.endpoint_url:
            options["endpoint_url"] = config.endpoint_url
        if config.key or config.secret:
            options["key"], options["secret"] = config.key or None, config.secret or None
        if config.region:
            options["client_kwargs"] = {"region_name": config.region}
        fs = s3fs.S3FileSystem(session=session_without_expect_continue(), **options)
        # s3fs retries some errors itself with sleeps; the saver has its own
        # backoff, logging and counters, so keep s3fs's short.
        fs.retries = 2
        root = config.url.split("://", 1)[1].strip("/")
        super().__init__(config.url, config.quarantine_prefix, fs=fs, root=root)
        self.conditional = True

    def _put(self, stem, ext, data, content_type, metadata) -> bool:
        return self._write(self._path(f"{stem}.{ext}"), data, content_type, metadata)

    def _put_with_record(self, stem, ext, data, content_type, record) -> bool:
        target = self._path(f"{stem}.{ext}")
        if self._exists(target):
            return False
        self._write(self._path(f"{stem}.json"), _json_bytes(record), "application/json", {})
        return self._write(target, data, content_type, {})

    def _put_record_only(self, stem, record) -> bool:
        return self._write(self._path(f"{stem}.json"), record, "application/json", {})

    def _write(self, path: str, data: bytes, content_type: str, metadata: dict[str, str]) -> bool:
        """One PUT, exclusive when the store supports it; False if the key exists."""
        extra = {"ContentType": content_type, "Metadata": metadata}
        if self.conditional:
            try:
                self.fs.pipe_file(path, data, mode="create", **extra)
                return True
            except FileExistsError:
                return False
            except OSError as error:
                if error.errno != errno.ENOSYS:
                    raise
                log.warning("%s does not support conditional writes (%s); checking for existing "
                            "keys before writing instead", self.describe(), error)
                self.conditional = False
        if self._exists(path):
            return False
        self.fs.pipe_file(path, data, **extra)
        return True

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]

    def _key(self, relative: str) -> str:
        """The S3 object key (without the bucket) of a store key."""
        path = self._path(relative)
        return path.split("/", 1)[1] if "/" in path else ""

    def list_dir(self, prefix: str, start_after: str = "") -> tuple[list[str], list[str]]:
        """One folder's listing straight from ListObjectsV2 (delimiter '/'), no listing cache,
        starting after ``start_after`` when given, so a folder that grows is re-read cheaply."""
        key_prefix = self._key(prefix)
        key_prefix = f"{key_prefix.rstrip('/')}/" if key_prefix else ""
        folders, files = [], []
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key_prefix, "Delimiter": "/"}
        if start_after:
            request["StartAfter"] = key_prefix + start_after
        while True:
            page = self.fs.call_s3("list_objects_v2", **request)
            folders += [item["Prefix"][len(key_prefix):].rstrip("/") for item in page.get("CommonPrefixes", [])]
            files += [item["Key"][len(key_prefix):] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                break
            request["ContinuationToken"] = page["NextContinuationToken"]
        return sorted(folders), sorted(name for name in files if name and not name.startswith("."))

    def read_metadata(self, key: str) -> dict[str, str]:
        return self.fs.metadata(self._path(_safe_relative(key)))

    def delete(self, keys: list[str]) -> int:
        """Faces on S3 have no sidecar: one DeleteObjects per 1,000 keys. The count is of the keys
        deleted without error (S3 does not say whether a key was there; one key alone is checked)."""
        keys = [_safe_relative(key) for key in keys]
        if len(keys) == 1 and not self._exists(self._path(keys[0])):
            return 0
        removed = 0
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            answer = self.fs.call_s3("delete_objects", Bucket=self.bucket,
                                     Delete={"Objects": [{"Key": self._key(key)} for key in batch], "Quiet": True})
            errors = answer.get("Errors", [])
            for error in errors[:3]:
                log.warning("cannot delete %s: %s", error.get("Key"), error.get("Message"))
            removed += len(batch) - len(errors)
        return removed


@dataclass(frozen=True)
class QuarantineEntry:
    """A quarantine write: its key stem, its record as JSON, and the payload unless it is not kept."""

    stem: str
    record: bytes
    payload: bytes | None

    @property
    def size(self) -> int:
        return len(self.record) + (len(self.payload) if self.payload is not None else 0)


def session_without_expect_continue():
    """An aiobotocore session whose S3 clients send PUTs without ``Expect: 100-continue``.

    botocore adds that header to every PUT with a body. aiohttp then sends the
    headers from the request's body-writer task and waits for "100 Continue"
    before the body; when S3 goes away and a pooled keep-alive connection is
    already closing, sending those headers fails inside that task, and the
    request fails on the response side first, so nobody ever awaits the task:
    asyncio logs "Task exception was never retrieved" with a traceback for the
    writes an outage catches on their way. Without the header the body goes out
    with the headers and aiohttp's own error handling covers a failure. The
    header buys little here: it saves sending the body of a refused write (412
    on ``If-None-Match``, 403), and a face is a few kilobytes. The handler is
    registered on the session, so every client s3fs makes from it (also a new
    one after the old one's connections closed) has it.
    """
    import aiobotocore.session

    session = aiobotocore.session.AioSession()
    # Registered after botocore's own add_expect_header on the same event, so it runs after it.
    session.register("before-call.s3", _drop_expect_continue, unique_id="facehub-no-expect-continue")
    return session


def _drop_expect_continue(params: dict[str, Any], **_: Any) -> None:
    params.get("headers", {}).pop("Expect", None)


def _json_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True, ensure_ascii=True, indent=1) + "\n").encode()


class NullStore(Store):
    """``null://``: a benchmark aid that acknowledges every write and keeps nothing.

    It counts what it was given (``faces``, ``quarantined``) and discards it, so
    ``facehub bench fleet`` can measure the broker and the savers without any
    storage cost: the ceiling of everything before the store. Never for real
    faces: a saver on ``null://`` acknowledges faces it did not keep.
    """

    def __init__(self, url: str, quarantine_prefix: str):
        super().__init__(url, quarantine_prefix)
        self.faces = 0
        self.quarantined = 0

    def _put_with_record(self, stem, ext, data, content_type, record) -> bool:
        if stem.startswith(self.quarantine_prefix.strip("/") + "/"):
            self.quarantined += 1
        else:
            self.faces += 1
        return True

    def _put_record_only(self, stem, record) -> bool:
        self.quarantined += 1
        return True

    def describe(self) -> str:
        return f"{self.url} (discards everything: benchmarks only)"

    def list_dir(self, prefix: str, start_after: str = "") -> tuple[list[str], list[str]]:
        return [], []

    def read(self, key: str) -> bytes:
        raise FileNotFoundError(key)

    def delete(self, keys: list[str]) -> int:
        return 0

    def delete_tree(self, prefix: str) -> None:
        pass


def open_store(config: SaverConfig) -> Store:
    """The store named by ``config.url``: S3, a folder, ``null://`` (benchmarks), or any other fsspec URL."""
    url = config.url
    protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
    if protocol == "null":
        log.warning("saver.url is %s: faces are acknowledged and discarded (a benchmark aid)", url)
        return NullStore(url, config.quarantine_prefix)
    if protocol in ("s3", "s3a"):
        return S3Store(config)
    if protocol in ("file", "local"):
        path = url.split("://", 1)[1] if "://" in url else url
        return FolderStore(path, config.quarantine_prefix, config.quarantine_reserve)
    return FsspecStore(url, config.quarantine_prefix)
