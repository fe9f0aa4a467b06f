"""Beam search on a TreeKVCache: fork the beams that survive twice, prune the ones that die.

The beams of a beam search share their prompt and most of their history, so the cache
stores each shared token once: W beams over a P-token prompt after G steps hold about
``P + W * G`` tokens instead of ``W * (P + G)``. Every step:

1. ``reserve(beams)`` gives each beam a slot for its pending token; for every layer the
   model writes that token's K/V (``write``) and attends (``attend``), once per beam.
2. The scores pick the W best (beam, next token) pairs. A beam picked k times is kept
   and forked k - 1 times (``fork``: no KV copied); a beam never picked is ``prune``-d
   (its pages go back to the pool unless another beam still reads them).

The "model" is a toy: random embeddings and per-layer projections, a residual stream,
no MLP; the prompt's K/V come straight from its token embeddings (a toy prefill). It
only has to produce plausible q/k/v and logits, the point is how the cache is driven.
At the end every beam's attention is checked against ``kernels.reference_decode``.

Run:
    python examples/09_beam_search.py                       # GPU if there is one, else CPU
    python examples/09_beam_search.py --beam_width 8 --steps 32 --prompt_len 512
    TRITON_INTERPRET=1 python examples/09_beam_search.py --steps 6   # Triton kernels on CPU
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

try:
    import treecache  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from kernels import reference_decode
from treecache import TreeKVCache


class ToyModel:
    """Embeddings, per-layer q/k/v/o projections and a residual stream: just enough model."""

    def __init__(self, vocab, d_model, num_layers, num_qo_heads, num_kv_heads, head_dim,
                 device, dtype, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)

        def w(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        self.hq, self.hk, self.d = num_qo_heads, num_kv_heads, head_dim
        self.emb = w(vocab, d_model, scale=1.0)
        s = d_model ** -0.5
        self.wq = [w(d_model, num_qo_heads * head_dim, scale=s) for _ in range(num_layers)]
        self.wk = [w(d_model, num_kv_heads * head_dim, scale=s) for _ in range(num_layers)]
        self.wv = [w(d_model, num_kv_heads * head_dim, scale=s) for _ in range(num_layers)]
        self.wo = [w(num_qo_heads * head_dim, d_model, scale=(num_qo_heads * head_dim) ** -0.5)
                   for _ in range(num_layers)]
        self.unembed = w(d_model, vocab, scale=2 * s)  # logits of std ~2

    def qkv(self, x, layer):
        """``x`` ``[n, d_model]`` -> q ``[n, Hq, D]``, k, v ``[n, Hk, D]``."""
        n = x.shape[0]
        return ((x @ self.wq[layer]).view(n, self.hq, self.d),
                (x @ self.wk[layer]).view(n, self.hk, self.d),
                (x @ self.wv[layer]).view(n, self.hk, self.d))

    def residual(self, x, o, layer):
        return x + o.reshape(x.shape[0], -1) @ self.wo[layer]

    def log_probs(self, x):
        return torch.log_softmax((x @ self.unembed).float(), dim=-1)


def prefill(cache, model, req, tokens):
    """Toy prefill: the prompt's K/V of every layer from its token embeddings."""
    x = model.emb[tokens]
    ks, vs = zip(*[model.qkv(x, layer)[1:] for layer in range(cache.num_layers)])
    cache.append(req, torch.stack(ks), torch.stack(vs))  # [num_layers, n, Hk, D]


def decode_step(cache, model, beams, pending):
    """Write every beam's pending token and attend, layer by layer; returns log-probs."""
    slots = cache.reserve(beams)
    x = model.emb[pending]  # [W, d_model]
    for layer in range(cache.num_layers):
        q, k, v = model.qkv(x, layer)
        cache.write(layer, slots, k, v)
        o = cache.attend(q, layer, beams)  # one plan for all layers of this step
        x = model.residual(x, o, layer)
    return model.log_probs(x)  # [W, vocab]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--beam_width", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--num_layers", type=int, default=2)
    ap.add_argument("--num_qo_heads", type=int, default=8)
    ap.add_argument("--num_kv_heads", type=int, default=2)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--page_size", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                    help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    W, P, G = args.beam_width, args.prompt_len, args.steps
    torch.manual_seed(0)

    cache = TreeKVCache(args.num_layers, args.num_qo_heads, args.num_kv_heads, args.head_dim,
                        capacity_tokens=(P + W * G + 4 * W) * args.page_size,
                        page_size=args.page_size, dtype=dtype, device=device,
                        backend=args.backend)
    model = ToyModel(args.vocab, 128, args.num_layers, args.num_qo_heads, args.num_kv_heads,
                     args.head_dim, device, dtype)
    print(f"device {device} ({dtype}), backend {cache.backend.value}, "
          f"{args.num_layers} layers, heads {args.num_qo_heads}/{args.num_kv_heads}, "
          f"head_dim {args.head_dim}, page_size {args.page_size}")
    print(f"beam search: width {W}, prompt {P} tokens, {G} steps, vocab {args.vocab}\n")

    prompt = torch.randint(args.vocab, (P + 1,), device=device)
    root = cache.new_request()
    prefill(cache, model, root, prompt[:-1])
    # One beam to start with, whose pending token is the prompt's last one; the first step
    # forks it into W beams (no KV copied).
    beams = [root]
    pending = prompt[-1:]
    scores = torch.zeros(1, device=device)

    print(" step  beams  forks  prunes  pages used  unique/logical tokens  saved vs copies"
          "  rebuilds  best score")
    for step in range(G):
        logp = decode_step(cache, model, beams, pending)
        cand = (scores[:, None] + logp).reshape(-1)
        best = torch.topk(cand, W)
        parent = (best.indices // args.vocab).tolist()
        token = best.indices % args.vocab
        counts = [parent.count(i) for i in range(len(beams))]
        # Prune the beams never picked (one call), keep a beam picked once, fork it for
        # every extra pick.
        cache.prune([b for i, b in enumerate(beams) if counts[i] == 0])
        new_beams = []
        for i, b in enumerate(beams):
            if counts[i]:
                new_beams.append(b)
                new_beams += [cache.fork(b) for _ in range(counts[i] - 1)]
        order = sorted(range(W), key=lambda j: parent[j])  # new_beams lists parents in order
        beams = new_beams
        pending = token[order]
        scores = best.values[order]
        s = cache.stats()
        saved = 1 - s["kv_bytes_used"] / s["kv_bytes_unshared"]
        print(f"{step:5d}  {len(beams):5d}  {sum(max(c - 1, 0) for c in counts):5d}  "
              f"{counts.count(0):6d}  {s['pages_used']:10d}  "
              f"{s['unique_tokens']:8d} / {s['logical_tokens']:<8d}    {saved:14.1%}  "
              f"{s['plan_rebuilds']:8d}  {scores.max().item():10.3f}")

    s = cache.stats()
    per_beam_copies = W * (P + G)
    print(f"\nstored tokens: {s['unique_tokens']} (P + W*G = {P + W * G}); "
          f"per-beam copies would need {per_beam_copies}")
    print(f"KV bytes: {s['kv_bytes_used'] / 2**20:.2f} MiB used, "
          f"{s['kv_bytes_unshared'] / 2**20:.2f} MiB as per-beam copies "
          f"(sharing ratio {s['sharing_ratio']:.2f})")
    print(f"plans built: {s['plan_rebuilds']} in {G} steps (one per step at most: "
          "steps without a fork or prune re-use the plan)")

    # Check: every beam's attention over its own path, against the dense reference.
    cache.check()
    max_err = 0.0
    for layer in range(cache.num_layers):
        q = torch.randn(len(beams), args.num_qo_heads, args.head_dim, device=device, dtype=dtype)
        out = cache.attend(q, layer, beams)
        ref = reference_decode(q, cache.k_pool[layer], cache.v_pool[layer],
                               [torch.from_numpy(cache.slots(b)).to(device) for b in beams],
                               cache.sm_scale)
        max_err = max(max_err, (out.float() - ref).abs().max().item())
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    print(f"max |attend - reference| over all beams and layers: {max_err:.2e}")
    cache.prune(beams)
    print(f"after pruning every beam: {cache.stats()['pages_used']} pages used")
    ok = max_err < tol and cache.stats()["pages_used"] == 0
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
