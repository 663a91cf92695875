"""A package's reply set (docs/PROTOCOL.md, "Reply set"): a model that may only say listed
replies never says anything else, and a bad reply set is refused with the field named."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import listenloop
from listenloop.errors import ExportError, ModelPackageError
from listenloop.package import load_package
from listenloop.reply_set import ReplySet

REPLIES = [{"emotion": "NORMAL", "text": "Someone is at the door."},
           {"emotion": "URGENT", "text": "Smoke alarm!"},
           {"emotion": "HAPPY", "text": "Hello! I'm listening."}]


def test_prefix_tree_lists_the_continuations():
    replies = ReplySet([(9, 1, 2, 0), (9, 1, 3, 0), (8, 4, 0)])
    assert replies.size == 3
    assert replies.allowed(()).tolist() == [8, 9]
    assert replies.allowed((9, 1)).tolist() == [2, 3]
    assert replies.allowed((9, 1, 2)).tolist() == [0]
    assert replies.allowed((7,)).size == 0
    logits = np.arange(10, dtype=np.float32)
    out = replies.constrain(logits, (9,), np.empty(10))
    assert np.argmax(out) == 1 and np.isinf(np.delete(out, 1)).all()


@pytest.fixture(scope="module")
def listed_package(tiny_checkpoint, tmp_path_factory):
    """The tiny random checkpoint exported with REPLIES as its reply set."""
    from listenloop.export.package import export_package

    root = tmp_path_factory.mktemp("reply-set")
    (root / "replies.json").write_text(json.dumps(REPLIES))
    return export_package(tiny_checkpoint, root / "pkg", precision="fp32", reply_set=root / "replies.json")


def _replies(package, seconds=6.0):
    """(emotion, text, truncated) of every reply a session gives to noise, answering every chunk."""
    noise = np.random.default_rng(3).standard_normal(int(seconds * 16000)).astype(np.float32) * 0.1
    with listenloop.Runtime(package, speak_bias=1e4, max_reply_tokens=24) as rt, rt.session() as s:
        s.accept_waveform(noise, 16000)
        s.finish(timeout=120)
        events = list(s.events(timeout=1))
    started = [e.emotion for e in events if e.kind == "ReplyStarted"]
    ended = [(e.text, e.truncated) for e in events if e.kind == "ReplyEnded"]
    assert len(started) == len(ended) > 0
    return [(emotion, text, cut) for emotion, (text, cut) in zip(started, ended)]


def test_a_listed_package_says_only_listed_replies(listed_package, tiny_package):
    listed = {(r["emotion"], r["text"]) for r in REPLIES}
    free = _replies(tiny_package)
    assert any((emotion, text) not in listed for emotion, text, _ in free)  # random weights babble
    constrained = _replies(listed_package)
    assert all((emotion, text) in listed and not cut for emotion, text, cut in constrained), constrained


def test_export_writes_the_reply_set(listed_package):
    package = load_package(listed_package)
    assert len(package.reply_set) == len(REPLIES)
    end = package.tokens["TEXT_END"]
    assert all(r[-1] == end and r[0] in package.emotions.values() for r in package.reply_set)


def _with_reply_set(source, tmp_path, reply_set):
    pkg = tmp_path / "pkg"
    shutil.copytree(source, pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["reply_set"] = reply_set(manifest)
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    return pkg


@pytest.mark.parametrize("make, words", [
    (lambda m: [], ["reply_set", "1 to"]),
    (lambda m: [[m["emotions"]["HAPPY"], 40]], ["reply_set[0]", "TEXT_END"]),
    (lambda m: [[40, m["tokens"]["TEXT_END"]]], ["reply_set[0][0]", "emotion"]),
    (lambda m: [[m["emotions"]["HAPPY"], 10 ** 9, m["tokens"]["TEXT_END"]]], ["reply_set[0][1]", "vocabulary"]),
    (lambda m: [[m["emotions"]["HAPPY"], m["tokens"]["TEXT_END"], 40, m["tokens"]["TEXT_END"]]],
     ["reply_set[0]", "only there"]),
    (lambda m: [[m["emotions"]["HAPPY"], m["tokens"]["TEXT_END"]]] * 2, ["reply_set", "twice"]),
    (lambda m: "all", ["reply_set", "list"]),
])
def test_a_bad_reply_set_is_refused_naming_the_field(tiny_package, tmp_path, make, words):
    pkg = _with_reply_set(tiny_package, tmp_path, make)
    with pytest.raises(ModelPackageError) as info:
        load_package(pkg)
    message = str(info.value)
    assert "manifest.json" in message and all(w in message for w in words), message


@pytest.mark.parametrize("content, words", [
    ("not json", ["cannot read"]),
    ("[]", ["non-empty"]),
    ('[{"emotion": "NORMAL"}]', ["reply 0", "keys"]),
    ('[{"emotion": "CALM", "text": "hi"}]', ["reply 0", "CALM"]),
    ('[{"emotion": "NORMAL", "text": " "}]', ["reply 0", "text"]),
])
def test_a_bad_reply_set_file_fails_the_export_before_any_work(tiny_checkpoint, tmp_path, content, words):
    from listenloop.export.package import export_package

    (tmp_path / "replies.json").write_text(content)
    with pytest.raises(ExportError) as info:
        export_package(tiny_checkpoint, tmp_path / "pkg", reply_set=tmp_path / "replies.json")
    assert "replies.json" in str(info.value) and all(w in str(info.value) for w in words)
    assert not (tmp_path / "pkg").exists()
