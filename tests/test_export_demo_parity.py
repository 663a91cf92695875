"""Quantized parity where it is meaningful: the trained demo checkpoint (demo/checkpoint, the
release layout the shipped model was exported from) over held-out example recordings with
replies. Its decisions have real margins, unlike the random tiny checkpoint's, so int8 and int4
must meet the export's 97 % decision-agreement threshold here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from listenloop.audio import read_audio  # noqa: E402
from listenloop.export.package import export_package  # noqa: E402
from listenloop.export.parity import MIN_DECISION_AGREEMENT, parity_report, reference_run  # noqa: E402
from listenloop.package import load_package  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "demo" / "checkpoint"
RECORDINGS = ("kitchen.wav", "front_door.wav", "living_room.wav")


@pytest.fixture(scope="module")
def reference():
    audio = np.concatenate([read_audio(ROOT / "examples" / name) for name in RECORDINGS])
    return reference_run(CHECKPOINT, max_reply_tokens=512, audio=audio)


@pytest.mark.parametrize("precision,attention,kv_dtype", [
    ("fp32", "grouped", None), ("int8", "grouped", None), ("int4", "grouped", None),
    ("fp32", "gqa", None), ("int8", "gqa", None), ("int4", "gqa", None),
    ("int4", "gqa", "float16"),  # the GPU package: 4-bit weights, float16 activations and KV
])
def test_demo_checkpoint_exports_with_parity(reference, tmp_path, precision, attention, kv_dtype):
    assert len(reference.trace.decisions) >= 60 and len(reference.trace.replies) >= 5
    package = export_package(CHECKPOINT, tmp_path / precision, precision=precision, max_context=4096,
                             attention=attention, kv_dtype=kv_dtype)
    assert load_package(package).io_dtype == (kv_dtype or "float32")
    report = parity_report(CHECKPOINT, package, reference=reference)
    print("\n" + report.table())
    assert report.decision_agreement >= MIN_DECISION_AGREEMENT, report.table()
    assert report.passed, report.table()
    if precision == "fp32":
        assert report.decision_agreement == 1.0 and report.reply_token_agreement == 1.0
