"""demo.calibrate: the speak-bias rule, and the chosen bias reaching a listenloop session."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demo/ is a top-level folder, not installed

pytest.importorskip("torch")

from demo.calibrate import choose, write_speak_bias  # noqa: E402
from demo.evaluate import Report  # noqa: E402

DEFAULT_PACKAGE = Path(__file__).resolve().parents[1] / "runtime" / "models" / "default"


def _report(right: int, of: int, false_replies: int, minutes: float = 10.0) -> Report:
    return Report({"doorbell": [True] * right + [False] * (of - right)}, [], false_replies, 60.0 * minutes)


def test_most_right_answers_among_biases_within_the_false_reply_limit():
    reports = {0.0: _report(9, 10, 4), -1.0: _report(8, 10, 1), -2.0: _report(6, 10, 0)}
    assert choose(reports, max_false=1.0) == -1.0
    assert choose(reports, max_false=5.0) == 0.0


def test_fewest_false_replies_when_no_bias_is_within_the_limit():
    reports = {0.0: _report(9, 10, 6), -1.0: _report(8, 10, 3), -2.0: _report(5, 10, 3)}
    assert choose(reports, max_false=1.0) == -1.0


def test_written_bias_is_what_a_session_uses(tmp_path):
    from listenloop.engine import Engine

    package = tmp_path / "pkg"
    shutil.copytree(DEFAULT_PACKAGE, package)
    write_speak_bias(package, -2.5)
    assert Engine(package, "cpu").speak_bias == -2.5
