"""Helpers shared by the planner tests (tests/test_plan.py, tests/test_plan_ops.py)."""

from __future__ import annotations

import numpy as np

from treecache.plan import DEFAULT_KV_SPLIT_SIZES, PlanBuffers, PlanInput

# Thresholds of 0 switch off the seed's parallelism adjustment (smaller KV chunks, then
# one tile shape for both phases), and explicit chunk lengths switch off the choice per
# plan, so that tiles and chunks are exactly what is asked.
NO_ADJUST = dict(kv_split_sizes=DEFAULT_KV_SPLIT_SIZES, para_threshs1=(0, 0),
                 para_threshs2=(0, 0))


def plan_input(parent, seqlen, req_end, node_tokens=None, growable=None) -> PlanInput:
    """A PlanInput with nodes laid out contiguously in id order."""
    seqlen = np.asarray(seqlen, dtype=np.int64)
    tok_ptr = np.concatenate([[0], np.cumsum(seqlen)[:-1]]).astype(np.int64)
    return PlanInput(
        parent=np.asarray(parent, dtype=np.int64), seqlen=seqlen, tok_ptr=tok_ptr,
        req_end=np.asarray(req_end, dtype=np.int64),
        node_tokens=None if node_tokens is None else np.asarray(node_tokens, dtype=np.int32),
        growable=None if growable is None else np.asarray(growable, dtype=bool),
    )


def stand_in_buffers(num_qo_heads, head_dim, **caps) -> PlanBuffers:
    """PlanBuffers whose device copy is a separate CPU tensor (as on a GPU), poisoned
    with -5; ``caps`` size them (a plan that needs more reallocates them as plain CPU
    buffers)."""
    buf = PlanBuffers(num_qo_heads, head_dim, "cpu", **caps)
    buf.dev = buf.host.clone()
    buf.dev.fill_(-5)
    return buf
