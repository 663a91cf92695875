"""The runtime on packages written by listenloop.export (a real tiny transformer), through the
exporter's session fixtures `tiny_package` and `tiny_package_at(precision)` (tests/conftest.py)."""
from __future__ import annotations

import numpy as np
import pytest

from listenloop.engine import Engine
from listenloop.package import load_package
from listenloop.protocol import BLOCK


def _fixture(request, name):
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        pytest.skip(f"the exporter's fixture {name!r} is not available")


@pytest.fixture(scope="module")
def exported(request):
    return load_package(_fixture(request, "tiny_package"))


def _audio(package, n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 10, package.hidden_size)).astype(np.float32)


def test_first_step_layout_on_exported_package(exported):
    engine = Engine(exported)
    engine.listen(_audio(exported, 1)[0])
    fed = engine.last_inputs()
    P = len(exported.prefix_ids)
    t = exported.tokens
    assert fed["token_ids"].tolist() == list(exported.prefix_ids) + [t["AUDIO_BEGIN"]] + [t["PAD"]] * 10 + [t["ASSISTANT"]]
    assert fed["positions"].tolist() == list(range(P + BLOCK))


def test_session_on_exported_package(exported):
    import listenloop

    rt = listenloop.Runtime(exported.path)
    rng = np.random.default_rng(0)
    pcm = (0.1 * rng.normal(size=16000 * 8)).astype(np.float32)
    with rt.session() as s:
        s.accept_waveform(pcm, 16000)
        s.finish(timeout=120)
        events = list(s.events(timeout=1))
    decisions = [e for e in events if e.kind == "Decision"]
    assert [d.chunk for d in decisions] == list(range(20))
    started = [e for e in events if e.kind == "ReplyStarted"]
    ended = [e for e in events if e.kind == "ReplyEnded"]
    assert len(started) == len(ended) == sum(d.spoke for d in decisions)
    for reply in ended:
        assert "\ufffd" not in reply.text


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_every_precision_runs(request, precision):
    factory = _fixture(request, "tiny_package_at")
    package = load_package(factory(precision))
    engine = Engine(package)
    assert engine.kv_cache.dtype == package.io_dtype
    for chunk in _audio(package, 4):
        result = engine.listen(chunk)
        assert 0.0 <= result.p_speak <= 1.0
        if result.spoke:
            steps = list(engine.speak(max_tokens=8))
            assert steps and all(0 <= s.token < package.vocab_size for s in steps)
