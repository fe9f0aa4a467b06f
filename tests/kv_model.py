"""The oracle of the cache tests: every live request's own K and V, no sharing.

``RequestKV`` mirrors the cache's operations (new request, append, fork, prune, accept)
on plain per-request tensors ``[num_layers, n, Hk, D]`` and computes float32 attention
over them, so a test can compare ``TreeKVCache.attend`` with it after any sequence of
operations. Used by tests/test_cache.py (CPU) and tests/test_cache_gpu.py.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels import reference_decode


class RequestKV:
    """Each live request's own K and V ``[num_layers, n, Hk, D]``, no sharing."""

    def __init__(self, num_layers, num_qo_heads, num_kv_heads, head_dim, *,
                 dtype=torch.float32, device="cpu", generator=None, seed=0):
        self.num_layers = num_layers
        self.shape = (num_layers, num_qo_heads, num_kv_heads, head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.gen = (generator if generator is not None
                    else torch.Generator(device=self.device).manual_seed(seed))
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.gen.device).to(
            self.device, self.dtype)

    def tokens(self, n) -> tuple[torch.Tensor, torch.Tensor]:
        """Random K, V ``[num_layers, n, Hk, D]``."""
        nl, _, hk, d = self.shape
        return self.randn(nl, n, hk, d), self.randn(nl, n, hk, d)

    def queries(self, b) -> torch.Tensor:
        _, hq, _, d = self.shape
        return self.randn(b, hq, d)

    def _empty(self, n) -> torch.Tensor:
        _, _, hk, d = self.shape
        return torch.zeros(n, hk, d, dtype=self.dtype, device=self.device)

    def new(self, r):
        nl, _, hk, d = self.shape
        self.k[r] = torch.zeros(nl, 0, hk, d, dtype=self.dtype, device=self.device)
        self.v[r] = self.k[r]

    def append(self, r, k, v):
        self.k[r] = torch.cat([self.k[r], k], dim=1)
        self.v[r] = torch.cat([self.v[r], v], dim=1)

    def fork(self, src, dst):
        self.k[dst], self.v[dst] = self.k[src], self.v[src]

    def prune(self, r):
        del self.k[r], self.v[r]

    def accept(self, req, draft, discard=()):
        self.k[req], self.v[req] = self.k.pop(draft), self.v.pop(draft)
        for d in discard:
            self.prune(d)

    def length(self, r) -> int:
        return self.k[r].shape[1]

    @property
    def requests(self) -> list[int]:
        return list(self.k)

    def reference(self, q, layer, requests, sm_scale, logit_cap=0.0) -> torch.Tensor:
        """Float32 attention of row i of q over requests[i]'s own tokens."""
        ks = [self.k[r][layer] for r in requests]
        vs = [self.v[r][layer] for r in requests]
        lens = [t.shape[0] for t in ks]
        offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        slots = [torch.arange(int(offs[i]), int(offs[i + 1]), device=self.device)
                 for i in range(len(lens))]
        pad = self._empty(1)
        return reference_decode(q, torch.cat(ks + [pad]), torch.cat(vs + [pad]), slots,
                                sm_scale, logit_cap)
