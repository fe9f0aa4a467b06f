"""Triton kernels of tree decode attention, each with its launcher.

The kernels know nothing about trees. They work on *virtual nodes* (vnodes): a vnode is
a set of query rows and a range of KV slots. Stage 1 runs one program per
(vnode, kv head): it loads every query of the vnode for all query heads of the GQA
group at once (so ``tl.dot`` sees ``q_tile * group`` rows), streams the vnode's KV once
and writes one partial output and one log-sum-exp per (query, head) into a *mid row*.
Stage 2 runs one program per (request, block of heads) and merges the request's mid
rows with the log-sum-exp trick.

Index arrays (all int32, on the device of ``q``):

* ``kv_indices[kv_start[v] : kv_start[v] + kv_len[v]]``: the KV slots of vnode ``v``
  (rows of ``k``/``v``), in attention order (order does not change the result).
* ``vnode_q_start[v]``, ``vnode_q_len[v]``: vnode ``v`` owns mid rows
  ``[q_start, q_start + q_len)``; ``mid_q_rows[j]`` is the row of ``q`` of mid row ``j``.
* ``req_mid_start[r]``, ``req_mid_len[r]``: request ``r`` merges mid rows
  ``req_mid_rows[req_mid_start[r] : req_mid_start[r] + req_mid_len[r]]``.

Log-sum-exp convention: **base 2**. Logits are scaled by ``sm_scale * log2(e)`` and
exponentiated with ``exp2``; ``mid_lse`` holds ``log2(sum(exp2(s)))`` of those scaled
logits. Accumulation is float32 throughout.

Logit cap (soft cap): when ``logit_cap > 0`` the scaled logit ``s = sm_scale * q.k`` is
replaced by ``logit_cap * tanh(s / logit_cap)`` before the softmax.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

__all__ = [
    "Phase",
    "SUPPORTED_DTYPES",
    "tree_decode_stage1",
    "tree_decode_stage2",
    "tree_decode",
    "stage1_block_sizes",
]

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest number of (query, head) rows one stage-1 program holds in registers.
MAX_BLOCK_M = 128


class Phase(NamedTuple):
    """A run of vnodes launched together with one tile shape.

    Attributes
    ----------
    vnode_offset : int
        Index of the first vnode of the phase.
    num_vnodes : int
        Number of vnodes in the phase (the launch grid's first dimension).
    q_tile : int
        Largest number of queries (requests) of any vnode in the phase.
    kv_tile : int
        KV tokens processed per inner-loop iteration.
    """

    vnode_offset: int
    num_vnodes: int
    q_tile: int
    kv_tile: int


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def stage1_block_sizes(q_tile: int, kv_tile: int, group: int, head_dim: int,
                       elem_bytes: int = 2) -> tuple[int, int, int]:
    """Return ``(BLOCK_M, BLOCK_N, BLOCK_D)`` that stage 1 uses for a phase.

    ``BLOCK_M`` covers ``q_tile * group`` rows (at least 16, the smallest ``tl.dot``
    shape); ``BLOCK_N`` is ``kv_tile`` rounded to a power of two in [16, 256], reduced
    for wide heads so that a K and a V tile stay within 64 KiB together.
    """
    block_m = max(16, _next_pow2(q_tile * group))
    block_d = max(16, _next_pow2(head_dim))
    block_n = min(256, max(16, _next_pow2(kv_tile)))
    while block_n > 16 and 2 * block_n * block_d * elem_bytes > 64 * 1024:
        block_n //= 2
    return block_m, block_n, block_d


def default_launch(block_m: int, block_n: int, block_d: int) -> tuple[int, int]:
    """``(num_warps, num_stages)`` of a stage-1 launch for these block sizes."""
    return (8 if block_m >= 128 else 4), 2


@triton.jit
def _tanh(x):
    # tanh through exp2, valid for all finite x (saturates to +-1).
    e = tl.exp2(x * 2.8853900817779268)  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _stage1_kernel(
    Q, K, V, MidO, MidLSE,
    KvIdx, VKvStart, VKvLen, VQStart, VQLen, MidQRows,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_mo_r, stride_mo_h,
    stride_ml_r,
    vnode_offset,
    qk_scale,  # sm_scale * log2(e) without cap; sm_scale with cap
    logit_cap,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    vid = tl.program_id(0) + vnode_offset
    kv_head = tl.program_id(1)

    q_start = tl.load(VQStart + vid)
    q_len = tl.load(VQLen + vid)
    kv_start = tl.load(VKvStart + vid)
    kv_len = tl.load(VKvLen + vid)

    # Row r of the tile is query r // GROUP of the vnode, head kv_head * GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    q_in_vnode = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = q_in_vnode < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_row = tl.load(MidQRows + q_start + q_in_vnode, mask=row_ok, other=0)
    q = tl.load(
        Q + q_row[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, kv_len, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < kv_len
        slot = tl.load(KvIdx + kv_start + n, mask=n_ok, other=0).to(tl.int64)
        kt = tl.load(
            K + slot[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N], fp32
        if USE_CAP:
            s = logit_cap * _tanh(s * qk_scale / logit_cap) * 1.4426950408889634
        else:
            s = s * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(
            V + slot[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
    mid_row = q_start + q_in_vnode
    tl.store(
        MidO + mid_row[:, None] * stride_mo_r + head[:, None] * stride_mo_h + offs_d[None, :],
        out,
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(MidLSE + mid_row * stride_ml_r + head, lse, mask=row_ok)


@triton.jit
def _stage2_kernel(
    MidO, MidLSE, O,
    ReqMidStart, ReqMidLen, ReqMidRows,
    stride_mo_r, stride_mo_h,
    stride_ml_r,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # One program per (request, query head); BLOCK_P partials are loaded per step.
    req = tl.program_id(0)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_p = tl.arange(0, BLOCK_P)
    start = tl.load(ReqMidStart + req)
    count = tl.load(ReqMidLen + req)

    m = tl.full([1], float("-inf"), dtype=tl.float32)
    l = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p0 in range(0, count, BLOCK_P):
        p_ok = p0 + offs_p < count
        rows = tl.load(ReqMidRows + start + p0 + offs_p, mask=p_ok, other=0).to(tl.int64)
        lse = tl.load(MidLSE + rows * stride_ml_r + head, mask=p_ok, other=float("-inf"))
        part = tl.load(
            MidO + rows[:, None] * stride_mo_r + head * stride_mo_h + offs_d[None, :],
            mask=p_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_P, BLOCK_D]
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        # While every partial so far is empty (lse = -inf) the weights stay 0.
        finite = m_new > float("-inf")
        m_ref = tl.where(finite, m_new, 0.0)
        alpha = tl.where(finite, tl.exp2(m - m_ref), 0.0)
        w = tl.where(finite, tl.exp2(lse - m_ref), 0.0)  # [BLOCK_P]
        acc = acc * alpha + tl.sum(part * w[:, None], axis=0)
        l = l * alpha + tl.sum(w, axis=0)
        m = m_new
    out = acc / tl.where(l > 0.0, l, 1.0)
    tl.store(O + req * stride_ob + head * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_ok)


def _check_index(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q is on {device}")


def tree_decode_stage1(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    kv_indices: torch.Tensor,
    vnode_kv_start: torch.Tensor,
    vnode_kv_len: torch.Tensor,
    vnode_q_start: torch.Tensor,
    vnode_q_len: torch.Tensor,
    mid_q_rows: torch.Tensor,
    phase: Phase,
    sm_scale: float,
    logit_cap: float = 0.0,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:
    """Launch stage 1 for one phase.

    Parameters
    ----------
    q : Tensor ``[B, Hq, D]`` (fp16 / bf16 / fp32), last dim contiguous.
    k, v : Tensor ``[S, Hk, D]``, same dtype as ``q``; rows are KV slots.
    mid_o : Tensor ``[R, Hq, D]`` float32, partial outputs (``R`` mid rows).
    mid_lse : Tensor ``[R, Hq]`` float32, base-2 log-sum-exp of each partial output.
    kv_indices, vnode_* , mid_q_rows : int32 index arrays (see the module docstring).
    phase : Phase
        Which vnodes to run and their tile sizes; every vnode of the phase must have
        ``q_len <= phase.q_tile``.
    sm_scale : float
        Softmax scale (usually ``1 / sqrt(D)``).
    logit_cap : float
        Soft cap of the scaled logits; ``<= 0`` disables it.
    """
    if phase.num_vnodes == 0:
        return
    hq, d = q.shape[1], q.shape[2]
    hk = k.shape[1]
    group = hq // hk
    block_m, block_n, block_d = stage1_block_sizes(phase.q_tile, phase.kv_tile, group, d,
                                                   q.element_size())
    if block_m > MAX_BLOCK_M and phase.q_tile > 1:
        raise ValueError(
            f"q_tile {phase.q_tile} x group {group} = {phase.q_tile * group} rows exceeds "
            f"{MAX_BLOCK_M}; use a smaller q tile"
        )
    use_cap = logit_cap is not None and logit_cap > 0
    qk_scale = sm_scale if use_cap else sm_scale * LOG2E
    # Triton's CPU interpreter multiplies bf16 bit patterns in tl.dot (upstream issue
    # #11584): there, bf16 operands are upcast to fp32 first.
    upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu"
    precision = "ieee" if (q.dtype == torch.float32 or upcast) else "tf32"
    if num_warps is None or num_stages is None:
        w, st = default_launch(block_m, block_n, block_d)
        num_warps = w if num_warps is None else num_warps
        num_stages = st if num_stages is None else num_stages
    # Shared memory: the q tile plus num_stages K and V tiles must fit (fp32 heads of 256).
    esz = q.element_size()
    while num_stages > 1 and (block_m * block_d + 2 * num_stages * block_n * block_d) * esz > 200 * 1024:
        num_stages -= 1
    grid = (phase.num_vnodes, hk)
    _stage1_kernel[grid](
        q, k, v, mid_o, mid_lse,
        kv_indices, vnode_kv_start, vnode_kv_len, vnode_q_start, vnode_q_len, mid_q_rows,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        mid_o.stride(0), mid_o.stride(1),
        mid_lse.stride(0),
        phase.vnode_offset,
        float(qk_scale),
        float(logit_cap if use_cap else 0.0),
        GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        USE_CAP=use_cap, DOT_PRECISION=precision, UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages,
    )


def tree_decode_stage2(
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    o: torch.Tensor,
    req_mid_start: torch.Tensor,
    req_mid_len: torch.Tensor,
    req_mid_rows: torch.Tensor,
) -> None:
    """Merge each request's partial outputs into ``o`` ``[B, Hq, D]`` (in place).

    A request with no mid rows (an empty context) gets zeros.
    """
    b, hq, d = o.shape
    if b == 0:
        return
    block_d = max(16, _next_pow2(d))
    block_p = 8 if block_d <= 128 else 4
    grid = (b, hq)
    _stage2_kernel[grid](
        mid_o, mid_lse, o,
        req_mid_start, req_mid_len, req_mid_rows,
        mid_o.stride(0), mid_o.stride(1),
        mid_lse.stride(0),
        o.stride(0), o.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_P=block_p,
        num_warps=1 if block_d <= 128 else 2, num_stages=2,
    )


def tree_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    *,
    kv_indices: torch.Tensor,
    vnode_kv_start: torch.Tensor,
    vnode_kv_len: torch.Tensor,
    vnode_q_start: torch.Tensor,
    vnode_q_len: torch.Tensor,
    mid_q_rows: torch.Tensor,
    req_mid_start: torch.Tensor,
    req_mid_len: torch.Tensor,
    req_mid_rows: torch.Tensor,
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    phases: Sequence[Phase],
    sm_scale: float,
    logit_cap: float = 0.0,
    check: bool = True,
) -> torch.Tensor:
    """Tree decode attention: stage 1 for every phase, then stage 2. Writes ``o``.

    Shapes: ``q``, ``o`` ``[B, Hq, D]``; ``k``, ``v`` ``[S, Hk, D]`` with ``Hq % Hk == 0``;
    ``mid_o`` ``[R, Hq, D]`` float32; ``mid_lse`` ``[R, Hq]`` float32, where ``R`` is at
    least the number of mid rows the vnodes use. Returns ``o``.
    """
    if check:
        _check_args(q, k, v, o, mid_o, mid_lse)
        for name, t in (
            ("kv_indices", kv_indices), ("vnode_kv_start", vnode_kv_start),
            ("vnode_kv_len", vnode_kv_len), ("vnode_q_start", vnode_q_start),
            ("vnode_q_len", vnode_q_len), ("mid_q_rows", mid_q_rows),
            ("req_mid_start", req_mid_start), ("req_mid_len", req_mid_len),
            ("req_mid_rows", req_mid_rows),
        ):
            _check_index(name, t, q.device)
    for ph in phases:
        tree_decode_stage1(
            q, k, v, mid_o, mid_lse, kv_indices, vnode_kv_start, vnode_kv_len,
            vnode_q_start, vnode_q_len, mid_q_rows, ph, sm_scale, logit_cap,
        )
    tree_decode_stage2(mid_o, mid_lse, o, req_mid_start, req_mid_len, req_mid_rows)
    return o


def _check_args(q, k, v, o, mid_o, mid_lse) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or o.dim() != 3:
        raise ValueError(
            f"q, k, v, o must be 3-D, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}, {tuple(o.shape)}"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} not supported, expected one of {SUPPORTED_DTYPES}")
    for name, t in (("k", k), ("v", v), ("o", o)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q is on {q.device}")
    if o.shape != q.shape:
        raise ValueError(f"o has shape {tuple(o.shape)}, expected q's {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k has head_dim {k.shape[2]}, q has {q.shape[2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of k's {k.shape[1]}")
    for name, t in (("q", q), ("k", k), ("v", v), ("o", o)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    if mid_o.dtype != torch.float32 or mid_lse.dtype != torch.float32:
        raise ValueError("mid_o and mid_lse must be float32")
    if mid_o.shape[1:] != q.shape[1:] or mid_lse.shape[1] != q.shape[1]:
        raise ValueError(
            f"mid_o {tuple(mid_o.shape)} / mid_lse {tuple(mid_lse.shape)} do not match "
            f"q's heads and head_dim {tuple(q.shape[1:])}"
        )
