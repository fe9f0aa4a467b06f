"""TreeKVCache: a stateful paged KV cache whose requests form a forest.

Each request is a path from a root to a node; nodes hold runs of tokens in pages of a
shared :class:`~treecache.pages.KVPool`. ``fork`` shares a request's tokens without
copying KV, ``prune`` returns pages nobody references, ``attend`` runs the tree-decode
kernels with a plan that is rebuilt only when the topology changes.

A decode step in a model loop::

    slots = cache.reserve(reqs)                # one new token slot per request, O(requests)
    for layer in range(num_layers):
        q, k, v = ...                          # [len(reqs), H, D] each
        cache.write(layer, slots, k, v)
        o = cache.attend(q, layer, reqs)       # plan built (if needed) once per step

Node lifecycle (side effects of the public methods):

* ``append``/``reserve`` on a request whose node is an *exclusive leaf* (no children,
  no other request ends there) grows that node in place: no re-plan; the plan's tail
  vnode of the request grows by one entry per token.
* Otherwise the request gets a new leaf child under its node (topology change).
* ``prune`` removes the request; nodes left with no requests and no children are
  deleted (their pages freed); a node left with no requests and one child is merged
  into that child (no KV is copied; tokens keep their slots).
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import numpy as np
import torch


from kernels import Backend
from kernels.kv_write import kv_write_launcher, kv_write_ok

from .fasttree import resolve_backend
from .errors import (
    OutOfPagesError,
    ShapeMismatchError,
    TreeCacheError,
    UnknownRequestError,
    UnsupportedConfigError,
)
from .pages import KVPool
from .plan import (
    DEFAULT_PARA_THRESHS1,
    DEFAULT_PARA_THRESHS2,
    SUPPORTED_HEAD_DIMS,
    DecodePlan,
    FastTreeParams,
    PlanBuffers,
    PlanInput,
    build_plan,
    normalize_device,
    to_device_async,
)
from .tree import KVTreeNode

__all__ = ["TreeKVCache"]

logger = logging.getLogger(__name__)

#: Append-only steps in which every request takes a fresh page (every step at page size
#: 1) derive the new slots on the device from a mirror of the page allocator's free
#: stack instead of copying them from the host (CUDA; other devices copy). The mirror
#: is brought up to date after pages are freed, with one copy of the changed entries.
DEVICE_STEP_SLOTS = True

#: On CUDA with the Triton backend, :meth:`TreeKVCache.write` stores a layer's K and V
#: rows with one prepared launch (:func:`kernels.kv_write.kv_write_launcher`) instead of
#: two ``index_copy_`` calls, where each source row is contiguous and the cache's device
#: is the current one (else, or False, the two copies). Measured on an H100 host
#: (benchmarks/RESULTS.md, v32).
FUSED_KV_WRITE = True

#: A re-plan hands the planner each node's run flag (its slots follow each other by
#: one), kept up to date as slots are added, instead of the planner finding the runs
#: with a pass over the whole slot table. False: that pass (the same plans).
NODE_RUNS = True

#: On a GPU a re-plan joins the nodes' slot arrays straight into the plan buffers'
#: staging region for the slot table (int32), instead of joining them into a new
#: array that the upload then copies there. False: that copy (the same plans).
SLOT_TABLE_IN_PLACE = True


class _Node:
    """A run of tokens. ``slots`` and ``pages`` are lists of int64 arrays (in order).
    ``run``: whether the slots follow each other by one; ``first`` and ``last``: the
    first and last slot (-1: none yet). A re-plan hands the runs to the planner instead
    of it finding them with a pass over the slot table (see :data:`NODE_RUNS`)."""

    __slots__ = ("id", "parent", "children", "ends", "slots", "pages", "run", "first", "last")

    def __init__(self, nid: int, parent: "_Node | None"):
        self.id = nid
        self.parent = parent
        self.children: list[_Node] = []
        self.ends: list[int] = []  # requests whose path ends here (creation order)
        self.slots: list[np.ndarray] = []
        self.pages: list[np.ndarray] = []
        self.run = True
        self.first = self.last = -1

    def slot_array(self) -> np.ndarray:
        return _joined(self.slots)

    def page_array(self) -> np.ndarray:
        return _joined(self.pages)


#: See TreeKVCache._rebuild.
_JOIN_PARTS = 8


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """The concatenation of ``parts``; the list keeps it as its only element."""
    if not parts:
        return np.zeros(0, dtype=np.int64)
    if len(parts) > 1:
        parts[:] = [np.concatenate(parts)]
    return parts[0]


def _note_run(nd: _Node, head: int, tail: int, inner: bool) -> None:
    """Keep ``nd``'s run flag and first and last slot for new slots ``head .. tail``
    appended to it (``inner``: they follow each other by one)."""
    if nd.last < 0:
        nd.first = head
    elif head != nd.last + 1:
        nd.run = False
    if not inner:
        nd.run = False
    nd.last = tail


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    """``parts`` joined (the one array itself when there is one)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _grow(a: np.ndarray, n: int, fill) -> np.ndarray:
    if n <= a.size:
        return a
    out = np.full(max(n, 2 * a.size), fill, dtype=a.dtype)
    out[:a.size] = a
    return out


class TreeKVCache:
    """Paged KV cache for all layers of a model, organised as a forest of requests.

    Parameters
    ----------
    num_layers : int
        Layers whose K/V the cache stores.
    num_qo_heads, num_kv_heads : int
        Query heads and KV heads (``num_qo_heads % num_kv_heads == 0``).
    head_dim : int
        One of 16, 32, 64, 128, 256.
    capacity_tokens : int
        Token slots in the pool (rounded up to whole pages).
    page_size : int
        Slots per page (default 1: no fragmentation when nodes are short, as in beam
        search). With larger pages each node starts on a fresh page.
    dtype : torch.dtype
        float16, bfloat16 or float32.
    device : torch device, optional
        Default: CUDA if available, else CPU.
    params : FastTreeParams, optional
        Cost model and tiles for planning (never modified); default
        :meth:`FastTreeParams.for_heads` (tiles tuned on an H100).
    backend : "auto", "triton" or "torch"
        Kernel implementation (see :func:`kernels.select_backend`).
    sm_scale : float, optional
        Softmax scale for :meth:`attend` (default ``1/sqrt(head_dim)``).
    logit_cap : float
        Soft cap of the scaled logits, off when ``<= 0``.
    plan_headroom : int
        KV entries reserved after each growing request's tail in the plan: this many
        append-only steps run without a re-plan.
    kv_split_sizes, para_threshs1, para_threshs2 :
        Planner chunking and thresholds (see :func:`treecache.plan.build_plan`; None, the
        default: each plan chooses its chunk length).
    pad_phases : bool
        Pad each plan's phases to powers of two with empty vnodes (see
        :func:`treecache.plan.build_plan`), so that re-plans of a tree that changes
        shape every step (beam search, draft trees) mostly keep the same launches and
        a captured CUDA graph stays valid: see :attr:`launch_version`. Default False.

    Examples
    --------
    >>> cache = TreeKVCache(2, 8, 2, 64, capacity_tokens=1024, device="cpu", dtype=torch.float32)
    >>> r = cache.new_request()
    >>> cache.append(r, torch.randn(2, 10, 2, 64), torch.randn(2, 10, 2, 64))
    >>> b = cache.fork(r)                       # shares r's 10 tokens
    >>> o = cache.attend(torch.randn(2, 8, 64), layer=0)   # rows: r, b
    """

    def __init__(
        self,
        num_layers: int,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        capacity_tokens: int,
        *,
        page_size: int = 1,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        params: FastTreeParams | None = None,
        backend: str = "auto",
        sm_scale: float | None = None,
        logit_cap: float = 0.0,
        plan_headroom: int = 64,
        kv_split_sizes: Sequence[int] | None = None,
        para_threshs1: Sequence[int] = DEFAULT_PARA_THRESHS1,
        para_threshs2: Sequence[int] = DEFAULT_PARA_THRESHS2,
        pad_phases: bool = False,
    ):
        for name, val in (("num_layers", num_layers), ("num_qo_heads", num_qo_heads),
                          ("num_kv_heads", num_kv_heads), ("capacity_tokens", capacity_tokens),
                          ("page_size", page_size)):
            if not isinstance(val, (int, np.integer)) or val < 1:
                raise UnsupportedConfigError(f"{name} must be a positive int, got {val!r}")
        if num_qo_heads % num_kv_heads:
            raise UnsupportedConfigError(
                f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise UnsupportedConfigError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise UnsupportedConfigError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        if plan_headroom < 0:
            raise UnsupportedConfigError(f"plan_headroom must be >= 0, got {plan_headroom}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = normalize_device(device)
        # See _here: the CUDA device index, or -1 for the CPU.
        self._cuda_index = self.device.index if self.device.type == "cuda" else -1
        self.num_layers = int(num_layers)
        self.num_qo_heads = int(num_qo_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.dtype = dtype
        self.page_size = int(page_size)
        num_pages = -(-int(capacity_tokens) // self.page_size)
        self.pool = KVPool(self.num_layers, num_pages, self.page_size, self.num_kv_heads,
                           self.head_dim, dtype, self.device)
        # Each layer's K/V view, made once (indexing the pool costs a view per call).
        self._k_layers = self.pool.k.unbind(0)
        self._v_layers = self.pool.v.unbind(0)
        self._kv_writes: dict = {}  # prepared K/V writes (see _kv_write)
        self.params = (FastTreeParams.for_heads(self.num_qo_heads, self.num_kv_heads,
                                                self.head_dim)
                       if params is None else params)
        self.params.validate()
        self.backend = resolve_backend(self.device, backend)
        logger.info("TreeKVCache: %d layers, %d slots, backend %s", self.num_layers,
                    self.pool.num_slots, self.backend.value)
        self.sm_scale = 1.0 / math.sqrt(self.head_dim) if sm_scale is None else float(sm_scale)
        self.logit_cap = float(logit_cap or 0.0)
        self.plan_headroom = int(plan_headroom)
        splits = None if kv_split_sizes is None else tuple(kv_split_sizes)
        self._plan_kw = dict(kv_split_sizes=splits,
                             para_threshs1=tuple(para_threshs1),
                             para_threshs2=tuple(para_threshs2),
                             pad_phases=bool(pad_phases))

        self._nodes: dict[int, _Node] = {}
        self._next_node = 0
        self._reqs: dict[int, _Node] = {}  # live request -> end node (creation order)
        self._next_req = 0
        # Hot-path mirrors, indexed by node id / request id.
        self._nd_seqlen = np.zeros(64, dtype=np.int64)
        self._nd_excl = np.zeros(64, dtype=bool)  # leaf, exactly one request ends here
        self._nd_tailpage = np.full(64, -1, dtype=np.int64)
        self._nd_tailfree = np.zeros(64, dtype=np.int64)  # free slots left in tail page
        self._rq_node = np.full(64, -1, dtype=np.int64)
        self._rq_alive = np.zeros(64, dtype=bool)
        self._rq_scratch = np.full(64, -1, dtype=np.int64)
        self._nd_pos = np.full(64, -1, dtype=np.int64)  # scratch of _rebuild
        # Tokens added by the fast path, not yet attached to node objects.
        self._pending_nodes: list[np.ndarray] = []
        self._pending_slots: list[np.ndarray] = []
        self._pending_page_nodes: list[np.ndarray] = []
        self._pending_pages: list[np.ndarray] = []

        self._live_cache: tuple[tuple[int, ...], np.ndarray] | None = None
        self._plan: DecodePlan | None = None
        self._plan_requests: tuple[int, ...] | None = None
        # The last list or tuple of requests given and its key (see _requests_key).
        self._last_requests: tuple | None = None
        self._plan_rows = np.full(64, -1, dtype=np.int64)
        self._plan_dirty = True
        self._buffers = PlanBuffers(self.num_qo_heads, self.head_dim, self.device)
        # Device half of a plan tail update, sent with the next slots (see _to_device).
        self._pending_plan_update = None
        # The allocator's top before a step in which every request took a fresh page,
        # and the device mirror of its free stack (see _to_device).
        self._pending_stack_top = None
        self._free_dev: torch.Tensor | None = None
        self.plan_rebuilds = 0
        self.plan_version = 0
        #: Incremented by a plan build whose launch key (DecodePlan.launch_key) differs
        #: from the last plan's: a captured CUDA graph stays valid while it is unchanged.
        self.launch_version = 0
        self._launch_key = None

    # ------------------------------------------------------------------ properties

    @property
    def requests(self) -> list[int]:
        """Live request ids in creation order."""
        return list(self._live()[0])

    @property
    def k_pool(self) -> torch.Tensor:
        """K storage ``[num_layers, num_slots, num_kv_heads, head_dim]``."""
        return self.pool.k

    @property
    def v_pool(self) -> torch.Tensor:
        """V storage ``[num_layers, num_slots, num_kv_heads, head_dim]``."""
        return self.pool.v

    @property
    def plan(self) -> DecodePlan | None:
        """The current plan (None before the first :meth:`attend` / :meth:`prepare`)."""
        return self._plan

    def __len__(self) -> int:
        return len(self._reqs)

    def __contains__(self, req: int) -> bool:
        return req in self._reqs

    # ------------------------------------------------------------------ requests

    def new_request(self) -> int:
        """Start an empty request at a new root; returns its id."""
        node = self._new_root()
        rid = self._add_request(node)
        self._refresh(node)
        return rid

    def fork(self, req: int) -> int:
        """A new request that shares all of ``req``'s tokens (no KV is copied).

        Both requests end at the same node afterwards; the next token appended to
        either goes into a new child node (the topology changes, so the plan is rebuilt
        before the next :meth:`attend`).
        """
        node = self._node_of(req)
        rid = self._add_request(node)
        self._nd_excl[node.id] = False  # two requests or more end there now
        return rid

    def prune(self, req: int | Iterable[int]) -> None:
        """End ``req``, or each request of an iterable of ids in its order (a beam
        step's dead beams in one call). Every id is checked first: an unknown, ended or
        repeated one raises before anything changes. Pages that no node references any
        more return to the pool (for a list, in one call at the end)."""
        reqs = [req] if isinstance(req, (int, np.integer)) else list(req)
        self._check_distinct(reqs, "prune")
        self._flush()
        freed: list[np.ndarray] = []
        for r in reqs:
            node = self._reqs[r]
            self._remove_request(r, node)
            self._collapse(node, freed)
        if freed:
            self.pool.allocator.decref(np.concatenate(freed) if len(freed) > 1 else freed[0])

    def accept(self, req: int, draft: int, discard: Iterable[int] = ()) -> None:
        """Speculative accept: ``req`` takes over the path of ``draft``.

        ``draft`` must descend from ``req`` (its path extends ``req``'s). Afterwards
        ``req`` ends where ``draft`` ended, ``draft`` is retired, and every request in
        ``discard`` is pruned (typically the rejected drafts).
        """
        node = self._node_of(req)
        dnode = self._node_of(draft)
        if draft == req:
            raise TreeCacheError(f"accept needs a draft other than the request itself ({req})")
        discard = [int(d) for d in discard]
        for d in discard:
            self._node_of(d)
            if d in (req, draft):
                raise TreeCacheError(f"discard lists request {d}, which accept keeps")
        self._check_distinct(discard, "discard")
        a = dnode
        while a is not None and a is not node:
            a = a.parent
        if a is None:
            raise TreeCacheError(f"request {draft} does not descend from request {req}")
        self._flush()
        # Move req to the draft's node, retire the draft id.
        node.ends.remove(req)
        dnode.ends[dnode.ends.index(draft)] = req
        del self._reqs[draft]
        self._rq_alive[draft] = False
        self._rq_node[draft] = -1
        self._reqs[req] = dnode
        self._rq_node[req] = dnode.id
        self._live_cache = None
        self._dirty()
        self._refresh(dnode)
        self._collapse(node)
        if discard:
            self.prune(discard)

    def length(self, req: int) -> int:
        """Tokens on ``req``'s path."""
        node = self._node_of(req)
        total = 0
        while node is not None:
            total += int(self._nd_seqlen[node.id])
            node = node.parent
        return total

    def slots(self, req: int) -> np.ndarray:
        """KV slots of ``req``'s whole path, root first (int64)."""
        node = self._node_of(req)
        self._flush()
        parts = []
        while node is not None:
            parts.append(node.slot_array())
            node = node.parent
        return np.concatenate(parts[::-1]) if parts else np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ tokens

    def reserve(self, requests: int | Sequence[int] | np.ndarray | None = None,
                num_tokens: int = 1) -> torch.Tensor:
        """Give requests new token slots; returns the slots (int64, cache device).

        With a list (or None: every live request) each request gets one slot, in list
        order; this is the per-step path of a model loop and costs O(requests) with no
        re-plan when every request's node is an exclusive leaf. With a single request
        id, ``num_tokens`` slots are given to it. Write K/V into the slots with
        :meth:`write` before attending. Raises :class:`OutOfPagesError` (cache
        unchanged) when the pool is full.
        """
        if requests is None:
            # Every live request, each once: no validation needed.
            reqs = self._live()[1]
            return self._to_device(self._reserve_step(reqs, trusted=True))
        if isinstance(requests, (int, np.integer)):
            return self._reserve_one(int(requests), int(num_tokens))
        else:
            reqs = np.asarray(requests, dtype=np.int64).reshape(-1)
        if num_tokens != 1:
            raise TreeCacheError(
                f"num_tokens must be 1 when reserving for a list of requests, got {num_tokens}")
        slots = self._reserve_step(reqs)
        return self._to_device(slots)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``, ``v`` ``[len(slots), num_kv_heads, head_dim]`` into ``layer``'s slots."""
        # The usual arguments pass a few cheap tests (a model calls this for every
        # layer of every step); anything else takes the checks below, which name what
        # is wrong. On the CPU the slots' range is checked too.
        fast = (type(layer) is int and 0 <= layer < self.num_layers
                and type(slots) is torch.Tensor and slots.dtype is torch.int64
                and slots.dim() == 1 and self._here(slots)
                and type(k) is torch.Tensor and type(v) is torch.Tensor
                and k.dtype is self.dtype and v.dtype is self.dtype
                and k.shape == v.shape == (slots.shape[0], self.num_kv_heads, self.head_dim)
                and self._here(k) and self._here(v))
        if fast and self._cuda_index < 0 and slots.numel():
            fast = int(slots.min()) >= 0 and int(slots.max()) < self.pool.num_slots
        if not fast:
            self._check_layer(layer)
            if not isinstance(slots, torch.Tensor):
                raise ShapeMismatchError(
                    f"slots must be the tensor reserve() returned, got {type(slots).__name__}")
            if slots.dtype != torch.int64 or slots.dim() != 1 or slots.device != self.device:
                raise ShapeMismatchError(
                    f"slots must be a 1-D torch.int64 tensor on {self.device}, got shape "
                    f"{tuple(slots.shape)}, {slots.dtype} on {slots.device}")
            if slots.device.type == "cpu" and slots.numel() and (
                    int(slots.min()) < 0 or int(slots.max()) >= self.pool.num_slots):
                raise ShapeMismatchError(
                    f"slots must lie in [0, {self.pool.num_slots}), got values in "
                    f"[{int(slots.min())}, {int(slots.max())}]")
            want = (slots.numel(), self.num_kv_heads, self.head_dim)
            for name, t in (("k", k), ("v", v)):
                if tuple(t.shape) != want:
                    raise ShapeMismatchError(
                        f"{name} has shape {tuple(t.shape)}, expected [len(slots), "
                        f"num_kv_heads, head_dim] = {list(want)}")
                self._check_dtype_device(name, t)
        # (Triton launches on the current device: from another one, the two copies.)
        if (FUSED_KV_WRITE and self._cuda_index >= 0 and self.backend is Backend.TRITON
                and kv_write_ok(k, v) and torch.cuda.current_device() == self._cuda_index):
            n = slots.shape[0]
            if n:
                self._kv_write(n, k.stride(0), v.stride(0))(
                    self._k_layers[layer], self._v_layers[layer], slots, k, v)
            return
        self._k_layers[layer].index_copy_(0, slots, k)
        self._v_layers[layer].index_copy_(0, slots, v)

    def _kv_write(self, n: int, k_stride: int, v_stride: int):
        """The prepared K/V write of ``n`` rows from sources of these row strides (see
        :data:`FUSED_KV_WRITE`): one per pair of strides, resized for another ``n``."""
        key = (k_stride, v_stride)
        launch = self._kv_writes.get(key)
        if launch is None:
            if len(self._kv_writes) >= 8:  # sources of many layouts: keep a few
                self._kv_writes.clear()
            launch = self._kv_writes[key] = kv_write_launcher(
                n, self.num_kv_heads * self.head_dim, k_stride, v_stride)
        elif launch.grid[0] != n:
            launch = self._kv_writes[key] = launch.resized(n, (), ())
        return launch

    def append(self, req: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append ``n`` tokens to ``req``; ``k``, ``v`` are ``[num_layers, n, num_kv_heads, head_dim]``.

        Returns the slots used. Raises :class:`OutOfPagesError` (cache unchanged).
        """
        self._node_of(req)
        for name, t in (("k", k), ("v", v)):
            if (t.dim() != 4 or t.shape[0] != self.num_layers or t.shape[2] != self.num_kv_heads
                    or t.shape[3] != self.head_dim):
                raise ShapeMismatchError(
                    f"{name} has shape {tuple(t.shape)}, expected [num_layers, n, num_kv_heads, "
                    f"head_dim] = [{self.num_layers}, n, {self.num_kv_heads}, {self.head_dim}]")
            self._check_dtype_device(name, t)
        if k.shape[1] != v.shape[1]:
            raise ShapeMismatchError(f"k has {k.shape[1]} tokens but v has {v.shape[1]}")
        n = int(k.shape[1])
        if n == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        slots = self.reserve(req, n)
        self.pool.k.index_copy_(1, slots, k)
        self.pool.v.index_copy_(1, slots, v)
        return slots

    # ------------------------------------------------------------------ attention

    def prepare(self, requests: Sequence[int] | None = None) -> DecodePlan:
        """Build the plan for ``requests`` now if it is stale (else reuse it).

        :meth:`attend` calls this itself; call it before capturing a CUDA graph so that
        no planning happens during capture.
        """
        key = self._requests_key(requests)
        if self._plan_dirty or self._plan is None or key != self._plan_requests:
            self._rebuild(key)
        return self._plan

    def attend(self, q: torch.Tensor, layer: int = 0, requests: Sequence[int] | None = None,
               *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode attention of one query per request over its whole path.

        Parameters
        ----------
        q : Tensor ``[len(requests), num_qo_heads, head_dim]``, the cache's dtype and device.
        layer : int
            Which layer's K/V to read.
        requests : list of request ids, optional
            Row order of ``q`` (default :attr:`requests`, the live requests in creation order).
        out : Tensor like ``q``, optional
            Output buffer (for CUDA graphs); allocated if omitted.

        Returns
        -------
        Tensor like ``q``: row ``i`` attends every token on ``requests[i]``'s path.
        """
        if not (type(layer) is int and 0 <= layer < self.num_layers):
            self._check_layer(layer)
        plan = self.prepare(requests)
        want = (plan.num_requests, self.num_qo_heads, self.head_dim)
        # As in write: cheap tests first, the checks that name what is wrong after.
        if not (type(q) is torch.Tensor and q.shape == want and q.dtype is self.dtype
                and self._here(q)):
            if not isinstance(q, torch.Tensor) or tuple(q.shape) != want:
                got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
                raise ShapeMismatchError(
                    f"q has shape {got}, expected [len(requests), num_qo_heads, head_dim] = "
                    f"{list(want)}")
            self._check_dtype_device("q", q)
        if q.stride(-1) != 1:
            q = q.contiguous()
        if out is None:
            out = torch.empty_like(q)
        elif not (type(out) is torch.Tensor and out.shape == want and out.dtype is self.dtype
                  and self._here(out) and out.stride(-1) == 1):
            if not isinstance(out, torch.Tensor):
                raise ShapeMismatchError(
                    f"out must be a torch.Tensor like q, got {type(out).__name__}")
            if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
                raise ShapeMismatchError(
                    f"out is {tuple(out.shape)} {out.dtype} on {out.device}, expected q's "
                    f"{tuple(q.shape)} {q.dtype} on {q.device}")
            if out.stride(-1) != 1:
                raise ShapeMismatchError(
                    f"out must have a contiguous last dimension (stride 1), got strides "
                    f"{tuple(out.stride())}")
        if plan.num_requests == 0:
            return out
        return plan.run(q, self._k_layers[layer], self._v_layers[layer], out,
                        sm_scale=self.sm_scale, logit_cap=self.logit_cap,
                        backend=self.backend, check=False)

    # ------------------------------------------------------------------ inspection

    def tree_info(self, requests: Sequence[int] | None = None) -> tuple[list[KVTreeNode], list[int]]:
        """A snapshot of the forest as seed-style :class:`KVTreeNode` objects.

        Returns ``(nodes, request_ids)``: node ids are ``0..n-1`` (parents before
        children), ``requests`` lists hold row indices into ``request_ids`` (default:
        the live requests), so the snapshot feeds :func:`treecache.fasttree_preparation`.
        Nodes not on any listed request's path are included with empty request lists.
        """
        self._flush()
        reqs = list(self._live()[0]) if requests is None else [int(r) for r in requests]
        order, parent = self._topo_order()
        index = {nd.id: i for i, nd in enumerate(order)}
        out = []
        for i, nd in enumerate(order):
            out.append(KVTreeNode(parent=parent[i],
                                  id=i, seqlen=int(self._nd_seqlen[nd.id]),
                                  num_children=len(nd.children), requests=[]))
        for row, r in enumerate(reqs):
            nd = self._node_of(r)
            while nd is not None:
                out[index[nd.id]].requests.append(row)
                nd = nd.parent
        return out, reqs

    def to_networkx(self):
        """The forest as a ``networkx.DiGraph``: node attributes ``seqlen``, ``slots``,
        ``pages``, ``requests`` (ids ending there); edges parent -> child."""
        import networkx as nx

        self._flush()
        g = nx.DiGraph()
        for nd in self._nodes.values():
            g.add_node(nd.id, seqlen=int(self._nd_seqlen[nd.id]),
                       slots=nd.slot_array().tolist(), pages=nd.page_array().tolist(),
                       requests=list(nd.ends))
        for nd in self._nodes.values():
            if nd.parent is not None:
                g.add_edge(nd.parent.id, nd.id)
        return g

    def stats(self) -> dict:
        """Pages used/free, unique vs logical tokens, plan rebuilds, nodes, requests."""
        alloc = self.pool.allocator
        unique = int(sum(int(self._nd_seqlen[i]) for i in self._nodes))
        logical = int(sum(self.length(r) for r in self._reqs))
        per_token = 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.pool.k.element_size()
        return {
            "requests": len(self._reqs),
            "nodes": len(self._nodes),
            "pages_used": alloc.num_used,
            "pages_free": alloc.num_free,
            "pages_total": alloc.num_pages,
            "page_size": self.page_size,
            "unique_tokens": unique,
            "logical_tokens": logical,
            "sharing_ratio": (logical / unique) if unique else 1.0,
            "kv_bytes_used": alloc.num_used * self.page_size * per_token,
            "kv_bytes_unshared": logical * per_token,
            "plan_rebuilds": self.plan_rebuilds,
            "backend": self.backend.value,
        }

    def check(self) -> None:
        """Verify every invariant; raise :class:`TreeCacheError` naming the broken one.

        A forest (acyclic, parent/child links agree, networkx agrees); every live
        request a root-to-node path; node token counts equal their slots; every slot in a
        page its node holds; no slot in two nodes; page reference counts equal the
        number of nodes holding each page; free + used pages = pool.
        """
        import networkx as nx

        self._flush()
        alloc = self.pool.allocator
        alloc.check()
        seen_slots = []
        counts = np.zeros(alloc.num_pages, dtype=np.int64)
        for nd in self._nodes.values():
            if nd.parent is not None:
                if nd.parent.id not in self._nodes or self._nodes[nd.parent.id] is not nd.parent:
                    raise TreeCacheError(f"node {nd.id}'s parent {nd.parent.id} is not in the cache")
                if sum(c is nd for c in nd.parent.children) != 1:
                    raise TreeCacheError(f"node {nd.id} is not listed once among its parent's children")
            for c in nd.children:
                if c.parent is not nd:
                    raise TreeCacheError(f"node {c.id} is a child of {nd.id} but points elsewhere")
            s = nd.slot_array()
            if s.size != self._nd_seqlen[nd.id]:
                raise TreeCacheError(
                    f"node {nd.id} has {s.size} slots but seqlen {int(self._nd_seqlen[nd.id])}")
            run = bool(s.size < 2 or (s[1:] == s[:-1] + 1).all())
            ends = (int(s[0]), int(s[-1])) if s.size else (-1, -1)
            if (nd.run, nd.first, nd.last) != (run, *ends):
                raise TreeCacheError(
                    f"node {nd.id}: run flag out of date (run {nd.run}, first {nd.first}, "
                    f"last {nd.last}; its slots: run {run}, first {ends[0]}, last {ends[1]})")
            p = nd.page_array()
            if np.unique(p).size != p.size:
                raise TreeCacheError(f"node {nd.id} holds a page twice")
            if s.size and not np.isin(s // self.page_size, p).all():
                raise TreeCacheError(f"node {nd.id} has a slot outside its pages")
            counts[p] += 1
            seen_slots.append(s)
            if not nd.ends and not nd.children:
                raise TreeCacheError(f"node {nd.id} has no requests and no children (leaked)")
            excl = (not nd.children) and len(nd.ends) == 1
            if bool(self._nd_excl[nd.id]) != excl:
                raise TreeCacheError(f"node {nd.id}: exclusive flag out of date")
        allslots = np.concatenate(seen_slots) if seen_slots else np.zeros(0, np.int64)
        if np.unique(allslots).size != allslots.size:
            raise TreeCacheError("a KV slot is held by two nodes")
        if not np.array_equal(counts, alloc.refcount.astype(np.int64)):
            bad = np.nonzero(counts != alloc.refcount)[0][:5].tolist()
            raise TreeCacheError(f"page reference counts disagree with node holdings at pages {bad}")
        if alloc.num_free + alloc.num_used != alloc.num_pages:
            raise TreeCacheError("free + used pages != pool size")
        g = self.to_networkx()
        if g.number_of_nodes() and not nx.is_forest(g.to_undirected()):
            raise TreeCacheError("the node graph is not a forest")
        for r, nd in self._reqs.items():
            if nd.id not in self._nodes or self._nodes[nd.id] is not nd:
                raise TreeCacheError(f"request {r} ends at a node that is not in the cache")
            if r not in nd.ends:
                raise TreeCacheError(f"request {r} is not listed at its end node {nd.id}")
            root = nd
            while root.parent is not None:
                root = root.parent
            if g.in_degree(root.id) != 0 or not nx.has_path(g, root.id, nd.id):
                raise TreeCacheError(f"request {r} is not a root-to-node path")
            if self._rq_node[r] != nd.id or not self._rq_alive[r]:
                raise TreeCacheError(f"request {r}: fast-path mirror out of date")
        ends = sum(len(nd.ends) for nd in self._nodes.values())
        if ends != len(self._reqs):
            raise TreeCacheError(f"{ends} request ends listed at nodes, {len(self._reqs)} live requests")

    # ------------------------------------------------------------------ internals

    def _check_dtype_device(self, name: str, t: torch.Tensor) -> None:
        if t.dtype != self.dtype:
            raise ShapeMismatchError(f"{name} has dtype {t.dtype}, the cache stores {self.dtype}")
        if t.device != self.device:
            raise ShapeMismatchError(f"{name} is on {t.device}, the cache is on {self.device}")

    def _here(self, t: torch.Tensor) -> bool:
        """Whether tensor ``t`` is on the cache's device (cheaper than comparing
        ``t.device``, which builds a device object)."""
        i = self._cuda_index
        return t.is_cuda and t.get_device() == i if i >= 0 else t.is_cpu

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise ShapeMismatchError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def _node_of(self, req) -> _Node:
        try:
            return self._reqs[req]
        except (KeyError, TypeError):
            pass
        if isinstance(req, (int, np.integer)) and 0 <= req < self._next_req:
            raise UnknownRequestError(f"request {req} was pruned or accepted into another")
        raise UnknownRequestError(f"unknown request id {req!r}")

    def _check_distinct(self, reqs: list, what: str) -> None:
        """Every id of ``reqs`` live (else :class:`UnknownRequestError`) and listed once
        (else ``TreeCacheError``: "``what`` lists request ``r`` twice")."""
        try:
            ids = set(reqs)
        except TypeError:  # an unhashable id: the loop below names it
            pass
        else:
            if len(ids) == len(reqs) and ids <= self._reqs.keys():
                return
        seen = set()
        for r in reqs:
            self._node_of(r)
            if r in seen:
                raise TreeCacheError(f"{what} lists request {r} twice")
            seen.add(r)

    def _live(self) -> tuple[tuple[int, ...], np.ndarray]:
        if self._live_cache is None:
            ids = tuple(self._reqs.keys())
            self._live_cache = (ids, np.asarray(ids, dtype=np.int64))
        return self._live_cache

    def _requests_key(self, requests) -> tuple[int, ...]:
        if requests is None:
            return self._live()[0]
        last = self._last_requests
        if (last is not None and not self._plan_dirty and last[1] is self._plan_requests
                and type(requests) is type(last[0]) and requests == last[0]):
            # The same list (or tuple) as the last call, unchanged (compared element by
            # element, not converted): a model's layers pass one list per step.
            return last[1]
        seq = requests
        if isinstance(requests, torch.Tensor):
            requests = requests.tolist()
        elif isinstance(requests, np.ndarray):
            requests = requests.tolist()
        key = tuple(int(r) for r in requests)
        if key == self._plan_requests and not self._plan_dirty:
            key = self._plan_requests
        else:
            ids = set(key)
            if len(ids) != len(key) or not ids <= self._reqs.keys():
                for r in key:
                    self._node_of(r)  # names the first unknown id
                raise TreeCacheError("requests lists a request twice")
        if type(seq) is list:
            self._last_requests = (seq.copy(), key)
        elif type(seq) is tuple:
            self._last_requests = (seq, key)
        return key

    def _take_node_ids(self, count: int) -> int:
        """The next ``count`` node ids (the first is returned), the id-indexed arrays
        grown to hold them. Ids are never reused, so their entries still hold the fill
        values (no tokens, not exclusive, no tail page)."""
        first = self._next_node
        end = self._next_node = first + count
        if end > self._nd_seqlen.size:
            self._nd_seqlen = _grow(self._nd_seqlen, end, 0)
            self._nd_excl = _grow(self._nd_excl, end, False)
            self._nd_tailpage = _grow(self._nd_tailpage, end, -1)
            self._nd_tailfree = _grow(self._nd_tailfree, end, 0)
        self._plan_dirty = True
        return first

    def _new_root(self) -> _Node:
        nid = self._take_node_ids(1)
        node = self._nodes[nid] = _Node(nid, None)
        return node

    def _add_request(self, node: _Node) -> int:
        rid = self._next_req
        self._next_req = rid + 1
        if rid >= self._rq_node.size or rid >= self._rq_alive.size or rid >= self._plan_rows.size:
            self._rq_node = _grow(self._rq_node, rid + 1, -1)
            self._rq_alive = _grow(self._rq_alive, rid + 1, False)
            self._plan_rows = _grow(self._plan_rows, rid + 1, -1)
        self._reqs[rid] = node
        node.ends.append(rid)
        self._rq_node[rid] = node.id
        self._rq_alive[rid] = True
        self._live_cache = None
        self._plan_dirty = True
        return rid

    def _remove_request(self, req: int, node: _Node) -> None:
        ends = node.ends
        ends.remove(req)
        del self._reqs[req]
        self._rq_alive[req] = False
        self._rq_node[req] = -1
        self._live_cache = None
        self._plan_dirty = True
        self._nd_excl[node.id] = not node.children and len(ends) == 1

    def _refresh(self, node: _Node) -> None:
        self._nd_excl[node.id] = (not node.children) and len(node.ends) == 1

    def _dirty(self) -> None:
        self._plan_dirty = True

    def _collapse(self, node: _Node, freed: list | None = None) -> None:
        """Delete request-less leaves upwards; merge a request-less single-child node
        into its child. The deleted nodes' pages are released, or with ``freed`` their
        page arrays added to it for the caller to release."""
        excl = self._nd_excl
        while node is not None and not node.ends and not node.children:
            parent = node.parent
            if freed is None:
                self.pool.allocator.decref(node.page_array())
            else:
                freed += node.pages
            del self._nodes[node.id]
            excl[node.id] = False
            if parent is not None:
                siblings = parent.children
                siblings.remove(node)
                excl[parent.id] = not siblings and len(parent.ends) == 1
            node = parent
            self._plan_dirty = True
        if node is not None and not node.ends and len(node.children) == 1:
            child = node.children[0]
            # The child absorbs the node: tokens keep their slots, requests don't move
            # (the arrays are joined when they are read, see _joined).
            child.slots = node.slots + child.slots
            child.pages = node.pages + child.pages
            self._join_runs(node, child)
            self._nd_seqlen[child.id] += self._nd_seqlen[node.id]
            child.parent = node.parent
            if node.parent is not None:
                siblings = node.parent.children
                siblings[siblings.index(node)] = child
            del self._nodes[node.id]
            excl[node.id] = False
            self._plan_dirty = True

    def _flush(self) -> None:
        """Attach tokens and pages added by the fast path to their node objects."""
        slot_nodes, page_nodes = self._pending_nodes, self._pending_page_nodes
        # Steps where every request took a fresh page list the same node arrays for
        # slots and pages (always so with page_size 1): group the nodes once.
        together = (bool(slot_nodes) and len(slot_nodes) == len(page_nodes)
                    and all(x is y for x, y in zip(slot_nodes, page_nodes)))
        if slot_nodes:
            fields = {"slots": _cat(self._pending_slots)}
            if together:
                fields["pages"] = _cat(self._pending_pages)
            # One step's nodes are distinct (reserve refuses a request twice and gives
            # each its own exclusive leaf).
            self._attach(_cat(slot_nodes), fields, distinct=len(slot_nodes) == 1)
        if page_nodes and not together:
            self._attach(_cat(page_nodes), {"pages": _cat(self._pending_pages)},
                         distinct=len(page_nodes) == 1)
        for pending in (slot_nodes, self._pending_slots, page_nodes, self._pending_pages):
            pending.clear()

    def _attach(self, nodes: np.ndarray, fields: dict[str, np.ndarray],
                distinct: bool = False) -> None:
        """Append to every node the entries of ``fields`` (node attribute -> values,
        one per entry of ``nodes``) that ``nodes`` gives it, in their order
        (``distinct``: ``nodes`` holds no id twice); with ``"slots"`` also keep each
        node's run flag and first and last slot."""
        if nodes.size == 0:
            return
        if distinct:
            order = None
            objs = [self._nodes[nid] for nid in nodes.tolist()]
        else:
            order = np.argsort(nodes, kind="stable")
            nodes = nodes[order]
            cut = (np.flatnonzero(nodes[1:] != nodes[:-1]) + 1).tolist()
            objs = [self._nodes[nid] for nid in nodes[[0] + cut].tolist()]
        if len(objs) == nodes.size:
            # One entry per node (a step's usual case): its one-element views, made by
            # iterating over the rows of a column.
            for field, values in fields.items():
                if order is not None:
                    values = values[order]
                if field != "slots":
                    for nd, part in zip(objs, values.reshape(-1, 1)):
                        getattr(nd, field).append(part)
                    continue
                for nd, part, v in zip(objs, values.reshape(-1, 1), values.tolist()):
                    nd.slots.append(part)
                    last = nd.last
                    if last < 0:
                        nd.first = v
                    elif v != last + 1:
                        nd.run = False
                    nd.last = v
            return
        starts, ends = [0] + cut, cut + [nodes.size]
        for field, values in fields.items():
            values = values[order]
            if field != "slots":
                for nd, a, b in zip(objs, starts, ends):
                    getattr(nd, field).append(values[a:b])
                continue
            # Per node: its first and last new slot, and whether its new slots follow
            # each other by one.
            at = np.array(starts, dtype=np.int64)
            heads = values[at].tolist()
            tails = values[np.array(ends, dtype=np.int64) - 1].tolist()
            gap = (values[1:] != values[:-1] + 1) & (nodes[1:] == nodes[:-1])
            inner = np.ones(len(objs), dtype=bool)
            inner[at.searchsorted(gap.nonzero()[0] + 1, side="right") - 1] = False
            for nd, a, b, h, t, ok in zip(objs, starts, ends, heads, tails, inner.tolist()):
                nd.slots.append(values[a:b])
                _note_run(nd, h, t, ok)

    def _join_runs(self, upper: _Node, lower: _Node) -> None:
        """Run flag and first and last slot of node ``lower`` after it absorbed its
        parent ``upper``'s slots (``upper``'s first)."""
        if upper.last < 0:
            return  # the parent held no slots
        if lower.last < 0:  # the child held none
            lower.run, lower.last = upper.run, upper.last
        elif lower.first != upper.last + 1 or not upper.run:
            lower.run = False
        lower.first = upper.first

    def _reserve_step(self, reqs: np.ndarray, trusted: bool = False) -> np.ndarray:
        """One slot per request; the fast path when every node is an exclusive leaf.

        ``trusted``: ``reqs`` are live and distinct (the live list itself).
        """
        if reqs.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not trusted:
            if (reqs.min() < 0 or reqs.max() >= self._rq_alive.size
                    or not self._rq_alive[reqs].all()):
                bad = [int(r) for r in reqs
                       if r < 0 or r >= self._rq_alive.size or not self._rq_alive[r]]
                self._node_of(bad[0])
            # Duplicate check in O(n): scatter positions, read them back.
            ar = np.arange(reqs.size)
            self._rq_scratch = _grow(self._rq_scratch, self._rq_alive.size, -1)
            self._rq_scratch[reqs] = ar
            if (self._rq_scratch[reqs] != ar).any():
                raise TreeCacheError("reserve lists a request twice")
        nodes = self._rq_node[reqs]
        if self._nd_excl[nodes].all():
            return self._extend_exclusive(reqs, nodes, trusted)
        # Some requests need a new leaf. All-or-nothing on the page count.
        excl = self._nd_excl[nodes]
        need = reqs.size - int(np.count_nonzero(self._nd_tailfree[nodes[excl]]))
        if need > self.pool.allocator.num_free:
            raise OutOfPagesError(
                f"reserve needs up to {need} new pages, {self.pool.allocator.num_free} are free")
        # A new leaf for each request whose node is shared (moving a request out never
        # makes a node exclusive); then every request ends at an exclusive node and
        # takes its slot as in an append-only step, pages handed out in list order.
        self._new_leaves(reqs[~excl])
        return self._extend_exclusive(reqs, self._rq_node[reqs])

    def _extend_exclusive(self, reqs: np.ndarray, nodes: np.ndarray,
                          trusted: bool = False) -> np.ndarray:
        p = self.page_size
        if p == 1:  # every tail page is full
            n_fresh = nodes.size
        else:
            tailfree = self._nd_tailfree[nodes]
            fresh = tailfree == 0
            n_fresh = int(np.count_nonzero(fresh))
        top = self.pool.allocator.num_free
        new_pages = self.pool.allocator.allocate(n_fresh)  # raises before any change
        # When every request takes a fresh page, its slot starts the page
        # free_stack[top - 1 - i]: the device can derive the slots (see _to_device).
        self._pending_stack_top = top if n_fresh == nodes.size else None
        if n_fresh == nodes.size:  # every tail page is full (always so with page_size 1)
            slots = new_pages * p if p != 1 else new_pages
            self._nd_tailpage[nodes] = new_pages
            if p != 1:
                self._nd_tailfree[nodes] = p - 1
            self._pending_page_nodes.append(nodes)
            self._pending_pages.append(new_pages)
        else:
            slots = np.empty(nodes.size, dtype=np.int64)
            old = ~fresh
            slots[old] = self._nd_tailpage[nodes[old]] * p + (p - tailfree[old])
            slots[fresh] = new_pages * p
            self._nd_tailfree[nodes[old]] -= 1
            if n_fresh:
                fn = nodes[fresh]
                self._nd_tailpage[fn] = new_pages
                self._nd_tailfree[fn] = p - 1
                self._pending_page_nodes.append(fn)
                self._pending_pages.append(new_pages)
        self._nd_seqlen[nodes] += 1
        self._pending_nodes.append(nodes)
        self._pending_slots.append(slots)
        # Grow the plan's tail vnodes in place when this plan covers these requests.
        # Its device half travels with the slots (see _to_device).
        if not self._plan_dirty and self._plan is not None:
            live_ids, live = self._live()
            if trusted and reqs is live and (self._plan_requests is live_ids
                                             or self._plan_requests == live_ids):
                # The plan's rows are the live requests in order.
                upd = self._plan.prepare_tails(None, slots)
            else:
                rows = self._plan_rows[reqs]
                upd = (None if (rows < 0).any()
                       else self._plan.prepare_tails(rows, slots, assume_unique=True))
            if upd is None:
                self._dirty()
            else:
                self._pending_plan_update = upd
        return slots

    def _reserve_one(self, req: int, n: int) -> torch.Tensor:
        self._node_of(req)
        if n < 0:
            raise TreeCacheError(f"num_tokens must be >= 0, got {n}")
        if n == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        nid = int(self._rq_node[req])
        if n == 1 and self._nd_excl[nid]:
            return self._to_device(self._reserve_step(np.array([req], dtype=np.int64)))
        return self._to_device(self._reserve_slow(req, n))

    def _reserve_slow(self, req: int, n: int) -> np.ndarray:
        node = self._reqs[req]
        p = self.page_size
        alloc = self.pool.allocator
        excl = bool(self._nd_excl[node.id])
        have = int(self._nd_tailfree[node.id]) if excl else 0
        need_pages = max(0, -(-(n - have) // p))
        if need_pages > alloc.num_free:
            raise OutOfPagesError(
                f"request {req} needs {need_pages} more pages for {n} tokens, "
                f"{alloc.num_free} are free")
        self._flush()
        if not excl:
            self._new_leaves(np.array([req], dtype=np.int64))
            node = self._reqs[req]
            have = 0
        pages = alloc.allocate(need_pages)
        nid = node.id
        parts = []
        if have:
            use = min(have, n)
            start = int(self._nd_tailpage[nid]) * p + (p - have)
            parts.append(np.arange(start, start + use, dtype=np.int64))
            self._nd_tailfree[nid] -= use
        if need_pages:
            rest = n - sum(x.size for x in parts)
            parts.append((pages[:, None] * p + np.arange(p)).reshape(-1)[:rest])
            node.pages.append(pages)
            self._nd_tailpage[nid] = pages[-1]
            self._nd_tailfree[nid] = need_pages * p - rest
        slots = np.concatenate(parts)
        node.slots.append(slots)
        _note_run(node, int(slots[0]), int(slots[-1]),
                  slots.size < 2 or bool((slots[1:] == slots[:-1] + 1).all()))
        self._nd_seqlen[nid] += n
        # A request growing its own leaf keeps the plan: its tail vnode grows in place.
        row = int(self._plan_rows[req])
        if not (excl and not self._plan_dirty and self._plan is not None and row >= 0
                and self._plan.extend_tail(row, slots)):
            self._dirty()
        return slots

    def _new_leaves(self, reqs: np.ndarray) -> None:
        """A new (empty) leaf under each of ``reqs``' nodes (distinct, live requests), in
        order; each request moves to its leaf. The id-indexed arrays are written once for
        all."""
        if reqs.size == 0:
            return
        first = self._take_node_ids(reqs.size)
        nodes, live = self._nodes, self._reqs
        parents = []
        for nid, r in enumerate(reqs.tolist(), first):
            node = live[r]
            leaf = _Node(nid, node)
            nodes[nid] = leaf
            node.children.append(leaf)
            node.ends.remove(r)
            leaf.ends.append(r)
            live[r] = leaf
            parents.append(node.id)
        end = first + reqs.size
        self._nd_excl[parents] = False  # each has a child (a new leaf)
        self._nd_excl[first:end] = True  # a leaf where one request ends
        self._rq_node[reqs] = np.arange(first, end)

    def _to_device(self, slots: np.ndarray) -> torch.Tensor:
        upd, self._pending_plan_update = self._pending_plan_update, None
        top, self._pending_stack_top = self._pending_stack_top, None
        if self.device.type == "cpu":
            return torch.from_numpy(slots.copy())  # the cache keeps ``slots`` itself
        if upd is None:
            return to_device_async(slots, self.device)
        if top is not None and DEVICE_STEP_SLOTS:
            # Every request took a fresh page: the device reads the pages from its
            # mirror of the free stack; no copy.
            out = self._plan.send_tails_from_stack(upd, self._free_stack_mirror(top), top,
                                                   self.page_size)
            if out is not None:
                return out
        # The slots travel with the plan's tail update (one copy).
        return self._plan.send_tails(upd, slots)

    def _free_stack_mirror(self, hi: int) -> torch.Tensor:
        """The device mirror of the page allocator's free stack, valid up to entry ``hi``
        (entries that changed since the last call are copied: after frees only)."""
        alloc = self.pool.allocator
        if self._free_dev is None:
            self._free_dev = torch.empty(alloc.num_pages, dtype=torch.int64, device=self.device)
        lo, hi = alloc.mirror_range(hi)
        if lo < hi:
            src = torch.from_numpy(alloc.stack_entries(lo, hi)).pin_memory()
            self._free_dev[lo:hi].copy_(src, non_blocking=True)
            alloc.mark_mirrored(hi)
        return self._free_dev

    def _slot_table(self, parts: list[np.ndarray], total: int) -> np.ndarray:
        """The nodes' slot arrays ``parts`` one after the other (``total`` slots). On a
        GPU they are written straight into the plan buffers' staging region for the
        slot table, as the int32 the upload takes (:data:`SLOT_TABLE_IN_PLACE`), so
        that the upload copies nothing more."""
        if not parts:
            return np.zeros(0, dtype=np.int64)
        bufs = self._buffers
        out = (bufs.staged_slot_table(total)
               if SLOT_TABLE_IN_PLACE and bufs is not None else None)
        if out is None:
            return np.concatenate(parts)
        np.concatenate(parts, out=out, casting="same_kind")
        return out

    def _topo_order(self) -> tuple[list[_Node], list[int]]:
        """The nodes depth-first (roots in creation order, children in order) and each
        one's parent's position in that list (-1 for a root)."""
        order, parent = [], []
        stack = [(nd, -1) for nd in self._nodes.values() if nd.parent is None][::-1]
        while stack:
            nd, up = stack.pop()
            if nd.children:
                here = len(order)
                stack.extend([(c, here) for c in nd.children[::-1]])
            order.append(nd)
            parent.append(up)
        return order, parent

    def _rebuild(self, key: tuple[int, ...]) -> None:
        self._flush()
        order, parent = self._topo_order()
        n = len(order)
        ids = np.array([nd.id for nd in order], dtype=np.int64)
        parent = np.array(parent, dtype=np.int64)
        # Every node's slot arrays in order, one concatenation for all (a node's list
        # is joined once it holds more than _JOIN_PARTS arrays, so that it stays short).
        slot_parts = []
        for nd in order:
            if len(nd.slots) > _JOIN_PARTS:
                _joined(nd.slots)
            slot_parts += nd.slots
        # Position of every live node id (a scratch array kept across rebuilds).
        self._nd_pos = _grow(self._nd_pos, self._next_node, -1)
        index = self._nd_pos
        index[ids] = np.arange(n)
        seqlen = self._nd_seqlen[ids]
        node_tokens = self._slot_table(slot_parts, int(seqlen.sum()))
        tok_ptr = np.zeros(n, dtype=np.int64)
        if n:
            tok_ptr[1:] = np.cumsum(seqlen)[:-1]
        reqs = np.asarray(key, dtype=np.int64)
        end_nodes = self._rq_node[reqs] if reqs.size else np.zeros(0, np.int64)
        req_end = index[end_nodes]
        growable = self._nd_excl[end_nodes]
        inp = PlanInput(parent=parent, seqlen=seqlen, tok_ptr=tok_ptr, req_end=req_end,
                        node_tokens=node_tokens, growable=growable,
                        node_runs=(np.array([nd.run for nd in order], dtype=bool)
                                   if NODE_RUNS else None))
        self._plan = build_plan(
            inp, num_qo_heads=self.num_qo_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, params=self.params, device=self.device,
            buffers=self._buffers, headroom=self.plan_headroom, **self._plan_kw)
        if self._plan_requests is not None and len(self._plan_requests):
            self._plan_rows[np.asarray(self._plan_requests, dtype=np.int64)] = -1
        self._plan_rows[reqs] = np.arange(reqs.size)
        self._plan_requests = key
        self._plan_dirty = False
        self.plan_rebuilds += 1
        self.plan_version += 1
        launch_key = self._plan.launch_key
        if launch_key != self._launch_key:
            self._launch_key = launch_key
            self.launch_version += 1
        logger.debug("plan rebuilt: %d nodes, %d requests, %d vnodes", n, reqs.size,
                     self._plan.num_vnodes)
