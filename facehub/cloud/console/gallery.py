"""The faces of a store, newest first, read through the storage layer's day folders.

Keys are ``<device>/<YYYY>/<MM>/<DD>/<HHMMSS.mmm>-<face id>.<ext>``: within one day
folder, names sort by capture time. A page is made by walking days newest first and
merging the day folders of the devices shown; a cursor (the last face shown) makes the
next page start right after it, so a page costs the listings of the days it touches,
never a listing of the whole store.

Listings are cached: a folder store's day listing stays valid while the folder's
modification time is the same; on S3 a recent day (today, yesterday) is re-read with
``StartAfter`` its last key (only new keys come back) and in full every
``FULL_RELIST`` seconds (faces that arrived late from an edge spool sort earlier);
older days and the year/month/day folder lists are re-read after a while. The poller
(:meth:`Gallery.poll`) keeps today's and yesterday's listings of every device current
and reports the faces that appeared, for the live gallery and the fleet.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from facehub.cloud.storage import FolderStore, Store

NAME = re.compile(r"^(?P<h>\d\d)(?P<m>\d\d)(?P<s>\d\d)\.(?P<ms>\d{3})-(?P<id>[A-Za-z0-9][A-Za-z0-9._-]*)"
                  r"\.(?P<ext>jpg|png|webp)$")
DAY = re.compile(r"^\d{4}/\d\d/\d\d$")
RECENT_TTL = 2.0  # seconds a listing of today or yesterday is trusted without looking (S3), unless told
OLD_TTL = 3600.0  # seconds a listing of an older day is trusted (S3; deletions through the console forget it)
FOLDERS_TTL = 120.0  # seconds a list of year/month/day folders is trusted (the newest are re-read by warm())
WARM_EVERY = 15.0  # seconds between two warm() rounds of the poller
FULL_RELIST = 60.0  # seconds between complete re-reads of a recent day on S3
METADATA_CACHE = 5000
TRACK_WINDOW_MS = 10 * 60 * 1000  # crops of one track are looked for within 10 minutes of a face
TRACK_CANDIDATES = 300


@dataclass(frozen=True, order=True)
class FaceRef:
    """One stored face, known from its key alone. Orders by capture time (day, name), then device."""

    day: str  # YYYY/MM/DD
    name: str  # HHMMSS.mmm-<face id>.<ext>
    device: str

    @property
    def key(self) -> str:
        return f"{self.device}/{self.day}/{self.name}"

    @property
    def face_id(self) -> str:
        return self.name[11:].rsplit(".", 1)[0]

    @property
    def captured_ms(self) -> int:
        y, mo, d = (int(part) for part in self.day.split("/"))
        n = self.name
        when = datetime(y, mo, d, int(n[0:2]), int(n[2:4]), int(n[4:6]), tzinfo=timezone.utc)
        return int(when.timestamp()) * 1000 + int(n[7:10])

    @property
    def cursor(self) -> str:
        """Where the next page starts: this face's key."""
        return self.key

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "device": self.device, "face_id": self.face_id, "captured_ms": self.captured_ms,
                "captured": iso(self.captured_ms)}

    @classmethod
    def from_key(cls, key: str) -> "FaceRef":
        parts = key.split("/")
        if len(parts) != 5 or not NAME.match(parts[4]) or not DAY.match("/".join(parts[1:4])):
            raise ValueError(f"not a face key: {key[:200]!r}")
        return cls("/".join(parts[1:4]), parts[4], parts[0])

    from_cursor = from_key


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def day_of(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y/%m/%d")


def name_bound(ms: int) -> str:
    """The smallest name in a day folder at or after ``ms``'s time of day."""
    when = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return f"{when:%H%M%S}.{ms % 1000:03d}"


@dataclass
class Listing:
    """The face names of one device-day folder, sorted, and how current they are."""

    names: list[str]
    checked: float  # monotonic time of the last look
    relisted: float  # monotonic time of the last complete read
    version: int = 0  # folder mtime (folders) or a counter of changes
    hours: dict[int, int] | None = None  # faces per hour of the day, computed once per version

    def per_hour(self) -> dict[int, int]:
        if self.hours is None:
            hours: dict[int, int] = {}
            for name in self.names:
                hour = int(name[:2])
                hours[hour] = hours.get(hour, 0) + 1
            self.hours = hours
        return self.hours


@dataclass
class Page:
    faces: list[FaceRef]
    next_cursor: str | None


class Gallery:
    """Newest-first pages of a store's faces, with cached listings (thread-safe)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time, workers: int = 8,
                 recent_ttl: float = RECENT_TTL):
        self.store = store
        # how old a listing of today or yesterday may be when a page uses it: the console's poller
        # re-reads them every poll interval, so its pages need not (no S3 request on a page's path)
        self.recent_ttl = recent_ttl
        self.clock = clock  # wall clock: which day is "today"
        self.folder = isinstance(store, FolderStore)
        self.reserved = store.quarantine_prefix.strip("/").split("/")[0]
        self._listings: dict[tuple[str, str], Listing] = {}
        self._folders: dict[str, tuple[float, list[str]]] = {}  # prefix -> (checked, folder names)
        self._metadata: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="console-store")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- folders ------------------------------------------------------------------------------

    def _subfolders(self, prefix: str, ttl: float = FOLDERS_TTL) -> list[str]:
        now = time.monotonic()
        with self._lock:
            cached = self._folders.get(prefix)
        if cached and now - cached[0] < ttl:
            return cached[1]
        folders, _ = self.store.list_dir(prefix)
        with self._lock:
            self._folders[prefix] = (now, folders)
        return folders

    def devices(self, ttl: float = FOLDERS_TTL) -> list[str]:
        """Every device with a folder in the store (the quarantine prefix is not a device)."""
        return [name for name in self._subfolders("", ttl) if name != self.reserved]

    def days(self, device: str, newest: str | None = None, oldest: str | None = None) -> list[str]:
        """The device's day folders (YYYY/MM/DD), newest first, within [oldest, newest] when given."""
        result = []
        for year in sorted(self._subfolders(device), reverse=True):
            if newest and year > newest[:4] or oldest and year < oldest[:4]:
                continue
            for month in sorted(self._subfolders(f"{device}/{year}"), reverse=True):
                ym = f"{year}/{month}"
                if newest and ym > newest[:7] or oldest and ym < oldest[:7]:
                    continue
                for day in sorted(self._subfolders(f"{device}/{ym}"), reverse=True):
                    ymd = f"{ym}/{day}"
                    if DAY.match(ymd) and not (newest and ymd > newest or oldest and ymd < oldest):
                        result.append(ymd)
        return result

    def _recent_days(self) -> tuple[str, str]:
        now = self.clock()
        return day_of(now * 1000), day_of((now - 86400) * 1000)

    # -- day listings -------------------------------------------------------------------------

    def listing(self, device: str, day: str, max_age: float | None = None) -> Listing:
        """The names in ``device/day``, read or re-read when the cached one may be stale (on S3: older
        than ``max_age``, default ``recent_ttl`` for today and yesterday)."""
        key = (device, day)
        prefix = f"{device}/{day}"
        now = time.monotonic()
        with self._lock:
            cached = self._listings.get(key)
        if self.folder:
            # A folder's mtime changes when a file is added or removed; one that changed within the
            # last second is not trusted (a write in the same clock tick as the listing leaves it equal).
            version = self.store.changed_ns(prefix)  # type: ignore[attr-defined]
            settled = self.clock() - version / 1e9 > 1.0
            if cached and cached.version == version and settled and now - cached.relisted < FULL_RELIST:
                cached.checked = now
                return cached
            _, files = self.store.list_dir(prefix)
            fresh = Listing(sorted(n for n in files if NAME.match(n)), now, now, version)
        else:
            recent = day in self._recent_days()
            ttl = max_age if max_age is not None else self.recent_ttl if recent else OLD_TTL
            if cached and now - cached.checked < ttl:
                return cached
            if cached and recent and cached.names and now - cached.relisted < FULL_RELIST:
                _, files = self.store.list_dir(prefix, start_after=cached.names[-1])
                added = [n for n in files if NAME.match(n)]
                if not added:
                    cached.checked = now
                    return cached
                fresh = Listing(sorted(set(cached.names).union(added)), now, cached.relisted, cached.version + 1)
            else:
                _, files = self.store.list_dir(prefix)
                fresh = Listing(sorted(n for n in files if NAME.match(n)), now, now,
                                (cached.version + 1) if cached else 0)
        with self._lock:
            self._listings[key] = fresh
        return fresh

    def forget(self, device: str | None = None, day: str | None = None) -> None:
        """Drop cached listings (after a deletion) of a device, a device-day, or everything."""
        with self._lock:
            for key in list(self._listings):
                if (device is None or key[0] == device) and (day is None or key[1] == day):
                    del self._listings[key]
            for prefix in list(self._folders):
                if device is None or prefix == "" or prefix == device or prefix.startswith(device + "/"):
                    del self._folders[prefix]

    def _listings_of(self, pairs: list[tuple[str, str]], max_age: float | None = None
                     ) -> dict[tuple[str, str], Listing]:
        """Listings of several device-days, read in parallel when they are not cached."""
        if len(pairs) <= 1:
            return {pair: self.listing(*pair, max_age) for pair in pairs}
        return dict(zip(pairs, self._pool.map(lambda pair: self.listing(*pair, max_age), pairs)))

    # -- pages --------------------------------------------------------------------------------

    def page(self, device: str | None = None, start_ms: int | None = None, end_ms: int | None = None,
             before: FaceRef | None = None, size: int = 60) -> Page:
        """Up to ``size`` faces, newest first: of ``device`` (or all), captured in [start_ms, end_ms),
        older than ``before``; with the cursor of the next page when there are more."""
        devices = [device] if device else self.devices()
        newest = day_of(end_ms - 1) if end_ms is not None else None
        if before is not None and (newest is None or before.day < newest):
            newest = before.day
        oldest = day_of(start_ms) if start_ms is not None else None
        if newest is not None and oldest is not None and newest < oldest:
            return Page([], None)
        per_device = dict(zip(devices, self._pool.map(lambda d: self.days(d, newest, oldest), devices)))
        all_days = sorted({day for days in per_device.values() for day in days}, reverse=True)
        found: list[FaceRef] = []
        for day in all_days:
            pairs = [(dev, day) for dev, days in per_device.items() if day in days]
            listings = self._listings_of(pairs)
            low = name_bound(start_ms) if start_ms is not None and day_of(start_ms) == day else None
            high = name_bound(end_ms) if end_ms is not None and day_of(end_ms) == day else None
            candidates = []
            for (dev, _), listing in listings.items():
                names = listing.names
                lo = bisect.bisect_left(names, low) if low else 0
                hi = bisect.bisect_left(names, high) if high else len(names)
                if before is not None and before.day == day:
                    hi = min(hi, bisect.bisect_right(names, before.name))
                # newest first: take at most the page's worth from the end of each listing
                # (one more than needed: the cursor's own face may be among them and be dropped)
                start = max(lo, hi - (size + 2 - len(found)))
                for name in names[start:hi]:
                    ref = FaceRef(day, name, dev)
                    if before is None or ref < before:
                        candidates.append(ref)
            candidates.sort(reverse=True)
            found.extend(candidates)
            if len(found) > size:
                break
        found.sort(reverse=True)
        if len(found) > size:
            return Page(found[:size], found[size - 1].cursor)
        return Page(found, None)

    # -- metadata -----------------------------------------------------------------------------

    def metadata(self, ref: FaceRef) -> dict[str, str]:
        """The face's stored metadata (cached: a stored face never changes)."""
        with self._lock:
            cached = self._metadata.get(ref.key)
            if cached is not None:
                self._metadata.move_to_end(ref.key)
                return cached
        meta = self.store.read_metadata(ref.key)
        with self._lock:
            self._metadata[ref.key] = meta
            while len(self._metadata) > METADATA_CACHE:
                self._metadata.popitem(last=False)
        return meta

    def same_track(self, ref: FaceRef, track: str) -> list[FaceRef]:
        """Other crops of the face's track: the same device and track id within ``TRACK_WINDOW_MS``,
        oldest first (track ids restart with the detector, so only nearby crops are looked at)."""
        names = self.listing(ref.device, ref.day).names
        lo = bisect.bisect_left(names, name_bound(max(0, ref.captured_ms - TRACK_WINDOW_MS)))
        hi = bisect.bisect_right(names, name_bound(ref.captured_ms + TRACK_WINDOW_MS) + "~")
        if day_of(ref.captured_ms + TRACK_WINDOW_MS) != ref.day:
            hi = len(names)
        if day_of(max(0, ref.captured_ms - TRACK_WINDOW_MS)) != ref.day:
            lo = 0
        position = bisect.bisect_left(names, ref.name)
        window = sorted(range(lo, hi), key=lambda i: abs(i - position))[:TRACK_CANDIDATES]
        others = [FaceRef(ref.day, names[i], ref.device) for i in sorted(window) if names[i] != ref.name]

        def meta(other: FaceRef) -> dict[str, str]:
            try:
                return self.metadata(other)
            except (OSError, ValueError):
                return {}

        return [other for other, m in zip(others, self._pool.map(meta, others)) if m.get("track") == track]

    # -- deleting -----------------------------------------------------------------------------

    def delete_face(self, ref: FaceRef) -> int:
        removed = self.store.delete([ref.key])
        self.forget(ref.device, ref.day)
        return removed

    def delete_day(self, device: str, day: str) -> int:
        names = self.listing(device, day).names
        removed = self.store.delete([f"{device}/{day}/{name}" for name in names]) if names else 0
        self.forget(device, day)
        return removed

    def delete_device(self, device: str) -> int:
        removed = sum(self.delete_day(device, day) for day in self.days(device))
        self.forget(device)
        return removed

    def warm(self, size: int) -> None:
        """Re-read each device's newest year, month and day folder lists and make the first page, so a
        request finds them cached: run by the poller at start and every ``WARM_EVERY`` seconds."""
        def one(device: str) -> None:
            years = self._subfolders(device, ttl=0)
            if years:
                months = self._subfolders(f"{device}/{max(years)}", ttl=0)
                if months:
                    self._subfolders(f"{device}/{max(years)}/{max(months)}", ttl=0)

        list(self._pool.map(one, self.devices(ttl=0)))
        self.page(size=size)

    # -- the live view ------------------------------------------------------------------------

    def poll(self, known: dict[tuple[str, str], list[str]], prime: bool = False) -> list[FaceRef]:
        """Re-read today's and yesterday's folder of every device; the faces that appeared since the
        names in ``known`` (updated in place). With ``prime`` it only fills ``known``."""
        today, yesterday = self._recent_days()
        pairs = [(dev, day) for dev in self.devices(ttl=0) for day in (today, yesterday)]
        listings = self._listings_of(pairs, max_age=0)
        new: list[FaceRef] = []
        for pair, listing in listings.items():
            seen = known.get(pair)
            known[pair] = listing.names
            if prime or seen is listing.names:
                continue
            added = set(listing.names).difference(seen) if seen else listing.names
            new.extend(FaceRef(pair[1], name, pair[0]) for name in added)
        for pair in [pair for pair in known if pair[1] not in (today, yesterday)]:
            del known[pair]
        return sorted(new)

    # -- the fleet ----------------------------------------------------------------------------

    def device_summary(self, device: str) -> dict[str, Any]:
        """Last face, faces today and faces per hour over the last 24 hours, from the day listings."""
        now_ms = int(self.clock() * 1000)
        today, yesterday = self._recent_days()
        listings = self._listings_of([(device, today), (device, yesterday)])
        hour_now = int(name_bound(now_ms)[:2])
        series = []
        for back in range(23, -1, -1):
            hour = hour_now - back
            day = today if hour >= 0 else yesterday
            series.append(listings[(device, day)].per_hour().get(hour % 24, 0))
        last = None
        for day in (today, yesterday):
            if listings[(device, day)].names:
                last = FaceRef(day, listings[(device, day)].names[-1], device)
                break
        if last is None:
            days = self.days(device, newest=today)
            if days:
                names = self.listing(device, days[0]).names
                if names:
                    last = FaceRef(days[0], names[-1], device)
        return {"device": device, "faces_today": len(listings[(device, today)].names), "per_hour": series,
                "last_face": last}


def parse_range(day: str | None, start: str | None, end: str | None) -> tuple[int | None, int | None]:
    """A gallery filter as [start_ms, end_ms): a day (YYYY-MM-DD) and optional times of day
    (HH:MM or HH:MM:SS, UTC); times without a day are ignored. ValueError for a bad value."""
    if not day:
        return None, None
    base = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc)

    def at(text: str | None, default: timedelta, end: bool = False) -> int:
        if not text:
            return int((base + default).timestamp() * 1000)
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            raise ValueError(f"bad time {text!r}") from None
        if len(parts) not in (2, 3) or not (0 <= parts[0] <= 24 and 0 <= parts[1] < 60) \
                or len(parts) == 3 and not 0 <= parts[2] < 60:
            raise ValueError(f"bad time {text!r}")
        offset = timedelta(hours=parts[0], minutes=parts[1], seconds=parts[2] if len(parts) == 3 else 0)
        if end and parts[0] < 24:  # "to 10:15" includes 10:15:59.999, "to 10:15:30" 10:15:30.999
            offset += timedelta(seconds=1 if len(parts) == 3 else 60)
        return int((base + min(offset, timedelta(days=1))).timestamp() * 1000)

    return at(start, timedelta(0)), at(end, timedelta(days=1), end=True)

