"""A package's closed set of replies: decoding may only follow one of them.

A model trained to say a fixed set of things (the demo model's alerts and answers) can still
put tokens together into a text outside that set. A package that lists its replies
(`reply_set` in manifest.json, runtime/PACKAGE_FORMAT.md) has every reply token chosen among
the tokens that continue one of them (docs/PROTOCOL.md, "Reply set"): the sampler sees the
other logits as -inf, so greedy decoding picks the likeliest listed continuation and a reply
is always one of the listed ones, or cut short by the reply cap.
"""
from __future__ import annotations

import numpy as np


class ReplySet:
    """The listed replies (each the tokens after TEXT_BEGIN: emotion, text, TEXT_END) as a
    prefix tree: for the tokens said so far, the ids that may come next. Shared read-only."""

    def __init__(self, replies):
        following: dict[tuple[int, ...], set[int]] = {}
        for reply in replies:
            for n, token in enumerate(reply):
                following.setdefault(tuple(reply[:n]), set()).add(int(token))
        self._next = {prefix: np.array(sorted(ids), np.int64) for prefix, ids in following.items()}
        self.size = len({tuple(r) for r in replies})

    def allowed(self, said) -> np.ndarray:
        """Ids that continue a listed reply after `said` (empty when `said` left the set)."""
        return self._next.get(tuple(said), np.zeros(0, np.int64))

    def constrain(self, logits: np.ndarray, said, out: np.ndarray) -> np.ndarray:
        """`logits` with every id outside allowed(said) at -inf, written into `out`."""
        out.fill(-np.inf)
        ids = self.allowed(said)
        out[ids] = logits[ids]
        return out
