"""How timings become figures: milliseconds, and median / p90 / p99 / mean / min / max / n."""
from __future__ import annotations

import numpy as np


def summarize(values_ms) -> dict:
    """median / p90 / p99 / mean / min / max / n of a list of milliseconds."""
    v = np.asarray(list(values_ms), dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)),
            "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def ms(seconds: float) -> float:
    return seconds * 1000.0
