"""The default tiles and warps of a head dim against those chosen at head_dim 128, on the
benchmark's cases, in one process.

``python -m benchmarks.head_dim_ab --head-dim 64 --out results.json`` builds two plans of
every case (float16 on a GPU, float32 on the CPU): ``new`` with the defaults
(``params=None``: :meth:`FastTreeParams.for_heads` at this head dim, and
``default_launch``'s warps), ``old`` with ``FastTreeParams.for_heads`` at head_dim 128
and without :data:`kernels.tree_decode.SMALL_TILE_WIDE_HEAD_DIM` (small GQA tiles on one
warp, as at head_dim 128). Both decode into a poisoned output and are checked against
the float32 reference; then each is timed in turn, ``--rounds`` times: CUDA-graph replay
and ``do_bench`` (eager) on a GPU, wall time on the CPU. Reported per case: both
plans' KV tiles, errors and median times, and the ratio new / old; at the end the
geometric means of the ratios with and without GQA. ``--out`` is rewritten after
every case (``complete`` is false until the last). This is the A/B behind the v35
entries of benchmarks/RESULTS.md (``--quick``: the tiny cases, a CPU smoke run).
"""

from __future__ import annotations

import argparse
import importlib
import math

import torch

from kernels import reference_decode
from treecache import FastTreeParams, fasttree_preparation, qkv_preparation, tree_stats
from treecache.fasttree import tree_plan_input
from treecache.plan import SUPPORTED_HEAD_DIMS, path_token_indices

from .kernel import (HEAD_DIM, _patched, _progress, ab_report, ab_row_line, ab_summary,
                     ab_times, ab_write, rel_err)
from .suite import quick_cases, suite_cases

# The package re-exports a function named tree_decode; fetch the module itself.
td = importlib.import_module("kernels.tree_decode")

#: A head dim no block reaches: small GQA tiles stay on one warp (the head_dim-128 rule).
_NEVER = 1 << 30


def run_case(name, nodes, hq, hk, d, device, dtype, rounds):
    """One case's row: both plans' tiles, errors and median times (see the module)."""
    b = tree_stats(nodes)["num_requests"]
    gen = torch.Generator(device="cpu").manual_seed(7)
    q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, d, device, dtype, generator=gen,
                                             build_cache=False)
    inp = tree_plan_input(nodes, ptrs, b)
    slots = path_token_indices(inp.parent, inp.seqlen, inp.tok_ptr, inp.req_end)
    sm = 1.0 / math.sqrt(d)
    ref = reference_decode(q, k, v, [torch.from_numpy(s).to(device) for s in slots], sm)
    row = dict(case=name, hq=hq, hk=hk, head_dim=d, requested_kv_tiles={}, kv_tiles={},
               err={})
    calls = {}
    for which in ("old", "new"):
        params = FastTreeParams.for_heads(hq, hk, HEAD_DIM) if which == "old" else None
        meta, _ = fasttree_preparation(nodes, ptrs, b, hq, hk, d, params=params, device=device)
        plan = meta.plan
        o = torch.full_like(q, float("nan"))

        def call(plan=plan, o=o):
            plan.run(q, k, v, o, sm_scale=sm, check=False)

        # The plan's launches are made at its first call, under its warp rule.
        with _patched("SMALL_TILE_WIDE_HEAD_DIM",
                      _NEVER if which == "old" else td.SMALL_TILE_WIDE_HEAD_DIM):
            call()
        row["err"][which] = rel_err(o, ref)
        row["requested_kv_tiles"][which] = list(plan.requested_kv_tiles)
        row["kv_tiles"][which] = list(plan.kv_tiles)
        calls[which] = call
    row["graph_us"], row["eager_us"] = ab_times(calls, device, rounds)
    return row


def summary(rows) -> list[str]:
    """Geometric means of new / old per timing, with and without GQA."""
    return ab_summary(rows, (("with GQA", lambda r: r["hq"] > r["hk"]),
                             ("without GQA", lambda r: r["hq"] == r["hk"])))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=64, choices=SUPPORTED_HEAD_DIMS)
    ap.add_argument("--out", default=None,
                    help="write a JSON file here (after every case; complete: true at the end)")
    ap.add_argument("--only", default=None, help="substring filter on case names")
    ap.add_argument("--rounds", type=int, default=2, help="timing rounds (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny cases (CPU smoke test)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cases = quick_cases() if args.quick else suite_cases(extra=True)
    if args.only:
        cases = [c for c in cases if args.only in c[0]]
    rows = []
    for name, nodes, (hq, hk) in _progress(cases, len(cases), "cases"):
        r = run_case(name, nodes, hq, hk, args.head_dim, device, dtype, args.rounds)
        rows.append(r)
        print(ab_row_line(r, f"kv tiles {r['kv_tiles']['old']} -> {r['kv_tiles']['new']}"),
              flush=True)
        ab_write(rows, summary(rows), args.out, device, False, head_dim=args.head_dim)
    ab_report(rows, summary(rows), args.out, device, head_dim=args.head_dim)
    return rows


if __name__ == "__main__":
    main()
