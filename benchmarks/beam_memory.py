"""Beam search: decode-step latency and KV memory, TreeKVCache against a per-beam cache.

``python -m benchmarks.beam_memory --out results.json`` (GPU; ``--quick`` runs tiny sizes
on the CPU) builds a randomly initialised Llama-family decoder of realistic shape (32
query / 8 KV heads, head_dim 128, hidden 4096, 4 layers, fp16; transformers'
``LlamaForCausalLM`` when transformers is installed, else an equivalent module tree
defined here), prefills a 4k-token prompt and runs beam search steps for each width W
with two caches behind the same forward:

* **tree**: ``TreeKVCache``. The prompt is stored once, beams fork (no copy) and die
  (pages freed); one decode call attends one query per beam with the tree kernel.
* **per-beam**: every beam owns a contiguous row ``[kv_heads, max_len, head_dim]`` per
  layer. A fork copies the parent's whole context into a free row (the reorder that a
  classic beam search does, restricted to the beams that actually fork); attention is
  ``torch.nn.functional.scaled_dot_product_attention`` over each beam's full context.

Both runs make the same beam choices (the tree run's choices are replayed), so they do
the same work; the last logits of both are compared as a sanity check. Reported per W:
decode-step latency, median and mean (all layers, attention included, host work
included; the mean also counts Triton compilations of kernel variants first met during
the measured steps), of which the step's slot reservation and (tree) its plan, the
attention alone (one ``attend`` per layer over the final beams, repeated), mean fork/prune
bookkeeping per step, KV bytes in use (tree: pages held; per-beam: the sum of the beams' context
lengths) and, on CUDA, the peak memory allocated during the run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    import treecache  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from treecache.integrations.transformers import TreeCacheModel

MIB = 1024 * 1024
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# --------------------------------------------------------------------------- the model


def build_model(args, device: torch.device, dtype: torch.dtype):
    """A random-weight Llama decoder; transformers' if available (and not refused)."""
    torch.manual_seed(0)
    if args.impl in ("auto", "hf"):
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError:
            if args.impl == "hf":
                raise
        else:
            config = LlamaConfig(
                vocab_size=args.vocab,
                hidden_size=args.hidden,
                intermediate_size=args.intermediate,
                num_hidden_layers=args.layers,
                num_attention_heads=args.heads,
                num_key_value_heads=args.kv_heads,
                head_dim=args.head_dim,
                max_position_embeddings=max(8192, 2 * args.prompt_len),
                tie_word_embeddings=False,
            )
            with torch.device(device):
                model = LlamaForCausalLM(config).to(dtype)
            return model.eval(), "transformers LlamaForCausalLM"
    with torch.device(device):
        model = _MiniLlama(args).to(dtype)
    return model.eval(), "built-in Llama modules"


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class _Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids):  # -> cos, sin [B, T, head_dim]
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class _Layer(nn.Module):
    def __init__(self, a):
        super().__init__()
        h, d = a.hidden, a.head_dim
        self.input_layernorm = _RMSNorm(h)
        self.post_attention_layernorm = _RMSNorm(h)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(h, a.heads * d, bias=False)
        self.self_attn.k_proj = nn.Linear(h, a.kv_heads * d, bias=False)
        self.self_attn.v_proj = nn.Linear(h, a.kv_heads * d, bias=False)
        self.self_attn.o_proj = nn.Linear(a.heads * d, h, bias=False)
        self.self_attn.head_dim = d
        self.self_attn.scaling = d**-0.5
        self.mlp = _SwiGLU(h, a.intermediate)


class _SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MiniLlama(nn.Module):
    """The module layout of transformers' LlamaForCausalLM, nothing else."""

    def __init__(self, a):
        super().__init__()
        self.config = types.SimpleNamespace(
            model_type="llama",
            num_attention_heads=a.heads,
            num_key_value_heads=a.kv_heads,
            head_dim=a.head_dim,
            hidden_size=a.hidden,
            vocab_size=a.vocab,
            eos_token_id=None,
        )
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(a.vocab, a.hidden)
        self.model.layers = nn.ModuleList(_Layer(a) for _ in range(a.layers))
        self.model.norm = _RMSNorm(a.hidden)
        self.model.rotary_emb = _Rotary(a.head_dim)
        self.lm_head = nn.Linear(a.hidden, a.vocab, bias=False)


# --------------------------------------------------------------------------- per-beam cache


class PerBeamKVCache:
    """One contiguous KV row per request; forks copy, attention is SDPA per beam context.

    Implements the part of the ``TreeKVCache`` interface that ``TreeCacheModel`` and
    the beam loop use. Storage ``[num_layers, max_requests, num_kv_heads, max_len, head_dim]``
    is allocated up front (a static cache), so ``write`` is an index copy and the SDPA
    reads a view.
    """

    def __init__(self, num_layers, num_qo_heads, num_kv_heads, head_dim, max_requests, max_len, *,
                 dtype, device, sm_scale):
        shape = (num_layers, max_requests, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.k_pool = self.k  # dtype/device introspection, as on TreeKVCache
        self.sm_scale = sm_scale
        self.group = num_qo_heads // num_kv_heads
        self._free = list(range(max_requests))[::-1]
        self._row: dict[int, int] = {}
        self._len: dict[int, int] = {}
        self._next = 0

    def new_request(self) -> int:
        rid, self._next = self._next, self._next + 1
        self._row[rid] = self._free.pop()
        self._len[rid] = 0
        return rid

    def append(self, req, k, v):  # k, v [num_layers, n, kv_heads, head_dim]
        row, n, start = self._row[req], k.shape[1], self._len[req]
        self.k[:, row, :, start : start + n] = k.transpose(1, 2)
        self.v[:, row, :, start : start + n] = v.transpose(1, 2)
        self._len[req] = start + n

    def fork(self, req) -> int:
        child = self.new_request()
        src, dst, n = self._row[req], self._row[child], self._len[req]
        self.k[:, dst, :, :n].copy_(self.k[:, src, :, :n])
        self.v[:, dst, :, :n].copy_(self.v[:, src, :, :n])
        self._len[child] = n
        return child

    def prune(self, req) -> None:
        self._free.append(self._row.pop(req))
        del self._len[req]

    def length(self, req) -> int:
        return self._len[req]

    def reserve(self, requests):
        rows = []
        for r in requests:
            rows.append(self._row[r] * self.k.shape[3] + self._len[r])
            self._len[r] += 1
        return torch.tensor(rows, device=self.k.device)

    def write(self, layer, slots, k, v):  # slot = row * max_len + position; k, v [n, KVH, d]
        rows, pos = slots // self.k.shape[3], slots % self.k.shape[3]
        self.k[layer, rows, :, pos] = k
        self.v[layer, rows, :, pos] = v

    def attend(self, q, layer=0, requests=()):
        requests = list(requests)
        rows = torch.tensor([self._row[r] for r in requests], device=q.device)
        lengths = {self._len[r] for r in requests}
        if len(lengths) == 1:
            # Beam search: every beam has the same length. One SDPA over all rows (in row
            # order, the spare row included), each row reading its own full context.
            n = lengths.pop()
            q_rows = q.new_zeros((self.k.shape[1],) + tuple(q.shape[1:]))
            q_rows[rows] = q
            return self._sdpa(q_rows, self.k[layer, :, :, :n], self.v[layer, :, :, :n])[rows]
        out = torch.empty_like(q)
        for i, r in enumerate(requests):
            row, n = self._row[r], self._len[r]
            out[i : i + 1] = self._sdpa(q[i : i + 1], self.k[layer, row : row + 1, :, :n],
                                        self.v[layer, row : row + 1, :, :n])
        return out

    def _sdpa(self, q, k, v):  # q [B, H, d]; k, v [B, KVH, n, d]
        # GQA without copying K/V: the query heads of a group are the group's "positions".
        # Flash / memory-efficient kernels: cuDNN's SDPA rebuilds its graph (~16 ms of host
        # time) whenever the context length changes, i.e. at every decode step.
        b, h, d = q.shape
        with sdpa_kernel(_SDPA_BACKENDS):
            o = F.scaled_dot_product_attention(q.view(b, h // self.group, self.group, d), k, v,
                                               scale=self.sm_scale)
        return o.reshape(b, h, d)

    def kv_bytes_used(self) -> int:
        per_token = 2 * self.k.shape[0] * self.k.shape[2] * self.k.shape[4] * self.k.element_size()
        return sum(self._len.values()) * per_token

    def kv_bytes_allocated(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


# --------------------------------------------------------------------------- the runs


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_beam(tm, cache, prompt, width, steps, warmup, device, choices=None):
    """Prefill, then ``warmup + steps`` beam steps; returns measurements and the choices made.

    ``choices`` (from an earlier run) replays the same (parent, token) picks.
    """
    root, logits = tm.prefill(cache, prompt)
    beams, tokens = [root], [int(logits.argmax())]
    scores = torch.zeros(1, device=device)
    made, step_s, book_s, plan_s, kv_used = [], [], [], [], []
    last_logits = None
    for step in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        if step == 0:  # W beams from the root: W - 1 forks
            parents, next_tokens = [0] * width, [tokens[0]] * width
            if choices is None:
                made.append((parents, next_tokens))
        elif choices is None:
            logp = torch.log_softmax(last_logits.float(), -1) + scores[:, None]
            top, idx = torch.topk(logp.reshape(-1), width)
            vocab = last_logits.shape[-1]
            parents, next_tokens = (idx // vocab).tolist(), (idx % vocab).tolist()
            scores = top
            made.append((parents, next_tokens))
        else:
            parents, next_tokens = choices[step]
        alive = set(parents)
        cache.prune([r for b, r in enumerate(beams) if b not in alive])
        claimed, new_beams = set(), []
        for p in parents:
            if p in claimed:
                new_beams.append(cache.fork(beams[p]))
            else:
                claimed.add(p)
                new_beams.append(beams[p])
        beams = new_beams
        _sync(device)
        t1 = time.perf_counter()
        # The step's slots and (tree) its plan first, timed on their own; the decode
        # step's time includes them.
        slots = cache.reserve(beams)
        prepare = getattr(cache, "prepare", None)
        if prepare is not None:
            prepare(beams)
        _sync(device)
        t_plan = time.perf_counter()
        last_logits = tm.decode(cache, beams, next_tokens, slots=slots)
        _sync(device)
        t2 = time.perf_counter()
        if step >= warmup:
            book_s.append(t1 - t0)
            plan_s.append(t_plan - t1)
            step_s.append(t2 - t1)
            kv_used.append(_kv_used(cache))
    attn_ms = _attention_ms(tm, cache, beams, device)
    return {
        "attention_ms": attn_ms,
        "decode_ms": statistics.mean(step_s) * 1e3,
        "decode_ms_median": statistics.median(step_s) * 1e3,
        "fork_prune_ms": statistics.mean(book_s) * 1e3,
        "reserve_plan_ms_median": statistics.median(plan_s) * 1e3,
        "kv_used_mib_final": kv_used[-1] / MIB,
        "kv_used_mib_peak": max(kv_used) / MIB,
    }, made, last_logits


def _attention_ms(tm, cache, beams, device, reps: int = 20) -> float:
    """Attention alone: one ``attend`` per layer over the final beams, mean ms per step."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(len(beams), tm.num_qo_heads, tm.head_dim, generator=gen, device=device,
                    dtype=cache.k_pool.dtype)
    for layer in range(tm.num_layers):  # warm-up (and the plan, for the tree)
        cache.attend(q, layer=layer, requests=beams)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        for layer in range(tm.num_layers):
            cache.attend(q, layer=layer, requests=beams)
    _sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


def _kv_used(cache) -> int:
    if hasattr(cache, "kv_bytes_used"):
        return cache.kv_bytes_used()
    return int(cache.stats()["kv_bytes_used"])


def measure(args, tm, width, device, dtype):
    gen = torch.Generator().manual_seed(width)
    prompt = torch.randint(0, args.vocab, (args.prompt_len,), generator=gen)
    total_steps = args.warmup + args.steps
    rows = []

    _reset_peak(device)
    cache = tm.new_cache(args.prompt_len + width * (total_steps + 2) + 64, backend=args.backend)
    tree, choices, tree_logits = run_beam(tm, cache, prompt, width, args.steps, args.warmup, device)
    tree.update(impl="tree", plan_rebuilds=int(cache.stats()["plan_rebuilds"]),
                kv_alloc_mib=2 * cache.k_pool.numel() * cache.k_pool.element_size() / MIB,
                backend=str(cache.stats().get("backend")), peak_mem_mib=_peak(device))
    rows.append(tree)
    del cache

    _reset_peak(device)
    cache = PerBeamKVCache(tm.num_layers, tm.num_qo_heads, tm.num_kv_heads, tm.head_dim,
                           max_requests=width + 1, max_len=args.prompt_len + total_steps + 1,
                           dtype=dtype, device=device, sm_scale=tm.sm_scale)
    beam, _, beam_logits = run_beam(tm, cache, prompt, width, args.steps, args.warmup, device, choices)
    beam.update(impl="per-beam", plan_rebuilds=None, kv_alloc_mib=cache.kv_bytes_allocated() / MIB,
                backend="sdpa", peak_mem_mib=_peak(device))
    rows.append(beam)
    del cache

    diff = (tree_logits - beam_logits).abs().max().item()
    for r in rows:
        r.update(num_beams=width, prompt_len=args.prompt_len, logits_max_abs_diff=diff)
    return rows


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device):
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None


def markdown(rows) -> str:
    head = ("| W | cache | decode step ms, median (mean) | of which reserve + plan ms, median "
            "| attention ms | fork/prune ms | KV in use MiB "
            "| KV allocated MiB | peak GPU MiB | plan rebuilds | max logit diff |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        peak = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "-"
        rebuilds = r["plan_rebuilds"] if r["plan_rebuilds"] is not None else "-"
        lines.append(
            f"| {r['num_beams']} | {r['impl']} | {r['decode_ms_median']:.3f} ({r['decode_ms']:.3f}) "
            f"| {r['reserve_plan_ms_median']:.3f} | {r['attention_ms']:.3f} "
            f"| {r['fork_prune_ms']:.3f} "
            f"| {r['kv_used_mib_peak']:.1f} | {r['kv_alloc_mib']:.1f} | {peak} | {rebuilds} "
            f"| {r['logits_max_abs_diff']:.2e} |"
        )
    return "\n".join(lines)


def add_beam_args(p: argparse.ArgumentParser, *, steps: int, warmup: int,
                  warmup_help: str) -> None:
    """The options of the beam-step benchmarks (this one and ``benchmarks.cache_ops``):
    widths, prompt, attention shape, steps, dtype, device, ``--quick`` and ``--out``."""
    p.add_argument("--num-beams", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=steps, help="measured beam steps per width")
    p.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    """``--device`` (default CUDA if available) and ``--dtype`` (default fp16 on CUDA,
    fp32 on the CPU)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    return device, dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_beam_args(p, steps=32, warmup=3, warmup_help="unmeasured steps first (kernel compilation)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--backend", default="auto", help="TreeKVCache backend: auto, triton or torch")
    p.add_argument("--impl", choices=["auto", "hf", "builtin"], default="auto",
                   help="model modules: transformers' LlamaForCausalLM or the built-in copy")
    args = p.parse_args(argv)
    if args.quick:
        args.num_beams = [2, 4]
        args.prompt_len, args.layers, args.hidden, args.intermediate = 64, 2, 256, 512
        args.heads, args.kv_heads, args.head_dim, args.vocab = 4, 2, 64, 512
        args.steps, args.warmup = 4, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype = device_and_dtype(args)
    model, impl = build_model(args, device, dtype)
    tm = TreeCacheModel(model)
    per_token = tm.kv_bytes_per_token()
    print(f"model: {impl}, {args.layers} layers, hidden {args.hidden}, {args.heads} q / {args.kv_heads} kv "
          f"heads x {args.head_dim}, {dtype}, on {device}; prompt {args.prompt_len} tokens "
          f"({per_token * args.prompt_len / MIB:.1f} MiB of KV)")
    rows = []
    for width in args.num_beams:
        rows.extend(measure(args, tm, width, device, dtype))
        tree, per_beam = rows[-2], rows[-1]
        print(f"W={width}: tree {tree['decode_ms_median']:.3f} ms/step (median), per-beam "
              f"{per_beam['decode_ms_median']:.3f} ms/step")
    table = markdown(rows)
    print()
    print(table)
    if args.out is not None:
        result = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "model": impl,
            "dtype": str(dtype),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "kv_bytes_per_token": per_token,
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
