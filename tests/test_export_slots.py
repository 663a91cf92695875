"""The slot decoder (docs/DESIGN.md, "Fixed-slot batching"), graph by graph on ONNX Runtime's
CPU provider at fp32: a slot's logits and cache rows are bit for bit the same whether the other
slots are empty or busy with other streams, at any slot index, and match the unbatched graph
within the parity tolerance of the other graph tests."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from listenloop.errors import ExportError  # noqa: E402
from listenloop.package import load_package  # noqa: E402
from listenloop.protocol import STEP  # noqa: E402

SLOTS, CAPACITY = 4, 64
PIECES = [(0, 13), (13, 26), (26, 30), (30, 43), (43, 44), (44, 45)]  # a 30-token prefill in pieces, a step, 2 tokens


@pytest.fixture(scope="module")
def package(tiny_package_at):
    return load_package(tiny_package_at("fp32", "grouped", slots=True))


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class SlotRunner:
    """The slot graph bound as the runtime binds it: each cache buffer as both past and present."""

    def __init__(self, package):
        dec = package.decoder
        self.session = _session(package.slot_decoder_path)
        self.layers, self.vocab, self.hidden = dec["num_layers"], dec["vocab_size"], dec["hidden_size"]
        self.cache = np.zeros((2 * self.layers, SLOTS, dec["num_kv_heads"], CAPACITY + STEP, dec["head_dim"]), np.float32)
        self.embeds = np.zeros((SLOTS, STEP, self.hidden), np.float32)

    def run(self, past, new, index):
        io = self.session.io_binding()
        io.bind_cpu_input("inputs_embeds", self.embeds)
        for name, values in (("past_lengths", past), ("new_lengths", new), ("logits_index", index)):
            io.bind_cpu_input(name, np.asarray(values, np.int64))
        logits = np.zeros((SLOTS, self.vocab), np.float32)
        io.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                buf = self.cache[2 * i + j]
                io.bind_input(f"past_{kind}.{i}", "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
                io.bind_output(f"present_{kind}.{i}", "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
        self.session.run_with_iobinding(io)
        return logits


def _stream(slot, busy, tokens, package):
    """Slot `slot` runs `tokens` piece by piece; with `busy`, every other slot runs random
    steps of random lengths at random positions meanwhile. -> (logits per piece, its cache rows)."""
    runner = SlotRunner(package)
    rng = np.random.default_rng(7)
    outs = []
    for start, stop in PIECES:
        past, new, index = np.zeros(SLOTS, int), np.zeros(SLOTS, int), np.zeros(SLOTS, int)
        for other in range(SLOTS):
            if busy and other != slot:
                past[other], new[other], index[other] = rng.integers(0, 40), rng.integers(0, STEP + 1), rng.integers(0, STEP)
                runner.embeds[other] = rng.normal(0, 1, (STEP, runner.hidden))
        past[slot], new[slot], index[slot] = start, stop - start, stop - start - 1
        runner.embeds[slot, :stop - start] = tokens[start:stop]
        outs.append(runner.run(past, new, index)[slot].copy())
    return np.array(outs), runner.cache[:, slot, :, :PIECES[-1][1]].copy()


@pytest.fixture(scope="module")
def int4_package(tiny_package_at):
    return load_package(tiny_package_at("int4", "grouped", slots=True))


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_slot_is_bitwise_the_same_alone_and_among_busy_slots(precision, package, int4_package):
    package = int4_package if precision == "int4" else package  # int4: MatMulNBits keeps rows apart too
    tokens = np.random.default_rng(0).normal(0, 1, (PIECES[-1][1], package.hidden_size)).astype(np.float32)
    alone, alone_cache = _stream(0, False, tokens, package)
    assert np.isfinite(alone).all() and np.abs(alone).max() > 0
    for slot in range(SLOTS):
        busy, busy_cache = _stream(slot, True, tokens, package)
        assert np.array_equal(alone, busy), f"slot {slot}: logits depend on the other slots"
        assert np.array_equal(alone_cache, busy_cache), f"slot {slot}: cache rows depend on the other slots"


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_slot_graph_matches_the_unbatched_graph(precision, package, int4_package):
    package = int4_package if precision == "int4" else package
    tokens = np.random.default_rng(1).normal(0, 1, (PIECES[-1][1], package.hidden_size)).astype(np.float32)
    batched, batched_cache = _stream(2, True, tokens, package)
    dec = package.decoder
    grouped = _session(package.decoder_path)
    cache = np.zeros((2 * dec["num_layers"], 1, CAPACITY, dec["num_kv_heads"], dec["head_dim"]), np.float32)
    reference = []
    for start, stop in ((0, 30), (30, 43), (43, 44), (44, 45)):  # the prefill in one call
        feeds = {"inputs_embeds": tokens[None, start:stop], "position_ids": np.arange(start, stop)[None],
                 "logits_index": np.array([stop - start - 1])}
        for j in range(2 * dec["num_layers"]):
            feeds[f"past_{('key', 'value')[j % 2]}.{j // 2}"] = cache[j][:, :start]
        out = grouped.run(None, feeds)
        for j in range(2 * dec["num_layers"]):
            cache[j][:, start:stop] = out[1 + j]
        reference.append(out[0][0])
    np.testing.assert_allclose(batched[2:], np.array(reference), atol=1e-4)  # tests/test_export_graphs.py's
    # position-major [C, KVH, D] against the slot buffer's head-major [KVH, C, D]
    np.testing.assert_allclose(batched_cache, cache[:, 0, :PIECES[-1][1]].transpose(0, 2, 1, 3), atol=1e-5)


def test_manifest_names_the_slot_decoder(package):
    manifest = json.loads((package.path / "manifest.json").read_text())
    assert manifest["slot_decoder"] == {"file": "decoder_slots.onnx", "step_tokens": STEP}
    assert "decoder_slots.onnx" in manifest["files"]


def test_slots_refused_for_int8(tiny_checkpoint, tmp_path):
    from listenloop.export.package import export_package

    with pytest.raises(ExportError, match="slot decoder is exported at one of fp32, fp16, int4, not int8"):
        export_package(tiny_checkpoint, tmp_path / "p", precision="int8", slots=True)
    assert not (tmp_path / "p").exists()
    # the chunks of a round are encoded in one call too, so the encoder may not be int8 either
    with pytest.raises(ExportError, match="slot encoder is exported at one of fp32, fp16, int4, not int8"):
        export_package(tiny_checkpoint, tmp_path / "p", precision="fp32", encoder_precision="int8", slots=True)
    assert not (tmp_path / "p").exists()


def test_a_package_whose_slot_decoder_has_an_int8_encoder_is_refused(package, tmp_path):
    import shutil

    from listenloop.errors import ModelPackageError

    copy = tmp_path / "p"
    shutil.copytree(package.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["encoder"]["precision"] = "int8"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match=r"slot_decoder: needs the encoder at one of fp32, fp16, int4, this one is int8"):
        load_package(copy)
