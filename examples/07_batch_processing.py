"""Batch processing: decode throughput against batch size and prefix sharing.

Every request has the same context length ``--context``; a fraction ``s`` of it is a
prompt shared by the whole batch and the rest is the request's own suffix. For each
batch size ``B`` and sharing fraction ``s`` the example builds that tree (one root of
``round(s * context)`` tokens with ``B`` children; a forest of ``B`` roots when s = 0)
and times one decode step with two plans over the same K/V:

* **tree**: the FastTree plan of the tree (``build_plan`` with ``FastTreeParams.for_heads``
  tiles), which reads the shared prompt once per query tile;
* **flat**: a tree-unaware plan of the same kernels, every request alone (a
  ``PlanInput`` with one root per request whose ``node_tokens`` are its whole path),
  which reads the prompt once per request.

It prints requests per second and context tokens attended per second (``B * context /
time``) for both, their ratio, and the ratio of KV bytes the two plans must read
(logical / unique tokens: the most sharing can save when decode is memory-bound).
Both outputs are checked against the dense float32 reference (``kernels.reference_decode``).

Timing: on CUDA the ``triton.testing.do_bench`` median of eager calls, or of CUDA-graph
replays with ``--cuda_graph`` (eager calls of small batches are dominated by the host
cost of the launches); on a CPU the wall-clock median of ``--iters`` calls with
``--threads`` torch threads. On a CPU the torch implementation of the plan runs; its
numbers show the trend, not GPU throughput.

Run:
    python examples/07_batch_processing.py
    python examples/07_batch_processing.py --batch_sizes 1,8,64 --shared 0,0.9 --context 1024
    python examples/07_batch_processing.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

try:
    import treecache  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import kernels
from treecache import PlanInput, build_plan
from treecache.plan import path_token_indices

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}
GPU_DEFAULTS = dict(batch_sizes="1,2,4,8,16,32,64,128,256", shared="0,0.5,0.9,0.99",
                    context=2048)
CPU_DEFAULTS = dict(batch_sizes="1,4,16,64", shared="0,0.5,0.9", context=512)
QUICK = dict(batch_sizes="1,8", shared="0,0.9", context=128)


def progress(it, total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(it, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        def plain():
            for i, x in enumerate(it):
                print(f"{desc}: {i + 1}/{total}", file=sys.stderr, flush=True)
                yield x
        return plain()


def time_us(fns: dict, device: torch.device, iters: int, cuda_graph: bool) -> dict:
    """Median time of one call of each function in ``fns``, in microseconds.

    On a CPU the functions take turns call by call, so that a slow spell of the machine
    hits all of them alike.
    """
    if device.type == "cuda":
        import triton.testing

        out = {}
        for name, fn in fns.items():
            if cuda_graph:
                ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            else:
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            out[name] = float(ms) * 1e3
        return out
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(max(1, iters)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def shared_prefix_tree(batch: int, context: int, shared: float) -> PlanInput:
    """One root of the shared prompt and ``batch`` suffix children (slots in node order).

    With no shared tokens the tree is a forest of ``batch`` roots. Every request ends at
    its own leaf and attends ``context`` tokens.
    """
    prefix = min(context - 1, int(round(shared * context)))
    suffix = context - prefix
    if prefix > 0:
        parent = np.concatenate([[-1], np.zeros(batch, np.int64)])
        seqlen = np.concatenate([[prefix], np.full(batch, suffix, np.int64)])
        req_end = np.arange(1, batch + 1, dtype=np.int64)
    else:
        parent = np.full(batch, -1, np.int64)
        seqlen = np.full(batch, context, np.int64)
        req_end = np.arange(batch, dtype=np.int64)
    tok_ptr = np.concatenate([[0], np.cumsum(seqlen)[:-1]]).astype(np.int64)
    return PlanInput(parent=parent, seqlen=seqlen, tok_ptr=tok_ptr, req_end=req_end)


def flat_input(slots: list[np.ndarray]) -> PlanInput:
    """Tree-unaware layout: request ``b`` is root ``b`` holding its whole path's slots."""
    lens = np.array([s.size for s in slots], dtype=np.int64)
    return PlanInput(parent=np.full(len(slots), -1, np.int64), seqlen=lens,
                     tok_ptr=np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64),
                     req_end=np.arange(len(slots), dtype=np.int64),
                     node_tokens=np.concatenate(slots))


def run_case(batch, context, shared, hq, hk, d, dtype, device, backend, args):
    inp = shared_prefix_tree(batch, context, shared)
    unique = int(inp.seqlen.sum())
    gen = torch.Generator(device=device).manual_seed(batch * 1000 + int(shared * 100))
    rnd = dict(generator=gen, device=device, dtype=dtype)
    q = torch.randn(batch, hq, d, **rnd)
    k = torch.randn(unique, hk, d, **rnd)
    v = torch.randn(unique, hk, d, **rnd)
    slots = path_token_indices(inp.parent, inp.seqlen, inp.tok_ptr, inp.req_end)
    sm = 1.0 / math.sqrt(d)
    ref = kernels.reference_decode(q, k, v, [torch.from_numpy(s).to(device) for s in slots], sm)
    kw = dict(num_qo_heads=hq, num_kv_heads=hk, head_dim=d, device=device)
    prefix = int(inp.seqlen[0]) if inp.parent.size > batch else 0
    row = dict(batch=batch, shared=shared, prefix=prefix, context=context,
               unique_tokens=unique, logical_tokens=batch * context)
    calls = {}
    for name, plan_inp in (("tree", inp), ("flat", flat_input(slots))):
        plan = build_plan(plan_inp, **kw)  # params=None: FastTreeParams.for_heads
        out = torch.full_like(q, float("nan"))  # poisoned: every row must be written
        plan.run(q, k, v, out, sm_scale=sm, backend=backend, check=False)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        row[f"{name}_rel_err"] = err if math.isfinite(err) else float("inf")
        row[f"{name}_vnodes"] = plan.num_vnodes
        row[f"{name}_kv_read"] = plan.kv_tokens_read()
        row[f"{name}_layout"] = (plan.phases, plan.vnode_kv_len_host.tolist(),
                                 plan.tensors()["vnode_q_len"][:plan.num_vnodes].tolist())
        calls[name] = (lambda p=plan, o=out:
                       p.run(q, k, v, o, sm_scale=sm, backend=backend, check=False))
    # With nothing shared both layouts give the same vnodes: any gap is timing noise.
    row["same_plan"] = row.pop("tree_layout") == row.pop("flat_layout")
    for name, us in time_us(calls, device, args.iters, args.cuda_graph).items():
        row[f"{name}_us"] = us
    return row


def main() -> int:
    p = argparse.ArgumentParser(description="Decode throughput against batch size and "
                                "shared-prefix fraction, tree plan against a flat plan.")
    p.add_argument("--batch_sizes", default=None,
                   help=f"comma list (default GPU {GPU_DEFAULTS['batch_sizes']}, "
                        f"CPU {CPU_DEFAULTS['batch_sizes']})")
    p.add_argument("--shared", default=None,
                   help=f"shared fractions of the context in [0, 1) (default GPU "
                        f"{GPU_DEFAULTS['shared']}, CPU {CPU_DEFAULTS['shared']})")
    p.add_argument("--context", type=int, default=None,
                   help=f"tokens per request (default GPU {GPU_DEFAULTS['context']}, "
                        f"CPU {CPU_DEFAULTS['context']})")
    p.add_argument("--heads", default="32,8", help="num_qo_heads,num_kv_heads (default 32,8)")
    p.add_argument("--head_dim", type=int, default=128, choices=[16, 32, 64, 128, 256])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default float16 on CUDA, float32 on a CPU")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"])
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--iters", type=int, default=5, help="timed calls per case on a CPU")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steadier timings on a shared machine)")
    p.add_argument("--cuda_graph", action="store_true",
                   help="on CUDA, time CUDA-graph replays instead of eager calls")
    p.add_argument("--quick", action="store_true",
                   help=f"batch sizes {QUICK['batch_sizes']}, shared {QUICK['shared']}, "
                        f"context {QUICK['context']}")
    p.add_argument("--out", default=None, help="write the rows as JSON to this file")
    args = p.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.float16 if device.type == "cuda" else torch.float32)
    defaults = QUICK if args.quick else (GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS)
    batch_sizes = [int(x) for x in (args.batch_sizes or defaults["batch_sizes"]).split(",")]
    fractions = [float(x) for x in (args.shared or defaults["shared"]).split(",")]
    context = args.context or defaults["context"]
    if context < 2 or any(b < 1 for b in batch_sizes) or any(not 0 <= f < 1 for f in fractions):
        p.error("need context >= 2, batch sizes >= 1 and shared fractions in [0, 1)")
    hq, hk = (int(x) for x in args.heads.split(","))
    d = args.head_dim
    backend = kernels.select_backend(device, args.backend)
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    if args.cuda_graph and device.type != "cuda":
        print("note: --cuda_graph needs a CUDA device; timing eager calls")

    timing = ("CUDA-graph replay" if args.cuda_graph and device.type == "cuda" else
              "eager, do_bench median" if device.type == "cuda" else
              f"median of {args.iters} calls")
    print(f"context {context} tokens per request; heads {hq}/{hk}, head_dim {d}, "
          f"{str(dtype).replace('torch.', '')}, {device} ({backend.value}); timing: {timing}")
    if backend is not kernels.Backend.TRITON:
        print(f"note: the {backend.value} backend runs here; the numbers show the trend, "
              "not GPU throughput")

    cases = [(b, f) for f in fractions for b in batch_sizes]
    rows = []
    t0 = time.perf_counter()
    for b, f in progress(cases, len(cases), "cases"):
        rows.append(run_case(b, context, f, hq, hk, d, dtype, device, backend, args))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t0

    tol = TOLERANCE[dtype]
    print(f"\n{'shared':>6} {'B':>5} {'unique tok':>10} {'tree us':>10} {'flat us':>10} "
          f"{'tree req/s':>11} {'tree tok/s':>11} {'flat tok/s':>11} {'flat/tree':>9} "
          f"{'bytes ratio':>11} {'max err':>8}")
    bad = 0
    for r in rows:
        err = max(r["tree_rel_err"], r["flat_rel_err"])
        bad += not err <= tol
        print(f"{r['shared']:>6.2f} {r['batch']:>5} {r['unique_tokens']:>10} "
              f"{r['tree_us']:>10.1f} {r['flat_us']:>10.1f} "
              f"{r['batch'] / r['tree_us'] * 1e6:>11.3g} "
              f"{r['logical_tokens'] / r['tree_us'] * 1e6:>11.3g} "
              f"{r['logical_tokens'] / r['flat_us'] * 1e6:>11.3g} "
              f"{r['flat_us'] / r['tree_us']:>8.2f}x "
              f"{r['logical_tokens'] / r['unique_tokens']:>10.2f}x {err:>8.1e}"
              f"{'  same plan' if r['same_plan'] else ''}{'' if err <= tol else '  MISMATCH'}")
    print("\nflat/tree > 1: the tree plan is faster; bytes ratio = logical / unique KV tokens "
          "(the most sharing can save on a memory-bound decode); same plan: both plans have "
          "the same vnodes, so their gap is timing noise")

    print("\nwhere sharing pays (tree plan at least 10% faster than the flat plan):")
    for f in fractions:
        sel = [r for r in rows if r["shared"] == f and not r["same_plan"]]
        if not sel:
            print(f"  shared {f:.2f}: the two plans are the same at every batch size")
            continue
        won = [r["batch"] for r in sel if r["flat_us"] > 1.1 * r["tree_us"]]
        lost = [r["batch"] for r in sel if r["tree_us"] > 1.1 * r["flat_us"]]
        msg = f"batch sizes {won}" if won else "no batch size"
        if lost:
            msg += f"; the flat plan is >10% faster at {lost}"
        print(f"  shared {f:.2f}: {msg}")
    print(f"\n{len(rows)} cases in {elapsed:.1f} s; "
          f"{'all outputs match the reference' if not bad else f'{bad} MISMATCH'} "
          f"(tolerance {tol:.0e})")

    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(dict(
            device=str(device), backend=backend.value, heads=[hq, hk], head_dim=d,
            dtype=str(dtype), timing=timing, rows=rows), indent=1))
        print(f"wrote {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
