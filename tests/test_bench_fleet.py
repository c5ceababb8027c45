"""``facehub bench fleet --quick``: real devices, broker, ``facehub run cloud`` and stores, a few seconds.

What must hold on any machine: every face the broker acknowledged is counted
stored (none lost, none rejected), and the tables have their rows. Never a speed.
"""

from __future__ import annotations

import pytest

from facehub.cloud.storage import NullStore, open_store
from facehub.config import SaverConfig
from facehub.dev.bench import fleet
from facehub.messages import Face

pytestmark = pytest.mark.timeout(300)


def test_null_store_acknowledges_counts_and_keeps_nothing():
    store = open_store(SaverConfig(url="null://bench"))
    assert isinstance(store, NullStore)
    face = Face(b"\xff\xd8\xff" + b"x" * 100, "cam-1")
    assert store.put_face(face) and store.put_face(face)  # no memory of what it was given
    assert store.put_quarantine("faces/cam-1", b"junk", "a reason", None)
    assert (store.faces, store.quarantined) == (2, 1)
    assert store.list_dir("") == ([], [])
    with pytest.raises(FileNotFoundError):
        store.read("cam-1/x.jpg")


def test_quick_fleet_loses_nothing_and_prints_its_rows(capsys):
    result = fleet.main(quick=True, devices=[3], savers=[1], stores=["null", "folder"], seconds=2.0,
                        soak_seconds=0)
    rows = result["ceiling"] + result["devices"] + result["paced"]
    assert [(r.store, r.rate == 0) for r in rows] == [("null", True), ("folder", True),
                                                      ("null", False), ("folder", False)]
    for row in rows:
        assert row.published > 0 and row.acked == row.published
        assert row.lost == 0 and row.rejected == 0
        assert row.stored + row.duplicates == row.acked
        assert row.stored > 0 and row.cpu_per_1000 > 0 and row.saver_rss > 0 and row.broker_rss > 0
        assert row.p50 is not None and row.p99 >= row.p50
    assert set(result["plain"]) == {("folder", 1)}
    out = capsys.readouterr().out
    assert "## Fleet: each store's ceiling through the savers" in out
    assert "## Fleet: latency at half the measured maximum" in out
    assert "| null | 3 | 1 | flat out |" in out and "| folder | 3 | 1 |" in out
    assert "fleet rows=4 lost=0 rejected=0" in out
