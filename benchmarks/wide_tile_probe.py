"""A stand-alone probe of the shared-prefix phase's tile shape (CUDA only).

``python -m benchmarks.wide_tile_probe [--out FILE]`` times one kernel that does the work
of the shared root of ``1,1024 2048,32`` at 32/8 (4,096 query rows per KV head against
2,048 contiguous tokens, two KV chunks of 1,024, 34.4 GFLOP) over a grid of tile shapes,
warps and pipeline stages, with K/V loaded through pointers (as ``kernels.tree_decode``
does) or through tensor descriptors (the Hopper bulk copy engine). No tree, no plan:
it bounds what the phase's tile choices can give before the library's kernel is changed.
Each configuration is checked against a float32 reference (chunks merged by their
log-sum-exps). Times are ``do_bench`` medians (L2 flushed).

``python -m benchmarks.wide_tile_probe --warp-specialize-check [--out FILE]`` needs no
GPU: it compiles the probe kernel for an H100 (sm_90) with and without Triton's
``warp_specialize`` loop flag, for pointer and descriptor loads, and reports whether
the flag produced warp-specialised code (a ``ttg.warp_specialize`` region in the
TritonGPU IR, or any change to the compiled binary) and whether the dots became
Hopper's warpgroup MMA; a Blackwell (sm_100) compile with the flag is the control.
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
                  D: tl.constexpr, DESC: tl.constexpr, STAGES: tl.constexpr,
                  WS: tl.constexpr = False):
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
    for n0 in tl.range(start, start + chunk, BLOCK_N, num_stages=STAGES, warp_specialize=WS):
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


def compile_offline(desc: bool, ws: bool, block_m: int = 128, block_n: int = 64,
                     warps: int = 8, stages: int = 3, capability: int = 90) -> dict:
    """Compile the probe kernel for an NVIDIA GPU of ``capability`` (90: H100, 100:
    B200) without a GPU (Triton's bundled ``ptxas``; not under Triton's interpreter) and
    describe the result:
    ``ws_region`` (a warp-specialised region in the TritonGPU IR), ``wgmma`` (warpgroup
    MMA), ``tma`` (bulk tensor copies), ``async_copies`` (asynchronous copies of the
    pipelined pointer loads), ``cubin_sha`` (a digest of the binary)."""
    import hashlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .compile_report import jit_signature

    # CPU tensors of the GPU run's shapes, specialised as the JIT would at launch (the
    # pointers and integers 16-divisible, else the loads could not become asynchronous
    # copies).
    q = torch.empty(B, HQ, D, dtype=torch.float16)
    k = torch.empty(T, HK, D, dtype=torch.float16)
    mid_o, mid_lse = poisoned_partials(torch.device("cpu"))
    kd = (TensorDescriptor(k.view(T, HK * D), [T, HK * D], [HK * D, 1], [block_n, D])
          if desc else None)
    args = (q, k, k, mid_o, mid_lse, kd, kd, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), B * HQ, CHUNK, D ** -0.5 * 1.4426950408889634)
    sig, consts, attrs = jit_signature(_probe_kernel, args, dict(
        GROUP=HQ // HK, BLOCK_M=block_m, BLOCK_N=block_n, D=D, DESC=desc, STAGES=stages,
        WS=ws))
    compiled = triton.compile(ASTSource(_probe_kernel, sig, consts, attrs),
                              target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    ttgir = compiled.asm["ttgir"]
    return dict(capability=capability, descriptors=desc, warp_specialize=ws,
                block_m=block_m, block_n=block_n, warps=warps, stages=stages,
                triton=triton.__version__,
                ws_region="ttg.warp_specialize" in ttgir,
                wgmma="warp_group_dot" in ttgir, tma="async_tma" in ttgir,
                async_copies=ttgir.count("async_copy_global_to_local"),
                cubin_sha=hashlib.sha256(compiled.asm["cubin"]).hexdigest()[:16])


def warp_specialize_check(out=None) -> list[dict]:
    """:func:`compile_offline` for the H100 with and without the flag, pointer and
    descriptor loads (``same_code``: the flag left the binary unchanged), and with it
    for a Blackwell target as a control."""
    rows = []
    for desc in (False, True):
        off, on = (compile_offline(desc, ws) for ws in (False, True))
        on["same_code"] = off["cubin_sha"] == on["cubin_sha"]
        rows += [off, on]
    # The control: on a Blackwell target the flag does specialise (with descriptors), so
    # a False above is the compiler's answer for the H100, not a blind check.
    rows.append(compile_offline(True, True, capability=100))
    for rec in rows:
        print(json.dumps(rec), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump({"compiled": "offline, no GPU", "results": rows}, f, indent=1)
    return rows


def root_problem(dev):
    """The probe's inputs on ``dev`` (fixed seed) and the float32 reference:
    ``(q, k, v, ref, flop)``."""
    g = HQ // HK
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, HQ, D, device=dev, dtype=torch.float16, generator=gen)
    k = torch.randn(T, HK, D, device=dev, dtype=torch.float16, generator=gen)
    v = torch.randn(T, HK, D, device=dev, dtype=torch.float16, generator=gen)
    s = torch.einsum("bhd,thd->bht", q.float(), k.float().repeat_interleave(g, 1)) * D ** -0.5
    ref = torch.einsum("bht,thd->bhd", s.softmax(-1), v.float().repeat_interleave(g, 1))
    return q, k, v, ref, 4 * B * HQ * T * D


def poisoned_partials(dev):
    """NaN-filled partial outputs and log-sum-exps for the probe's chunks x rows."""
    n = (T // CHUNK) * B * HQ
    return (torch.full((n, D), float("nan"), device=dev, dtype=torch.float16),
            torch.full((n,), float("nan"), device=dev))


def merged_error(mid_o, mid_lse, ref) -> float:
    """Relative error of the chunks' partials merged by their log-sum-exps (base 2)."""
    nchunks = T // CHUNK
    w = torch.softmax(mid_lse.view(nchunks, B, HQ) * 0.6931471805599453, dim=0)
    out = (mid_o.view(nchunks, B, HQ, D).float() * w[..., None]).sum(0)
    return ((out - ref).abs().max() / ref.abs().max()).item()


def probe_launch(q, k, v, mid_o, mid_lse, desc: bool, block_m: int, block_n: int,
                 warps: int, stages: int):
    """``fn()``: the probe kernel over the root at one configuration (pointer or
    tensor-descriptor loads), writing ``mid_o`` and ``mid_lse``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    kd = vd = None
    if desc:
        kd, vd = (TensorDescriptor(t.view(T, HK * D), [T, HK * D], [HK * D, 1], [block_n, D])
                  for t in (k, v))
    g = HQ // HK

    def fn():
        _probe_kernel[(B * g // block_m, T // CHUNK, HK)](
            q, k, v, mid_o, mid_lse, kd, vd, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), B * HQ, CHUNK, D ** -0.5 * 1.4426950408889634, GROUP=g,
            BLOCK_M=block_m, BLOCK_N=block_n, D=D, DESC=desc, STAGES=stages,
            num_warps=warps, num_stages=stages)

    return fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--warp-specialize-check", action="store_true",
                    help="no GPU: compile for sm_90 with and without the warp_specialize "
                         "loop flag and compare (sm_100 as a control)")
    args = ap.parse_args(argv)
    if args.warp_specialize_check:
        warp_specialize_check(args.out)
        return
    dev = torch.device("cuda")
    q, k, v, ref, flop = root_problem(dev)
    results = []
    for desc, bm, bn, warps, stages in itertools.product(
            (False, True), (64, 128), (32, 64, 128), (4, 8), (2, 3)):
        if bm == 64 and warps == 8:
            continue
        mid_o, mid_lse = poisoned_partials(dev)
        fn = probe_launch(q, k, v, mid_o, mid_lse, desc, bm, bn, warps, stages)
        rec = dict(descriptors=desc, block_m=bm, block_n=bn, warps=warps, stages=stages)
        fn()
        rec["rel_err"] = merged_error(mid_o, mid_lse, ref)
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
