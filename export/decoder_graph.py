"""The decoder as an explicit PyTorch module, and its ONNX export (docs/DESIGN.md decoder contract).

Why not onnxruntime-genai's model builder, transformers' Qwen2 module or optimum's exporter:
the runtime needs (a) logits only for the rows in `logits_index` (a [T, 151936] logits tensor
per step would dominate memory traffic), (b) positions rounded through float16 inside the graph
(docs/PROTOCOL.md, "Listening step"), (c) a KV cache the graph writes in place on CPU as well as
on GPUs, and (d) a bounded-memory export of real-size weights (the builder loads the whole
model). The builder's structure is what the `gqa` attention below adopts: one
`com.microsoft.GroupQueryAttention` node per layer over a fixed-capacity cache that past and
present share. The math is exactly HF Qwen2's: RMSNorm, rotate-half RoPE with
θ_i = base^(-2i/D), grouped-query attention, SiLU-gated MLP. `tests/test_export_graphs.py`
checks both attention kinds against `transformers.Qwen2ForCausalLM`.

Two attention kinds (manifest `decoder.attention`; docs/DESIGN.md lists both contracts):

- `grouped` (the default, best on CPUs): standard ONNX ops over a position-major cache
  `[1, P, KVH, D]` that the runtime binds as a prefix of its buffer. The G = NH/KVH query heads
  that share a KV head are stacked into one [G*T, D] matrix, so each KV head is read once per
  step by one matrix product (ORT folds the cache's transposes into the MatMul: no copy), and
  the softmax is split between the cached and the new keys so the cache is never concatenated.
  On a 2-core VM, 36 layers at the real dimensions, 13 new tokens, 4,000 cached: 111 ms,
  against 167 ms for ORT's CPU GroupQueryAttention kernel (which multiplies each query head
  separately) and 516 ms for the format 1 graph that expanded K and V to every head
  (bench/attention.py).
- `gqa` (GPUs): GroupQueryAttention over a head-major buffer `[B, KVH, C, D]` bound as both
  past and present, with per-row lengths (`seqlens_k`). Every step binds the same addresses
  and shapes, which is what CUDA graphs need; one-token steps of rows of different lengths
  share one call.

A third graph, the slot decoder (`slots`, slot_graph.py), is exported beside either of them by
`--slots`: S streams' steps of 13 rows in one call over one shared buffer per cache, for GPUs
(docs/DESIGN.md, "Fixed-slot batching").
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from listenloop.package import ATTENTIONS
from listenloop.protocol import STEP

from .slot_graph import slot_attention, write_rows

OPSET = 17
# The slot decoder (slot_graph.py): S streams' steps of STEP token rows in one call, a third
# kind of graph beside the package's attention kinds, exported to its own file.
SLOTS = "slots"
GRAPH_KINDS = (*ATTENTIONS, SLOTS)


def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """θ_i = base^(-2i/D), computed as HF Qwen2 does (float32)."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def round_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Positions go through float16 before the angles: 2049 -> 2048, 2051 -> 2052
    (docs/PROTOCOL.md, "Listening step")."""
    return position_ids.to(torch.float16).to(torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A Linear that shares the checkpoint's tensors (no copy: real-size weights are 13.6 GB)."""
    layer = nn.Linear(1, 1, bias=bias is not None)
    layer.in_features, layer.out_features = weight.shape[1], weight.shape[0]
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


# Projections that read the same input are one product in the graph: q, k and v (as
# onnxruntime-genai's builder fuses them) and the MLP's gate and up. One larger product uses the
# cores better than three small ones (k and v have 256 outputs), and a quantized graph quantizes
# the shared input once. Per-column (int8) and per-block-of-a-column (int4) weight quantization
# is unchanged by stacking columns. Fused name -> its parts, in output order.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def _fused_linear(state: dict, prefix: str, fused: str) -> nn.Linear:
    """The fused projection: from `state` when it carries the fused tensors (the streamed
    export's placeholders), else the parts concatenated (a copy: small models and tests)."""
    if prefix + fused + ".weight" in state:
        return _linear(state[prefix + fused + ".weight"], state.get(prefix + fused + ".bias"))
    parts = [prefix + part for part in FUSED[fused]]
    weights = [state[part + ".weight"] for part in parts]
    biases = [state.get(part + ".bias") for part in parts]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)])
    return _linear(torch.cat(weights), bias)


class DecoderLayer(nn.Module):
    def __init__(self, state: dict, prefix: str, cfg: dict, attention: str = "grouped"):
        super().__init__()
        self.attention = attention
        self.n_head, self.n_kv, self.head_dim = cfg["n_head"], cfg["n_query_groups"], cfg["head_size"]
        self.intermediate = cfg["intermediate_size"]
        eps = float(cfg["norm_eps"])
        get = state.__getitem__
        self.input_layernorm = RMSNorm(get(prefix + "input_layernorm.weight"), eps)
        self.qkv_proj = _fused_linear(state, prefix, "self_attn.qkv_proj")
        self.o_proj = _linear(get(prefix + "self_attn.o_proj.weight"))
        self.post_attention_layernorm = RMSNorm(get(prefix + "post_attention_layernorm.weight"), eps)
        self.gate_up_proj = _fused_linear(state, prefix, "mlp.gate_up_proj")
        self.down_proj = _linear(get(prefix + "mlp.down_proj.weight"))

    def forward(self, x, cos, sin, causal, cache):
        B, T = x.shape[0], x.shape[1]
        h = self.input_layernorm(x)
        D = self.head_dim
        q, k, v = self.qkv_proj(h).split([self.n_head * D, self.n_kv * D, self.n_kv * D], dim=-1)
        q = q.reshape(B, T, self.n_head, D)
        k = k.reshape(B, T, self.n_kv, D)
        v = v.reshape(B, T, self.n_kv, D)
        # cos/sin: [B, T, 1, D], broadcast over heads.
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.attention == "gqa":
            attn, *written = GroupQueryAttention.apply(
                q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1), *cache, self.n_head, self.n_kv)
        elif self.attention == SLOTS:
            attn, *written = slot_attention(q, k, v, *cache, self.head_dim ** -0.5)
        else:
            attn = grouped_attention(q, k, v, *cache, causal, self.head_dim ** -0.5)
            written = [k, v]
        x = x + self.o_proj(attn)
        h = self.post_attention_layernorm(x)
        gate, up = self.gate_up_proj(h).split([self.intermediate, self.intermediate], dim=-1)
        x = x + self.down_proj(nn.functional.silu(gate) * up)
        return x, written


def _row_max(scores: torch.Tensor) -> torch.Tensor:
    """Max over the last axis, -inf over an empty one (the first step has no cache; ONNX's
    ReduceMax already gives -inf there, torch's amax refuses)."""
    if torch.jit.is_tracing() or scores.shape[-1] > 0:
        return scores.amax(-1, keepdim=True)
    return scores.new_full((*scores.shape[:-1], 1), float("-inf"))


def grouped_attention(q, new_key, new_value, past_key, past_value, causal, scale: float):
    """Attention for one row (B = 1): q [1,T,NH,D], new_key/new_value [1,T,KVH,D], past_*
    [1,P,KVH,D] (position-major), causal [G*T, T] (0 or -inf) -> [1, T, NH*D].

    Query head n uses KV head n // G (HF's repeat_interleave order), so q is regrouped to
    [KVH, G*T, D]: one product per KV head instead of G. softmax(s) over [past | new] is
    exp(s - m) / sum with m the max over both parts, computed part by part (no concat)."""
    T, NH, D = q.shape[1], q.shape[2], q.shape[3]
    n_kv = new_key.shape[2]
    groups = NH // n_kv
    # Rows as [P, KVH, D] by a Reshape to a constant shape, which ONNX Runtime runs in place
    # (`[0]` traces to a Gather, which copies the cache, and squeeze(0) to an If); the
    # permutes then fold into the MatMuls.
    def rows(x):
        return x.reshape(-1, n_kv, D)

    qg = (q * scale).reshape(T, n_kv, groups, D).permute(1, 2, 0, 3).reshape(n_kv, groups * T, D)
    s_past = torch.matmul(qg, rows(past_key).permute(1, 2, 0))  # [KVH, G*T, P]
    s_new = torch.matmul(qg, rows(new_key).permute(1, 2, 0)) + causal  # [KVH, G*T, T]
    m = torch.maximum(_row_max(s_past), _row_max(s_new))
    e_past, e_new = torch.exp(s_past - m), torch.exp(s_new - m)
    total = e_past.sum(-1, keepdim=True) + e_new.sum(-1, keepdim=True)
    out = (torch.matmul(e_past, rows(past_value).permute(1, 0, 2))
           + torch.matmul(e_new, rows(new_value).permute(1, 0, 2))) / total
    return out.reshape(n_kv, groups, T, D).permute(2, 0, 1, 3).reshape(1, T, NH * D)


class GroupQueryAttention(torch.autograd.Function):
    """com.microsoft.GroupQueryAttention (no rotary inside: RoPE is applied before, with the
    float16-rounded positions) over caches [B, KVH, C, D] shared by past and present. Row b's
    T new tokens sit at positions seqlens_k[b]+1-T .. seqlens_k[b]. The eager forward computes
    the same for tracing and tests; the export writes the contrib node."""

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_length, num_heads, kv_heads):
        B, T, _ = query.shape
        D = past_key.shape[-1]
        groups = num_heads // kv_heads
        present_key, present_value = past_key.clone(), past_value.clone()
        out = query.new_zeros(B, T, num_heads * D)
        if torch.jit.is_tracing():  # the export writes the contrib node: only shapes matter here
            return out, present_key, present_value
        for b in range(B):
            end = int(seqlens_k[b]) + 1
            start = end - T
            present_key[b, :, start:end] = key[b].view(T, kv_heads, D).transpose(0, 1)
            present_value[b, :, start:end] = value[b].view(T, kv_heads, D).transpose(0, 1)
            keys = present_key[b, :, :end].repeat_interleave(groups, 0)  # [NH, end, D]
            values = present_value[b, :, :end].repeat_interleave(groups, 0)
            q = query[b].view(T, num_heads, D).transpose(0, 1)  # [NH, T, D]
            scores = torch.matmul(q, keys.transpose(1, 2)) * D ** -0.5
            allowed = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[b] = torch.matmul(torch.softmax(scores, -1), values).transpose(0, 1).reshape(T, num_heads * D)
        return out, present_key, present_value

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_length, num_heads, kv_heads):
        out, present_key, present_value = g.op(
            "com.microsoft::GroupQueryAttention", query, key, value, past_key, past_value, seqlens_k, total_length,
            num_heads_i=num_heads, kv_num_heads_i=kv_heads, outputs=3)
        out.setType(query.type())  # torch.onnx cannot infer a contrib op's output types
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


class ExportDecoder(nn.Module):
    """grouped: inputs_embeds [1,T,H], position_ids [1,T], logits_index [K],
    past_key/value.{i} [1,P,KVH,D] -> logits [K,V] float32, new_key/value.{i} [1,T,KVH,D].
    gqa: inputs_embeds [B,T,H], position_ids [B,T], logits_index [K] (rows of the flattened
    [B*T]), seqlens_k [B] int32, total_sequence_length int32, past_key/value.{i} [B,KVH,C,D]
    -> logits [K,V], present_key/value.{i} (the same buffers)."""

    def __init__(self, lm_state: dict, cfg: dict, attention: str = "grouped"):
        super().__init__()
        if attention not in GRAPH_KINDS:
            raise ValueError(f"attention must be one of {', '.join(GRAPH_KINDS)}, got {attention!r}")
        self.attention = attention
        self.num_layers = cfg["n_layer"]
        self.groups = cfg["n_head"] // cfg["n_query_groups"]
        self.layers = nn.ModuleList(DecoderLayer(lm_state, f"model.layers.{i}.", cfg, attention)
                                    for i in range(cfg["n_layer"]))
        self.norm = RMSNorm(lm_state["model.norm.weight"], float(cfg["norm_eps"]))
        self.lm_head = _linear(lm_state["lm_head.weight"])
        self.register_buffer("inv_freq", rope_inv_freq(cfg["head_size"], float(cfg["rope_base"])), persistent=False)

    def forward(self, inputs_embeds, position_ids, logits_index, *rest):
        if self.attention == SLOTS:
            return self._slots_forward(inputs_embeds, position_ids, logits_index, *rest)
        B, T, H = inputs_embeds.shape
        angles = round_positions(position_ids)[..., None] * self.inv_freq  # [B, T, D/2]
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
        cos, sin = angles.cos().to(inputs_embeds.dtype), angles.sin().to(inputs_embeds.dtype)
        if self.attention == "gqa":
            lengths, past = rest[:2], rest[2:]
            causal = None
        else:
            lengths, past = (), rest
            # new token t sees new tokens 0..t; rows are [group, t] (grouped_attention)
            index = torch.arange(T, device=inputs_embeds.device)
            causal = torch.where(index[None, :] <= index[:, None], 0.0, float("-inf")).repeat(self.groups, 1)
        x = inputs_embeds
        written = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, causal, (past[2 * i], past[2 * i + 1], *lengths))
            written += kv
        return (self._logits(x, logits_index), *written)

    def _logits(self, x, flat_index):
        B, T, H = x.shape
        rows = x.reshape(1, B * T, H).index_select(1, flat_index)  # only the requested rows reach lm_head
        # 3-D input makes lm_head a MatMul (not a Gemm), which the weight quantizers handle.
        return self.lm_head(self.norm(rows))[0].float()

    def _slots_forward(self, inputs_embeds, past_lengths, new_lengths, logits_index, *cache):
        """slots: inputs_embeds [S,STEP,H], past_lengths [S], new_lengths [S], logits_index [S]
        (a row of each slot's STEP), past_key/value.{i} [S,KVH,C+STEP,D] -> logits [S,V],
        present_key/value.{i} (the same buffers)."""
        S, T, H = inputs_embeds.shape
        positions = past_lengths[:, None] + torch.arange(T, device=inputs_embeds.device)[None, :]  # [S, T]
        angles = round_positions(positions)[..., None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
        cos, sin = angles.cos().to(inputs_embeds.dtype), angles.sin().to(inputs_embeds.dtype)
        written_at = write_rows(past_lengths, new_lengths, T, cache[0].shape[2])
        x = inputs_embeds
        written = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, None, (cache[2 * i], cache[2 * i + 1], positions, written_at))
            written += kv
        flat = torch.arange(S, device=x.device) * T + logits_index
        return (self._logits(x, flat), *written)


def io_names(num_layers: int, attention: str = "grouped") -> tuple[list, list]:
    if attention == SLOTS:
        inputs = ["inputs_embeds", "past_lengths", "new_lengths", "logits_index"]
    else:
        inputs = ["inputs_embeds", "position_ids", "logits_index"]
    if attention == "gqa":
        inputs += ["seqlens_k", "total_sequence_length"]
    written = "present" if attention in ("gqa", SLOTS) else "new"
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key.{i}", f"past_value.{i}"]
        outputs += [f"{written}_key.{i}", f"{written}_value.{i}"]
    return inputs, outputs


def fixed_input_count(num_layers: int, attention: str) -> int:
    return len(io_names(num_layers, attention)[0])


def export_decoder(module: ExportDecoder, path: Path, cfg: dict) -> Path:
    """Write the fp32 decoder graph with dynamic T, P and K, weights and all (the module holds every
    weight, and torch.onnx copies them: for small models and tests; the package uses
    `export_decoder_streamed`)."""
    path = Path(path)
    _trace_to_onnx(module, path, cfg)
    return path


def _trace_to_onnx(module: ExportDecoder, path: Path, cfg: dict, export_params: bool = True) -> None:
    n_kv, d, h = cfg["n_query_groups"], cfg["head_size"], cfg["n_embd"]
    T, P = 3, 5
    attention = module.attention
    if attention == SLOTS:
        _trace_slots_to_onnx(module, path, cfg, export_params)
        return
    if attention == "gqa":  # a buffer of capacity C holding P cached rows
        C = P + T + 2
        cache = [torch.zeros(1, n_kv, C, d) for _ in range(2 * module.num_layers)]
        lengths = (torch.tensor([P + T - 1], dtype=torch.int32), torch.tensor(P + T, dtype=torch.int32))
    else:
        cache = [torch.zeros(1, P, n_kv, d) for _ in range(2 * module.num_layers)]
        lengths = ()
    args = (torch.zeros(1, T, h), torch.arange(P, P + T)[None], torch.tensor([T - 1]), *lengths, *cache)
    inputs, outputs = io_names(module.num_layers, attention)
    dynamic = {"inputs_embeds": {1: "T"}, "position_ids": {1: "T"}, "logits_index": {0: "K"}, "logits": {0: "K"}}
    if attention == "gqa":
        for name in ("inputs_embeds", "position_ids"):
            dynamic[name] = {0: "B", 1: "T"}
        dynamic["seqlens_k"] = {0: "B"}
        for name in inputs[5:] + outputs[1:]:
            dynamic[name] = {0: "B", 2: "C"}
    else:
        for name in inputs[3:]:
            dynamic[name] = {1: "P"}
        for name in outputs[1:]:
            dynamic[name] = {1: "T"}
    with torch.no_grad(), weights_hidden_from_shape_inference(module, hide=not export_params):
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, do_constant_folding=True,
                          export_params=export_params,
                          custom_opsets={"com.microsoft": 1} if attention == "gqa" else None)


def _trace_slots_to_onnx(module: ExportDecoder, path: Path, cfg: dict, export_params: bool) -> None:
    """The slot graph: S and the buffer's rows dynamic, STEP rows per slot static."""
    n_kv, d, h = cfg["n_query_groups"], cfg["head_size"], cfg["n_embd"]
    S, rows = 2, 2 * STEP + 1
    cache = [torch.zeros(S, n_kv, rows, d) for _ in range(2 * module.num_layers)]
    args = (torch.zeros(S, STEP, h), torch.tensor([0, 3]), torch.tensor([STEP, 1]), torch.tensor([STEP - 1, 0]), *cache)
    inputs, outputs = io_names(module.num_layers, SLOTS)
    dynamic = {"inputs_embeds": {0: "S"}, "past_lengths": {0: "S"}, "new_lengths": {0: "S"},
               "logits_index": {0: "S"}, "logits": {0: "S"}}
    for name in inputs[4:] + outputs[1:]:
        dynamic[name] = {0: "S", 2: "C"}
    with torch.no_grad(), weights_hidden_from_shape_inference(module, hide=not export_params):
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False, do_constant_folding=True,
                          export_params=export_params)


@contextlib.contextmanager
def weights_hidden_from_shape_inference(module: nn.Module, hide: bool = True):
    """While exporting without parameters: torch.onnx's shape inference pass serialises the value
    of every parameter a node reads, per node (a contiguous copy of each placeholder: minutes and
    GBs at real size). Shapes and types are all it needs from a weight, and the traced graph
    carries them, so `module`'s parameters are left out of the values that pass sees."""
    if not hide:
        yield
        return
    names = {name for name, _ in module.named_parameters()}
    from torch import _C

    original = _C._jit_pass_onnx_graph_shape_type_inference

    def without_weights(graph, params_dict, opset_version):
        kept = {name: value for name, value in params_dict.items() if name not in names}
        return original(graph, kept, opset_version)

    _C._jit_pass_onnx_graph_shape_type_inference = without_weights
    try:
        yield
    finally:
        _C._jit_pass_onnx_graph_shape_type_inference = original


class _MatMulLinear(nn.Module):
    """`x @ Wᵀ (+ b)` with Wᵀ itself the parameter. On 3-D input it traces to the same
    MatMul (+ Add) that torch.onnx makes of nn.Linear once constant folding has transposed W,
    but nothing is left to fold, so the weights need no values at export time."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight_t, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight)
        return y if self.bias is None else self.bias + y  # Add(bias, y), as nn.Linear exports


def _placeholder(shape, index: int) -> torch.Tensor:
    """A weight of the right shape that occupies 4 bytes (a broadcast scalar). Distinct values:
    torch.onnx merges initializers that compare equal."""
    return torch.full((), 1e-3 * (index + 1)).expand(*shape)


def linear_as_matmul(module: nn.Module) -> set:
    """Replace every nn.Linear inside `module` by a _MatMulLinear holding the same tensors (Wᵀ is a
    view: no copy). Returns the names of the resulting transposed-weight parameters."""
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                bias = None if child.bias is None else child.bias.detach()
                setattr(parent, child_name, _MatMulLinear(child.weight.detach().t(), bias))
    return {f"{name}.weight" for name, sub in module.named_modules() if isinstance(sub, _MatMulLinear)}


def skeleton_decoder(shapes: dict, cfg: dict, attention: str = "grouped") -> tuple[ExportDecoder, dict]:
    """The export module with placeholder weights, and ONNX parameter name -> (checkpoint key, or
    the keys a fused projection stacks, transposed). `shapes`: HF Qwen2 name -> shape (the
    embedding table is not needed)."""
    shapes = dict(shapes)
    fused_parts = {}  # fused projection name -> the checkpoint names it stacks
    for i in range(cfg["n_layer"]):
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                names = tuple(f"model.layers.{i}.{part}.{kind}" for part in parts)
                present = [name in shapes for name in names]
                if all(present):
                    fused_parts[f"model.layers.{i}.{fused}.{kind}"] = names
                elif any(present):
                    raise RuntimeError(f"layer {i}: {', '.join(parts)} must all have a {kind} or none")
    for name, parts in fused_parts.items():
        shapes[name] = (sum(shapes[part][0] for part in parts), *shapes[parts[0]][1:])
    state, keys = {}, {}
    for index, (key, shape) in enumerate(shapes.items()):
        state[key] = _placeholder(tuple(shape), index)
        keys[state[key].data_ptr()] = fused_parts.get(key, key)
    module = ExportDecoder(state, cfg, attention)
    transposed = linear_as_matmul(module)  # placeholders stay 4-byte broadcasts: same data_ptr
    sources = {}
    for name, param in module.named_parameters():
        key = keys.get(param.data_ptr())
        if key is None:
            raise RuntimeError(f"decoder parameter {name}: no checkpoint weight behind it")
        sources[name] = (key, name in transposed)
    return module, sources


def export_decoder_streamed(weights, path: Path, cfg: dict, attention: str = "grouped") -> Path:
    """The graph `export_decoder` writes, with the weights streamed from `weights` one tensor at a
    time into `<name>.data` (see external.py), so peak memory is about the graph proto plus the
    largest weight, whatever the model size.

    `weights`: HF Qwen2 name -> float32 tensor on access, with `.shape(name)` (a lazy checkpoint
    state, checkpoint.LazyLMState) or a plain dict of tensors. The graph is traced from a module
    with placeholder weights (skeleton_decoder) and exported without parameters, which then
    become the initializers."""
    from .external import attach_initializers

    shape_of = weights.shape if hasattr(weights, "shape") else (lambda k: tuple(weights[k].shape))
    keys = [k for k in weights.keys() if k != "model.embed_tokens.weight"]
    module, sources = skeleton_decoder({k: shape_of(k) for k in keys}, cfg, attention)
    path = Path(path)
    _trace_to_onnx(module, path, cfg, export_params=False)
    del module

    def fetch(key, transposed):
        def read():
            parts = key if isinstance(key, tuple) else (key,)  # a fused projection: its parts stacked
            tensor = torch.cat([weights[part].detach().float() for part in parts])
            return (tensor.t() if transposed else tensor).contiguous().numpy()
        return read

    attach_initializers(path, fixed_input_count(cfg["n_layer"], attention),
                        {name: fetch(*src) for name, src in sources.items()})
    return path
