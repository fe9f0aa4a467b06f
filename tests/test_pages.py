"""Tests of treecache.pages.PageAllocator alone: exact page ids, reference counts, errors.

The allocator is a stack of free pages: pages are handed out 0, 1, 2, ... from a fresh
pool; the pages one ``decref`` frees go back on top of the stack, lowest id first, so
they are the next ones handed out.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from treecache.errors import OutOfPagesError, TreeCacheError
from treecache.pages import KVPool, PageAllocator


def ids(a) -> list[int]:
    return np.asarray(a).tolist()


def snapshot(alloc: PageAllocator):
    return (alloc.num_free, alloc.num_used, ids(alloc.free_pages()), ids(alloc.refcount))


# ------------------------------------------------------------------------- construction


def test_fresh_pool_is_all_free():
    a = PageAllocator(5, 4)
    assert a.num_pages == 5 and a.page_size == 4
    assert a.num_free == 5 and a.num_used == 0
    assert ids(a.refcount) == [0, 0, 0, 0, 0]
    # The next page handed out is the last entry of the free stack.
    assert ids(a.free_pages()) == [4, 3, 2, 1, 0]
    a.check()


@pytest.mark.parametrize("num_pages, page_size", [(0, 1), (-1, 1), (4, 0), (4, -2)])
def test_bad_sizes_rejected(num_pages, page_size):
    with pytest.raises(ValueError):
        PageAllocator(num_pages, page_size)


# ------------------------------------------------------------------------- allocation


def test_allocation_order_is_0_1_2():
    a = PageAllocator(8, 1)
    assert ids(a.allocate(3)) == [0, 1, 2]
    assert ids(a.allocate(1)) == [3]
    assert ids(a.allocate(2)) == [4, 5]
    assert a.num_used == 6 and a.num_free == 2
    assert ids(a.refcount) == [1, 1, 1, 1, 1, 1, 0, 0]
    a.check()


def test_allocate_zero_returns_empty_and_changes_nothing():
    a = PageAllocator(3, 2)
    a.allocate(1)
    before = snapshot(a)
    got = a.allocate(0)
    assert got.size == 0 and got.dtype == np.int64
    assert snapshot(a) == before


def test_allocate_returns_int64_copy():
    a = PageAllocator(4, 1)
    got = a.allocate(2)
    assert got.dtype == np.int64
    got[:] = 99  # must not corrupt the free stack
    assert ids(a.allocate(2)) == [2, 3]
    a.check()


def test_freed_pages_reused_lowest_first():
    a = PageAllocator(8, 1)
    a.allocate(6)  # 0..5
    assert a.decref(np.array([4, 1, 3])) == 3
    assert a.num_free == 5
    # The pages freed together come back lowest first, before never-used pages.
    assert ids(a.allocate(1)) == [1]
    assert ids(a.allocate(2)) == [3, 4]
    assert ids(a.allocate(2)) == [6, 7]
    a.check()


def test_free_stack_is_lifo_across_calls():
    a = PageAllocator(6, 1)
    a.allocate(4)  # 0..3
    a.decref(np.array([0]))
    a.decref(np.array([2]))
    # Most recently freed first.
    assert ids(a.allocate(3)) == [2, 0, 4]
    a.check()


def test_allocate_all_then_free_all():
    a = PageAllocator(5, 3)
    pages = a.allocate(5)
    assert ids(pages) == [0, 1, 2, 3, 4]
    assert a.num_free == 0
    assert a.decref(pages) == 5
    assert a.num_free == 5 and a.num_used == 0
    assert ids(a.refcount) == [0] * 5
    assert ids(a.allocate(5)) == [0, 1, 2, 3, 4]
    a.check()


# ------------------------------------------------------------------------- reference counts


def test_incref_decref_counts():
    a = PageAllocator(4, 1)
    p = a.allocate(2)  # 0, 1
    a.incref(p)
    a.incref(np.array([1]))
    assert ids(a.refcount) == [2, 3, 0, 0]
    assert a.decref(np.array([0, 1])) == 0
    assert ids(a.refcount) == [1, 2, 0, 0]
    assert a.decref(np.array([1])) == 0
    assert a.decref(np.array([0, 1])) == 2
    assert ids(a.refcount) == [0, 0, 0, 0]
    assert a.num_free == 4
    a.check()


def test_page_listed_twice_counts_twice():
    a = PageAllocator(3, 1)
    a.allocate(1)  # page 0, count 1
    a.incref(np.array([0, 0]))
    assert ids(a.refcount) == [3, 0, 0]
    # Two references dropped by one call, the page is still held.
    assert a.decref(np.array([0, 0])) == 0
    assert ids(a.refcount) == [1, 0, 0]
    # A page freed by a call that lists it twice goes on the free stack once.
    a.incref(np.array([0]))
    assert a.decref(np.array([0, 0])) == 1
    assert ids(a.free_pages()).count(0) == 1
    a.check()


def test_decref_empty_is_noop():
    a = PageAllocator(3, 1)
    a.allocate(2)
    before = snapshot(a)
    assert a.decref(np.zeros(0, dtype=np.int64)) == 0
    assert snapshot(a) == before


# ------------------------------------------------------------------------- errors


def test_out_of_pages_leaves_state_unchanged():
    a = PageAllocator(4, 2)
    a.allocate(3)
    before = snapshot(a)
    with pytest.raises(OutOfPagesError) as ei:
        a.allocate(2)
    assert isinstance(ei.value, TreeCacheError) and isinstance(ei.value, MemoryError)
    msg = str(ei.value)
    assert "2" in msg and "1 of 4" in msg
    assert snapshot(a) == before
    a.check()
    # The one free page can still be taken.
    assert ids(a.allocate(1)) == [3]


def test_out_of_pages_on_empty_pool():
    a = PageAllocator(2, 1)
    a.allocate(2)
    with pytest.raises(OutOfPagesError):
        a.allocate(1)
    assert a.num_free == 0
    a.check()


def test_incref_of_free_page_rejected_without_change():
    a = PageAllocator(4, 1)
    a.allocate(2)
    before = snapshot(a)
    with pytest.raises(TreeCacheError, match="free page"):
        a.incref(np.array([1, 2]))
    assert snapshot(a) == before
    a.check()


def test_double_free_detected():
    a = PageAllocator(4, 1)
    p = a.allocate(2)
    a.decref(p[:1])
    with pytest.raises(TreeCacheError, match="double free"):
        a.decref(p[:1])


def test_double_free_leaves_state_unchanged():
    """A detected double free must not corrupt the pool: counts and free stack as before."""
    a = PageAllocator(4, 1)
    a.allocate(2)  # 0, 1
    a.decref(np.array([1]))
    before = snapshot(a)
    with pytest.raises(TreeCacheError, match="double free"):
        a.decref(np.array([0, 1]))  # page 0 is live, page 1 is already free
    assert snapshot(a) == before
    a.check()


def test_check_detects_corruption():
    a = PageAllocator(4, 1)
    a.allocate(2)
    a.check()
    a.refcount[0] = 0  # used page with no reference
    with pytest.raises(TreeCacheError, match="neither free nor referenced"):
        a.check()
    a.refcount[0] = 1
    a.refcount[3] = 1  # free page with a reference
    with pytest.raises(TreeCacheError, match="non-zero reference count"):
        a.check()
    a.refcount[3] = 0
    a._free[a._top - 1] = a._free[0]  # a page on the free stack twice
    with pytest.raises(TreeCacheError, match="twice"):
        a.check()


@pytest.mark.parametrize("seed", range(4))
def test_decref_matches_a_reference_model_for_every_list_size(seed):
    # decref has a path for a few distinct pages, one for many distinct pages and one
    # for lists naming a page more than once; each must give the model's counts, free
    # stack (lowest freed page on top) and return value, and change nothing on an error.
    from collections import Counter

    rng = np.random.default_rng(seed)
    n_pages = 48
    a = PageAllocator(n_pages, 1)
    rc = [0] * n_pages
    stack = list(range(n_pages - 1, -1, -1))
    for _ in range(300):
        held = [p for p in range(n_pages) if rc[p] > 0]
        r = rng.random()
        if r < 0.35 or not held:
            n = int(rng.integers(0, len(stack) + 1))
            got = ids(a.allocate(n))
            want = stack[len(stack) - n:][::-1]
            del stack[len(stack) - n:]
            for p in want:
                rc[p] = 1
            assert got == want
        elif r < 0.45:
            extra = rng.choice(held, size=int(rng.integers(1, len(held) + 1)))
            a.incref(extra)
            for p in extra.tolist():
                rc[p] += 1
        else:
            k = int(rng.integers(1, min(len(held), 20) + 1))
            pages = rng.choice(held, size=k, replace=False).tolist()
            kind = rng.random()
            if kind < 0.15:
                pages.append(pages[0])  # a page twice
            elif kind < 0.2:
                pages.append(n_pages)  # outside the pool
            elif kind < 0.3 and len(stack):
                pages.insert(int(rng.integers(0, len(pages) + 1)), stack[-1])  # a free page
            rng.shuffle(pages)
            times = Counter(pages)
            ok = all(0 <= p < n_pages for p in times) and all(
                rc[p] >= t for p, t in times.items())
            before = snapshot(a)
            if not ok:
                with pytest.raises(TreeCacheError, match="double free|outside"):
                    a.decref(np.array(pages))
                assert snapshot(a) == before
                continue
            for p, t in times.items():
                rc[p] -= t
            freed = sorted(p for p in times if rc[p] == 0)
            stack += freed[::-1]
            arr = np.array(pages)
            if len(pages) % 2 == 0 and rng.random() < 0.3:
                arr = arr.reshape(2, -1)  # any shape is a list of pages
            assert a.decref(arr) == len(freed)
        assert ids(a.refcount) == rc
        assert ids(a.free_pages()) == stack
        a.check()


# ------------------------------------------------------------------------- mirror


@pytest.mark.parametrize("seed", range(6))
def test_mirror_range_keeps_a_copy_that_predicts_allocations(seed):
    # A copy of the free stack kept in sync only through mirror_range / mark_mirrored
    # (as the cache's device mirror is) predicts every allocation: allocate(n) hands out
    # mirror[top - 1 - i], across random allocations and frees (double frees included,
    # which change nothing).
    rng = np.random.default_rng(seed)
    a = PageAllocator(int(rng.integers(4, 40)), int(rng.integers(1, 4)))
    mirror = np.full(a.num_pages, -1, dtype=np.int64)
    used: list[int] = []
    copied = 0
    for _ in range(200):
        if used and rng.random() < 0.4:
            k = int(rng.integers(1, len(used) + 1))
            pick = rng.choice(len(used), size=k, replace=False)
            pages = np.array([used[i] for i in pick])
            if rng.random() < 0.1:
                pages = np.concatenate([pages, pages[:1]])  # one released twice: refused
                with pytest.raises(TreeCacheError, match="double free"):
                    a.decref(pages)
                continue
            a.decref(pages)
            used = [p for i, p in enumerate(used) if i not in set(pick.tolist())]
            continue
        n = int(rng.integers(0, a.num_free + 1))
        top = a.num_free
        lo, hi = a.mirror_range(top)
        if lo < hi:
            mirror[lo:hi] = a.stack_entries(lo, hi)
            copied += hi - lo
            a.mark_mirrored(hi)
        assert a.mirror_range(top)[0] >= top  # nothing left to copy
        pages = a.allocate(n)
        assert ids(pages) == ids(mirror[top - 1 - np.arange(n)])
        used += ids(pages)
        a.check()
    # The mirror is written only where frees changed the stack, not every step.
    assert copied < 200 * a.num_pages


def test_mirror_range_after_frees():
    a = PageAllocator(6, 1)
    assert a.mirror_range(6) == (0, 6)  # nothing mirrored yet
    a.mark_mirrored(6)
    assert a.mirror_range(6)[0] >= 6
    got = a.allocate(4)  # pages 0..3
    assert a.mirror_range(6)[0] >= 6  # allocations change no entry
    a.decref(got[[1, 3]])  # pages 1 and 3 pushed at entries 2, 3
    assert a.mirror_range(a.num_free) == (2, 4)
    assert ids(a.stack_entries(2, 4)) == [3, 1]
    with pytest.raises(ValueError, match="lo <= hi"):
        a.stack_entries(3, 2)
    with pytest.raises(ValueError, match="hi must lie"):
        a.mark_mirrored(7)


# ------------------------------------------------------------------------- KV pool


def test_kv_pool_shapes():
    pool = KVPool(num_layers=3, num_pages=5, page_size=4, num_kv_heads=2, head_dim=16,
                  dtype=torch.float16, device=torch.device("cpu"))
    assert pool.k.shape == (3, 20, 2, 16) and pool.v.shape == (3, 20, 2, 16)
    assert pool.k.dtype == torch.float16
    assert pool.num_slots == 20
    assert pool.nbytes() == 2 * 3 * 20 * 2 * 16 * 2
    assert pool.allocator.num_pages == 5 and pool.allocator.page_size == 4
