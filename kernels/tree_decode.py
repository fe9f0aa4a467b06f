"""Triton kernels of tree decode attention, each with its launcher.

The kernels know nothing about trees. They work on *virtual nodes* (vnodes): a vnode is
a set of query rows and a range of KV slots. Stage 1 runs one program per
(vnode, kv head): it loads every query of the vnode for all query heads of the GQA
group at once (so ``tl.dot`` sees ``q_tile * group`` rows), streams the vnode's KV once
and writes one partial output and one log-sum-exp per (query, head) into a *mid row*.
Both phases of a plan (two tile shapes) run in one stage-1 launch when the second is
small (:func:`merge_phases`); otherwise a captured CUDA graph runs their two launches
concurrently (:data:`OVERLAP_PHASES`). Stage 2 runs one program per (request, block of heads,
:func:`stage2_blocks`) and merges the request's mid rows with the log-sum-exp trick; on
CUDA devices of compute capability >= 9 it is a programmatic dependent launch of stage 1
(:data:`DEPENDENT_LAUNCH`). Prepared launches skip Triton's JIT dispatch after their
first call (:data:`FAST_LAUNCH`).

Index arrays (all int32, on the device of ``q``):

* ``kv_indices[kv_start[v] : kv_start[v] + kv_len[v]]``: the KV slots of vnode ``v``
  (rows of ``k``/``v``), in attention order (order does not change the result).
* ``vnode_q_start[v]``, ``vnode_q_len[v]``: vnode ``v`` owns mid rows
  ``[q_start, q_start + q_len)``; ``mid_q_rows[j]`` is the row of ``q`` of mid row ``j``.
* ``req_mid_start[r]``, ``req_mid_len[r]``: request ``r`` merges mid rows
  ``req_mid_rows[req_mid_start[r] : req_mid_start[r] + req_mid_len[r]]``.
* ``vnode_slot0[v]`` (optional hint): ``>= 0`` when vnode ``v``'s slots are the contiguous
  run ``vnode_slot0[v] + [0, kv_len[v])``; stage 1 then computes the slots instead of
  loading them. ``kv_indices`` must hold the same slots either way.
* ``kv_mask[j]`` (optional row masks): query ``i`` of a vnode attends its KV entry ``j``
  only where bit ``min(i, 31)`` is set (-1: every query), so that one vnode may hold
  several requests over the union of their contexts.

Partial outputs (``mid_o``) are float32, the dtype of ``q``, or float16 for bfloat16
inputs (stored scaled, :func:`scaled_partials`); plans use float16 for float16 and
bfloat16 inputs, else float32. Their log-sum-exps (``mid_lse``) are always float32.

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
    "launch_form",
    "merge_phases",
    "tree_decode_stage1",
    "tree_decode_stage2",
    "tree_decode",
    "stage1_block_sizes",
    "stage2_blocks",
    "scaled_partials",
    "tree_decode_launcher",
]

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest number of (query, head) rows one stage-1 program holds in registers.
MAX_BLOCK_M = 128
# Shared-memory estimate a stage-1 launch may use (the H100 allows 227 KiB per block;
# the estimate leaves room for layout conversions).
SMEM_BUDGET = 160 * 1024


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
    masked : bool
        Whether the phase's KV entries may carry row masks (``kv_mask``). False: a
        promise that every entry of its vnodes has mask -1; a Triton launch of such
        phases only neither compiles the mask test nor reads the masks, and the torch
        implementation applies none there (default True: masks apply whenever given).
    """

    vnode_offset: int
    num_vnodes: int
    q_tile: int
    kv_tile: int
    masked: bool = True


#: The stage-1 kernel's integer arguments that depend on the sizes of a launch's phases.
#: The JIT does not specialise on them (no divisibility or == 1 cases), so that a
#: launch set resized for a plan of other phase sizes keeps its compiled kernels
#: (:meth:`_LaunchSet.resized`).
STAGE1_SIZE_ARGS = ("vnode_offset", "num_first")


def next_pow2(x: int) -> int:
    """The least power of two >= ``x`` (1 for ``x`` <= 1)."""
    return 1 << max(0, int(x) - 1).bit_length()


def stage1_block_sizes(q_tile: int, kv_tile: int, group: int, head_dim: int,
                       elem_bytes: int = 2) -> tuple[int, int, int]:
    """Return ``(BLOCK_M, BLOCK_N, BLOCK_D)`` that stage 1 uses for a phase.

    ``BLOCK_M`` covers ``q_tile * group`` rows (at least 16, the smallest ``tl.dot``
    shape); ``BLOCK_N`` is ``kv_tile`` rounded to a power of two in [16, 256], reduced
    for wide heads so that a K and a V tile stay within 64 KiB together.
    """
    block_m = max(16, next_pow2(q_tile * group))
    block_d = max(16, next_pow2(head_dim))
    block_n = min(256, max(16, next_pow2(kv_tile)))
    while block_n > 16 and 2 * block_n * block_d * elem_bytes > 64 * 1024:
        block_n //= 2
    return block_m, block_n, block_d


#: With GQA, tiles of at most 16 rows run on 4 warps from this head dim (``BLOCK_D``) on,
#: instead of one (a 16 x 256 float32 accumulator takes 128 registers a thread on one
#: warp). Measured on an H100 at head_dim 256 (benchmarks/RESULTS.md, v35) on the 33 GQA
#: benchmark cases: graph time 0.945x on the geometric mean (0.819-1.011x), eager 0.955x
#: (0.787-1.006x). Without GQA (2 warps) 4 warps gave 1.008x (0.937-1.100x): kept at 2.
SMALL_TILE_WIDE_HEAD_DIM = 256


def stage1_shared_bytes(shapes, stages: int, elem_size: int) -> int:
    """Shared memory a stage-1 kernel of the tile ``shapes`` (``(BLOCK_M, BLOCK_N,
    BLOCK_D)`` each) takes with ``stages`` pipeline stages: a shape's query tile and
    ``stages`` K and V tiles. A kernel of two shapes runs them in exclusive branches, so
    the compiler lets their buffers share memory: the larger shape's bytes (before v38
    the estimate added both, which cut the merged launches at head_dim 256 to one stage;
    ``python -m benchmarks.compile_report`` compares the estimate with the compiled
    kernels)."""
    return max((bm * bd + 2 * stages * bn * bd) * elem_size for bm, bn, bd in shapes)


def default_launch(block_m: int, block_n: int, block_d: int, group: int = 1) -> tuple[int, int]:
    """``(num_warps, num_stages)`` of a stage-1 launch for these block sizes and GQA group.

    Tiles of at most 16 rows (the leaves' phase) run on 2 warps without GQA and on one
    warp with it (on 4 with it at head dims from :data:`SMALL_TILE_WIDE_HEAD_DIM`); wider
    tiles on 4 warps (8 from 128 rows). Measured on an H100 under graph replay
    (benchmarks/RESULTS.md, v8): against 4 warps everywhere, 1.027x on the geometric
    mean of the 51 benchmark cases, 1.08-1.12x on the deep 32/32 trees (head_dim 128);
    v35 for head_dim 256.
    """
    if block_m <= 16:
        if group > 1 and block_d >= SMALL_TILE_WIDE_HEAD_DIM:
            return 4, 2
        return (2 if group == 1 else 1), 2
    return (8 if block_m >= 128 else 4), 2


@triton.jit
def _tanh(x):
    # tanh through exp2, valid for all finite x (saturates to +-1).
    e = tl.exp2(x * 2.8853900817779268)  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _kv_loop(q, K, V, KvIdx, kv_start, kv_len, slot0, kv_head,
             stride_kt, stride_kh, stride_vt, stride_vh,
             qk_scale, logit_cap, offs_d, d_ok, KvMask, row_bit,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, USE_CAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
             UPCAST: tl.constexpr, HAS_SLOT0: tl.constexpr, OFF32: tl.constexpr,
             HAS_MASK: tl.constexpr):
    """Online softmax of one tile of rows over ``kv_len`` KV slots.

    The slots are ``slot0, slot0 + 1, ...`` when ``slot0 >= 0`` (the index loads are
    masked off), else ``KvIdx[kv_start:kv_start + kv_len]``. One loop serves both, so
    the kernel holds one set of pipeline buffers. ``OFF32``: every element offset of
    ``K`` and ``V`` fits in int32, so addresses are computed in 32-bit arithmetic.
    Without a padded head dimension (``HEAD_DIM == BLOCK_D``) the loads are masked
    along the KV axis only. ``HAS_MASK``: row ``r`` attends KV entry ``j`` only where
    bit ``row_bit[r]`` of ``KvMask[kv_start + j]`` is set (a row may then see no entry
    of a tile, or none at all: its output is 0 with an lse of -inf).
    """
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    Kh = K + kv_head * stride_kh
    Vh = V + kv_head * stride_vh
    for n0 in range(0, kv_len, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < kv_len
        if HAS_SLOT0:
            gather = (n * 0 + slot0) < 0  # a block (the interpreter wants a block mask)
            idx = tl.load(KvIdx + kv_start + n, mask=n_ok & gather, other=0)
            slot = tl.where(slot0 >= 0, slot0 + n, idx)
        else:
            slot = tl.load(KvIdx + kv_start + n, mask=n_ok, other=0)
        if not OFF32:
            slot = slot.to(tl.int64)
        if HEAD_DIM == BLOCK_D:
            k_mask = n_ok[None, :]
            v_mask = n_ok[:, None]
        else:
            k_mask = n_ok[None, :] & d_ok[:, None]
            v_mask = n_ok[:, None] & d_ok[None, :]
        kt = tl.load(Kh + (slot[None, :] * stride_kt + offs_d[:, None]), mask=k_mask,
                     other=0.0)  # [BLOCK_D, BLOCK_N]
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N], fp32
        if USE_CAP:
            s = logit_cap * _tanh(s * qk_scale / logit_cap) * 1.4426950408889634
        else:
            s = s * qk_scale
        if HAS_MASK:
            bits = tl.load(KvMask + kv_start + n, mask=n_ok, other=0)
            seen = ((bits[None, :] >> row_bit[:, None]) & 1) != 0
            s = tl.where(seen & n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row that has seen no entry yet keeps m = -inf: exponents from 0 instead.
            m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
        else:
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(Vh + (slot[:, None] * stride_vt + offs_d[None, :]), mask=v_mask,
                     other=0.0)  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _finish_rows(out, lse, q_row, mid_row, head, row_ok, offs_d, d_ok,
                 MidO, MidLSE, O, ReqMidLen, ReqMidStart, ReqMidRows,
                 stride_mo_r, stride_mo_h, stride_ml_r, stride_ob, stride_oh, num_heads,
                 PDL_WAIT: tl.constexpr, SCALED: tl.constexpr):
    """Merge each row's partial ``(out, lse)`` with the other partials of its request
    (its mid rows other than ``mid_row``) and store the request's output: the stage-2
    merge, done by the program that computes a request's last partial. ``SCALED``: the
    stored partials are scaled (see :func:`_store_partial`)."""
    count = tl.load(ReqMidLen + q_row, mask=row_ok, other=0)
    start = tl.load(ReqMidStart + q_row, mask=row_ok, other=0)
    if PDL_WAIT:
        # A programmatic dependent launch: the earlier launch's partials are complete
        # and visible after this (everything above reads only the plan).
        tl.extra.cuda.gdc_wait()
    m = lse
    l = tl.where(lse > float("-inf"), 1.0, 0.0)
    acc = out * l[:, None]
    hd_ok = row_ok[:, None] & d_ok[None, :]
    for p in range(0, tl.max(count, axis=0)):
        ok = row_ok & (p < count)
        r = tl.load(ReqMidRows + start + p, mask=ok, other=0)
        ok = ok & (r != mid_row)
        r = r.to(tl.int64)
        lse_p = tl.load(MidLSE + r * stride_ml_r + head, mask=ok, other=float("-inf"))
        part = tl.load(MidO + r[:, None] * stride_mo_r + head[:, None] * stride_mo_h
                       + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                       other=0.0).to(tl.float32)
        m_new = tl.maximum(m, lse_p)
        # While every partial so far is empty (lse = -inf) the weights stay 0.
        finite = m_new > float("-inf")
        m_ref = tl.where(finite, m_new, 0.0)
        alpha = tl.where(finite, tl.exp2(m - m_ref), 0.0)
        w = tl.where(finite, tl.exp2(lse_p - m_ref), 0.0)
        if SCALED:
            shift = tl.load(MidLSE + r * stride_ml_r + num_heads + head, mask=ok, other=0.0)
            acc = acc * alpha[:, None] + part * tl.where(finite, tl.exp2(lse_p + shift - m_ref),
                                                         0.0)[:, None]
        else:
            acc = acc * alpha[:, None] + part * w[:, None]
        l = l * alpha + w
        m = m_new
    res = acc / tl.where(l > 0.0, l, 1.0)[:, None]
    tl.store(O + q_row[:, None] * stride_ob + head[:, None] * stride_oh + offs_d[None, :],
             res.to(O.dtype.element_ty), mask=hd_ok)


@triton.jit
def _store_partial(out, lse, mid_row, head, keep, offs_d, d_ok, MidO, MidLSE,
                   stride_mo_r, stride_mo_h, stride_ml_r, num_heads, SCALED: tl.constexpr):
    """Store each row's partial output and log-sum-exp in its mid row. ``SCALED``
    (float16 partials of bfloat16 inputs): the output is stored times ``2**-shift``, with
    ``shift`` the row's power of two that brings its largest magnitude into [2**13, 2**14)
    (0 for a zero row), so that any bfloat16 magnitude fits float16 with float16's
    precision; ``shift`` goes to column ``num_heads + head`` of the row's log-sum-exps."""
    if SCALED:
        amax = tl.max(tl.abs(out), axis=1)
        shift = tl.where(amax > 0.0, tl.floor(tl.log2(tl.maximum(amax, 1e-36))) - 13.0, 0.0)
        # Within float32's normal range both ways (bfloat16's range needs -146..114).
        shift = tl.minimum(tl.maximum(shift, -120.0), 120.0)
        out = out * tl.exp2(-shift)[:, None]
        tl.store(MidLSE + mid_row * stride_ml_r + num_heads + head, shift, mask=keep)
    tl.store(MidO + mid_row[:, None] * stride_mo_r + head[:, None] * stride_mo_h
             + offs_d[None, :], out.to(MidO.dtype.element_ty),
             mask=keep[:, None] & d_ok[None, :])
    tl.store(MidLSE + mid_row * stride_ml_r + head, lse, mask=keep)


@triton.jit
def _stage1_vnode(
    vid, kv_head,
    Q, K, V, MidO, MidLSE, O, ReqMidLen, ReqMidStart, ReqMidRows,
    KvIdx, VKvStart, VKvLen, VQStart, VQLen, MidQRows, VSlot0, KvMask,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_mo_r, stride_mo_h, stride_ml_r, stride_ob, stride_oh,
    qk_scale, logit_cap,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_SLOT0: tl.constexpr,
    DIRECT: tl.constexpr, OFF32: tl.constexpr, FINISH: tl.constexpr, PDL_WAIT: tl.constexpr,
    HAS_MASK: tl.constexpr, SCALED: tl.constexpr,
):
    """Stage 1 for vnode ``vid`` and one KV head (one tile shape).

    ``FINISH``: this is the plan's last launch and each query row's request has no
    other partial in it; the row's partial is merged with the request's other partials
    (written by earlier launches) and the output is written here, with no stage 2."""
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

    if HAS_SLOT0:
        slot0 = tl.load(VSlot0 + vid)
    else:
        slot0 = -1
    acc, m_i, l_i = _kv_loop(
        q, K, V, KvIdx, kv_start, kv_len, slot0, kv_head,
        stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, logit_cap, offs_d, d_ok,
        KvMask, tl.minimum(q_in_vnode, 31),
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, USE_CAP, DOT_PRECISION, UPCAST, HAS_SLOT0, OFF32,
        HAS_MASK)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
    mid_row = q_start + q_in_vnode
    num_heads = tl.num_programs(1) * GROUP  # the grid's second axis is the KV heads
    if FINISH:
        _finish_rows(out, lse, q_row, mid_row, head, row_ok, offs_d, d_ok,
                     MidO, MidLSE, O, ReqMidLen, ReqMidStart, ReqMidRows,
                     stride_mo_r, stride_mo_h, stride_ml_r, stride_ob, stride_oh, num_heads,
                     PDL_WAIT, SCALED)
    else:
        keep = row_ok
        if DIRECT:
            # A request whose only partial this is gets its output here (stage 2 skips
            # it).
            cnt = tl.load(ReqMidLen + q_row, mask=row_ok, other=0)
            single = row_ok & (cnt == 1)
            tl.store(
                O + q_row[:, None] * stride_ob + head[:, None] * stride_oh + offs_d[None, :],
                out.to(O.dtype.element_ty),
                mask=single[:, None] & d_ok[None, :],
            )
            keep = row_ok & (cnt != 1)
        _store_partial(out, lse, mid_row, head, keep, offs_d, d_ok, MidO, MidLSE,
                       stride_mo_r, stride_mo_h, stride_ml_r, num_heads, SCALED)


@triton.jit(do_not_specialize=STAGE1_SIZE_ARGS)
def _stage1_kernel(
    Q, K, V, MidO, MidLSE, O, ReqMidLen, ReqMidStart, ReqMidRows,
    KvIdx, VKvStart, VKvLen, VQStart, VQLen, MidQRows, VSlot0, KvMask,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_mo_r, stride_mo_h,
    stride_ml_r,
    stride_ob, stride_oh,
    vnode_offset,
    num_first,  # programs (vnodes) of the first tile shape; the rest use the second
    qk_scale,  # sm_scale * log2(e) without cap; sm_scale with cap
    logit_cap,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M0: tl.constexpr,
    BLOCK_N0: tl.constexpr,
    BLOCK_M1: tl.constexpr,
    BLOCK_N1: tl.constexpr,
    TWO_SHAPES: tl.constexpr,
    USE_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_SLOT0: tl.constexpr,
    DIRECT: tl.constexpr,
    OFF32: tl.constexpr,
    PDL_TRIGGER: tl.constexpr,
    FINISH: tl.constexpr,
    PDL_WAIT: tl.constexpr,
    WAIT_AT_END: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SCALED: tl.constexpr,
):
    if PDL_TRIGGER:
        # Let stage 2 (a programmatic dependent launch) be scheduled now; it waits for
        # this grid to finish before it reads the partials.
        tl.extra.cuda.gdc_launch_dependents()
    # Both phases of a plan in one launch: programs [0, num_first) run the first tile
    # shape (the long, shared vnodes, scheduled first), the rest the second.
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    vid = pid + vnode_offset
    if TWO_SHAPES:
        if pid < num_first:
            _stage1_vnode(
                vid, kv_head, Q, K, V, MidO, MidLSE, O, ReqMidLen, ReqMidStart, ReqMidRows,
                KvIdx, VKvStart, VKvLen, VQStart, VQLen, MidQRows, VSlot0, KvMask,
                stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_mo_r, stride_mo_h, stride_ml_r, stride_ob, stride_oh, qk_scale, logit_cap,
                GROUP, HEAD_DIM, BLOCK_D, BLOCK_M0, BLOCK_N0, USE_CAP, DOT_PRECISION, UPCAST,
                HAS_SLOT0, DIRECT, OFF32, FINISH, PDL_WAIT, HAS_MASK, SCALED)
        else:
            _stage1_vnode(
                vid, kv_head, Q, K, V, MidO, MidLSE, O, ReqMidLen, ReqMidStart, ReqMidRows,
                KvIdx, VKvStart, VKvLen, VQStart, VQLen, MidQRows, VSlot0, KvMask,
                stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_mo_r, stride_mo_h, stride_ml_r, stride_ob, stride_oh, qk_scale, logit_cap,
                GROUP, HEAD_DIM, BLOCK_D, BLOCK_M1, BLOCK_N1, USE_CAP, DOT_PRECISION, UPCAST,
                HAS_SLOT0, DIRECT, OFF32, FINISH, PDL_WAIT, HAS_MASK, SCALED)
    else:
        _stage1_vnode(
            vid, kv_head, Q, K, V, MidO, MidLSE, O, ReqMidLen, ReqMidStart, ReqMidRows,
            KvIdx, VKvStart, VKvLen, VQStart, VQLen, MidQRows, VSlot0, KvMask,
            stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
            stride_mo_r, stride_mo_h, stride_ml_r, stride_ob, stride_oh, qk_scale, logit_cap,
            GROUP, HEAD_DIM, BLOCK_D, BLOCK_M0, BLOCK_N0, USE_CAP, DOT_PRECISION, UPCAST,
            HAS_SLOT0, DIRECT, OFF32, FINISH, PDL_WAIT, HAS_MASK, SCALED)
    if WAIT_AT_END:
        # A programmatic dependent launch that reads nothing of the launch before it: it
        # runs beside that launch and only its end waits for it, so that this grid ends
        # after both (the launch after this one waits for this grid alone).
        tl.extra.cuda.gdc_wait()


_STAGE1_SIZE_POS = tuple(_stage1_kernel.arg_names.index(n) for n in STAGE1_SIZE_ARGS)


@triton.jit
def _stage2_kernel(
    MidO, MidLSE, O,
    ReqMidStart, ReqMidLen, ReqMidRows,
    stride_mo_r, stride_mo_h,
    stride_ml_r,
    stride_ob, stride_oh,
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SKIP_SINGLE: tl.constexpr,
    PDL_WAIT: tl.constexpr,
    SCALED: tl.constexpr,
):
    # One program per (request, block of BLOCK_H query heads); BLOCK_P partials of all
    # those heads are loaded per step as one [BLOCK_P, BLOCK_H, BLOCK_D] tile.
    # SKIP_SINGLE: stage 1 already wrote the output of requests with one partial.
    # SCALED: the partials are scaled by 2**-shift, shift in column num_heads + head of
    # their log-sum-exps (see _store_partial).
    req = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_p = tl.arange(0, BLOCK_P)
    start = tl.load(ReqMidStart + req)
    count = tl.load(ReqMidLen + req)
    n_parts = count
    if SKIP_SINGLE:
        n_parts = tl.where(count == 1, 0, count)  # nothing to merge (and no store)
    rows_next = tl.load(ReqMidRows + start + offs_p, mask=offs_p < n_parts, other=0)
    if PDL_WAIT:
        # Launched as a programmatic dependent of stage 1: everything above reads only
        # the plan; wait for stage 1's partials (and their visibility) here.
        tl.extra.cuda.gdc_wait()

    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    hd_ok = h_ok[:, None] & d_ok[None, :]
    for p0 in range(0, n_parts, BLOCK_P):
        p_ok = p0 + offs_p < n_parts
        rows = rows_next.to(tl.int64)
        # The next step's mid rows, in flight while this step merges.
        nxt = p0 + BLOCK_P + offs_p
        rows_next = tl.load(ReqMidRows + start + nxt, mask=nxt < n_parts, other=0)
        lse = tl.load(MidLSE + rows[:, None] * stride_ml_r + heads[None, :],
                      mask=p_ok[:, None] & h_ok[None, :], other=float("-inf"))  # [P, H]
        part = tl.load(
            MidO + rows[:, None, None] * stride_mo_r + heads[None, :, None] * stride_mo_h
            + offs_d[None, None, :],
            mask=p_ok[:, None, None] & hd_ok[None, :, :],
            other=0.0,
        ).to(tl.float32)  # [P, H, D]
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        # While every partial so far is empty (lse = -inf) the weights stay 0.
        finite = m_new > float("-inf")
        m_ref = tl.where(finite, m_new, 0.0)
        alpha = tl.where(finite, tl.exp2(m - m_ref), 0.0)  # [H]
        w = tl.where(finite[None, :], tl.exp2(lse - m_ref[None, :]), 0.0)  # [P, H]
        if SCALED:
            shift = tl.load(MidLSE + rows[:, None] * stride_ml_r + num_heads + heads[None, :],
                            mask=p_ok[:, None] & h_ok[None, :], other=0.0)  # [P, H]
            wo = tl.where(finite[None, :], tl.exp2(lse + shift - m_ref[None, :]), 0.0)
            acc = acc * alpha[:, None] + tl.sum(part * wo[:, :, None], axis=0)
        else:
            acc = acc * alpha[:, None] + tl.sum(part * w[:, :, None], axis=0)
        l = l * alpha + tl.sum(w, axis=0)
        m = m_new
    out = acc / tl.where(l > 0.0, l, 1.0)[:, None]
    write = hd_ok
    if SKIP_SINGLE:
        write = hd_ok & ((heads * 0 + count) != 1)[:, None]  # a block mask (interpreter)
    tl.store(O + req * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=write)


def scaled_partials(mid_o: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether partial outputs in ``mid_o`` for inputs of ``dtype`` are stored scaled:
    float16 partials of bfloat16 inputs. Each is stored times a power of two
    ``2**-shift`` that brings its largest magnitude into [2**13, 2**14), and ``mid_lse``
    is then ``[R, 2 * Hq]``: log-sum-exps in columns ``[0, Hq)``, shifts in
    ``[Hq, 2 * Hq)``. Half the partial traffic of float32 partials, with float16's
    11-bit precision at any bfloat16 magnitude (bfloat16 partials would have 8 bits)."""
    return mid_o.dtype == torch.float16 and dtype == torch.bfloat16


def _check_stats(mid_o: torch.Tensor, mid_lse: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise ValueError unless ``mid_lse`` has the columns the partials in ``mid_o``
    need for inputs of ``dtype`` (twice the heads with scaled partials)."""
    hq = mid_o.shape[1]
    cols = 2 * hq if scaled_partials(mid_o, dtype) else hq
    if mid_lse.dim() != 2 or mid_lse.shape[1] != cols:
        raise ValueError(
            f"mid_lse has shape {tuple(mid_lse.shape)}, expected [rows, {cols}] for "
            f"{mid_o.dtype} partials of {dtype} inputs"
            + (" (log-sum-exps then shifts: see scaled_partials)" if cols != hq else ""))


def _check_index(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q is on {device}")


# One launch for both phases when the second has at most this many programs (vnodes x
# KV heads); see merge_phases.
MERGE_MAX_PROGRAMS = 4096
#: In CUDA graphs, run the two stage-1 launches of a plan whose phases are not merged
#: concurrently, on two streams (see :func:`_overlapped`). Measured on an H100
#: (benchmarks/RESULTS.md, v8): 1.02-1.05x under graph replay on the 20 benchmark
#: cases with two launches.
OVERLAP_PHASES = True


def merge_phases(phases: Sequence[Phase], group: int, num_kv_heads: int) -> bool:
    """Whether :func:`tree_decode` runs these two phases in one stage-1 launch.

    One launch saves a kernel launch and lets the second phase's programs fill the SMs
    while the first phase's long vnodes finish; but the kernel then holds the registers
    and shared memory of both tile shapes, which costs the many small programs of a
    large second phase occupancy. Measured on an H100 (benchmarks/RESULTS.md, v4): one
    launch was faster on every seed-suite case whose second phase had <= 3,200 programs
    and slower on every case with >= 8,192.
    """
    live = [ph for ph in phases if ph.num_vnodes > 0]
    if len(live) != 2 or live[1].vnode_offset != live[0].vnode_offset + live[0].num_vnodes:
        return False
    return live[1].num_vnodes * num_kv_heads <= MERGE_MAX_PROGRAMS


def _phase_list(phase) -> list[Phase]:
    phases = [phase] if isinstance(phase, Phase) else [p for p in phase]
    phases = [p for p in phases if p.num_vnodes > 0]
    if len(phases) > 2:
        raise ValueError(f"one stage-1 launch runs at most 2 phases, got {len(phases)}")
    if len(phases) == 2 and phases[1].vnode_offset != phases[0].vnode_offset + phases[0].num_vnodes:
        raise ValueError(
            f"the phases of one launch must be adjacent, got vnodes "
            f"[{phases[0].vnode_offset}, +{phases[0].num_vnodes}) and "
            f"[{phases[1].vnode_offset}, +{phases[1].num_vnodes})")
    return phases


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
    phase: Phase | Sequence[Phase],
    sm_scale: float,
    logit_cap: float = 0.0,
    num_warps: int | None = None,
    num_stages: int | None = None,
    vnode_slot0: torch.Tensor | None = None,
    o: torch.Tensor | None = None,
    req_mid_len: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
) -> None:
    """Launch stage 1 for one phase, or for two adjacent phases in one launch.

    Parameters
    ----------
    q : Tensor ``[B, Hq, D]`` (fp16 / bf16 / fp32), last dim contiguous.
    k, v : Tensor ``[S, Hk, D]``, same dtype as ``q``; rows are KV slots.
    mid_o : Tensor ``[R, Hq, D]``, float32 or ``q``'s dtype (or float16 for bfloat16
        ``q``, :func:`scaled_partials`): partial outputs (``R`` mid rows), stored
        normalised (divided by their softmax sum).
    mid_lse : Tensor ``[R, Hq]`` float32, base-2 log-sum-exp of each partial output
        (``[R, 2 * Hq]`` with scaled partials: the shifts follow).
    kv_indices, vnode_* , mid_q_rows : int32 index arrays (see the module docstring).
    phase : Phase or a sequence of at most two adjacent phases
        Which vnodes to run and their tile sizes; every vnode of a phase must have
        ``q_len <= phase.q_tile``. Two phases run in one launch, the first phase's
        programs first.
    sm_scale : float
        Softmax scale (usually ``1 / sqrt(D)``).
    logit_cap : float
        Soft cap of the scaled logits; ``<= 0`` disables it.
    vnode_slot0 : int32 Tensor ``[num_vnodes]``, optional
        ``vnode_slot0[v] >= 0`` promises that vnode ``v``'s slots are the contiguous run
        ``vnode_slot0[v] + [0, kv_len)``: its loop then computes slots instead of loading
        them. ``-1`` (or no tensor) reads ``kv_indices``.
    o, req_mid_len : optional, together
        *Direct* mode: a query row whose request has exactly one partial
        (``req_mid_len[r] == 1``) is written to ``o`` instead of the mid buffers (run
        stage 2 with ``skip_single=True``, or not at all when every request has one).
    kv_mask : int32 Tensor ``[len(kv_indices)]``, optional
        Row masks: query ``i`` of a vnode attends the vnode's KV entry ``j`` only where
        bit ``min(i, 31)`` of ``kv_mask[vnode_kv_start[v] + j]`` is set, so one vnode
        may hold the queries of up to 32 requests over the union of their contexts
        (entries every query attends carry -1). A query that sees none of its vnode's
        entries gets an empty partial (log-sum-exp ``-inf``).
    """
    _check_stats(mid_o, mid_lse, q.dtype)
    _stage1_launcher(q, k, v, mid_o, mid_lse, kv_indices, vnode_kv_start, vnode_kv_len,
                     vnode_q_start, vnode_q_len, mid_q_rows, phase, sm_scale, logit_cap,
                     num_warps, num_stages, vnode_slot0, o, req_mid_len,
                     kv_mask=kv_mask)(q, k, v, o)


def _stage1_launcher(q, k, v, mid_o, mid_lse, kv_indices, vnode_kv_start, vnode_kv_len,
                     vnode_q_start, vnode_q_len, mid_q_rows, phase, sm_scale, logit_cap=0.0,
                     num_warps=None, num_stages=None, vnode_slot0=None, o=None,
                     req_mid_len=None, pdl=False, finish=None, pdl_wait=False,
                     wait_at_end=False, kv_mask=None):
    """Everything :func:`tree_decode_stage1` decides, done once: returns
    ``launch(q, k, v, o)``, which launches stage 1 for tensors of the same dtypes,
    shapes and strides as the ones given here (the other tensors are bound).
    ``pdl``: its programs let a programmatic dependent launch (stage 2) start early.
    ``finish = (req_mid_start, req_mid_rows)`` (one phase, direct mode): the launch is
    the plan's last and merges each request's partials itself (see
    :func:`tree_decode_launcher`); ``pdl_wait``: it is a programmatic dependent launch of
    the launch before it; ``wait_at_end``: it is a programmatic dependent launch of the
    launch before it whose programs wait for that launch only at their end."""
    if (o is None) != (req_mid_len is None):
        raise ValueError("o and req_mid_len go together (direct mode)")
    phases = _phase_list(phase)
    if not phases:
        return _Stage1([], [], False)
    if kv_mask is not None and not any(ph.masked for ph in phases):
        kv_mask = None  # every entry of these phases attends every query
    if finish is not None and (o is None or len(phases) != 1):
        raise ValueError("a finishing launch runs one phase in direct mode")
    hq, d = q.shape[1], q.shape[2]
    hk = k.shape[1]
    group = hq // hk
    esz = q.element_size()
    blocks = []
    for ph in phases:
        bm, bn, bd = stage1_block_sizes(ph.q_tile, ph.kv_tile, group, d, esz)
        if bm > MAX_BLOCK_M and ph.q_tile > 1:
            raise ValueError(
                f"q_tile {ph.q_tile} x group {group} = {ph.q_tile * group} rows exceeds "
                f"{MAX_BLOCK_M}; use a smaller q tile")
        blocks.append((bm, bn, bd))
    two = len(phases) == 2 and blocks[0] != blocks[1]
    use_cap = logit_cap is not None and logit_cap > 0
    qk_scale = sm_scale if use_cap else sm_scale * LOG2E
    # Triton's CPU interpreter multiplies bf16 bit patterns in tl.dot (upstream issue
    # #11584): there, bf16 operands are upcast to fp32 first.
    upcast = q.dtype == torch.bfloat16 and q.device.type == "cpu"
    precision = "ieee" if (q.dtype == torch.float32 or upcast) else "tf32"
    warps_arg, stages_arg = num_warps, num_stages
    launches = [default_launch(*blk, group=group) for blk in blocks]
    total = sum(ph.num_vnodes for ph in phases)
    few_finish = finish is not None and _few_programs(total * hk)
    if num_warps is None:
        num_warps = max(w for w, _ in launches)
        if few_finish:
            num_warps = max(num_warps, int(FEW_FINISH_WARPS))
    if num_stages is None:
        num_stages = min(st for _, st in launches)
    # Shared memory (stage1_shared_bytes): keep the estimate under the budget with fewer
    # pipeline stages, else launch the phases separately.
    block_d = blocks[0][2]
    shapes = set(blocks) if two else {blocks[0]}

    def smem(stages):
        return stage1_shared_bytes(shapes, stages, esz)

    while num_stages > 1 and smem(num_stages) > SMEM_BUDGET:
        num_stages -= 1
    if two and smem(num_stages) > SMEM_BUDGET:
        parts = [_stage1_launcher(q, k, v, mid_o, mid_lse, kv_indices, vnode_kv_start,
                                  vnode_kv_len, vnode_q_start, vnode_q_len, mid_q_rows, ph,
                                  sm_scale, logit_cap, warps_arg, stages_arg, vnode_slot0, o,
                                  req_mid_len, pdl, kv_mask=kv_mask) for ph in phases]
        return _Stage1([part.kernels[0] for part in parts], [(0,), (1,)], o is not None)
    first = phases[0]
    slot0 = vnode_slot0 if vnode_slot0 is not None else vnode_kv_start
    direct = o is not None
    out = o if direct else q
    count = req_mid_len if direct else vnode_q_len
    strides = (
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        mid_o.stride(0), mid_o.stride(1),
        mid_lse.stride(0),
        out.stride(0), out.stride(1),
        first.vnode_offset,
        first.num_vnodes,
        float(qk_scale),
        float(logit_cap if use_cap else 0.0),
    )
    consts = dict(
        GROUP=group, HEAD_DIM=d, BLOCK_D=block_d,
        BLOCK_M0=blocks[0][0], BLOCK_N0=blocks[0][1],
        BLOCK_M1=blocks[-1][0], BLOCK_N1=blocks[-1][1], TWO_SHAPES=two,
        USE_CAP=use_cap, DOT_PRECISION=precision, UPCAST=upcast,
        HAS_SLOT0=vnode_slot0 is not None, DIRECT=direct,
        OFF32=_offsets_fit_int32(k) and _offsets_fit_int32(v), PDL_TRIGGER=bool(pdl),
        FINISH=finish is not None, PDL_WAIT=bool(pdl_wait), WAIT_AT_END=bool(wait_at_end),
        HAS_MASK=kv_mask is not None, SCALED=scaled_partials(mid_o, q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    if pdl_wait or wait_at_end:
        consts["launch_pdl"] = True
    cap = _register_cap(blocks if two else blocks[:1], num_warps, q.device.type,
                        few_finish=few_finish)
    if cap is not None:
        consts["maxnreg"] = cap

    kernel = _KernelLaunch(
        _stage1_kernel, (total, hk),
        (q, k, v, mid_o, mid_lse, o if direct else q, count)
        + (tuple(finish) if finish is not None else (count, count))
        + (kv_indices, vnode_kv_start, vnode_kv_len, vnode_q_start, vnode_q_len,
           mid_q_rows, slot0, kv_mask if kv_mask is not None else kv_indices) + strides,
        consts, slots=(0, 1, 2, 5))
    return _Stage1([kernel], [tuple(range(len(phases)))], direct)


class _Stage1:
    """The stage-1 launches of one group of phases (:func:`_stage1_launcher`): one
    kernel launch, or one per phase where the two tile shapes do not fit one kernel's
    shared memory. ``parts[i]`` gives the positions, in the group, of the phases that
    ``kernels[i]`` runs; ``direct``: the launches write the output (else they get ``q``
    in its place)."""

    __slots__ = ("kernels", "parts", "direct")

    def __init__(self, kernels, parts, direct):
        self.kernels = kernels
        self.parts = parts
        self.direct = direct

    def __call__(self, q, k, v, o):
        out = o if self.direct else q
        for kernel in self.kernels:
            kernel(q, k, v, out)

    def resized(self, phases) -> "_Stage1":
        """These launches for ``phases`` (the group's phases of another plan: same
        count, tile shapes and masking, other sizes): the grids and the size arguments
        (:data:`STAGE1_SIZE_ARGS`) change, nothing else."""
        kernels = []
        for kernel, part in zip(self.kernels, self.parts):
            first = phases[part[0]]
            kernels.append(kernel.resized(
                sum(phases[i].num_vnodes for i in part), _STAGE1_SIZE_POS,
                (first.vnode_offset, first.num_vnodes)))
        return _Stage1(kernels, self.parts, self.direct)


#: A finishing stage-1 launch (the merge in phase 1) of at most this many programs
#: (vnodes x KV heads; 0: none) runs on at least :data:`FEW_FINISH_WARPS` warps instead
#: of :func:`default_launch`'s one or two for its small tiles: with few programs each
#: one's merge of the earlier partials is the call's tail. Measured on an H100
#: (benchmarks/RESULTS.md, v16): 4 warps 0.92-0.95x replayed on the three finishing
#: plans of 256 programs; 1.04-1.24x slower on those of 1,024 and more.
FEW_FINISH_MAX_PROGRAMS = 256
FEW_FINISH_WARPS = 4
#: Whether such a finishing launch keeps the wide tiles' register cap
#: (:data:`WIDE_TILE_MAX_REGISTERS`). False: it runs uncapped. Its programs (at most
#: 256 on 132 SMs) fit without the cap, which only made them spill: the finishing
#: launch of the speculative-decoding case at 32/8 (64-row tiles, 168 programs) spills
#: 232 bytes a thread under the cap and none without it (compiled for sm_90 with
#: Triton 3.6, ``python -m benchmarks.compile_report``). Measured on an H100
#: (benchmarks/RESULTS.md, v38): that case 0.84x of its time replayed, 0.87x eager; no
#: other launch of the 51 benchmark cases changes.
FEW_FINISH_REGISTER_CAP = False


def _few_programs(programs: int) -> bool:
    """Whether a finishing launch of ``programs`` programs (vnodes x KV heads) counts as
    few (:data:`FEW_FINISH_MAX_PROGRAMS`): more warps, and no register cap."""
    return bool(FEW_FINISH_MAX_PROGRAMS and programs <= FEW_FINISH_MAX_PROGRAMS)

#: Prepared launches call Triton's compiled kernel directly after their first call
#: (:class:`_KernelLaunch`); False: every call goes through the JIT. Measured on an
#: H100 host (benchmarks/RESULTS.md, v10): 62 -> 26 us of host time per eager call of a
#: small plan (two launches).
FAST_LAUNCH = True

try:  # Triton >= 3.4; without it every launch goes through the JIT
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton
    _knobs = None


def _hooks_active() -> bool:
    """Whether Triton has launch hooks set (profilers): ``None`` or an empty hook chain
    (what Triton >= 3.6 holds when none is set) are inactive."""
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


#: Compiled kernels of earlier prepared launches, by :func:`_specialisation` (at most
#: :data:`REUSE_MAX` kept; 0: none). A new launch set whose launch has the key of an
#: earlier one takes its compiled kernel instead of calling the JIT first: a plan of
#: other sizes but the same tiles, modes and buffers (a decode loop whose tree changes
#: shape every step). Measured on an H100 host (benchmarks/RESULTS.md, v27).
REUSE_MAX = 256
_COMPILED: dict = {}


def _specialisation(fn, args, consts, device) -> tuple | None:
    """A key at least as fine as the one Triton's JIT compiles a kernel under: the
    kernel, the device, the compile-time constants and options, and per runtime
    argument its kind with, for a tensor, its dtype and address modulo 16, for an
    integer, its value modulo 16, whether it is 0 or 1 and its integer range (the JIT
    specialises integers equal to 1 and on divisibility by 16, tensors on 16-byte
    alignment, and types integers by range). None where an argument is of another
    kind (no reuse)."""
    key = [fn, device, tuple(sorted(consts.items()))]
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() & 15))
        elif a is None or isinstance(a, bool):
            key.append(a)
        elif isinstance(a, int):
            key.append((a & 15, a == 0, a == 1, -2 ** 31 <= a < 2 ** 31, a < 2 ** 63))
        elif isinstance(a, float):
            key.append(float)
        else:
            return None
    key = tuple(key)
    try:
        hash(key)
    except TypeError:  # a constant that cannot be a key
        return None
    return key


def _alignment(args) -> list:
    """Whether each per-call tensor's address is 16-byte aligned (None for a scalar:
    per-call scalars must be parameters the kernel does not specialise on)."""
    return [t.data_ptr() % 16 == 0 if isinstance(t, torch.Tensor) else None for t in args]


class _KernelLaunch:
    """One prepared launch of a Triton kernel: fixed grid, arguments, compile-time
    constants and options; ``slots`` are the positions of the arguments given per call
    (tensors of the same dtype, shape and strides as the ones given here).

    The first call goes through the JIT, which compiles (or finds) the kernel
    specialised for these arguments and returns it, unless an earlier launch's first
    call had the same :func:`_specialisation` key: then it takes that compiled kernel
    (see :data:`REUSE_MAX`). Later calls launch that compiled kernel directly, with
    the arguments in signature order, as the JIT itself would: this skips its
    per-call argument binding, specialisation key and cache lookup
    (tens of microseconds of host time for stage 1's ~40 arguments). Of the per-call
    tensors the JIT specialises on their dtypes (the caller keeps those fixed) and on
    whether their addresses are 16-byte aligned (a per-call integer must be one of the
    kernel's ``do_not_specialize`` parameters): the direct path is taken only while
    that alignment, the current device and the absence of launch hooks (profilers)
    are as on the first call, and only on CUDA; anything else goes through the JIT.
    The direct path passes the bound tensors as their addresses, taken on the first
    call (the launcher would otherwise read and check each one's address on every
    call); the launch keeps the tensors, and their storage must stay where it is, as
    for a captured CUDA graph.
    """

    __slots__ = ("fn", "grid", "args", "consts", "slots", "tail", "compiled", "aligned",
                 "all_aligned", "device", "fast_calls", "fast_args", "driver")

    def __init__(self, fn, grid, args, consts, slots):
        self.fn = fn
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.slots = tuple(slots)
        # The per-call slots are not kept between calls (no reference to the caller's
        # tensors outlives a call).
        self.args = [None if i in self.slots else a for i, a in enumerate(args)]
        self.consts = consts
        # The constexpr arguments, in signature order after the positional ones.
        names = fn.arg_names[len(self.args):]
        self.tail = (tuple(consts[n] for n in names)
                     if all(n in consts for n in names) else None)
        self.compiled = None
        self.aligned = None
        self.all_aligned = False  # every per-call value was an aligned tensor
        self.device = None
        self.fast_calls = 0  # calls that took the direct path (tests read it)
        # ``args`` with the bound tensors as addresses, then the constexpr tail.
        self.fast_args = None
        self.driver = None  # (current device, current stream) functions

    def __call__(self, *tensors):
        ck = self.compiled
        if ck is not None and FAST_LAUNCH and not _hooks_active():
            if self.all_aligned:
                bits = 0
                for t in tensors:
                    bits |= t.data_ptr()
                same = not bits & 15
            else:
                same = _alignment(tensors) == self.aligned
            if same:
                current_device, current_stream = self.driver
                device = current_device()
                if device == self.device:
                    args = self.fast_args.copy()
                    for i, t in zip(self.slots, tensors):
                        args[i] = t
                    g0, g1, g2 = self.grid
                    ck.run(g0, g1, g2, current_stream(device), ck.function,
                           ck.packed_metadata, None, None, None, *args)
                    self.fast_calls += 1
                    return
        args = self.args.copy()
        for i, t in zip(self.slots, tensors):
            args[i] = t
        first = (ck is None and FAST_LAUNCH and _knobs is not None and self.tail is not None
                 and tensors and tensors[0].device.type == "cuda")
        key = None
        if first and REUSE_MAX and not _hooks_active():
            key = _specialisation(self.fn, args, self.consts,
                                  triton.runtime.driver.active.get_current_device())
            found = _COMPILED.get(key) if key is not None else None
            if found is not None:
                self._bind(found, tensors)
                self(*tensors)
                return
        out = self.fn[self.grid](*args, **self.consts)
        if first and all(hasattr(out, a) for a in ("run", "function", "packed_metadata")):
            self._bind(out, tensors)
            if key is not None:
                if len(_COMPILED) >= REUSE_MAX:
                    _COMPILED.pop(next(iter(_COMPILED)))  # the oldest
                _COMPILED[key] = out

    def resized(self, grid0: int, positions, values) -> "_KernelLaunch":
        """This launch with ``grid0`` programs along the grid's first dimension and
        ``values`` as the arguments at ``positions``. It keeps the compiled kernel of this
        one (and its direct path) where every argument replaced is an integer the kernel
        does not specialise on (``do_not_specialize``) and the old and the new values are
        both 32-bit integers (the type the JIT gives them); otherwise its first call
        goes through the JIT as a new launch's does."""
        new = object.__new__(_KernelLaunch)
        # Every field (__slots__), the grid and the call count set anew.
        new.fn = self.fn
        new.slots = self.slots
        new.consts = self.consts
        new.tail = self.tail
        new.compiled = self.compiled
        new.aligned = self.aligned
        new.all_aligned = self.all_aligned
        new.device = self.device
        new.fast_args = self.fast_args
        new.driver = self.driver
        new.grid = (int(grid0),) + self.grid[1:]
        new.fast_calls = 0
        args = new.args = self.args.copy()
        params = getattr(self.fn, "params", None)
        keep = self.fast_args is not None and params is not None
        for i, value in zip(positions, values):
            keep = (keep and getattr(params[i], "do_not_specialize", False)
                    and _is_int32(args[i]) and _is_int32(value))
            args[i] = value
        if keep:
            fast = new.fast_args = self.fast_args.copy()
            for i, value in zip(positions, values):
                fast[i] = value
        else:
            new.compiled = new.fast_args = new.aligned = new.device = new.driver = None
            new.all_aligned = False
        return new

    def _bind(self, compiled, tensors) -> None:
        """Take ``compiled`` for the direct path, for per-call tensors like ``tensors``."""
        drv = triton.runtime.driver.active
        self.compiled = compiled
        self.aligned = _alignment(tensors)
        self.all_aligned = all(a is True for a in self.aligned)
        self.driver = (drv.get_current_device, drv.get_current_stream)
        self.device = drv.get_current_device()
        self.fast_args = [a.data_ptr() if isinstance(a, torch.Tensor) else a
                          for a in self.args] + list(self.tail)


def _is_int32(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and -2 ** 31 <= x < 2 ** 31


#: Largest element offset (exclusive) that stage 1 computes in 32-bit arithmetic.
OFF32_LIMIT = 2 ** 31
#: Register cap per thread of a stage-1 launch of one tile shape with >= 64 rows and
#: 4 warps (the shared-prefix phase; None or 0: the compiler's choice). Such a program
#: needed 141 registers on an H100 (3 programs per SM); at 128, 4 fit. Measured
#: (benchmarks/RESULTS.md, v8): that phase 1.2-1.4x faster on the 32/8 and 32/32 trees;
#: the same cap on the small-tile phase made it slower, so it is not applied there.
WIDE_TILE_MAX_REGISTERS = 128


def _register_cap(shapes, num_warps: int, device_type: str,
                  few_finish: bool = False) -> int | None:
    """``maxnreg`` of a stage-1 launch: :data:`WIDE_TILE_MAX_REGISTERS` for a CUDA
    launch of one tile shape ``(BLOCK_M, BLOCK_N, BLOCK_D)`` with >= 64 rows and a head
    dim of at most 128 on 4 warps (one warpgroup per program, the shared-prefix
    phase), else None (a 256-wide accumulator alone needs 128 registers a thread).
    ``few_finish``: a finishing launch of few programs (:func:`_few_programs`), the
    plan's last with at most two programs an SM, where the cap would only make it
    spill: None unless :data:`FEW_FINISH_REGISTER_CAP`."""
    if (not WIDE_TILE_MAX_REGISTERS or device_type != "cuda" or len(set(shapes)) != 1
            or shapes[0][0] < 64 or shapes[0][2] > 128 or num_warps != 4
            or (few_finish and not FEW_FINISH_REGISTER_CAP)):
        return None
    return int(WIDE_TILE_MAX_REGISTERS)


def _offsets_fit_int32(t: torch.Tensor) -> bool:
    """Whether every element offset of ``t`` (from its first element) is < OFF32_LIMIT."""
    if t.numel() == 0:
        return True
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return span <= OFF32_LIMIT


def stage2_blocks(num_requests: int, num_heads: int, head_dim: int) -> tuple[int, int, int]:
    """``(BLOCK_H, BLOCK_P, num_warps)`` of a stage-2 launch: one program per (request,
    BLOCK_H heads), BLOCK_P partials per step.

    Measured on an H100 (``python -m benchmarks.sweep --stage2``, every benchmark case;
    benchmarks/RESULTS.md, v5): one warp always; one head and 8 partials a step when
    one head per program gives fewer than 1,024 programs (few requests, many partials
    each); 4 heads and 2 partials for >= 512 requests of <= 16 heads; otherwise 2 heads
    and 4 partials. This rule is within 3% of the best shape per case on the geomean
    (the previous fixed shape, 1 head and 8 partials: 25%).
    """
    if num_requests * num_heads < 1024:
        block_h, block_p = 1, 8
    elif num_requests >= 512 and num_heads <= 16:
        block_h, block_p = 4, 2
    else:
        block_h, block_p = 2, 4
    block_h = min(block_h, next_pow2(num_heads))
    return block_h, block_p, 1


def tree_decode_stage2(
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    o: torch.Tensor,
    req_mid_start: torch.Tensor,
    req_mid_len: torch.Tensor,
    req_mid_rows: torch.Tensor,
    skip_single: bool = False,
    block_h: int | None = None,
    block_p: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Merge each request's partial outputs into ``o`` ``[B, Hq, D]`` (in place).

    A request with no mid rows (an empty context) gets zeros. ``skip_single``: leave the
    rows of requests with exactly one partial alone (stage 1 wrote them, ``direct``).
    ``block_h`` (heads per program), ``block_p`` (partials per step) and ``num_warps``
    default to :func:`stage2_blocks`. float16 partials for a bfloat16 ``o`` are read as
    scaled (:func:`scaled_partials`).
    """
    _check_stats(mid_o, mid_lse, o.dtype)
    _stage2_launcher(mid_o, mid_lse, o, req_mid_start, req_mid_len, req_mid_rows,
                     skip_single, block_h, block_p, num_warps)(o)


def _stage2_launcher(mid_o, mid_lse, o, req_mid_start, req_mid_len, req_mid_rows,
                     skip_single=False, block_h=None, block_p=None, num_warps=None,
                     pdl=False):
    """What :func:`tree_decode_stage2` decides, done once: returns ``launch(o)`` for
    outputs of the same shape and strides as ``o``. ``pdl``: launched as a programmatic
    dependent of the kernel before it (CUDA, compute capability >= 9: see
    :data:`DEPENDENT_LAUNCH`)."""
    b, hq, d = o.shape
    if b == 0:
        return lambda o: None
    block_d = max(16, next_pow2(d))
    auto_h, auto_p, auto_w = stage2_blocks(b, hq, d)
    block_h = auto_h if block_h is None else int(block_h)
    block_p = auto_p if block_p is None else int(block_p)
    num_warps = auto_w if num_warps is None else int(num_warps)
    args = (mid_o, mid_lse, o, req_mid_start, req_mid_len, req_mid_rows,
            mid_o.stride(0), mid_o.stride(1),
            mid_lse.stride(0),
            o.stride(0), o.stride(1),
            hq)
    consts = dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_P=block_p,
                  SKIP_SINGLE=bool(skip_single), PDL_WAIT=bool(pdl),
                  SCALED=scaled_partials(mid_o, o.dtype), num_warps=num_warps, num_stages=2)
    if pdl:
        consts["launch_pdl"] = True
    return _KernelLaunch(_stage2_kernel, (b, triton.cdiv(hq, block_h)), args, consts,
                         slots=(2,))


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
    vnode_slot0: torch.Tensor | None = None,
    direct: bool = False,
    needs_stage2: bool = True,
    finish: bool = False,
    kv_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tree decode attention: stage 1 (one launch, or one per phase: see
    :func:`merge_phases`), then stage 2.

    ``direct``: stage 1 writes the output of requests with exactly one partial itself
    and stage 2 skips them; ``needs_stage2=False`` (only with ``direct``, when every
    request has exactly one partial) skips the stage-2 launch. ``finish`` (two phases,
    every request with exactly one partial in the second): no stage 2; the second phase
    merges (see :func:`tree_decode_launcher`).

    Writes ``o``. ``vnode_slot0`` is the optional contiguity hint and ``kv_mask`` the
    optional row masks of :func:`tree_decode_stage1`; ``mid_o`` may be float32 or
    ``q``'s dtype, or float16 for bfloat16 ``q`` (:func:`scaled_partials`).

    Shapes: ``q``, ``o`` ``[B, Hq, D]``; ``k``, ``v`` ``[S, Hk, D]`` with ``Hq % Hk == 0``;
    ``mid_o`` ``[R, Hq, D]``; ``mid_lse`` ``[R, Hq]`` float32 (``[R, 2 * Hq]`` with scaled
    partials), where ``R`` is at least the number of mid rows the vnodes use. Returns ``o``.
    """
    if check:
        _check_args(q, k, v, o, mid_o, mid_lse)
        for name, t in (
            ("kv_indices", kv_indices), ("vnode_kv_start", vnode_kv_start),
            ("vnode_kv_len", vnode_kv_len), ("vnode_q_start", vnode_q_start),
            ("vnode_q_len", vnode_q_len), ("mid_q_rows", mid_q_rows),
            ("req_mid_start", req_mid_start), ("req_mid_len", req_mid_len),
            ("req_mid_rows", req_mid_rows),
        ) + ((("vnode_slot0", vnode_slot0),) if vnode_slot0 is not None else ()) + (
                (("kv_mask", kv_mask),) if kv_mask is not None else ()):
            _check_index(name, t, q.device)
    tree_decode_launcher(
        q, k, v, o, kv_indices=kv_indices, vnode_kv_start=vnode_kv_start,
        vnode_kv_len=vnode_kv_len, vnode_q_start=vnode_q_start, vnode_q_len=vnode_q_len,
        mid_q_rows=mid_q_rows, req_mid_start=req_mid_start, req_mid_len=req_mid_len,
        req_mid_rows=req_mid_rows, mid_o=mid_o, mid_lse=mid_lse, phases=phases,
        sm_scale=sm_scale, logit_cap=logit_cap, vnode_slot0=vnode_slot0, direct=direct,
        needs_stage2=needs_stage2, finish=finish, kv_mask=kv_mask)(q, k, v, o)
    return o


def runs_stage2(direct: bool, needs_stage2: bool, finish: bool) -> bool:
    """Whether a decode with these launch modes (``DecodePlan.launch_modes``) launches
    stage 2: not when phase 1 merges (``finish``), nor when every request's output is
    written directly by stage 1 (``direct`` without ``needs_stage2``)."""
    return not finish and (needs_stage2 or not direct)


def tree_decode_launcher(
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
    vnode_slot0: torch.Tensor | None = None,
    direct: bool = False,
    needs_stage2: bool = True,
    overlap: bool | None = None,
    finish: bool = False,
    kv_mask: torch.Tensor | None = None,
):
    """Prepare every launch of :func:`tree_decode` once (launch grouping, tile and
    launch sizes, strides, compile-time constants) and return ``launch(q, k, v, o)``.

    ``launch`` may be called again with other tensors of the same dtypes, shapes and
    strides as the ``q``, ``k``, ``v``, ``o`` given here; the index tensors and mid
    buffers are bound (on CUDA as their addresses after the first call: their storage
    must not be replaced in place). Arguments are not checked (see
    :func:`tree_decode`). A plan keeps these per tensor layout (``DecodePlan.run``), so
    repeated calls skip the Python work. ``launch.resized(other_phases)`` gives the
    launches of a plan over the same tensors whose phases differ only in their sizes
    (:func:`launch_form`; None otherwise) without building them again.

    ``overlap`` (default :data:`OVERLAP_PHASES`): on CUDA, when the two stage-1 phases
    run as two launches, a CUDA graph captured from ``launch`` runs them concurrently
    (see :func:`_overlapped`; the result is the same bits either way).

    ``finish``: the plan has two phases and every request has exactly one partial in the
    second (``direct`` and ``needs_stage2`` are then not read). There is no stage 2: the
    first phase is launched alone, and the second phase's programs merge each of their
    requests' partials from the first with their own and write the output (a
    programmatic dependent launch where available: its programs compute their own
    partials while the first launch ends, then wait for it). The merge order differs
    from stage 2's, so the result may differ in the last bits.

    On CUDA devices of compute capability >= 9 two stage-1 launches are chained
    (:data:`CHAIN_PHASES`) instead of overlapped on two streams.
    """
    group, hk = q.shape[1] // k.shape[1], k.shape[1]
    groups = _phase_groups(phases, group, hk, finish)
    dependent_ok = _dependent_launch_ok(q.device)
    with_stage2 = runs_stage2(direct, needs_stage2, finish)
    chained = not finish and len(groups) == 2 and CHAIN_PHASES and dependent_ok
    pdl = (with_stage2 or chained or finish) and bool(groups) and dependent_ok

    def stage1_launcher(i, grp):
        # With finish: the first launch keeps every partial, the last one merges.
        finishing = finish and i == 1
        writes_out = finishing or (direct and not finish)
        return _stage1_launcher(
            q, k, v, mid_o, mid_lse, kv_indices, vnode_kv_start, vnode_kv_len,
            vnode_q_start, vnode_q_len, mid_q_rows, grp, sm_scale, logit_cap,
            vnode_slot0=vnode_slot0, o=o if writes_out else None,
            req_mid_len=req_mid_len if writes_out else None,
            pdl=pdl and (i == 0 or with_stage2), wait_at_end=chained and i == 1,
            finish=(req_mid_start, req_mid_rows) if finishing else None,
            pdl_wait=pdl and finishing, kv_mask=kv_mask)

    stage1 = [stage1_launcher(i, grp) for i, grp in enumerate(groups)]
    stage2 = None
    if with_stage2:
        stage2 = _stage2_launcher(mid_o, mid_lse, o, req_mid_start, req_mid_len, req_mid_rows,
                                  skip_single=direct, pdl=pdl)
    if overlap is None:
        overlap = OVERLAP_PHASES
    overlap = (overlap and not (chained or finish) and len(stage1) == 2
               and q.device.type == "cuda")
    return _LaunchSet(launch_form(phases, group, hk, finish), (group, hk, finish),
                      stage1, stage2, q.device if overlap else None)


def _phase_groups(phases, group: int, num_kv_heads: int, finish: bool,
                  merged: bool | None = None) -> list:
    """The phases of each stage-1 launch group of :func:`tree_decode_launcher`
    (``merged``: whether the phases share one launch, as :func:`launch_form` found; None:
    decided here)."""
    live = [ph for ph in phases if ph.num_vnodes > 0]
    if finish:
        if len(live) != 2:
            raise ValueError(f"finish needs two phases, got {len(live)}")
        return [[ph] for ph in live]
    if merged is None:
        merged = merge_phases(live, group, num_kv_heads)
    if merged:
        return [live]
    return [[ph] for ph in live]


def launch_form(phases: Sequence[Phase], group: int, num_kv_heads: int,
                finish: bool = False) -> tuple:
    """What :func:`tree_decode_launcher` decides from ``phases``, less their sizes: the
    tile shapes and masking of the non-empty phases, how they are grouped into launches
    and whether a finishing launch takes :data:`FEW_FINISH_WARPS` (and, unless
    :data:`FEW_FINISH_REGISTER_CAP`, runs without the register cap). Plans whose phases
    have the same form (and the same tensors and modes) get the same launches but for
    the grids and the vnode offsets and counts passed to them: see
    :meth:`_LaunchSet.resized`."""
    live = [ph for ph in phases if ph.num_vnodes > 0]
    merged = not finish and merge_phases(live, group, num_kv_heads)
    few = bool(finish and len(live) == 2 and _few_programs(live[1].num_vnodes * num_kv_heads))
    return (tuple((ph.q_tile, ph.kv_tile, bool(ph.masked)) for ph in live), merged, few)


class _LaunchSet:
    """The prepared launches of :func:`tree_decode` (what :func:`tree_decode_launcher`
    returns): call it as ``launch(q, k, v, o)``. ``form`` is :func:`launch_form` of the
    phases it was built for, ``shape`` the ``(group, num_kv_heads, finish)`` it was
    built with; ``stage1`` holds one :class:`_Stage1` per launch group."""

    __slots__ = ("form", "shape", "stage1", "stage2", "overlap_device", "_calls",
                 "_overlapped")

    def __init__(self, form, shape, stage1, stage2, overlap_device):
        self.form = form
        self.shape = shape
        self.stage1 = stage1
        self.stage2 = stage2
        self.overlap_device = overlap_device
        # The kernel launches in order, each with whether it takes the output (else q).
        self._calls = tuple((kernel, part.direct) for part in stage1
                            for kernel in part.kernels)
        self._overlapped = (None if overlap_device is None else
                            _overlapped(self._sequential, stage1, stage2, overlap_device))

    def __call__(self, q, k, v, o):
        if self._overlapped is not None:
            self._overlapped(q, k, v, o)
        else:
            self._sequential(q, k, v, o)

    def _sequential(self, q, k, v, o):
        for kernel, direct in self._calls:
            kernel(q, k, v, o if direct else q)
        if self.stage2 is not None:
            self.stage2(o)

    def resized(self, phases: Sequence[Phase], form: tuple | None = None) -> "_LaunchSet | None":
        """This set for a plan whose ``phases`` have other sizes but the same
        :func:`launch_form` (else None), over the same tensors and modes: the grids and
        the vnode offsets and counts change, and the compiled kernels stay bound (no
        JIT call, no argument binding), which costs a few microseconds of host time
        where building a set and its first launches cost a few hundred on a plan of
        many vnodes. The result equals what :func:`tree_decode_launcher` would build.
        ``form``: ``launch_form(phases, ...)`` where the caller has it already."""
        group, hk, finish = self.shape
        if form is None:
            form = launch_form(phases, group, hk, finish)
        if form != self.form:
            return None
        groups = _phase_groups(phases, group, hk, finish, merged=form[1])
        stage1 = [part.resized(grp) for part, grp in zip(self.stage1, groups)]
        return _LaunchSet(self.form, self.shape, stage1, self.stage2, self.overlap_device)


#: Where the two stage-1 phases are two launches, the second is a programmatic
#: dependent launch of the first (CUDA, compute capability >= 9): it starts once every
#: program of the first has started, runs beside it, and its programs wait for the first
#: launch only at their end, so eager calls overlap the phases too (graphs otherwise
#: overlap them on two streams, :data:`OVERLAP_PHASES`).
CHAIN_PHASES = True

#: Stage 2 is launched as a programmatic dependent of stage 1 (CUDA, compute capability
#: >= 9): its launch and start overlap the end of stage 1, and its programs wait for
#: stage 1's partials with ``griddepcontrol.wait`` before reading them. False: a plain
#: launch after stage 1. Measured on an H100 (benchmarks/RESULTS.md, v10): 1.01x under
#: graph replay, 1.03x on eager calls (geomean of the 45 seed cases); same bits. The
#: full runs' ablations put it within noise under replay (0.993x-1.004x).
DEPENDENT_LAUNCH = True


_MAJOR: dict = {}  # compute capability's major version by CUDA device index


def _dependent_launch_ok(device: torch.device) -> bool:
    """Whether stage 2 may be a programmatic dependent launch on ``device``."""
    if not (DEPENDENT_LAUNCH and device.type == "cuda"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    major = _MAJOR.get(index)
    if major is None:
        major = _MAJOR[index] = torch.cuda.get_device_capability(index)[0]
    return major >= 9


def _overlapped(sequential, stage1, stage2, device):
    """While a CUDA graph is being captured, launch ``stage1[0]`` on a side stream and
    ``stage1[1]`` on the caller's stream, then join them before stage 2: the graph
    holds the two launches as parallel branches, so phase 0 (few long programs on the
    shared prefixes, bound by tensor-core throughput) and phase 1 (many short programs
    on the leaves, bound by memory) share the GPU instead of running one after the
    other. The side stream waits for the caller's stream first and the caller's stream
    waits for the side stream before stage 2, so the call is ordered like one on a
    single stream. Eager calls run ``sequential`` on the caller's stream (the stream
    switch and events cost more host time than the overlap saves there). The side
    stream and the events are made at the first capture: eager-only and one-shot uses
    (:func:`tree_decode`) never pay for them."""
    first, second = stage1
    index = device.index if device.index is not None else torch.cuda.current_device()
    made = []  # (side stream, fork event, join event), once captured

    def launch(q, k, v, o):
        if not torch.cuda.is_current_stream_capturing():
            # Eager: one stream. The stream switch and the events cost ~30-40 us of
            # host time on the benchmark machine, more than the overlap gains there.
            sequential(q, k, v, o)
            return
        if not made:
            made.append((torch.cuda.Stream(device=device), torch.cuda.Event(),
                         torch.cuda.Event()))
        side, fork, join = made[0]
        main = torch.cuda.current_stream(index)
        fork.record(main)
        side.wait_event(fork)
        torch.cuda.set_stream(side)  # Triton launches on torch's current stream
        try:
            first(q, k, v, o)
        finally:
            torch.cuda.set_stream(main)
        join.record(side)
        second(q, k, v, o)
        main.wait_event(join)
        if stage2 is not None:
            stage2(o)

    return launch


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
    scaled = scaled_partials(mid_o, q.dtype)
    if ((mid_o.dtype not in (torch.float32, q.dtype) and not scaled)
            or mid_lse.dtype != torch.float32):
        raise ValueError(
            f"mid_o must be float32 or q's dtype {q.dtype} (or float16 for bfloat16 q; got "
            f"{mid_o.dtype}) and mid_lse float32 (got {mid_lse.dtype})")
    if mid_o.shape[1:] != q.shape[1:]:
        raise ValueError(
            f"mid_o {tuple(mid_o.shape)} does not match q's heads and head_dim "
            f"{tuple(q.shape[1:])}")
    _check_stats(mid_o, mid_lse, q.dtype)
