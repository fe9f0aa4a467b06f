"""A stand-alone probe of the shared-prefix phase's tile shape (CUDA only).

``python -m benchmarks.wide_tile_probe [--out FILE]`` times one kernel that does the work
of the shared root of ``1,1024 2048,32`` at 32/8 (4,096 query rows per KV head against
2,048 contiguous tokens, two KV chunks of 1,024, 34.4 GFLOP) over a grid of tile shapes,
warps and pipeline stages, with K/V loaded through pointers (as ``kernels.tree_decode``
does) or through tensor descriptors (the Hopper bulk copy engine). No tree, no plan:
it bounds what the phase's tile choices can give before the library's kernel is changed.
Each configuration is checked against a float32 reference (chunks merged by their
log-sum-exps). Times are ``do_bench`` medians (L2 flushed).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
import triton.language as tl

from .kernel import _bench

B, HQ, HK, D, T, CHUNK = 1024, 32, 8, 128, 2048, 1024


@triton.jit
def _probe_kernel(Q, K, V, MidO, MidLSE, KDesc, VDesc, stride_qb, stride_qh, stride_kt,
                  stride_kh, rows_per_chunk, chunk, qk_scale,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  D: tl.constexpr, DESC: tl.constexpr, STAGES: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    h = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    req = rows // GROUP
    head = h * GROUP + rows % GROUP
    d = tl.arange(0, D)
    q = tl.load(Q + req[:, None] * stride_qb + head[:, None] * stride_qh + d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    start = pid_c * chunk
    for n0 in tl.range(start, start + chunk, BLOCK_N, num_stages=STAGES):
        if DESC:
            kt = tl.trans(KDesc.load([n0, h * D]))
            v = VDesc.load([n0, h * D])
        else:
            n = n0 + offs_n
            kt = tl.load(K + h * stride_kh + n[None, :] * stride_kt + d[:, None])
            v = tl.load(V + h * stride_kh + n[:, None] * stride_kt + d[None, :])
        s = tl.dot(q, kt) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    r = pid_c * rows_per_chunk + req * (GROUP * tl.num_programs(2)) + head
    tl.store(MidO + r[:, None] * D + d[None, :], (acc / l_i[:, None]).to(MidO.dtype.element_ty))
    tl.store(MidLSE + r, m_i + tl.log2(l_i))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    from triton.tools.tensor_descriptor import TensorDescriptor

    dev = torch.device("cuda")
    g = HQ // HK
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, HQ, D, device=dev, dtype=torch.float16, generator=gen)
    k = torch.randn(T, HK, D, device=dev, dtype=torch.float16, generator=gen)
    v = torch.randn(T, HK, D, device=dev, dtype=torch.float16, generator=gen)
    s = torch.einsum("bhd,thd->bht", q.float(), k.float().repeat_interleave(g, 1)) * D ** -0.5
    ref = torch.einsum("bht,thd->bhd", s.softmax(-1), v.float().repeat_interleave(g, 1))
    flop = 4 * B * HQ * T * D
    nchunks, rows = T // CHUNK, B * HQ
    results = []
    for desc, bm, bn, warps, stages in itertools.product(
            (False, True), (64, 128), (32, 64, 128), (4, 8), (2, 3)):
        if bm == 64 and warps == 8:
            continue
        mid_o = torch.full((nchunks * rows, D), float("nan"), device=dev, dtype=torch.float16)
        mid_lse = torch.full((nchunks * rows,), float("nan"), device=dev)
        kd = vd = None
        if desc:
            kd, vd = (TensorDescriptor(t.view(T, HK * D), [T, HK * D], [HK * D, 1], [bn, D])
                      for t in (k, v))

        def fn():
            _probe_kernel[(B * g // bm, nchunks, HK)](
                q, k, v, mid_o, mid_lse, kd, vd, q.stride(0), q.stride(1), k.stride(0),
                k.stride(1), rows, CHUNK, D ** -0.5 * 1.4426950408889634, GROUP=g,
                BLOCK_M=bm, BLOCK_N=bn, D=D, DESC=desc, STAGES=stages, num_warps=warps,
                num_stages=stages)

        rec = dict(descriptors=desc, block_m=bm, block_n=bn, warps=warps, stages=stages)
        fn()
        w = torch.softmax(mid_lse.view(nchunks, B, HQ) * 0.6931471805599453, dim=0)
        out = (mid_o.view(nchunks, B, HQ, D).float() * w[..., None]).sum(0)
        rec["rel_err"] = ((out - ref).abs().max() / ref.abs().max()).item()
        us = _bench(fn, dev)
        rec.update(us=us, tflops=flop / us / 1e6)
        print(json.dumps(rec), flush=True)
        results.append(rec)
    for desc in (False, True):
        best = min((r for r in results if r["descriptors"] == desc), key=lambda r: r["us"])
        print(("descriptors" if desc else "pointers") + ": best", best)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
