"""Writing one layer's new K and V rows into a paged pool in one launch.

A decode step writes each layer's new keys and values (one row per request) into the
pool's slots. Two ``index_copy_`` calls do that with two launches, each with torch's
dispatch in front of it; on CUDA :func:`kv_write_launcher` does it with one prepared
launch (:class:`kernels.tree_decode._KernelLaunch`), which after its first call launches
the compiled kernel directly. Measured on an H100 host (benchmarks/RESULTS.md, v32).

Layout: a pool layer ``[slots, heads, head_dim]`` is contiguous, so slot ``s`` is the
``ROW = heads * head_dim`` elements from ``s * ROW``; the new rows ``k``, ``v``
``[n, heads, head_dim]`` have their ``heads * head_dim`` elements contiguous per row
(any row stride).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tree_decode import _KernelLaunch

__all__ = ["kv_write", "kv_write_launcher", "kv_write_ok"]

#: Elements a program copies per step (the row is covered in steps of this many).
KV_WRITE_BLOCK = 1024


@triton.jit(do_not_specialize=["k_stride", "v_stride"])
def _kv_write_kernel(k_pool, v_pool, slots, k, v, k_stride, v_stride,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    dst = tl.load(slots + i).to(tl.int64) * ROW
    src_k = i.to(tl.int64) * k_stride
    src_v = i.to(tl.int64) * v_stride
    for start in tl.static_range(0, ROW, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < ROW
        tl.store(k_pool + dst + o, tl.load(k + src_k + o, mask=m), mask=m)
        tl.store(v_pool + dst + o, tl.load(v + src_v + o, mask=m), mask=m)


def kv_write_ok(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel can read ``k`` and ``v`` (``[n, heads, head_dim]``): each row's
    ``heads * head_dim`` elements contiguous, in heads-major order."""
    for t in (k, v):
        if t.stride(2) != 1 or (t.shape[1] > 1 and t.stride(1) != t.shape[2]):
            return False
    return True


def _block(row: int) -> int:
    return min(KV_WRITE_BLOCK, triton.next_power_of_2(int(row)))


def kv_write_launcher(n: int, row: int, k_stride: int, v_stride: int) -> _KernelLaunch:
    """A prepared write of ``n`` rows of ``row`` elements (``heads * head_dim``) whose
    sources have row strides ``k_stride`` and ``v_stride``: call it as
    ``launch(k_pool, v_pool, slots, k, v)`` (pool layers ``[slots, heads, head_dim]``
    contiguous, ``slots`` int64 ``[n]``, ``k``, ``v`` ``[n, heads, head_dim]`` as
    :func:`kv_write_ok` requires, the pool's dtype). Row ``i`` of ``k`` goes to slot
    ``slots[i]`` of ``k_pool``, the same for ``v``. ``n`` must be at least 1; for
    another ``n`` use ``launch.resized(n, (), ())``, which keeps the compiled kernel."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return _KernelLaunch(_kv_write_kernel, (int(n),),
                         [None] * 5 + [int(k_stride), int(v_stride)],
                         {"ROW": int(row), "BLOCK": _block(row)}, slots=(0, 1, 2, 3, 4))


def kv_write(k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """One write through the JIT (any device Triton runs on, the interpreter included);
    arguments as for :func:`kv_write_launcher`'s launch."""
    n = int(slots.numel())
    if n == 0:
        return
    row = int(k_pool.shape[1] * k_pool.shape[2])
    _kv_write_kernel[(n,)](k_pool, v_pool, slots, k, v, k.stride(0), v.stride(0),
                           ROW=row, BLOCK=_block(row))
