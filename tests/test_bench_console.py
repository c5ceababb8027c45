"""bench console on small stores: it serves real pages from both stores and reports its figures (no time is asserted)."""

from __future__ import annotations

from facehub.dev.bench import console


def test_bench_console_measures_both_stores():
    rows = console.run(folder_faces=700, s3_faces=250)
    assert [(row["store"], row["faces"]) for row in rows] == [("folder", 700), ("moto S3", 250)]
    for row in rows:
        assert row["tiles"] == 60  # a full first page
        assert row["page"] == (12 if row["store"] == "folder" else 5)  # followed the "older" links to the end
        assert all(row[key] > 0 for key in ("cold", "warm", "deep", "device"))
    table = console.table(rows)
    assert "| folder | 700 |" in table and "| moto S3 | 250 |" in table
