"""What the leaves' phase of an MHA tree can reach in this KV layout (CUDA only).

``python -m benchmarks.leaf_read_probe [--out FILE]`` times stand-alone kernels over the
leaves of a tree at 32 query heads / 32 KV heads, head dim 128, float16, with K and V in
the layout of the benchmark (``[slots, heads, head_dim]``, each leaf's tokens one run of
slots): every leaf is one request's own tokens, attended by its one query.

* ``head``: one program per (leaf, head), as the library's leaves' phase runs: the
  leaf's tokens of one head (256-byte rows, 8 KiB apart) with one query, as float32
  vector products (no tensor cores, no shared memory).
* ``heads xN``: one program per (leaf, N heads): N heads' rows of each token are one
  contiguous run of N x 256 bytes.
* ``read``: the same bytes read as one contiguous range in 64 KiB blocks (a sum per
  block): the read rate this GPU gives to plain streaming.
* ``library``: the whole decode of ``1,L 16,T`` (a 16-token root, then the leaves)
  through the library (root phase, leaves' phase and the merge).

Each attention kernel is checked against float32 math. Times are ``do_bench`` medians
(L2 flushed) and CUDA-graph replays; rates are the leaves' K and V bytes over the time.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .kernel import _bench, _graph_time
from .probe_common import last_phase_call, library_plan, probe_main, write_rows

HEADS, D = 32, 128
#: (leaves, tokens per leaf)
SHAPES = ((1024, 16), (256, 32), (1024, 32))
WARPS = (1, 2, 4)


@triton.jit
def _leaf_heads_kernel(Q, K, V, O, qk_scale, T: tl.constexpr, HB: tl.constexpr,
                       H: tl.constexpr, D: tl.constexpr):
    # One program per (leaf, block of HB heads): [T, HB, D] tiles of K and V.
    leaf = tl.program_id(0)
    hb = tl.program_id(1)
    t = tl.arange(0, T)
    h = hb * HB + tl.arange(0, HB)
    d = tl.arange(0, D)
    off = ((leaf * T + t)[:, None, None] * (H * D) + h[None, :, None] * D
           + d[None, None, :])
    k = tl.load(K + off).to(tl.float32)
    q = tl.load(Q + leaf * (H * D) + h[:, None] * D + d[None, :]).to(tl.float32)  # [HB, D]
    s = tl.sum(k * q[None, :, :], axis=2) * qk_scale  # [T, HB]
    m = tl.max(s, axis=0)
    p = tl.exp2(s - m[None, :])
    l = tl.sum(p, axis=0)
    v = tl.load(V + off).to(tl.float32)
    out = tl.sum(p[:, :, None] * v, axis=0) / l[:, None]  # [HB, D]
    tl.store(O + leaf * (H * D) + h[:, None] * D + d[None, :], out.to(O.dtype.element_ty))


@triton.jit
def _ladder_kernel(Q, K, V, O, MidO, MidLSE, VKvLen, VSlot0, VQStart, MidQRows, qk_scale,
                   T: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr,
                   LOOP: tl.constexpr, INDEX: tl.constexpr, MID: tl.constexpr):
    # One program per (leaf, head), one query: the library's leaves' program built up
    # one feature at a time. DOT: a 16-row tensor-core tile (the query in row 0) instead
    # of vector products; LOOP: a runtime loop over the leaf's tokens in T-token steps
    # with KV masks instead of one step of exactly T tokens; INDEX: the leaf's first
    # slot, length and query row read from index arrays (query row through mid_q_rows);
    # MID: a float16 partial and its log-sum-exp stored instead of the output.
    leaf = tl.program_id(0)
    head = tl.program_id(1)
    if INDEX:
        slot0 = tl.load(VSlot0 + leaf)
        kv_len = tl.load(VKvLen + leaf)
        q_row = tl.load(MidQRows + tl.load(VQStart + leaf))
    else:
        slot0 = leaf * T
        kv_len = T
        q_row = leaf
    d = tl.arange(0, D)
    offs_n = tl.arange(0, T)
    Kh = K + head * D
    Vh = V + head * D
    if DOT:
        rows = tl.arange(0, 16)
        q = tl.load(Q + q_row * (H * D) + head * D + rows[:, None] * 0 + d[None, :],
                    mask=(rows < 1)[:, None], other=0.0)  # [16, D]
        m_i = tl.full([16], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([16], dtype=tl.float32)
        acc = tl.zeros([16, D], dtype=tl.float32)
    else:
        q = tl.load(Q + q_row * (H * D) + head * D + d).to(tl.float32)  # [D]
        m_i = tl.full([1], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([1, D], dtype=tl.float32)
    n_steps = tl.cdiv(kv_len, T) if LOOP else 1
    for step in range(0, n_steps):
        n = step * T + offs_n
        n_ok = n < kv_len
        if LOOP:
            kt = tl.load(Kh + (slot0 + n)[None, :] * (H * D) + d[:, None], mask=n_ok[None, :],
                         other=0.0)  # [D, T]
        else:
            kt = tl.load(Kh + (slot0 + n)[None, :] * (H * D) + d[:, None])
        if DOT:
            s = tl.dot(q, kt) * qk_scale  # [16, T]
        else:
            s = tl.sum(kt.to(tl.float32) * q[:, None], axis=0)[None, :] * qk_scale  # [1, T]
        if LOOP:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if LOOP:
            v = tl.load(Vh + (slot0 + n)[:, None] * (H * D) + d[None, :], mask=n_ok[:, None],
                        other=0.0)  # [T, D]
        else:
            v = tl.load(Vh + (slot0 + n)[:, None] * (H * D) + d[None, :])
        if DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.sum(p.reshape(T, 1) * v.to(tl.float32),
                                                axis=0)[None, :]
        m_i = m_new
    out = acc / l_i[:, None]
    lse = m_i + tl.log2(l_i)
    if DOT:
        r = tl.arange(0, 16)
        dst = (leaf * H + head) * D + r[:, None] * 0 + d[None, :]
        if MID:
            tl.store(MidO + dst, out.to(tl.float16), mask=(r < 1)[:, None])
            tl.store(MidLSE + leaf * H + head + r * 0, lse, mask=r < 1)
        else:
            tl.store(O + dst, out.to(O.dtype.element_ty), mask=(r < 1)[:, None])
    else:
        dst = (leaf * H + head) * D + tl.arange(0, 1)[:, None] * 0 + d[None, :]
        if MID:
            tl.store(MidO + dst, out.to(tl.float16))
            tl.store(MidLSE + leaf * H + head + tl.arange(0, 1), lse)
        else:
            tl.store(O + dst, out.to(O.dtype.element_ty))


#: The ladder: (label, DOT, LOOP, INDEX, MID), each step adding one of the library's
#: features to the one before.
LADDER = (("vector, one step", False, False, False, False),
          ("tensor-core tile, one step", True, False, False, False),
          ("tile, runtime loop with masks", True, True, False, False),
          ("tile, loop, index loads", True, True, True, False),
          ("tile, loop, index loads, fp16 partials", True, True, True, True),
          ("vector, loop, index loads, fp16 partials", False, True, True, True))


@triton.jit
def _read_kernel(X, Out, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    x = tl.load(X + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(Out + i, tl.sum(x, axis=0))


def _library_time(leaves: int, tokens: int, dev):
    """The library on ``1,L 16,T`` at 32/32: eager and replayed times of the whole
    decode and of its last stage-1 phase (the leaves) launched alone, and the phases."""
    q, k, v, _, plan = library_plan(f"1,{leaves} 16,{tokens}", HEADS, HEADS, D, dev)
    o = torch.empty_like(q)
    leaves_phase, _ = last_phase_call(plan, q, k, v, D ** -0.5)

    def whole():
        plan.run(q, k, v, o, check=False)

    whole()
    leaves_phase()
    return dict(whole=(_bench(whole, dev), _graph_time(whole, dev)),
                leaves_phase=(_bench(leaves_phase, dev), _graph_time(leaves_phase, dev)),
                phases=[list(ph) for ph in plan.phases], modes=plan.launch_modes)


def run(out_path=None) -> list[dict]:
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for leaves, tokens in SHAPES:
        k = torch.randn(leaves * tokens, HEADS, D, generator=gen).to(dev, torch.float16)
        v = torch.randn(leaves * tokens, HEADS, D, generator=gen).to(dev, torch.float16)
        q = torch.randn(leaves, HEADS, D, generator=gen).to(dev, torch.float16)
        scale = D ** -0.5
        kf = k.float().view(leaves, tokens, HEADS, D)
        vf = v.float().view(leaves, tokens, HEADS, D)
        s = torch.einsum("lhd,lthd->lht", q.float(), kf) * scale
        ref = torch.einsum("lht,lthd->lhd", s.softmax(-1), vf)
        nbytes = 2 * k.numel() * k.element_size()
        name = f"{leaves} leaves x {tokens} tokens"

        def record(label, fn, out=None, **extra):
            err = None
            if out is not None:
                out.fill_(float("nan"))
                fn()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if out.isnan().any():
                    err = float("nan")
            eager = _bench(fn, dev)
            graph = _graph_time(fn, dev)
            row = dict(shape=name, kernel=label, eager_us=eager, graph_us=graph,
                       eager_tb_s=nbytes / eager / 1e6, graph_tb_s=nbytes / graph / 1e6,
                       rel_err=err, **extra)
            rows.append(row)
            print(f"{name} ({nbytes / 1e6:.0f} MB): {label}: eager {eager:.1f} us "
                  f"({row['eager_tb_s']:.2f} TB/s), graph {graph:.1f} us "
                  f"({row['graph_tb_s']:.2f} TB/s)"
                  + ("" if err is None else f", rel err {err:.1e}"), flush=True)

        o = torch.empty_like(q)
        for hb in (1, 4, 8):
            for warps in WARPS:
                def fn(hb=hb, warps=warps):
                    _leaf_heads_kernel[(leaves, HEADS // hb)](
                        q, k, v, o, scale * 1.4426950408889634, T=tokens, HB=hb, H=HEADS,
                        D=D, num_warps=warps)

                record("head" if hb == 1 else f"heads x{hb}", fn, o, heads=hb, warps=warps)
        slot0 = torch.arange(leaves, device=dev, dtype=torch.int32) * tokens
        kv_len = torch.full((leaves,), tokens, device=dev, dtype=torch.int32)
        q_start = torch.arange(leaves, device=dev, dtype=torch.int32)
        mid_q_rows = torch.arange(leaves, device=dev, dtype=torch.int32)
        mid_o = torch.empty(leaves, HEADS, D, device=dev, dtype=torch.float16)
        mid_lse = torch.empty(leaves, HEADS, device=dev)
        for label, dot, loop, index, mid in LADDER:
            def fn(dot=dot, loop=loop, index=index, mid=mid):
                _ladder_kernel[(leaves, HEADS)](
                    q, k, v, o, mid_o, mid_lse, kv_len, slot0, q_start, mid_q_rows,
                    scale * 1.4426950408889634, T=tokens, H=HEADS, D=D, DOT=dot, LOOP=loop,
                    INDEX=index, MID=mid, num_warps=2, num_stages=2)

            record(label, fn, mid_o if mid else o, ladder=True)
        block = 32768  # 64 KiB of float16
        flat_k, flat_v = k.view(-1), v.view(-1)
        sums = torch.empty(2 * flat_k.numel() // block, device=dev)
        half = flat_k.numel() // block

        def read():
            _read_kernel[(half,)](flat_k, sums, BLOCK=block, num_warps=8)
            _read_kernel[(half,)](flat_v, sums[half:], BLOCK=block, num_warps=8)

        record("read", read)
        lib = _library_time(leaves, tokens, dev)
        for part, label in (("leaves_phase", "library: its leaves' phase alone"),
                            ("whole", "library: whole decode of 1,L 16,T")):
            eager, graph = lib[part]
            rows.append(dict(shape=name, kernel=label, eager_us=eager, graph_us=graph,
                             eager_tb_s=nbytes / eager / 1e6, graph_tb_s=nbytes / graph / 1e6,
                             phases=lib["phases"], modes=lib["modes"]))
            print(f"{name}: {label}: eager {eager:.1f} us ({nbytes / eager / 1e6:.2f} TB/s), "
                  f"graph {graph:.1f} us ({nbytes / graph / 1e6:.2f} TB/s)", flush=True)
        print(f"{name}: library phases {lib['phases']}, {lib['modes']}", flush=True)
    write_rows(out_path, rows)
    return rows


def main(argv=None):
    probe_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
