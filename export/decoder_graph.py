"""The decoder as an explicit PyTorch module, and its ONNX export (docs/DESIGN.md decoder contract).

Why not transformers' Qwen2 module or optimum's exporter: the runtime needs (a) a position-major
KV layout `[1, P, KVH, D]` whose new rows the graph writes straight into a bound cache buffer
(zero copy), (b) logits only for the rows in `logits_index` (a [T, 151936] logits tensor per
prefill would dominate memory traffic), and (c) positions rounded through float16 inside the
graph (docs/PROTOCOL.md, "Listening step"). Stock exporters give a head-major cache
`[1, KVH, P, D]`, all-row logits and integer positions. The math here is exactly HF Qwen2's:
RMSNorm, rotate-half RoPE with θ_i = base^(-2i/D), grouped-query attention, SiLU-gated MLP.
`tests/test_export_graphs.py` checks it against `transformers.Qwen2ForCausalLM`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

OPSET = 17


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


class DecoderLayer(nn.Module):
    def __init__(self, state: dict, prefix: str, cfg: dict):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg["n_head"], cfg["n_query_groups"], cfg["head_size"]
        eps = float(cfg["norm_eps"])
        get = state.__getitem__
        self.input_layernorm = RMSNorm(get(prefix + "input_layernorm.weight"), eps)
        self.q_proj = _linear(get(prefix + "self_attn.q_proj.weight"), state.get(prefix + "self_attn.q_proj.bias"))
        self.k_proj = _linear(get(prefix + "self_attn.k_proj.weight"), state.get(prefix + "self_attn.k_proj.bias"))
        self.v_proj = _linear(get(prefix + "self_attn.v_proj.weight"), state.get(prefix + "self_attn.v_proj.bias"))
        self.o_proj = _linear(get(prefix + "self_attn.o_proj.weight"))
        self.post_attention_layernorm = RMSNorm(get(prefix + "post_attention_layernorm.weight"), eps)
        self.gate_proj = _linear(get(prefix + "mlp.gate_proj.weight"))
        self.up_proj = _linear(get(prefix + "mlp.up_proj.weight"))
        self.down_proj = _linear(get(prefix + "mlp.down_proj.weight"))

    def forward(self, x, cos, sin, mask, past_key, past_value):
        T = x.shape[1]
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(1, T, self.n_head, self.head_dim)
        k = self.k_proj(h).view(1, T, self.n_kv, self.head_dim)
        v = self.v_proj(h).view(1, T, self.n_kv, self.head_dim)
        # cos/sin: [1, T, 1, D], broadcast over heads (position-major layout throughout).
        q = q * cos + _rotate_half(q) * sin
        new_key = k * cos + _rotate_half(k) * sin
        new_value = v
        keys = torch.cat([past_key, new_key], dim=1).transpose(1, 2)  # [1, KVH, P+T, D]
        values = torch.cat([past_value, new_value], dim=1).transpose(1, 2)
        groups = self.n_head // self.n_kv
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q.transpose(1, 2), keys.transpose(2, 3)) * (self.head_dim ** -0.5)
        probs = torch.softmax(scores.float() + mask, dim=-1).to(values.dtype)
        attn = torch.matmul(probs, values).transpose(1, 2).reshape(1, T, self.n_head * self.head_dim)
        x = x + self.o_proj(attn)
        h = self.post_attention_layernorm(x)
        x = x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
        return x, new_key, new_value


class ExportDecoder(nn.Module):
    """inputs_embeds [1,T,H], position_ids [1,T], logits_index [K], past_key/value.{i} [1,P,KVH,D]
    -> logits [K,V] float32, new_key/value.{i} [1,T,KVH,D]."""

    def __init__(self, lm_state: dict, cfg: dict):
        super().__init__()
        self.num_layers = cfg["n_layer"]
        self.layers = nn.ModuleList(DecoderLayer(lm_state, f"model.layers.{i}.", cfg) for i in range(cfg["n_layer"]))
        self.norm = RMSNorm(lm_state["model.norm.weight"], float(cfg["norm_eps"]))
        self.lm_head = _linear(lm_state["lm_head.weight"])
        self.register_buffer("inv_freq", rope_inv_freq(cfg["head_size"], float(cfg["rope_base"])), persistent=False)

    def forward(self, inputs_embeds, position_ids, logits_index, *past):
        T = inputs_embeds.shape[1]
        P = past[0].shape[1]
        angles = round_positions(position_ids)[..., None] * self.inv_freq  # [1, T, D/2]
        angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
        cos, sin = angles.cos().to(inputs_embeds.dtype), angles.sin().to(inputs_embeds.dtype)
        # Causal over P cached + T new: new token t sees keys 0..P+t.
        key_index = torch.arange(P + T, device=inputs_embeds.device)
        query_index = torch.arange(T, device=inputs_embeds.device) + P
        mask = torch.where(key_index[None, :] <= query_index[:, None], 0.0, float("-inf"))
        x = inputs_embeds
        new = []
        for i, layer in enumerate(self.layers):
            x, new_key, new_value = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            new += [new_key, new_value]
        rows = x.index_select(1, logits_index)  # only the requested rows reach lm_head
        # 3-D input makes lm_head a MatMul (not a Gemm), which the weight quantizers handle.
        logits = self.lm_head(self.norm(rows))[0].float()
        return (logits, *new)


def io_names(num_layers: int) -> tuple[list, list]:
    inputs = ["inputs_embeds", "position_ids", "logits_index"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key.{i}", f"past_value.{i}"]
        outputs += [f"new_key.{i}", f"new_value.{i}"]
    return inputs, outputs


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
    past = []
    for _ in range(module.num_layers):
        past += [torch.zeros(1, P, n_kv, d), torch.zeros(1, P, n_kv, d)]
    args = (torch.zeros(1, T, h), torch.arange(P, P + T)[None], torch.tensor([T - 1]), *past)
    inputs, outputs = io_names(module.num_layers)
    dynamic = {"inputs_embeds": {1: "T"}, "position_ids": {1: "T"}, "logits_index": {0: "K"}, "logits": {0: "K"}}
    for name in inputs[3:]:
        dynamic[name] = {1: "P"}
    for name in outputs[1:]:
        dynamic[name] = {1: "T"}
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


def skeleton_decoder(shapes: dict, cfg: dict) -> tuple[ExportDecoder, dict]:
    """The export module with placeholder weights, and ONNX parameter name -> (checkpoint key,
    transposed). `shapes`: HF Qwen2 name -> shape (the embedding table is not needed)."""
    state, keys = {}, {}
    for index, (key, shape) in enumerate(shapes.items()):
        state[key] = _placeholder(tuple(shape), index)
        keys[state[key].data_ptr()] = key
    module = ExportDecoder(state, cfg)
    transposed = linear_as_matmul(module)  # placeholders stay 4-byte broadcasts: same data_ptr
    sources = {}
    for name, param in module.named_parameters():
        key = keys.get(param.data_ptr())
        if key is None:
            raise RuntimeError(f"decoder parameter {name}: no checkpoint weight behind it")
        sources[name] = (key, name in transposed)
    return module, sources


def export_decoder_streamed(weights, path: Path, cfg: dict) -> Path:
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
    module, sources = skeleton_decoder({k: shape_of(k) for k in keys}, cfg)
    path = Path(path)
    _trace_to_onnx(module, path, cfg, export_params=False)
    del module

    def fetch(key, transposed):
        def read():
            tensor = weights[key].detach().float()
            return (tensor.t() if transposed else tensor).contiguous().numpy()
        return read

    attach_initializers(path, 3 + 2 * cfg["n_layer"], {name: fetch(*src) for name, src in sources.items()})
    return path
