"""Grouped-query attention: one tree, KV group sizes 1 to 16.

With GQA, ``num_qo_heads / num_kv_heads = group`` query heads share each KV head. Stage 1
of the kernel runs one program per (vnode, KV head) and loads the queries of all heads of
the group together, so a program holds ``q_tile * group`` rows. The planner keeps that
within 128 rows: the effective query tile of a phase is ``min(requested, 128 // group)``.
Nothing else changes for the caller: ``params`` is never modified, and decode still
accepts the tiles ``params`` asked for (``params.TSQs``), running the plan's own.

For each group size the example prints the requested and effective query tiles, the KV
tiles, the number of vnodes and phases, the decode time (on CUDA the ``do_bench`` median,
on CPU the wall-clock median of ``--iters`` calls) and the error against the float32
reference.

Run:
    python examples/04_gqa_example.py [--head_dim 128 --dtype float16]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

try:
    import treecache  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import kernels
from treecache import (
    FastTreeParams,
    fasttree_decode,
    fasttree_preparation,
    generate_tree,
    qkv_preparation,
    tree_stats,
)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}
# (num_qo_heads, num_kv_heads): group sizes 1, 2, 4, 7, 8, 16.
HEAD_CONFIGS = [(32, 32), (32, 16), (32, 8), (28, 4), (32, 4), (32, 2)]


def request_slots(tree_info, KV_ptrs, batch_size):
    """KV rows each request attends: the tokens of every node that lists it."""
    slots = [[] for _ in range(batch_size)]
    for node in tree_info:
        for r in node.requests:
            slots[r].extend(range(KV_ptrs[node.id], KV_ptrs[node.id + 1]))
    return [torch.tensor(s, dtype=torch.long) for s in slots]


def time_ms(fn, device: str, iters: int) -> float:
    """Median time of one call of ``fn`` in milliseconds."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    fn()  # warm-up
    times = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description="One tree, GQA group sizes 1 to 16.")
    p.add_argument("--head_dim", type=int, default=128, choices=[16, 32, 64, 128, 256])
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--iters", type=int, default=2,
                   help="timed calls on CPU (on CUDA do_bench picks its own count)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="default: cuda if available, else cpu")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    d = args.head_dim

    # A 256-token prompt, 4 branches of 32 tokens, 16 leaves of 32 tokens: 16 requests.
    tree_info = generate_tree([1, 4, 16], [256, 32, 32])
    stats = tree_stats(tree_info)
    batch_size = stats["num_requests"]
    params = FastTreeParams()  # requests q tiles [64, 16], kv tiles [32, 128]

    print(f"tree: {stats['num_nodes']} nodes, {batch_size} requests, "
          f"{stats['unique_tokens']} unique / {stats['logical_tokens']} logical tokens; "
          f"head_dim {d}, {args.dtype}, {device} ({kernels.select_backend(device).value})")
    print(f"params asked for q tiles {params.TSQs}, kv tiles {params.TSKs}\n")
    print(f"{'heads':>7} {'group':>5} {'q tiles':>9} {'rows':>5} {'kv tiles':>10} "
          f"{'vnodes':>6} {'phases':>6} {'time ms':>9} {'rel err':>8}")

    ok = True
    for hq, hk in HEAD_CONFIGS:
        group = hq // hk
        gen = torch.Generator(device=device).manual_seed(0)
        Q, _, _, _, K, V, KV_ptrs = qkv_preparation(
            tree_info, hq, hk, d, device=device, dtype=dtype, generator=gen, build_cache=False)
        O = torch.empty_like(Q)
        params.set_kv_group_num(group)  # informational; the plan uses hq // hk
        metadata, _ = fasttree_preparation(
            tree_info, KV_ptrs, batch_size, hq, hk, d,
            [1024, 128], [132, 528], [132, 132], params, device=device)
        plan = metadata.plan
        sm_scale = 1.0 / d ** 0.5

        def decode():
            fasttree_decode(Q, K, V, O, *metadata, params.TSQs, params.TSKs, sm_scale)

        ms = time_ms(decode, device, args.iters)
        ref = kernels.reference_decode(Q, K, V, request_slots(tree_info, KV_ptrs, batch_size),
                                       sm_scale)
        rel_err = ((O.float() - ref).norm() / ref.norm()).item()
        ok &= rel_err < TOLERANCE[dtype]
        rows = max(ph.q_tile for ph in plan.phases) * group
        print(f"{hq:>3}/{hk:<3} {group:>5} {str(list(plan.q_tiles)):>9} {rows:>5} "
              f"{str(list(plan.kv_tiles)):>10} {plan.num_vnodes:>6} {len(plan.phases):>6} "
              f"{ms:>9.3f} {rel_err:>8.1e}")

    print("\nrows = largest query tile x group: the (query, head) rows one stage-1 "
          "program holds (at most 128)")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
