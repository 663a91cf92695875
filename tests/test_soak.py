"""A short soak: 30 simulated minutes of examples, silence and noise through one session
(`listenloop bench --soak 24` is the long run). Nothing is lost, the answers keep coming and
memory stays flat."""
from __future__ import annotations

from listenloop.benchmarks import soak


def test_thirty_simulated_minutes_lose_nothing_and_keep_memory_flat():
    result = soak.soak(0.5, report_every_hours=0.25)
    rows = result["rows"]
    at_10_min, last = rows[0], rows[-1]
    assert at_10_min["hours"] == round(10 / 60, 3) and last["hours"] == 0.5
    assert last["dropped_samples"] == last["dropped_chunks"] == last["dropped_events"] == last["faults"] == 0
    assert last["resets"] > 0 and last["replies"] > 0
    reps = result["repetitions"]
    assert len(reps) == 12  # 3 programs x 4 recordings (the quiet one expects no reply)
    assert sum(r["answered"] for r in reps) >= 0.6 * sum(r["expected"] for r in reps)
    assert last["rss_mb"] <= at_10_min["rss_mb"] * 1.01
    assert "RSS growth" in soak.report(result)
