"""Basic usage: load a tree file, plan, time the decode, check it against the reference.

A tree file lists one line per node (``<parent> <id> <seqlen> <num_children>``, see
docs/TREE_FORMAT.md); loading it gives one request per leaf. Q/K/V are random, laid out
as the functional API expects: node ``i``'s tokens at rows ``KV_ptrs[i]..KV_ptrs[i+1]-1``
of K and V, one query row per request.

Timing: on CUDA, ``triton.testing.do_bench`` (median over about 100 ms of calls, L2 cache
flushed between calls); on CPU, the wall-clock median of ``--iters`` calls after one
warm-up call.

Run:
    python examples/02_basic_usage.py
    python examples/02_basic_usage.py --tree_file my_tree.txt --num_qo_heads 32 \\
        --num_kv_heads 8 --dtype bfloat16
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
    load_tree,
    qkv_preparation,
    tree_stats,
)

HERE = pathlib.Path(__file__).resolve().parent
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Relative error (Frobenius norm) accepted against the float32 reference.
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}


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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Load a tree file, plan, time and check decode.")
    p.add_argument("--tree_file", type=pathlib.Path,
                   default=HERE / "data" / "tree_example.txt",
                   help="tree file (default: data/tree_example.txt next to this script)")
    p.add_argument("--num_qo_heads", type=int, default=32)
    p.add_argument("--num_kv_heads", type=int, default=32)
    p.add_argument("--head_dim", type=int, default=128, choices=[16, 32, 64, 128, 256])
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--iters", type=int, default=5,
                   help="timed calls on CPU (on CUDA do_bench picks its own count)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="default: cuda if available, else cpu")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    hq, hk, d = args.num_qo_heads, args.num_kv_heads, args.head_dim

    tree_info = load_tree(args.tree_file)
    stats = tree_stats(tree_info)
    batch_size = stats["num_requests"]

    gen = torch.Generator(device=device).manual_seed(0)
    Q, _, _, _, K, V, KV_ptrs = qkv_preparation(
        tree_info, hq, hk, d, device=device, dtype=dtype, generator=gen, build_cache=False)
    O = torch.empty_like(Q)

    params = FastTreeParams()
    t0 = time.perf_counter()
    metadata, node_assignments = fasttree_preparation(
        tree_info, KV_ptrs, batch_size, hq, hk, d,
        [1024, 128], [132, 528], [132, 132], params, device=device)
    plan_ms = (time.perf_counter() - t0) * 1e3
    plan = metadata.plan

    sm_scale = 1.0 / d ** 0.5
    backend = kernels.select_backend(device)

    def decode():
        fasttree_decode(Q, K, V, O, *metadata, params.TSQs, params.TSKs, sm_scale)

    decode_ms = time_ms(decode, device, args.iters)

    ref = kernels.reference_decode(Q, K, V, request_slots(tree_info, KV_ptrs, batch_size),
                                   sm_scale)
    rel_err = ((O.float() - ref).norm() / ref.norm()).item()
    ok = rel_err < TOLERANCE[dtype]

    split_q = sum(node_assignments)
    print(f"tree            : {args.tree_file}")
    print(f"nodes / roots   : {stats['num_nodes']} / {stats['num_roots']}, depth {stats['depth']}")
    print(f"requests        : {batch_size}")
    print(f"tokens          : {stats['unique_tokens']} unique, {stats['logical_tokens']} logical "
          f"(sharing ratio {stats['sharing_ratio']:.2f})")
    print(f"shape           : q/o [{batch_size}, {hq}, {d}], k/v [{KV_ptrs[-1]}, {hk}, {d}], "
          f"{args.dtype}")
    print(f"split decisions : {split_q} split-Q, {len(node_assignments) - split_q} split-K")
    print(f"vnodes          : {plan.num_vnodes}, KV tokens read per kv head "
          f"{plan.kv_tokens_read()}")
    for i, ph in enumerate(plan.phases):
        print(f"  phase {i}       : {ph.num_vnodes} vnodes from {ph.vnode_offset}, "
              f"q tile {ph.q_tile}, kv tile {ph.kv_tile}")
    print(f"plan time       : {plan_ms:.2f} ms (host)")
    print(f"decode time     : {decode_ms:.3f} ms median on {device} ({backend.value})")
    print(f"relative error  : {rel_err:.2e} (tolerance {TOLERANCE[dtype]:.0e})")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
