"""Attention of the slot decoder: S streams' steps in one call (docs/DESIGN.md, "Fixed-slot batching").

Each layer's cache is one head-major buffer `[S, KVH, C + 13, D]` shared by S slots, bound as
both past and present. A call carries `STEP` (13) token rows per slot, of which the first
`new_lengths[s]` are real; slot s's rows sit at positions `past_lengths[s] + t`. The new keys
and values are written into the buffer by one ScatterND per cache (in place when past and
present are bound to the same memory); row t that is not real goes to row C + t, a scratch row
that no query ever reads, so no two rows of a call are written to the same place (ScatterND
leaves duplicate indices undefined, and ONNX Runtime's CPU kernel copies rows in parallel). Attention then reads the whole buffer with a mask that admits key j for
query row t of slot s only when j <= past_lengths[s] + t.

Only standard ONNX operators (MatMul, Where, Softmax, ScatterND): every slot's row is computed
by the same kernels at the same shapes whatever the other slots hold, and nothing reduces
across slots, so a stream's numbers are those of its own inputs alone.
"""
from __future__ import annotations

import torch


class ScatterND(torch.autograd.Function):
    """ONNX ScatterND (reduction none): `data` with `updates` written at `indices`."""

    @staticmethod
    def forward(ctx, data, indices, updates):
        out = data.clone()
        if torch.jit.is_tracing():  # the export writes the ONNX node: only the shape matters here
            return out
        depth = indices.shape[-1]
        flat = indices.reshape(-1, depth)
        out[tuple(flat.t())] = updates.reshape(-1, *data.shape[depth:])
        return out

    @staticmethod
    def symbolic(g, data, indices, updates):
        out = g.op("ScatterND", data, indices, updates)
        out.setType(data.type())
        return out


def write_rows(past_lengths, new_lengths, steps: int, buffer_rows):
    """Where each slot's T rows go: past_lengths[s] + t for real rows, scratch row C + t (of
    the buffer's last T) for the others. [S, T] int64."""
    t = torch.arange(steps, device=past_lengths.device)
    positions = past_lengths[:, None] + t[None, :]
    return torch.where(t[None, :] < new_lengths[:, None], positions, buffer_rows - steps + t[None, :])


def slot_attention(q, new_key, new_value, key_cache, value_cache, positions, written_at, scale: float):
    """q [S,T,NH,D], new_key/new_value [S,T,KVH,D], caches [S,KVH,C+T,D], positions [S,T]
    (past_lengths[s] + t), written_at [S,T] (write_rows) -> ([S,T,NH*D], present key, present value).

    Query head n uses KV head n // G, so q is regrouped to [S, KVH, G*T, D] (rows g*T + t):
    one product per slot and KV head, as the grouped graph does per stream."""
    S, T, NH, D = q.shape
    n_kv = new_key.shape[2]
    groups = NH // n_kv
    rows = key_cache.shape[2]
    slot = torch.arange(S, device=q.device)[:, None, None].expand(S, n_kv, T)
    head = torch.arange(n_kv, device=q.device)[None, :, None].expand(S, n_kv, T)
    where = written_at[:, None, :].expand(S, n_kv, T)
    indices = torch.stack([slot, head, where], dim=-1)  # [S, KVH, T, 3]
    present_key = ScatterND.apply(key_cache, indices, new_key.permute(0, 2, 1, 3))
    present_value = ScatterND.apply(value_cache, indices, new_value.permute(0, 2, 1, 3))

    qg = (q * scale).reshape(S, T, n_kv, groups, D).permute(0, 2, 3, 1, 4).reshape(S, n_kv, groups * T, D)
    scores = torch.matmul(qg, present_key.transpose(2, 3))  # [S, KVH, G*T, C+T]
    keys = torch.arange(rows, device=q.device)
    allowed = (keys[None, None, :] <= positions[:, :, None]).repeat(1, groups, 1)[:, None]  # [S, 1, G*T, C+T]
    # Where, not an added -inf: a masked score stays -inf whatever the unused rows hold
    scores = torch.where(allowed, scores, torch.full((), float("-inf"), dtype=scores.dtype))
    out = torch.matmul(torch.softmax(scores, dim=-1), present_value)  # [S, KVH, G*T, D]
    out = out.reshape(S, n_kv, groups, T, D).permute(0, 3, 1, 2, 4).reshape(S, T, NH * D)
    return out, present_key, present_value
