"""Profile one tree: time per kernel stage, bytes moved, achieved bandwidth.

    python examples/06_profiling.py --tree "1,1024 2048,32" --heads 32,8
    python examples/06_profiling.py --tree "1,1024 2048,32" --heads 32,8 --head_dim 64 --dtype bfloat16

For each stage-1 phase and for stage 2 it launches the kernel alone (median of many
runs on a GPU, wall clock on the CPU) and reports the bytes that stage must move:
stage 1 reads the K/V of every vnode (a token read by several vnodes counts each time),
its queries, and writes partial outputs (float16 for float16 inputs, else float32);
stage 2 reads the partials and writes the output. Bandwidth = bytes / time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import treecache as tc
from kernels import select_backend
from kernels.tree_decode import tree_decode_stage2
from treecache.plan import SUPPORTED_HEAD_DIMS


def bench(fn, device):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default="1,1024 2048,32", help="'nodes per level  tokens per level'")
    ap.add_argument("--heads", default="32,8", help="num_qo_heads,num_kv_heads")
    ap.add_argument("--head_dim", type=int, default=128, choices=SUPPORTED_HEAD_DIMS)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                    help="input dtype on a GPU (default float16; the CPU runs float32)")
    args = ap.parse_args()
    hq, hk = (int(x) for x in args.heads.split(","))
    d = args.head_dim
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and select_backend(device).value == "torch":
        print("no GPU and TRITON_INTERPRET is not set: the stages below run in Triton's "
              "interpreter only; set TRITON_INTERPRET=1 (slow) or use a GPU")
        return
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    nodes = tc.generate_tree_from_spec(args.tree)
    q, _, _, _, k, v, ptrs = tc.qkv_preparation(nodes, hq, hk, d, device, dtype, build_cache=False)
    b = q.shape[0]
    meta, _ = tc.fasttree_preparation(nodes, ptrs, b, hq, hk, d, device=device)
    plan = meta.plan
    t = plan.kernel_tensors(q.dtype)  # what decode uses (float16 partials for 16-bit inputs)
    o = torch.empty_like(q)
    sm = 1 / math.sqrt(d)
    esz = q.element_size()
    psz = t["mid_o"].element_size()  # bytes per partial-output value
    # Bytes of statistics per partial: its log-sum-exp (and, for bfloat16, its shift).
    lsz = 4 * (t["mid_lse"].shape[1] // hq)
    st = tc.tree_stats(nodes)
    print(f"tree {args.tree!r}: {st['num_nodes']} nodes, {b} requests, {st['unique_tokens']} "
          f"unique tokens; heads {hq}/{hk}, head_dim {d}, {dtype}, {device}")
    print(f"plan: {plan.num_vnodes} vnodes, {plan.num_mid_rows} mid rows, q tiles {plan.q_tiles}, "
          f"kv tiles {plan.kv_tiles}, kv splits {plan.kv_split_sizes}")
    total_us, total_bytes = 0.0, 0
    lens = plan.vnode_kv_len_host
    qlens = t["vnode_q_len"].cpu().numpy()
    for i, ph in enumerate(plan.phases):
        sl = slice(ph.vnode_offset, ph.vnode_offset + ph.num_vnodes)
        tokens = int(lens[sl].sum())
        rows = int(qlens[sl].sum())
        nbytes = 2 * tokens * hk * d * esz + rows * hq * (d * (esz + psz) + lsz)
        us = bench(lambda ph=ph: plan.run_stage1(q, k, v, ph, sm), device)
        total_us += us
        total_bytes += nbytes
        print(f"stage 1 phase {i}: {ph.num_vnodes:5d} vnodes x {hk} heads, q tile {ph.q_tile}, "
              f"{tokens} KV tokens read: {us:8.1f} us, {nbytes / 1e6:8.1f} MB, "
              f"{nbytes / us / 1e6:6.2f} TB/s")
    nbytes = plan.num_mid_rows * hq * (d * psz + lsz) + b * hq * d * esz
    us = bench(lambda: tree_decode_stage2(t["mid_o"], t["mid_lse"], o, t["req_mid_start"],
                                          t["req_mid_len"], t["req_mid_rows"]), device)
    total_us += us
    total_bytes += nbytes
    print(f"stage 2: {b} requests, {plan.num_mid_rows} partials: {us:8.1f} us, "
          f"{nbytes / 1e6:8.1f} MB, {nbytes / us / 1e6:6.2f} TB/s")
    if plan.finish:
        print("this plan merges in phase 1 (DecodePlan.finish): the whole decode below runs "
              "no stage 2; the line above is what a separate merge costs")
    floor = (2 * st["unique_tokens"] * hk * d * esz + 2 * b * hq * d * esz) / 3.0e12 * 1e6
    full = bench(lambda: plan.run(q, k, v, o, sm_scale=sm, check=False), device)
    print(f"sum of stages {total_us:.1f} us; whole decode {full:.1f} us; roofline of the unique "
          f"bytes at 3.0 TB/s {floor:.1f} us ({floor / full:.0%} of it achieved)")


if __name__ == "__main__":
    main()
