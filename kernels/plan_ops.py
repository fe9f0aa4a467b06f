"""Small Triton kernels that write plan index arrays on the device.

A plan's index arrays live in one int32 device buffer (``treecache.plan.PlanBuffers``).
Two jobs there would otherwise take several torch operations (each one a launch and
host time) or a per-token host loop:

* :func:`expand_runs`: ``kv_indices`` of a plan whose slots are runs ``start + [0, len)``
  (a contiguous plan), expanded from a table of runs that was copied to the device with
  the rest of the plan: one launch, the host's work stays O(runs). With a slot table
  (a cache's plan) the runs are ranges of that table, gathered on the device, and the
  entries' row masks of a masked plan are written there too. The launch may also read
  the tables from the pinned staging buffer in place and copy the plan's small arrays
  from it, so that a plan's upload is one launch and no copy.
* :func:`grow_tails_launcher`: the append-only step of a cache (every request appends one
  token): the new slot goes to the end of each request's tail vnode (in rank order
  where several requests share the vnode's range, with their row masks) and the
  vnode's length grows, from device-resident tail positions: one launch, no per-step
  host-to-device copy besides the slots themselves.
* :func:`grow_tails_stack_launcher`: the same step when every request's new slot starts
  a fresh page (always so at page size 1): the slots are read from a device mirror of
  the page allocator's free stack, so the step copies nothing from the host.

The expansion and both tail steps are prepared launches
(:class:`kernels.tree_decode._KernelLaunch`) on CUDA: after the first call the compiled
kernel is launched directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tree_decode import _KernelLaunch

__all__ = ["RUN_FIELDS", "expand_runs", "expand_runs_launcher", "grow_tails_launcher",
           "grow_tails_stack_launcher"]

#: A run table is ``[count, start_0, dst_0, len_0, mask_0, start_1, ...]`` (int32): entries
#: ``dst_i + [0, len_i)`` of ``kv_indices`` get ``start_i + [0, len_i)``, or with a slot
#: table ``table[start_i + [0, len_i)]``; with masks their row masks get ``mask_i``.
RUN_FIELDS = 4
#: Programs of an expansion on CUDA (a multiple of the SM count is not needed: each
#: program walks runs ``pid, pid + G, ...``).
EXPAND_PROGRAMS = 512
EXPAND_BLOCK = 256


@triton.jit
def _expand_runs_kernel(buf, src, n_copy, runs_off, kv_off, src_off, mask_off,
                        GATHER: tl.constexpr, HAS_MASK: tl.constexpr, COPY: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if COPY:
        # src[0:n_copy] -> buf[0:n_copy], blocks dealt round-robin.
        for i0 in range(pid * BLOCK, n_copy, nprog * BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            m = i < n_copy
            tl.store(buf + i, tl.load(src + i, mask=m), mask=m)
    count = tl.load(src + runs_off)
    for i in range(pid, count, nprog):
        rec = src + runs_off + 1 + i * 4
        start = tl.load(rec)
        dst = tl.load(rec + 1)
        length = tl.load(rec + 2)
        for j0 in range(0, length, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            m = j < length
            if GATHER:
                val = tl.load(src + src_off + start + j, mask=m)
            else:
                val = start + j
            tl.store(buf + kv_off + dst + j, val, mask=m)
            if HAS_MASK:
                bits = tl.load(rec + 3) + tl.zeros([BLOCK], dtype=tl.int32)
                tl.store(buf + mask_off + dst + j, bits, mask=m)


@triton.jit
def _grow_tail_entries(buf, slot, tails, i, m, n, kv_off, len_off, mask_off,
                       HAS_MASK: tl.constexpr):
    pos = tl.load(tails + i, mask=m)
    vnode = tl.load(tails + n + i, mask=m)
    base = tl.load(tails + 2 * n + i, mask=m)
    stride = tl.load(tails + 3 * n + i, mask=m)
    tl.store(buf + kv_off + pos, slot.to(tl.int32), mask=m)
    tl.store(buf + len_off + vnode, pos - base, mask=m)
    if HAS_MASK:
        tl.store(buf + mask_off + pos, tl.load(tails + 4 * n + i, mask=m), mask=m)
    tl.store(tails + i, pos + stride, mask=m)


@triton.jit
def _grow_tails_kernel(buf, slots, tails, n, kv_off, len_off, mask_off,
                       HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    slot = tl.load(slots + i, mask=m)
    _grow_tail_entries(buf, slot, tails, i, m, n, kv_off, len_off, mask_off, HAS_MASK)


@triton.jit(do_not_specialize=["top"])
def _grow_tails_stack_kernel(buf, slots, tails, free, top, n, kv_off, len_off, mask_off,
                             HAS_MASK: tl.constexpr, PAGE: tl.constexpr, BLOCK: tl.constexpr):
    # Request i takes the page free[top - 1 - i] (the allocator's order) and its first
    # slot; the slots are also written out for the caller.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    slot = tl.load(free + (top - 1 - i), mask=m, other=0).to(tl.int64) * PAGE
    tl.store(slots + i, slot, mask=m)
    _grow_tail_entries(buf, slot, tails, i, m, n, kv_off, len_off, mask_off, HAS_MASK)


def expand_runs_launcher(buf: torch.Tensor, runs_off: int, kv_off: int, src_off: int = -1,
                         mask_off: int = -1, src: torch.Tensor | None = None,
                         n_copy: int = 0):
    """A prepared expansion for ``buf`` (int32, CUDA): call it with ``buf`` itself. It
    reads the run table at ``buf[runs_off:]`` (see :data:`RUN_FIELDS`) and writes
    ``buf[kv_off + dst_i + j] = start_i + j``, or ``buf[src_off + start_i + j]`` with
    ``src_off >= 0`` (a slot table in the same buffer); with ``mask_off >= 0`` also
    ``buf[mask_off + dst_i + j] = mask_i``. The table's count is read on the device, so
    one launcher serves every plan written into these buffers.

    With ``src`` (int32, pinned host memory the device can address, laid out as
    ``buf``) the run table and the slot table are read from ``src`` in place, and
    ``src[:n_copy]`` is copied to ``buf[:n_copy]`` by the same launch: one launch
    instead of a copy and a launch. ``src`` must not change until the launch has run."""
    copy = src is not None
    return _KernelLaunch(_expand_runs_kernel, (EXPAND_PROGRAMS,),
                         [buf, src if copy else buf, int(n_copy) if copy else 0, int(runs_off),
                          int(kv_off), max(int(src_off), 0), max(int(mask_off), 0)],
                         {"GATHER": src_off >= 0, "HAS_MASK": mask_off >= 0, "COPY": copy,
                          "BLOCK": EXPAND_BLOCK}, slots=(0,))


def expand_runs(buf: torch.Tensor, runs_off: int, kv_off: int, count: int, src_off: int = -1,
                mask_off: int = -1) -> None:
    """One expansion through the JIT (any device Triton runs on, the interpreter
    included); ``count`` (the table's first entry) only sizes the grid; ``src_off`` and
    ``mask_off`` as for :func:`expand_runs_launcher`."""
    grid = (max(1, min(EXPAND_PROGRAMS, int(count))),)
    _expand_runs_kernel[grid](buf, buf, 0, int(runs_off), int(kv_off), max(int(src_off), 0),
                              max(int(mask_off), 0), GATHER=src_off >= 0,
                              HAS_MASK=mask_off >= 0, COPY=False, BLOCK=EXPAND_BLOCK)


def grow_tails_launcher(buf: torch.Tensor, tails: torch.Tensor, kv_off: int, len_off: int,
                        mask_off: int = -1, block: int = 256):
    """A prepared tail step: call it with the new slots (int64 ``[n]``, one per request,
    on ``buf``'s device). ``tails`` (int32 ``[4 n]``) holds per request its next kv entry
    position ``pos``, tail vnode, ``base`` and ``stride``; the step writes the slot at
    ``buf[kv_off + pos]``, the vnode length ``pos - base`` at ``buf[len_off + vnode]``
    and advances the position by ``stride``. A request alone in its vnode's range has
    ``base`` = the range's first position - 1 and ``stride`` 1; ``k`` requests whose
    entries interleave in one range (the request of rank ``r`` at ``r, r + k, ...``
    after its filled entries) have ``stride`` ``k`` and ``base`` = first position -
    ``k`` + ``r``, so that every one of them writes the same length (requests that
    write one vnode's length must write the same value). With ``mask_off >= 0``
    ``tails`` has a fifth row, each request's row mask, written at ``buf[mask_off +
    pos]`` (int32 ``[5 n]``)."""
    n = tails.numel() // (5 if mask_off >= 0 else 4)
    return _KernelLaunch(_grow_tails_kernel, (triton.cdiv(max(n, 1), block),),
                         [buf, None, tails, n, int(kv_off), int(len_off), max(int(mask_off), 0)],
                         {"HAS_MASK": mask_off >= 0, "BLOCK": block}, slots=(1,))


def grow_tails_stack_launcher(buf: torch.Tensor, tails: torch.Tensor, kv_off: int,
                              len_off: int, page_size: int, mask_off: int = -1,
                              block: int = 256):
    """:func:`grow_tails_launcher` for a step whose new slots are fresh pages of the page
    allocator, derived on the device: call it with ``(slots, free, top)``, where
    ``free`` (int64) mirrors the allocator's free stack up to ``top``, its top before the
    step's allocation, and ``slots`` (int64 ``[n]``) receives request ``i``'s slot
    ``free[top - 1 - i] * page_size``. Nothing is copied from the host. ``tails`` and
    ``mask_off`` as there."""
    n = tails.numel() // (5 if mask_off >= 0 else 4)
    return _KernelLaunch(_grow_tails_stack_kernel, (triton.cdiv(max(n, 1), block),),
                         [buf, None, tails, None, None, n, int(kv_off), int(len_off),
                          max(int(mask_off), 0)],
                         {"HAS_MASK": mask_off >= 0, "PAGE": int(page_size), "BLOCK": block},
                         slots=(1, 3, 4))
