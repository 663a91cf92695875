"""Decoder attention alone, at the real dimensions: the three ways the exported graph can compute
it, side by side in one process on ONNX Runtime's CPU provider.

    python bench/attention.py [--context 500,2000,4000] [--steps 13,1] [--rounds 10] [--threads 2] [--json F]

Each graph chains 36 attention layers (16 query heads, 2 KV heads, head_dim 128; the real
model's), with the query of a layer taken from the previous layer's output, and the cache of P
tokens bound in place as the runtime binds it:

- `expanded`: what format 1 packages compute: cache and new keys concatenated, K and V repeated
  to all 16 heads, a float mask, Softmax, MatMul;
- `grouped`: what the `grouped` graph computes (export/decoder_graph.py): the 8 query heads of a
  KV head stacked into one matrix, the softmax split between cached and new keys, the cache read
  in place;
- `gqa`: `com.microsoft.GroupQueryAttention` on a [1, 2, C, 128] buffer shared by past and
  present (the `gqa` graph's attention node).

Times are medians of `--rounds` interleaved rounds (each round runs every variant once), in ms
per call of all 36 layers. Only attention: projections, norms and the MLP are not in these
graphs, and the whole step is measured by `listenloop bench --context` and
bench/side_by_side.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 36, 16, 2, 128
GROUPS = HEADS // KV_HEADS
CAPACITY = 4608
F32, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


def _const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _model(nodes, inputs, output, initializers=(), contrib=False):
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info(output, F32, None)],
                              initializer=list(initializers))
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    # An explicit IR version: onnx 1.23 writes IR 14 by default, newer than onnxruntime 1.31 loads.
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _common_inputs():
    return [helper.make_tensor_value_info("q", F32, [1, "T", HEADS * HEAD_DIM]),
            helper.make_tensor_value_info("k", F32, [1, "T", KV_HEADS, HEAD_DIM]),
            helper.make_tensor_value_info("v", F32, [1, "T", KV_HEADS, HEAD_DIM])]


def expanded_graph():
    """Concat + repeat to every head + float mask + Softmax (format 1)."""
    nodes, inputs = [], _common_inputs() + [helper.make_tensor_value_info("mask", F32, ["T", "S"])]
    inits = [_const("q_shape", [1, -1, HEADS, HEAD_DIM]), _const("out_shape", [1, -1, HEADS * HEAD_DIM]),
             _const("axis", [2]),
             _const("heads_shape", [1, HEADS, -1, HEAD_DIM]), _const("scale", np.float32(HEAD_DIM ** -0.5), np.float32),
             _const("expand", [1, KV_HEADS, GROUPS, 1, 1])]
    x = "q"
    for i in range(LAYERS):
        p = f"l{i}_"
        inputs += [helper.make_tensor_value_info(f"past_key.{i}", F32, [1, "P", KV_HEADS, HEAD_DIM]),
                   helper.make_tensor_value_info(f"past_value.{i}", F32, [1, "P", KV_HEADS, HEAD_DIM])]
        for kind, new in (("key", "k"), ("value", "v")):
            nodes += [helper.make_node("Concat", [f"past_{kind}.{i}", new], [p + kind], axis=1),
                      helper.make_node("Transpose", [p + kind], [p + kind + "_t"], perm=[0, 2, 1, 3]),
                      helper.make_node("Unsqueeze", [p + kind + "_t", "axis"], [p + kind + "_u"]),
                      helper.make_node("Expand", [p + kind + "_u", "expand"], [p + kind + "_e"]),
                      helper.make_node("Reshape", [p + kind + "_e", "heads_shape"], [p + kind + "_h"])]
        nodes += [helper.make_node("Reshape", [x, "q_shape"], [p + "q4"]),
                  helper.make_node("Transpose", [p + "q4"], [p + "qh"], perm=[0, 2, 1, 3]),
                  helper.make_node("Transpose", [p + "key_h"], [p + "kT"], perm=[0, 1, 3, 2]),
                  helper.make_node("MatMul", [p + "qh", p + "kT"], [p + "s0"]),
                  helper.make_node("Mul", [p + "s0", "scale"], [p + "s1"]),
                  helper.make_node("Add", [p + "s1", "mask"], [p + "s"]),
                  helper.make_node("Softmax", [p + "s"], [p + "a"], axis=-1),
                  helper.make_node("MatMul", [p + "a", p + "value_h"], [p + "o"]),
                  helper.make_node("Transpose", [p + "o"], [p + "o_t"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [p + "o_t", "out_shape"], [p + "out"])]
        x = p + "out"
    return _model(nodes, inputs, x, inits)


def grouped_graph():
    """One product per KV head, softmax split between cache and new keys (the grouped graph)."""
    nodes, inputs = [], _common_inputs() + [helper.make_tensor_value_info("causal", F32, ["GT", "T"])]
    inits = [_const("q_shape", [-1, KV_HEADS, GROUPS, HEAD_DIM]), _const("g_shape", [KV_HEADS, -1, HEAD_DIM]),
             _const("kv_shape", [-1, KV_HEADS, HEAD_DIM]), _const("o_shape", [KV_HEADS, GROUPS, -1, HEAD_DIM]),
             _const("out_shape", [1, -1, HEADS * HEAD_DIM]), _const("last", [-1]),
             _const("scale", np.float32(HEAD_DIM ** -0.5), np.float32)]
    nodes += [helper.make_node("Reshape", ["k", "kv_shape"], ["k3"]),
              helper.make_node("Transpose", ["k3"], ["knT"], perm=[1, 2, 0]),
              helper.make_node("Reshape", ["v", "kv_shape"], ["v3"]),
              helper.make_node("Transpose", ["v3"], ["vn"], perm=[1, 0, 2])]
    x = "q"
    for i in range(LAYERS):
        p = f"l{i}_"
        inputs += [helper.make_tensor_value_info(f"past_key.{i}", F32, [1, "P", KV_HEADS, HEAD_DIM]),
                   helper.make_tensor_value_info(f"past_value.{i}", F32, [1, "P", KV_HEADS, HEAD_DIM])]
        n = [("Mul", [x, "scale"], "qs"), ("Reshape", [p + "qs", "q_shape"], "q4")]
        nodes += [helper.make_node(op, ins, [p + out]) for op, ins, out in n]
        nodes += [helper.make_node("Transpose", [p + "q4"], [p + "q5"], perm=[1, 2, 0, 3]),
                  helper.make_node("Reshape", [p + "q5", "g_shape"], [p + "qg"]),
                  helper.make_node("Reshape", [f"past_key.{i}", "kv_shape"], [p + "pk"]),
                  helper.make_node("Transpose", [p + "pk"], [p + "pkT"], perm=[1, 2, 0]),
                  helper.make_node("Reshape", [f"past_value.{i}", "kv_shape"], [p + "pv"]),
                  helper.make_node("Transpose", [p + "pv"], [p + "pvt"], perm=[1, 0, 2]),
                  helper.make_node("MatMul", [p + "qg", p + "pkT"], [p + "sp"]),
                  helper.make_node("MatMul", [p + "qg", "knT"], [p + "sn0"]),
                  helper.make_node("Add", [p + "sn0", "causal"], [p + "sn"]),
                  helper.make_node("ReduceMax", [p + "sp", "last"], [p + "mp"], keepdims=1),
                  helper.make_node("ReduceMax", [p + "sn", "last"], [p + "mn"], keepdims=1),
                  helper.make_node("Max", [p + "mp", p + "mn"], [p + "m"]),
                  helper.make_node("Sub", [p + "sp", p + "m"], [p + "dp"]),
                  helper.make_node("Exp", [p + "dp"], [p + "ep"]),
                  helper.make_node("Sub", [p + "sn", p + "m"], [p + "dn"]),
                  helper.make_node("Exp", [p + "dn"], [p + "en"]),
                  helper.make_node("ReduceSum", [p + "ep", "last"], [p + "zp"], keepdims=1),
                  helper.make_node("ReduceSum", [p + "en", "last"], [p + "zn"], keepdims=1),
                  helper.make_node("Add", [p + "zp", p + "zn"], [p + "z"]),
                  helper.make_node("MatMul", [p + "ep", p + "pvt"], [p + "op"]),
                  helper.make_node("MatMul", [p + "en", "vn"], [p + "on"]),
                  helper.make_node("Add", [p + "op", p + "on"], [p + "o0"]),
                  helper.make_node("Div", [p + "o0", p + "z"], [p + "o"]),
                  helper.make_node("Reshape", [p + "o", "o_shape"], [p + "o4"]),
                  helper.make_node("Transpose", [p + "o4"], [p + "o5"], perm=[2, 0, 1, 3]),
                  helper.make_node("Reshape", [p + "o5", "out_shape"], [p + "out"])]
        x = p + "out"
    return _model(nodes, inputs, x, inits)


def gqa_graph():
    """GroupQueryAttention over a shared [1, KVH, C, D] buffer per layer (the gqa graph)."""
    nodes = []
    inputs = [helper.make_tensor_value_info("q", F32, [1, "T", HEADS * HEAD_DIM]),
              helper.make_tensor_value_info("k", F32, [1, "T", KV_HEADS * HEAD_DIM]),
              helper.make_tensor_value_info("v", F32, [1, "T", KV_HEADS * HEAD_DIM]),
              helper.make_tensor_value_info("seqlens_k", I32, [1]),
              helper.make_tensor_value_info("total_sequence_length", I32, [])]
    outputs = []
    x = "q"
    for i in range(LAYERS):
        shape = [1, KV_HEADS, "C", HEAD_DIM]
        inputs += [helper.make_tensor_value_info(f"past_key.{i}", F32, shape),
                   helper.make_tensor_value_info(f"past_value.{i}", F32, shape)]
        outputs += [f"present_key.{i}", f"present_value.{i}"]
        nodes.append(helper.make_node("GroupQueryAttention", [x, "k", "v", f"past_key.{i}", f"past_value.{i}",
                                                              "seqlens_k", "total_sequence_length"],
                                      [f"l{i}_out", f"present_key.{i}", f"present_value.{i}"], domain="com.microsoft",
                                      num_heads=HEADS, kv_num_heads=KV_HEADS))
        x = f"l{i}_out"
    model = _model(nodes, inputs, x, contrib=True)
    model.graph.output.extend(helper.make_tensor_value_info(name, F32, None) for name in outputs)
    return model


class Variant:
    """One graph, its session and the cache it binds, for a given (P, T)."""

    def __init__(self, name, model, threads):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.name = name
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        shape = (1, KV_HEADS, CAPACITY, HEAD_DIM) if name == "gqa" else (1, CAPACITY, KV_HEADS, HEAD_DIM)
        rng = np.random.default_rng(0)
        self.cache = [rng.standard_normal(shape, dtype=np.float32) for _ in range(2 * LAYERS)]

    def bind(self, P: int, T: int, rng) -> None:
        io = self.io = self.session.io_binding()
        self.q = rng.standard_normal((1, T, HEADS * HEAD_DIM), dtype=np.float32) * 0.1
        kv_shape = (1, T, KV_HEADS * HEAD_DIM) if self.name == "gqa" else (1, T, KV_HEADS, HEAD_DIM)
        self.k, self.v = (rng.standard_normal(kv_shape, dtype=np.float32) for _ in range(2))
        for name, array in (("q", self.q), ("k", self.k), ("v", self.v)):
            io.bind_cpu_input(name, array)
        t = np.arange(T)
        causal = np.where(t[None, :] <= t[:, None], 0.0, -np.inf).astype(np.float32)
        if self.name == "gqa":
            self.lengths = (np.array([P + T - 1], np.int32), np.array(CAPACITY, np.int32))
            io.bind_cpu_input("seqlens_k", self.lengths[0])
            io.bind_cpu_input("total_sequence_length", self.lengths[1])
        elif self.name == "grouped":
            self.mask = np.tile(causal, (GROUPS, 1))
            io.bind_cpu_input("causal", self.mask)
        else:
            self.mask = np.concatenate([np.zeros((T, P), np.float32), causal], axis=1)
            io.bind_cpu_input("mask", self.mask)
        for j, buf in enumerate(self.cache):
            name = f"past_{'key' if j % 2 == 0 else 'value'}.{j // 2}"
            if self.name == "gqa":
                io.bind_input(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
                io.bind_output(name.replace("past", "present"), "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            else:
                io.bind_input(name, "cpu", 0, np.float32, [1, P, KV_HEADS, HEAD_DIM], buf.ctypes.data)
        io.bind_output(f"l{LAYERS - 1}_out", "cpu")

    def run(self) -> float:
        started = time.perf_counter()
        self.session.run_with_iobinding(self.io)
        return 1000 * (time.perf_counter() - started)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", default="500,2000,4000", help="cached tokens P")
    p.add_argument("--steps", default="13,1", help="new tokens T per call (13: listening step, 1: reply token)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    variants = [Variant(name, build(), args.threads) for name, build in
                (("expanded", expanded_graph), ("grouped", grouped_graph), ("gqa", gqa_graph))]
    rng = np.random.default_rng(1)
    rows = []
    print(f"36 attention layers, {args.threads} threads, medians of {args.rounds} interleaved rounds (ms)")
    print(f"{'T':>3} {'P':>6} " + " ".join(f"{v.name:>10}" for v in variants) + "   expanded/grouped  gqa/grouped")
    for T in (int(x) for x in args.steps.split(",")):
        for P in (int(x) for x in args.context.split(",")):
            for v in variants:
                v.bind(P, T, rng)
                v.run(), v.run()  # warm-up
            times = {v.name: [] for v in variants}
            for _ in range(args.rounds):
                for v in variants:
                    times[v.name].append(v.run())
            medians = {name: float(np.median(t)) for name, t in times.items()}
            rows.append({"T": T, "P": P, "median_ms": medians})
            print(f"{T:>3} {P:>6} " + " ".join(f"{medians[v.name]:10.1f}" for v in variants)
                  + f"   {medians['expanded'] / medians['grouped']:16.2f}  {medians['gqa'] / medians['grouped']:11.2f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python bench/attention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "onnxruntime": ort.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
