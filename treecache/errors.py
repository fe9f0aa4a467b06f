"""Exception hierarchy of treecache.

Every exception the library raises on purpose derives from :class:`TreeCacheError`,
so ``except treecache.TreeCacheError`` catches all of them. Each kind of failure has
its own type; several also derive from the matching built-in (``ValueError``,
``LookupError``, ``MemoryError``) so that generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "TreeCacheError",
    "InvalidTreeError",
    "OutOfPagesError",
    "UnknownRequestError",
    "ShapeMismatchError",
    "PlanMismatchError",
    "UnsupportedConfigError",
]


class TreeCacheError(Exception):
    """Base class of every treecache exception."""


class InvalidTreeError(TreeCacheError, ValueError):
    """A tree (or tree file) is malformed: cycles, bad ids, wrong counts, bad requests."""


class OutOfPagesError(TreeCacheError, MemoryError):
    """The page pool cannot hold the tokens asked for. The cache is left unchanged."""


class UnknownRequestError(TreeCacheError, LookupError):
    """A request id that was never created, or that was already pruned."""


class ShapeMismatchError(TreeCacheError, ValueError):
    """A tensor argument has the wrong shape, dtype or device."""


class PlanMismatchError(TreeCacheError, ValueError):
    """Arguments disagree with the plan they are used with (tile sizes, batch, heads)."""


class UnsupportedConfigError(TreeCacheError, ValueError):
    """A configuration the kernels do not support (head_dim, group size, dtype)."""
