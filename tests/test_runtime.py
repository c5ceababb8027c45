"""Runtime counters, gauges and percentiles flushed for health and the demo."""

from facehub.runtime import Runtime, percentiles, read_stats


def test_percentiles_nearest_rank():
    assert percentiles(range(1, 101)) == {"count": 100, "p50": 50, "p95": 95, "p99": 99, "max": 100}
    assert percentiles([7.0]) == {"count": 1, "p50": 7.0, "p95": 7.0, "p99": 7.0, "max": 7.0}
    assert percentiles([]) == {"count": 0}


def test_flush_and_read_back(tmp_path):
    runtime = Runtime("saver-1", state_dir=tmp_path)
    runtime.count("stored", 3)
    runtime.gauge("spool_depth", 12)
    for value in (10, 20, 30):
        runtime.observe("latency_ms", value)
    runtime.flush()
    data = read_stats(tmp_path)["saver-1"]
    assert data["counters"] == {"stored": 3}
    assert data["gauges"] == {"spool_depth": 12}
    assert data["percentiles"]["latency_ms"]["p50"] == 20
