"""The seed-compatible functional API: ``fasttree_preparation`` and ``fasttree_decode``.

A thin layer over :mod:`treecache.plan` and :mod:`kernels`. It keeps the research
artifact's call pattern working::

    metadata, node_assignments = fasttree_preparation(
        tree_info, KV_ptrs, batch_size, num_qo_heads, num_kv_heads, head_dim,
        [1024, 128], [132, 528], [132, 132], params)
    fasttree_decode(Q, K, V, O, *metadata, params.TSQs, params.TSKs, sm_scale)

and fixes what the artifact got wrong: it never prints and never modifies ``params``;
the metadata carries its plan, so decode always runs with the tiles the plan was built
for (tile sizes passed to decode must be the plan's or the ones ``params`` asked for);
forests and requests that end at internal nodes work; CPU tensors work.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch

from kernels import Backend, select_backend

from .errors import UnsupportedConfigError

from .errors import PlanMismatchError, ShapeMismatchError
from .plan import (
    DEFAULT_PARA_THRESHS1,
    DEFAULT_PARA_THRESHS2,
    DecodePlan,
    FastTreeParams,
    PlanInput,
    build_plan,
    normalize_device,
    path_token_indices,
)
from .tree import KVTreeNode, request_end_nodes, validate_tree

__all__ = [
    "FastTreeParams",
    "FastTreeMetadata",
    "fasttree_preparation",
    "fasttree_decode",
    "qkv_preparation",
    "tree_plan_input",
]

logger = logging.getLogger(__name__)

METADATA_FIELDS = (
    "vnode_to_kv_entries", "vnode_to_kv_offs", "vnode_to_kv_lens",
    "vnode_to_q_entries", "vnode_to_q_offs", "vnode_to_q_lens",
    "req_to_vnode_entries", "req_to_vnode_offs", "req_to_vnode_lens",
    "mid_o", "mid_lse", "phase_node_nums", "phase_node_offsets",
)

_announced: set[str] = set()


def _announce(backend: Backend) -> None:
    if backend.value not in _announced:
        _announced.add(backend.value)
        logger.info("treecache decode runs on the %s backend", backend.value)


class FastTreeMetadata(tuple):
    """The 13 metadata entries of the seed API, plus the :class:`DecodePlan` behind them.

    Unpacks like the seed's tuple (``fasttree_decode(q, k, v, o, *metadata, ...)``);
    ``metadata.plan`` is the named plan object. Fields, in order: ``vnode_to_kv_entries``
    (KV slot of every vnode token), ``vnode_to_kv_offs``/``_lens``, ``vnode_to_q_entries``
    (request of every mid row), ``vnode_to_q_offs``/``_lens``, ``req_to_vnode_entries``
    (mid rows of every request), ``req_to_vnode_offs``/``_lens``, ``mid_o`` ``[rows, Hq, D]``
    float32, ``mid_lse`` ``[rows, Hq]`` float32 (base-2), ``phase_node_nums`` and
    ``phase_node_offsets`` (lists of two ints). A masked plan (``plan.masked``) also
    reads row masks of the kv entries (``plan.tensors()["kv_mask"]``), which the 13
    entries do not hold; :func:`fasttree_decode` applies them.
    """

    plan: DecodePlan

    def __new__(cls, plan: DecodePlan):
        t = plan.tensors()
        nums = [0, 0]
        offs = [0, 0]
        for i, ph in enumerate(plan.phases):
            # A plan with one phase reports it in the slot its tiles belong to.
            slot = i if len(plan.phases) == 2 else (0 if ph.q_tile == plan.q_tiles[0] else 1)
            nums[slot] = ph.num_vnodes
            offs[slot] = ph.vnode_offset
        items = (
            t["kv_indices"], t["vnode_kv_start"], t["vnode_kv_len"],
            t["mid_q_rows"], t["vnode_q_start"], t["vnode_q_len"],
            t["req_mid_rows"], t["req_mid_start"], t["req_mid_len"],
            t["mid_o"], t["mid_lse"], nums, offs,
        )
        self = super().__new__(cls, items)
        self.plan = plan
        # The first tensor remembers its plan, so that ``*metadata`` unpacking keeps it.
        items[0]._treecache_plan = plan
        return self

    def _asdict(self) -> dict:
        return dict(zip(METADATA_FIELDS, self))


def tree_plan_input(tree_info: Sequence[KVTreeNode], KV_ptrs: Sequence[int],
                    batch_size: int | None = None) -> PlanInput:
    """Validate ``tree_info`` / ``KV_ptrs`` and turn them into a :class:`PlanInput`."""
    validate_tree(tree_info, num_requests=batch_size)
    n = len(tree_info)
    parent = np.fromiter((nd.parent for nd in tree_info), dtype=np.int64, count=n)
    seqlen = np.fromiter((nd.seqlen for nd in tree_info), dtype=np.int64, count=n)
    ptrs = np.asarray(list(KV_ptrs), dtype=np.int64)
    if ptrs.shape != (n + 1,):
        raise PlanMismatchError(
            f"KV_ptrs must have len(tree_info) + 1 = {n + 1} entries, got {ptrs.size}")
    bad = np.nonzero(np.diff(ptrs) != seqlen)[0]
    if bad.size:
        i = int(bad[0])
        raise PlanMismatchError(
            f"KV_ptrs[{i + 1}] - KV_ptrs[{i}] = {int(ptrs[i + 1] - ptrs[i])} but node {i} "
            f"has seqlen {int(seqlen[i])}")
    if n and ptrs[0] < 0:
        raise PlanMismatchError(f"KV_ptrs[0] must be >= 0, got {int(ptrs[0])}")
    req_end = request_end_nodes(tree_info, batch_size)
    return PlanInput(parent=parent, seqlen=seqlen, tok_ptr=ptrs[:-1], req_end=req_end)


def fasttree_preparation(
    tree_info: Sequence[KVTreeNode],
    KV_ptrs: Sequence[int],
    batch_size: int,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    KV_SPLIT_SIZES: Sequence[int] | None = None,
    para_threshs1: Sequence[int] = DEFAULT_PARA_THRESHS1,
    para_threshs2: Sequence[int] = DEFAULT_PARA_THRESHS2,
    params: FastTreeParams | None = None,
    device: torch.device | str | None = None,
) -> tuple[FastTreeMetadata, list[int]]:
    """Plan decode attention over a tree (or forest) of KV nodes.

    Parameters
    ----------
    tree_info : list[KVTreeNode]
        Nodes with ids ``0..n-1``; every request ``0..batch_size-1`` is a root-to-node
        path (listed in the ``requests`` of each node on it).
    KV_ptrs : list[int]
        ``len(tree_info) + 1`` offsets: node ``i``'s tokens are rows
        ``KV_ptrs[i] .. KV_ptrs[i+1]-1`` of ``k_buffer``/``v_buffer``.
    batch_size : int
        Number of requests (rows of ``q``).
    num_qo_heads, num_kv_heads, head_dim : int
        Attention shape; head_dim in {16, 32, 64, 128, 256}.
    KV_SPLIT_SIZES, para_threshs1, para_threshs2 : two ints each
        KV chunking and the parallelism thresholds (see :func:`treecache.plan.build_plan`);
        ``KV_SPLIT_SIZES=None`` (default) lets the plan choose its chunk length.
    params : FastTreeParams, optional
        Cost model and tiles; never modified.
    device : torch device, optional
        Where the metadata tensors live (default: CUDA if available, else CPU).

    Returns
    -------
    (metadata, node_assignments)
        ``metadata`` is a :class:`FastTreeMetadata` (13 entries; ``.plan`` is the plan);
        ``node_assignments[i]`` is 0 (split-K) or 1 (split-Q).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = normalize_device(device)
    inp = tree_plan_input(tree_info, KV_ptrs, batch_size)
    plan = build_plan(
        inp, num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        params=params, kv_split_sizes=KV_SPLIT_SIZES, para_threshs1=para_threshs1,
        para_threshs2=para_threshs2, device=device,
    )
    plan.total_tokens = int(KV_ptrs[-1]) if len(KV_ptrs) else 0
    return FastTreeMetadata(plan), list(plan.node_assignments)


def resolve_backend(device, backend) -> Backend:
    """:func:`kernels.select_backend`, raising :class:`UnsupportedConfigError` on a bad choice."""
    try:
        return select_backend(device, backend)
    except ValueError as exc:
        raise UnsupportedConfigError(str(exc)) from None


def _plan_of(metadata_first) -> DecodePlan:
    plan = getattr(metadata_first, "_treecache_plan", None)
    if plan is None:
        raise PlanMismatchError(
            "fasttree_decode needs the metadata returned by fasttree_preparation "
            "(pass it as *metadata)")
    return plan


def fasttree_decode(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                    o: torch.Tensor, *args, phase_q_tile_sizes=None, phase_kv_tile_sizes=None,
                    sm_scale: float | None = None, logit_cap: float = -1,
                    backend: str = "auto", graph: bool = False) -> torch.Tensor:
    """Decode attention over the planned tree; writes ``o`` in place and returns it.

    Called as in the seed: ``fasttree_decode(q, k, v, o, *metadata, phase_q_tile_sizes,
    phase_kv_tile_sizes, sm_scale, logit_cap=-1)``.

    Parameters
    ----------
    q : Tensor ``[batch_size, num_qo_heads, head_dim]``, fp16 / bf16 / fp32.
    k_buffer, v_buffer : Tensor ``[total_tokens, num_kv_heads, head_dim]``, same dtype;
        ``total_tokens`` must equal ``KV_ptrs[-1]``.
    o : Tensor like ``q``; overwritten.
    *args : the 13 metadata entries, then optionally the three seed positionals
        ``phase_q_tile_sizes``, ``phase_kv_tile_sizes``, ``sm_scale`` (and ``logit_cap``).
    phase_q_tile_sizes, phase_kv_tile_sizes : two ints each, optional
        Must equal the plan's tiles or the ones its ``params`` asked for; the plan's own
        tiles are used either way (a mismatch raises :class:`PlanMismatchError`).
    sm_scale : float, optional
        Softmax scale, default ``1/sqrt(head_dim)``.
    logit_cap : float
        Soft cap ``cap * tanh(s / cap)`` of the scaled logits; off when ``<= 0``.
    backend : "auto", "triton" or "torch"
        "auto" runs Triton on CUDA, the Triton interpreter on CPU when
        ``TRITON_INTERPRET=1``, else torch (a log line says which).
    graph : bool
        Replay the launches from a CUDA graph captured on the first call with these
        tensors (see :meth:`treecache.plan.DecodePlan.run`); saves the host time of the
        kernel launches on repeated calls with the same buffers.
    """
    if len(args) < 13:
        raise PlanMismatchError(
            f"fasttree_decode expects the 13 metadata entries after o, got {len(args)} "
            "positional arguments")
    meta, extra = args[:13], list(args[13:])
    if len(extra) > 4:
        raise TypeError(f"fasttree_decode got {len(extra)} extra positional arguments (max 4)")
    names = ["phase_q_tile_sizes", "phase_kv_tile_sizes", "sm_scale", "logit_cap"]
    given = dict(zip(names, extra))
    if "phase_q_tile_sizes" in given:
        phase_q_tile_sizes = given["phase_q_tile_sizes"]
    if "phase_kv_tile_sizes" in given:
        phase_kv_tile_sizes = given["phase_kv_tile_sizes"]
    if "sm_scale" in given:
        sm_scale = given["sm_scale"]
    if "logit_cap" in given:
        logit_cap = given["logit_cap"]
    plan = _plan_of(meta[0])
    _check_tiles(plan, phase_q_tile_sizes, "phase_q_tile_sizes", plan.q_tiles,
                 plan.requested_q_tiles)
    _check_tiles(plan, phase_kv_tile_sizes, "phase_kv_tile_sizes", plan.kv_tiles,
                 plan.requested_kv_tiles)
    plan.check_inputs(q, k_buffer, v_buffer, o)
    total = getattr(plan, "total_tokens", None)
    if total is not None and k_buffer.shape[0] != total:
        raise ShapeMismatchError(
            f"k_buffer has {k_buffer.shape[0]} tokens, KV_ptrs[-1] was {total}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(plan.head_dim)
    if not math.isfinite(float(sm_scale)) or float(sm_scale) <= 0:
        raise PlanMismatchError(f"sm_scale must be a positive finite number, got {sm_scale!r}")
    be = resolve_backend(q.device, backend)
    _announce(be)
    plan.check_current()
    # Inputs were checked above: the plan need not check them again.
    return plan.run(q, k_buffer, v_buffer, o, sm_scale=float(sm_scale),
                    logit_cap=float(logit_cap if logit_cap is not None else -1),
                    backend=be, check=False, graph=bool(graph))


def _check_tiles(plan, given, name, effective, requested) -> None:
    if given is None:
        return
    try:
        g = tuple(int(x) for x in given)
    except TypeError:
        raise PlanMismatchError(f"{name} must be a list of two ints, got {given!r}") from None
    if g != tuple(effective) and g != tuple(requested):
        raise PlanMismatchError(
            f"{name} = {list(g)} does not match the plan: it was built with "
            f"{list(effective)} (params asked for {list(requested)}); decode always uses "
            "the plan's tiles, pass those or omit the argument")


def qkv_preparation(
    tree_info: Sequence[KVTreeNode],
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float16,
    *,
    generator: torch.Generator | None = None,
    build_cache: bool = True,
):
    """Random Q/K/V for a tree, in the tree layout and in a per-request padded layout.

    ``device`` defaults to CUDA when available, else the CPU.

    Returns
    -------
    Q : ``[B, Hq, D]``
    K_cache, V_cache : ``[B, max_seqlen, Hk, D]``, each request's whole context
        (root first, zero padded), for tree-unaware baselines; ``None`` if
        ``build_cache`` is False.
    cache_seqlens : int32 ``[B]``
    K_tree, V_tree : ``[total_tokens, Hk, D]``, node ``i`` at rows ``KV_ptrs[i]..``
    KV_ptrs : list[int], ``len(tree_info) + 1`` entries.
    """
    from .tree import kv_ptrs as _kv_ptrs

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    validate_tree(tree_info)
    ptrs = _kv_ptrs(tree_info)
    req_end = request_end_nodes(tree_info)
    b = req_end.size
    total = ptrs[-1]
    dev = torch.device(device)
    kw = dict(dtype=dtype, device=dev, generator=generator)
    if generator is not None and generator.device.type != dev.type:
        kw["device"] = generator.device
    q = torch.randn(b, num_qo_heads, head_dim, **kw).to(dev)
    k = torch.randn(total, num_kv_heads, head_dim, **kw).to(dev)
    v = torch.randn(total, num_kv_heads, head_dim, **kw).to(dev)
    parent = np.array([nd.parent for nd in tree_info], dtype=np.int64)
    seqlen = np.array([nd.seqlen for nd in tree_info], dtype=np.int64)
    slots = path_token_indices(parent, seqlen, np.asarray(ptrs[:-1]), req_end)
    seqlens = torch.tensor([s.size for s in slots], dtype=torch.int32, device=dev)
    k_cache = v_cache = None
    if build_cache:
        max_len = int(seqlens.max()) if b else 0
        idx = torch.zeros(b, max_len, dtype=torch.long, device="cpu")
        for i, s in enumerate(slots):
            idx[i, :s.size] = torch.from_numpy(s)
        idx = idx.to(dev)
        ok = (torch.arange(max_len, device=dev)[None, :] < seqlens[:, None].long())[..., None, None]
        k_cache = torch.where(ok, k[idx], torch.zeros((), dtype=dtype, device=dev))
        v_cache = torch.where(ok, v[idx], torch.zeros((), dtype=dtype, device=dev))
    return q, k_cache, v_cache, seqlens, k, v, list(ptrs)
