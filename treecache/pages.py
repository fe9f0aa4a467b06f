"""The page pool: K/V storage for every layer, a free list and reference counts.

:class:`PageAllocator` is tensor-free (numpy only) and testable on its own;
:class:`KVPool` adds the K/V tensors. Slot ``s`` of the pool is token ``s % page_size``
of page ``s // page_size``; kernels address K/V by slot.

Invariants (checked by :meth:`PageAllocator.check`):

* a page is either free (on the free stack, reference count 0) or used (count >= 1);
* ``num_free + num_used == num_pages``;
* the free stack holds no page twice.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .errors import OutOfPagesError, TreeCacheError

__all__ = ["PageAllocator", "KVPool"]

logger = logging.getLogger(__name__)

#: ``decref`` of at most this many distinct pages works on Python ints.
_FEW_PAGES = 8


class PageAllocator:
    """Free stack and reference counts of ``num_pages`` pages of ``page_size`` slots."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        # Stack: the next page handed out is _free[_top - 1]; initially 0, 1, 2, ...
        self._free = np.arange(self.num_pages - 1, -1, -1, dtype=np.int64)
        self._top = self.num_pages
        self.refcount = np.zeros(self.num_pages, dtype=np.int32)
        # Entries [0, _mirrored) of the stack equal those of a copy kept elsewhere (the
        # cache's device mirror, see mirror_range); frees lower it, allocations keep it.
        self._mirrored = 0

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.num_pages - self._top

    def allocate(self, n: int) -> np.ndarray:
        """Take ``n`` pages (reference count 1 each). Raises :class:`OutOfPagesError`
        and changes nothing if fewer than ``n`` are free."""
        n = int(n)
        if n > self._top:
            raise OutOfPagesError(
                f"need {n} free pages, only {self._top} of {self.num_pages} are free "
                f"(page_size {self.page_size})")
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        pages = self._free[self._top - n:self._top][::-1].copy()
        self._top -= n
        self.refcount[pages] = 1
        return pages

    def incref(self, pages: np.ndarray) -> None:
        """Add one reference to each page (a page listed twice gets two)."""
        pages = np.asarray(pages, dtype=np.int64)
        if pages.size and (self.refcount[pages] <= 0).any():
            raise TreeCacheError(f"incref of a free page: {pages[self.refcount[pages] <= 0][:5]}")
        np.add.at(self.refcount, pages, 1)

    def decref(self, pages: np.ndarray) -> int:
        """Drop one reference per listed page; pages reaching 0 go back on the free stack.
        Returns how many pages were freed."""
        pages = np.asarray(pages, dtype=np.int64).reshape(-1)
        n = pages.size
        if n == 0:
            return 0
        # Distinct pages (a node's own pages, the usual call) take a path without
        # counting: elementwise in Python for a few pages, through one sort for more.
        if n <= _FEW_PAGES:
            listed = pages.tolist()
            if len(set(listed)) == n:
                return self._decref_few(listed)
        else:
            order = np.sort(pages)
            if not (order[1:] == order[:-1]).any():
                return self._decref_sorted(order)
        # Check before changing anything: a double free must leave the pool intact.
        uniq, times = np.unique(pages, return_counts=True)
        self._check_ids(int(uniq[0]), int(uniq[-1]))
        short = self.refcount[uniq] < times
        if short.any():
            p = int(uniq[short][0])
            self._double_free(p, int(times[short][0]))
        np.subtract.at(self.refcount, pages, 1)
        return self._push(np.unique(pages[self.refcount[pages] == 0]))

    def _decref_few(self, listed: list[int]) -> int:
        """``decref`` of a few distinct pages, one by one."""
        self._check_ids(min(listed), max(listed))
        rc = self.refcount
        short = [p for p in listed if rc[p] < 1]
        if short:
            self._double_free(min(short), 1)
        freed = []
        for p in listed:
            c = rc[p] - 1
            rc[p] = c
            if c == 0:
                freed.append(p)
        freed.sort()
        return self._push(freed)

    def _decref_sorted(self, order: np.ndarray) -> int:
        """``decref`` of distinct pages given in ascending order."""
        self._check_ids(int(order[0]), int(order[-1]))
        counts = self.refcount[order]
        short = counts < 1
        if short.any():
            self._double_free(int(order[short][0]), 1)
        counts -= 1
        self.refcount[order] = counts
        return self._push(order[counts == 0])

    def _check_ids(self, lo: int, hi: int) -> None:
        if lo < 0 or hi >= self.num_pages:
            raise TreeCacheError(f"decref of page ids outside [0, {self.num_pages})")

    def _double_free(self, page: int, released: int) -> None:
        raise TreeCacheError(
            f"double free: page {page} has {int(self.refcount[page])} references, "
            f"{released} released")

    def _push(self, freed) -> int:
        """Push freed pages (ascending; an array or a list) so that the lowest is handed
        out first."""
        k = len(freed)
        self._free[self._top:self._top + k] = freed[::-1]
        self._mirrored = min(self._mirrored, self._top)
        self._top += k
        return k

    def mirror_range(self, hi: int) -> tuple[int, int]:
        """The entries ``[lo, hi)`` of the free stack that a mirror (a copy of the stack
        kept elsewhere, e.g. on a GPU) must receive so that its first ``hi`` entries
        equal the stack's; ``lo >= hi`` when it has them already. Call
        :meth:`mark_mirrored` once they are copied.

        Entries change only when pages are freed (pushed at the top), so a mirror
        stays valid across allocations: after ``allocate(n)`` the pages handed out are
        ``stack[top - n : top]`` of the stack before, in reverse order.
        """
        return self._mirrored, int(hi)

    def stack_entries(self, lo: int, hi: int) -> np.ndarray:
        """A copy of the free stack's entries ``[lo, hi)``; ``hi`` may exceed the top:
        the entries above it are the pages handed out last (until pages are freed)."""
        if not 0 <= lo <= hi <= self.num_pages:
            raise ValueError(f"need 0 <= lo <= hi <= {self.num_pages}, got [{lo}, {hi})")
        return self._free[lo:hi].copy()

    def mark_mirrored(self, hi: int) -> None:
        """The mirror now holds the stack's entries ``[0, hi)``."""
        if not 0 <= hi <= self.num_pages:
            raise ValueError(f"hi must lie in [0, {self.num_pages}], got {hi}")
        self._mirrored = max(self._mirrored, int(hi))

    def free_pages(self) -> np.ndarray:
        """The free stack (copy), next page to be handed out last."""
        return self._free[:self._top].copy()

    def check(self) -> None:
        """Raise :class:`TreeCacheError` if an invariant is broken."""
        free = self._free[:self._top]
        if np.unique(free).size != free.size:
            raise TreeCacheError("a page is on the free stack twice")
        if (self.refcount[free] != 0).any():
            raise TreeCacheError("a free page has a non-zero reference count")
        used = np.ones(self.num_pages, dtype=bool)
        used[free] = False
        if (self.refcount[used] < 1).any():
            bad = np.nonzero(used & (self.refcount < 1))[0][:5]
            raise TreeCacheError(f"pages {bad.tolist()} are neither free nor referenced")


class KVPool:
    """K/V tensors ``[num_layers, num_pages * page_size, num_kv_heads, head_dim]`` + allocator."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.allocator = PageAllocator(num_pages, page_size)
        slots = num_pages * page_size
        self.k = torch.zeros(num_layers, slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(num_layers, slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        logger.debug("KV pool: %d layers x %d slots (%.1f MiB)", num_layers, slots,
                     2 * self.k.numel() * self.k.element_size() / 2**20)

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
