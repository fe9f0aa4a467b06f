"""Speculative decoding with a draft tree on a TreeKVCache.

Each round, a cheap draft model proposes a tree of candidate continuations under the
request (e.g. 3 candidates, then 2 under each, then 2 under each of those: depth 3).
Every draft token is its own request: a ``fork`` of its parent plus one ``reserve``-d
slot, so its path is prompt + accepted tokens + its draft ancestors + itself, and the
whole tree shares the request's KV without a copy. Verification is one pass of the
target model over the request's pending token and every draft token, layer by layer:
``write`` the layer's K/V of all of them, then ``attend`` with one query per token.
The longest path of drafts that agrees with the target's greedy choice is kept with
``accept(req, draft, discard=rest)``; the target's own next token after that path
becomes the new pending token. Rejected drafts free their pages.

The models are toys (random weights; the draft model is a bigram table that the target
also leans on, so drafts are often, not always, right). Checks: every verification
``attend`` against ``kernels.reference_decode``; and the tokens produced, and the logits
that chose them, must equal those of plain greedy decoding, one token per step, of the
same model (float32).

Run:
    python examples/10_speculative_decoding.py              # GPU if there is one, else CPU
    python examples/10_speculative_decoding.py --widths 3 3 2 --rounds 12
    TRITON_INTERPRET=1 python examples/10_speculative_decoding.py --rounds 3
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


class ToyModels:
    """A target model (embeddings, per-layer q/k/v/o, a residual stream, logits that
    lean on a bigram table) and a draft model (the bigram table alone)."""

    def __init__(self, vocab, d_model, num_layers, num_qo_heads, num_kv_heads, head_dim,
                 device, dtype, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)

        def w(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        self.hq, self.hk, self.d = num_qo_heads, num_kv_heads, head_dim
        s = d_model ** -0.5
        self.emb = w(vocab, d_model, scale=1.0)
        self.wq = [w(d_model, num_qo_heads * head_dim, scale=s) for _ in range(num_layers)]
        self.wk = [w(d_model, num_kv_heads * head_dim, scale=s) for _ in range(num_layers)]
        self.wv = [w(d_model, num_kv_heads * head_dim, scale=s) for _ in range(num_layers)]
        self.wo = [w(num_qo_heads * head_dim, d_model, scale=(num_qo_heads * head_dim) ** -0.5)
                   for _ in range(num_layers)]
        self.unembed = w(d_model, vocab, scale=s)
        self.bigram = (torch.randn(vocab, vocab, generator=g) * 2.0).to(device)

    def qkv(self, x, layer):
        n = x.shape[0]
        return ((x @ self.wq[layer]).view(n, self.hq, self.d),
                (x @ self.wk[layer]).view(n, self.hk, self.d),
                (x @ self.wv[layer]).view(n, self.hk, self.d))

    def residual(self, x, o, layer):
        return x + o.reshape(x.shape[0], -1) @ self.wo[layer]

    def logits(self, x, tokens):
        """Target's next-token logits after each row (its hidden state ``x``, its token)."""
        return (x @ self.unembed).float() + self.bigram[tokens]

    def draft(self, token, k):
        """Draft model: the ``k`` likeliest next tokens after ``token``."""
        return torch.topk(self.bigram[token], k).indices.tolist()


def prefill(cache, models, req, tokens):
    """Toy prefill: the prompt's K/V of every layer from its token embeddings."""
    x = models.emb[tokens]
    ks, vs = zip(*[models.qkv(x, layer)[1:] for layer in range(cache.num_layers)])
    cache.append(req, torch.stack(ks), torch.stack(vs))


def forward(cache, models, reqs, tokens, slots, check):
    """One target pass: row i is ``tokens[i]`` at the end of ``reqs[i]``'s path, its slot
    ``slots[i]`` already reserved. Returns the logits of every row and the largest
    deviation of ``attend`` from the reference."""
    x = models.emb[tokens]
    err = 0.0
    for layer in range(cache.num_layers):
        q, k, v = models.qkv(x, layer)
        cache.write(layer, slots, k, v)
        o = cache.attend(q, layer, reqs)
        if check:
            ref = reference_decode(q, cache.k_pool[layer], cache.v_pool[layer],
                                   [torch.from_numpy(cache.slots(r)).to(q.device) for r in reqs],
                                   cache.sm_scale)
            err = max(err, (o.float() - ref).abs().max().item())
        x = models.residual(x, o, layer)
    return models.logits(x, tokens), err


def speculative_round(cache, models, req, pending, widths, check):
    """Draft, verify, accept. Returns (new tokens, their logits, accepted drafts, drafts,
    error of attend)."""
    device = cache.device
    # Row 0 is the request's pending token, in place at the request's tail.
    rows = [(req, pending, -1)]
    slots = [cache.reserve(req, 1)]
    # Draft tree, level by level. A draft is a fork of its parent (sharing every token of
    # the parent's path, its draft token included) plus one slot for its own token.
    frontier = [0]
    for width in widths:
        nxt = []
        for parent in frontier:
            for tok in models.draft(rows[parent][1], width):
                d = cache.fork(rows[parent][0])
                slots.append(cache.reserve(d, 1))
                rows.append((d, tok, parent))
                nxt.append(len(rows) - 1)
        frontier = nxt
    drafts = [r for r, _, _ in rows[1:]]
    slots = torch.cat(slots)
    tokens = torch.tensor([t for _, t, _ in rows], device=device)
    logits, err = forward(cache, models, [r for r, _, _ in rows], tokens, slots, check)
    pred = logits.argmax(-1).tolist()

    # Walk down the tree while a child's token is what the target predicts.
    children = {}
    for i, (_, tok, parent) in enumerate(rows[1:], start=1):
        children.setdefault(parent, {})[tok] = i
    path, node = [], 0
    while pred[node] in children.get(node, {}):
        node = children[node][pred[node]]
        path.append(node)
    new_tokens = [rows[i][1] for i in path] + [pred[node]]
    new_logits = logits[[0] + path]  # the rows that predicted the new tokens
    if path:
        keep = rows[path[-1]][0]
        cache.accept(req, keep, discard=[d for d in drafts if d != keep])
    else:
        cache.prune(drafts)
    return new_tokens, new_logits, len(path), len(drafts), err


def greedy_reference(cache, models, prompt, n):
    """Plain greedy decoding of ``n`` tokens, one per step, on a fresh request.
    Returns the tokens and the logits that chose them ``[n, vocab]``."""
    req = cache.new_request()
    prefill(cache, models, req, prompt[:-1])
    pending, out, logits = int(prompt[-1]), [], []
    for _ in range(n):
        slot = cache.reserve([req])
        lg, _ = forward(cache, models, [req], torch.tensor([pending], device=cache.device),
                        slot, check=False)
        pending = int(lg[0].argmax())
        out.append(pending)
        logits.append(lg[0])
    cache.prune(req)
    return out, torch.stack(logits)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[3, 2, 2],
                    help="candidates per draft token at each level (depth = how many)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=96)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--num_layers", type=int, default=2)
    ap.add_argument("--num_qo_heads", type=int, default=8)
    ap.add_argument("--num_kv_heads", type=int, default=2)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--page_size", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    max_tree = 1
    for w in reversed(args.widths):
        max_tree = 1 + w * max_tree
    cache = TreeKVCache(args.num_layers, args.num_qo_heads, args.num_kv_heads, args.head_dim,
                        capacity_tokens=4 * (args.prompt_len + args.rounds * (len(args.widths) + 1)
                                             + max_tree * args.page_size),
                        page_size=args.page_size, dtype=dtype, device=device,
                        backend=args.backend)
    models = ToyModels(args.vocab, 128, args.num_layers, args.num_qo_heads, args.num_kv_heads,
                       args.head_dim, device, dtype)
    print(f"device {device} ({dtype}), backend {cache.backend.value}, "
          f"{args.num_layers} layers, heads {args.num_qo_heads}/{args.num_kv_heads}, "
          f"head_dim {args.head_dim}")
    print(f"draft tree widths {args.widths} ({max_tree - 1} draft tokens), "
          f"prompt {args.prompt_len} tokens, {args.rounds} rounds\n")

    prompt = torch.randint(args.vocab, (args.prompt_len + 1,), device=device)
    req = cache.new_request()
    prefill(cache, models, req, prompt[:-1])
    pending = int(prompt[-1])
    generated, gen_logits, max_err = [], [], 0.0
    print(" round  drafts  accepted  new tokens  length  pages used  rebuilds  max |err|")
    for rnd in range(args.rounds):
        new, logits, accepted, ndrafts, err = speculative_round(cache, models, req, pending,
                                                                args.widths, check=True)
        generated += new
        gen_logits.append(logits)
        pending = new[-1]
        max_err = max(max_err, err)
        s = cache.stats()
        print(f"{rnd:6d}  {ndrafts:6d}  {accepted:8d}  {len(new):10d}  {cache.length(req):6d}  "
              f"{s['pages_used']:10d}  {s['plan_rebuilds']:8d}  {err:9.2e}")
        cache.check()
        assert cache.requests == [req], "rejected drafts must all be gone"

    rounds = args.rounds
    print(f"\n{len(generated)} tokens in {rounds} rounds "
          f"({len(generated) / rounds:.2f} per target pass; plain decoding makes 1)")
    expected, ref_logits = greedy_reference(cache, models, prompt, len(generated))
    same = sum(a == b for a, b in zip(generated, expected))
    logit_err = (torch.cat(gen_logits) - ref_logits).abs().max().item()
    print(f"agreement with plain greedy decoding: {same}/{len(generated)} tokens, "
          f"max logit difference {logit_err:.2e}")
    print(f"max |attend - reference| during verification: {max_err:.2e}")
    cache.prune(req)
    print(f"after pruning: {cache.stats()['pages_used']} pages used")

    tol = 1e-3 if dtype == torch.float32 else 3e-2
    ok = max_err < tol and cache.stats()["pages_used"] == 0
    if dtype == torch.float32:  # half precision may flip a near-tie
        ok = ok and same == len(generated) and logit_err < 1e-3
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
