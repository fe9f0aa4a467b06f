"""Host-side planning: the FastTree cost model and the vnode decomposition.

A plan turns a forest of KV nodes plus a list of requests (each a root-to-node path)
into *virtual nodes* (vnodes) that the kernels in :mod:`kernels.tree_decode` execute.

The cost model (FastTree, MLSys'25) walks every tree from its root. For each child edge
``parent -> child`` it compares

* **split-K**: the child's queries attend the parent's tokens together with the parent's
  other queries, and the child's tokens separately (one extra partial result to merge);
* **split-Q**: the child's queries leave the parent's group and attend parent + child
  tokens in one vnode (the parent's tokens are read once more).

with ``Cmm(nQ, nK) = alpha * padQ * g * nK + beta * padK * nQ * g`` (tile padding of the
matrix products, ``g`` the GQA group size) and ``Cred(nQ) = gamma * nQ``. Each *group*
(a node with the queries that attend it) covers the node's tokens plus those of its
split-Q ancestors; long groups are cut into KV chunks and wide ones into query tiles.

Everything here is O(nodes + requests) Python plus vectorised numpy over tokens: no
Python loop ever runs per token.
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from typing import Sequence

import attrs
import numpy as np
import torch

from kernels import (
    SUPPORTED_DTYPES,
    Backend,
    Phase,
    select_backend,
    torch_tree_decode,
)
from kernels.backend import interpreter_enabled
from kernels.plan_ops import (
    RUN_FIELDS,
    expand_runs,
    expand_runs_launcher,
    grow_tails_launcher,
    grow_tails_stack_launcher,
)
from kernels.tree_decode import (
    MAX_BLOCK_M,
    launch_form,
    next_pow2,
    stage2_blocks,
    tree_decode_launcher,
    tree_decode_stage1,
)

from .errors import PlanMismatchError, ShapeMismatchError, UnsupportedConfigError

__all__ = [
    "FastTreeParams",
    "PlanInput",
    "DecodePlan",
    "PlanBuffers",
    "build_plan",
    "path_token_indices",
    "DEFAULT_KV_SPLIT_SIZES",
    "AUTO_KV_CHUNKS",
    "DEFAULT_PARA_THRESHS1",
    "DEFAULT_PARA_THRESHS2",
]

logger = logging.getLogger(__name__)

DEFAULT_KV_SPLIT_SIZES = (1024, 128)
#: KV chunk lengths a plan built with ``kv_split_sizes=None`` weighs against the seed's
#: rule (:data:`DEFAULT_KV_SPLIT_SIZES`, shorter chunks where a phase has few programs),
#: each for both phases, by an estimate of the plan's time in KV steps
#: (:func:`_split_costs`: the longest program against all programs' steps over
#: :data:`AUTO_SLOTS` at a time, plus the partials); () turns the choice off. The
#: weights were fitted to a sweep of these chunk lengths on the 51 benchmark cases on an
#: H100 (benchmarks/RESULTS.md, v14), where the best length per case would have been
#: 0.956x the rule's time under graph replay (0.68-1.0x per case).
AUTO_KV_CHUNKS = (1024, 512, 256, 128, 64)
AUTO_SLOTS = 528
AUTO_PROGRAM_STEPS = 4
AUTO_PARTIAL_WEIGHT = 1.0
#: The merge's serial chain in that estimate: the request with the most partials is
#: merged in ceil(partials / partials per step) dependent steps (stage 2's shape,
#: :func:`kernels.tree_decode.stage2_blocks`); every step beyond
#: :data:`AUTO_MERGE_FREE_STEPS` adds :data:`AUTO_MERGE_WEIGHT` KV steps. 0: off.
AUTO_MERGE_WEIGHT = 4.0
AUTO_MERGE_FREE_STEPS = 2
#: Plans whose groups hold more KV entries than this keep the rule without an estimate:
#: of the benchmark's trees, the largest seed tree (280,000-420,000 entries), where the
#: estimate would cost ~0.2 ms of the 2 ms planning target and would change the chunk
#: only at 16/1, which the sweep measured 1.03x slower.
AUTO_MAX_KV_ENTRIES = 200_000
DEFAULT_PARA_THRESHS1 = (132, 528)
DEFAULT_PARA_THRESHS2 = (132, 132)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
#: Trees of at most this many nodes run the cost model's heuristic as the scalar loop
#: (:func:`_tree_heuristic`), larger ones vectorised (:func:`_tree_heuristic_vec`);
#: both decide identically. Measured on beam-search trees (benchmarks/RESULTS.md, v30),
#: loop against vectorised: on the H100's host 59 / 165 us at 29 nodes, 153 / 281 at
#: 77, 204 / 252 at 103, 317 / 287 at 160; on the development CPU 33 / 77 us at 29
#: nodes, 90 / 113 at 77, 169 / 158 at 103. Since v33 the loop writes the cost model
#: out (no call per term): on the development CPU 25 / 97 us at 29 nodes, 76 / 110 at
#: 103, 152 / 208 at 214, 420 / 344 at 416 (v33).
SCALAR_HEURISTIC_MAX_NODES = 256
#: Whether new plans store float16 partial outputs for float16 and bfloat16 inputs
#: (:attr:`DecodePlan.half_partials`; scaled per row for bfloat16). Measured on an H100
#: (benchmarks/RESULTS.md, v5): 5% faster on the geomean of the benchmark cases, up to
#: 16% on trees of many small nodes; slower on three cases (1.26x on ``1,1024 2048,32``
#: 16/1). bfloat16 since v36 (see RESULTS.md).
HALF_PARTIALS = True
#: KV tile of the small-tile phase (phase 1) when its vnodes are short: a plan lowers
#: the phase's KV tile to this when the mean KV length of its vnodes is at most
#: :data:`SHORT_KV_MAX_MEAN` and the GQA group is at most :data:`SHORT_KV_MAX_GROUP`
#: (``DecodePlan.kv_tiles`` shows the tiles used, ``requested_kv_tiles`` the asked
#: ones). None or 0: off. Measured on an H100 against tile 32 (benchmarks/RESULTS.md,
#: v11): the six seed trees of 16-token leaves (mean 16-19.4 tokens) 1.13-1.18x faster
#: at 32/32 and 1.04-1.08x at 32/8 under graph replay; at 16/1 0.88-1.01x, trees of
#: 32-token leaves up to 1.3x slower, and a phase of mostly 1-3-token drafts beside
#: 1024-token chunks (median 2, mean 166) 1.34x slower, hence the conditions.
SHORT_KV_TILE = 16
SHORT_KV_MAX_MEAN = 20
SHORT_KV_MAX_GROUP = 4
#: Plans whose two phases give every request exactly one partial in phase 1 merge in
#: phase 1 instead of a stage-2 launch (:attr:`DecodePlan.finish`) when their GQA group
#: has at least this many query heads per KV head or their phase 1 is fused
#: (:data:`FUSE_PHASE1`; None or 0: never) and phase 1 has
#: between :data:`FINISH_MIN_PROGRAMS` and :data:`FINISH_MAX_PROGRAMS` programs (vnodes
#: x KV heads). Measured on an H100 against stage 2 (``python -m benchmarks.sweep
#: --finish``, benchmarks/RESULTS.md, v15, two runs): 16/1 plans of 256-1024 phase-1
#: programs 0.77-0.99x the time replayed and 0.81-1.03x eager; 32/8 plans of 512-4096
#: 0.88-0.97x replayed (one repeat of one case 1.8x) and 0.92-0.97x eager, of 8192
#: 1.03-1.19x; 32/32 plans (2048-32768) 1.18-1.38x replayed (each phase-1 program there merges one
#: request's partials for one head, one dependent gather after another).
FINISH_MIN_GROUP = 4
#: A smaller phase 1 shares one launch with phase 0 and stage 2 merges:
#: ``1,2,64 8,256,32`` 16/1 (64 phase-1 programs, six partials a request) takes 7.8 us
#: replayed with stage 2 against 10.2 us merging in phase 1 (v15). None or 0: no bound.
FINISH_MIN_PROGRAMS = 128
#: A larger phase 1 keeps stage 2 (the 32/8 plans of 8192 phase-1 programs above).
#: None or 0: no bound.
FINISH_MAX_PROGRAMS = 4096
#: Fuse phase-1 groups that share requests into one masked vnode each (False: never).
#: The phase-1 groups of a request (its leaf, and the
#: nodes above it whose other children the cost model split off) each give it a
#: partial; a fused vnode holds the requests of such a set of groups (at most the
#: phase's q tile, at most 32) over all their chains, every kv entry with a mask of the
#: queries that attend it, so each of its requests has one partial in phase 1. Fused
#: are sets of at least two groups whose chains hold at most the phase's KV chunk.
#: Such plans merge in phase 1 (:data:`FINISH_MIN_GROUP`). Measured on an H100
#: (``python -m benchmarks.sweep --fuse``, benchmarks/RESULTS.md, v20): the six deep
#: 32/32 seed trees 0.88-0.92x replayed and 0.89-0.93x eager, two deep 32/8 trees
#: 0.97x; without the merge in phase 1 (stage 2 merging two partials a request)
#: 1.02-1.04x slower at 32/32. Without :data:`FUSE_PACK` no other plan of the 51 cases
#: is fused; with it nine more are packed.
FUSE_PHASE1 = True
#: Fusion is skipped where it would leave phase 1 fewer programs (vnodes x KV heads)
#: than this (the fused plans measured had 2,048; a guard against a phase of a few long
#: programs, not a measured bound). None or 0: no bound.
FUSE_MIN_PROGRAMS = 1024
#: Plans whose groups hold more KV entries than this are not fused (the analysis is
#: skipped): a bound on planning time. On the largest seed tree (about 300,000 entries,
#: never fused) the analysis made a plan 1.82 instead of 1.57 ms on the GPU machine's
#: host (32/8, medians of 200 interleaved builds, benchmarks/RESULTS.md, v21); the
#: masked plans of the benchmark hold at most 51,200.
FUSE_MAX_KV_ENTRIES = 200_000
#: Also pack phase-1 groups of one request each (leaves whose chains hold at most the
#: phase's KV chunk / q tile) a q tile at a time into masked vnodes (see
#: :func:`_fuse_phase1`) where the fused phase 1 then has from
#: :data:`FUSE_PACK_MIN_PROGRAMS` to :data:`FUSE_PACK_MAX_PROGRAMS` programs (instead
#: of the :data:`FUSE_MIN_PROGRAMS` bound); elsewhere fuse without packing. Measured on an H100 (``python -m benchmarks.sweep
#: --fuse``, benchmarks/RESULTS.md, v20), packed against fused plans: the nine plans of
#: 256-1024 packed phase-1 programs 0.70-1.02x replayed (`1,256 256,32` 32/8 29.9 ->
#: 20.8 us, `1,4,16,512 1024,256,128,32` 32/32 172.3 -> 160.4), those of 2048 0.96-1.12x
#: (`1,1024 2048,32` 32/8 171 -> 191 us), hence the upper bound (fitted on that
#: sweep); the lower one is the smallest measured (no smaller plan packs).
FUSE_PACK = True
FUSE_PACK_MIN_PROGRAMS = 256
FUSE_PACK_MAX_PROGRAMS = 1024
#: Inline whole request paths: a plan may instead be one masked phase whose vnodes each
#: hold ``min(32, INLINE_ROWS // group)`` requests, neighbours in depth-first order of
#: their end nodes, over the union of their paths (every node read once per vnode that
#: needs it, its entries masked to the requests through it). Every request then has one
#: partial, written by stage 1 as its output: one launch, no merge. Used where every
#: vnode holds at most :data:`INLINE_MAX_KV` entries and the phase has at least
#: :data:`INLINE_MIN_PROGRAMS` programs (vnodes x KV heads). Measured on an H100
#: (``python -m benchmarks.sweep --inline``, benchmarks/RESULTS.md, v21): the six deep
#: seed trees at 32/8 0.68-0.90x replayed and 0.71-0.90x eager, the deep 16-token tree
#: at 32/32 0.955x; at 16/1 (256 programs) five of six plans 1.05-1.11x slower, hence
#: the program bound.
INLINE = True
INLINE_ROWS = 64
INLINE_MAX_KV = 1024
INLINE_MIN_PROGRAMS = 512
#: Where whole paths do not fit :data:`INLINE`'s bound, a plan may keep every node of at
#: least this many tokens as a shared group of its own (all requests through it, phase
#: 0, chunked like the cost model's groups) and inline the rest of each path: blocks of
#: ``min(32, INLINE_ROWS // group)`` requests in depth-first order over the union of
#: their other nodes, one masked phase-1 vnode each (at most :data:`INLINE_MAX_KV`
#: entries), where every request has one partial and phase 1 merges. Used where the
#: vnodes then read at most :data:`SHARED_INLINE_MAX_READS` x the KV entries the cost
#: model's vnodes read (every q tile reads its group's chain). 0: off. Measured on an
#: H100 (``python -m benchmarks.sweep --shared-inline``, benchmarks/RESULTS.md, v23):
#: the speculative-decoding tree (2,048-token contexts, 21 one-token drafts each) 0.71x
#: replayed at 32/8 (135.7 -> 96.0 us) and 0.77x at 32/32, reading 0.67x and 0.50x the
#: entries; every other plan this would change reads as many entries as before and was
#: 1.02-2.97x slower (packed leaves beside a shared root, split chains).
SHARED_INLINE = 256
SHARED_INLINE_MAX_READS = 0.8
#: In a masked plan, a phase whose entries all attend every query of their vnode (phase
#: 0 of a fused plan) is marked unmasked (``Phase.masked``): its launches skip the
#: masks. False: every phase of a masked plan reads them (as before v22). Measured on
#: an H100 (v22 sweep, as above): 0.988x replayed and 0.992x eager on the geomean of
#: the 51 cases, the 14 fused plans 0.89-1.0x (``1,4,16,512 1024,256,128,32`` 32/8
#: 87.0 -> 77.1 us replayed).
UNMASKED_PHASES = True
#: A chain's last KV chunk of at most this fraction of the chunk length joins the
#: chunk before it (one vnode per q tile and one partial per request fewer): a
#: 264-token chain at chunk 128 becomes 128 + 136 entries instead of 128 + 128 + 8.
#: 0: never. Measured on an H100 (``python -m benchmarks.sweep --chunks``,
#: benchmarks/RESULTS.md, v22) against plans with :data:`UNMASKED_PHASES` alone: 0.990x
#: replayed and 0.992x eager on the geomean of the 51 cases; ``1,4,256 8,256,32`` 32/8
#: 28.9 -> 23.2 us replayed, the trees of 8-token roots 0.81-0.93x; at a quarter
#: (0.25), ``1,2,64 8,256,32`` 16/1 (64 + 8 tokens joined) was 1.06x slower.
CHUNK_TAIL_ABSORB = 0.1
#: Cut chains into chunks of equal length (the same count, ``ceil(length / chunks)``
#: entries each) instead of whole chunks and a shorter last one. Off: measured
#: 1.006x slower on the geomean (v22 sweep above), ``spec 16x2048 + 3-2-2 drafts``
#: 32/32 1.35x, where 2,049-token chains became three of 683 instead of 1024 + 1024 + 1.
BALANCE_CHUNKS = False
#: Prepared launch sets a PlanBuffers keeps for the plans written into it (least
#: recently used dropped). In a beam search that re-plans every step (development CPU,
#: two rules for the beams' choices, 50 re-plans each) a new plan found its set there
#: 47-48 times at W = 4, 35-36 at W = 16 and 9-11 at W = 64 (benchmarks/RESULTS.md, v25).
#: 0: every plan prepares its own.
SHARED_LAUNCHERS = 32
#: A plan that finds no shared launch set of its phases takes the newest set of another
#: plan of these buffers whose phases have the same form (tile shapes, masking,
#: grouping: :func:`kernels.tree_decode.launch_form`) and other sizes, resized to its
#: own (:meth:`kernels.tree_decode._LaunchSet.resized`: new grids and vnode counts,
#: compiled kernels kept), instead of building one and going through the JIT on its
#: first call. Needs :data:`SHARED_LAUNCHERS` > 0. False: every such plan builds its
#: own set (before v28).
RESIZED_LAUNCHERS = True
#: On a GPU, expand every plan's kv entries (and row masks) on the device from its
#: table of segment runs, with a cache's slot table copied as it is (see
#: :meth:`PlanBuffers.upload`). False: only contiguous plans without headroom are
#: expanded there; the others write every entry on the host (before v25).
DEVICE_EXPAND = True
#: On a GPU, the launch that expands a plan's kv entries also reads the pinned staging
#: buffer in place (its run and slot tables) and copies the plan's small arrays from
#: it: one launch per upload instead of a copy and a launch (see
#: :meth:`PlanBuffers.upload`). False: the staging buffer's used part is copied first.
ZERO_COPY_UPLOAD = True


def _default_tsqs() -> list[int]:
    return [64, 16]


def _default_tsks() -> list[int]:
    return [32, 128]


#: :meth:`FastTreeParams.for_heads` gives phase 0 KV tiles of 64 tokens for GQA heads of
#: these dims (32 otherwise, and without GQA). Measured on an H100 at head_dim 64
#: (benchmarks/RESULTS.md, v35), against 32-token tiles on the 33 GQA benchmark cases:
#: graph time 0.903x on the geometric mean (0.655-1.055x), eager 0.929x (0.747-1.136x).
#: Without GQA it was 0.999x (0.913-1.172x), so those keep 32. Head dims 16 and 32 were
#: not measured and keep 32.
WIDE_KV_TILE_HEAD_DIMS = (64,)


@attrs.define
class FastTreeParams:
    """Cost-model weights and tile sizes of the FastTree planner.

    Attributes
    ----------
    alpha : float
        Weight of query-tile padding in the cost model.
    beta : float
        Weight of KV-tile padding.
    gamma : float
        Weight of the extra reduction a split-K edge costs (per query).
    TSQs : list[int]
        Query tiles (requests per vnode) of phase 0 and phase 1. Groups with more than
        ``TSQs[1]`` queries run in phase 0. Each plan clamps a tile so that
        ``tile * group <= 128`` rows fit one program.
    TSKs : list[int]
        KV tiles (tokens per inner-loop step) of phase 0 and phase 1. A plan lowers the
        phase-1 tile to :data:`SHORT_KV_TILE` when that phase's vnodes are that short
        (see there).
    kv_group_num : int
        Query heads per KV head, as the seed API had it. Plans use the group implied by
        the head counts they are built for; this field is informational.

    Every instance has its own lists; the planner never modifies a ``FastTreeParams``.
    """

    alpha: float = 0.66
    beta: float = 0.33
    gamma: float = 0.1
    TSQs: list[int] = attrs.field(factory=_default_tsqs, converter=list)
    TSKs: list[int] = attrs.field(factory=_default_tsks, converter=list)
    kv_group_num: int = 1

    @classmethod
    def for_heads(cls, num_qo_heads: int, num_kv_heads: int,
                  head_dim: int = 128) -> "FastTreeParams":
        """Tiles measured to run well on an H100 for this head layout (fp16).

        Query tiles of 64 and 16 rows of the GQA-expanded tile (``q_tile = rows //
        group``); KV tiles of 32, or 64 in phase 0 with GQA (``num_qo_heads >
        num_kv_heads``) at the head dims of :data:`WIDE_KV_TILE_HEAD_DIMS` (a 64-token
        K/V tile of 64-wide heads takes the space of a 32-token one at head_dim 128).
        See benchmarks/RESULTS.md for the sweeps behind them (head_dim 128; v35 for 64).
        Used whenever a planner is given ``params=None``.
        """
        group = max(1, int(num_qo_heads) // max(1, int(num_kv_heads)))
        kv0 = 64 if group > 1 and int(head_dim) in WIDE_KV_TILE_HEAD_DIMS else 32
        return cls(TSQs=[max(1, 64 // group), max(1, 16 // group)], TSKs=[kv0, 32],
                   kv_group_num=group)

    def set_values(self, alpha: float, beta: float, gamma: float) -> None:
        """Set the three cost-model weights."""
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)

    def set_kv_group_num(self, kv_group_num: int) -> None:
        """Set the GQA group size (query heads per KV head)."""
        self.kv_group_num = int(kv_group_num)

    def set_q_tile_sizes(self, TSQs: Sequence[int]) -> None:
        """Set the query tiles of phase 0 and phase 1 (a copy of the list is kept)."""
        self.TSQs = [int(x) for x in TSQs]

    def set_kv_tile_sizes(self, TSKs: Sequence[int]) -> None:
        """Set the KV tiles of phase 0 and phase 1 (a copy of the list is kept)."""
        self.TSKs = [int(x) for x in TSKs]

    def validate(self) -> None:
        """Raise ``ValueError`` (a :class:`PlanMismatchError`) on unusable values."""
        for name in ("TSQs", "TSKs"):
            val = getattr(self, name)
            if len(val) != 2 or any(int(x) < 1 for x in val):
                raise PlanMismatchError(f"params.{name} must be two positive ints, got {val!r}")
        for name in ("alpha", "beta", "gamma"):
            val = getattr(self, name)
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val >= 0):
                raise PlanMismatchError(f"params.{name} must be a finite number >= 0, got {val!r}")


@attrs.frozen
class PlanInput:
    """The topology a plan is built from, as flat arrays.

    Attributes
    ----------
    parent : int64 ``[n]``
        Parent of each node, -1 for roots. Nodes are ``0..n-1``.
    seqlen : int64 ``[n]``
        Tokens in each node.
    tok_ptr : int64 ``[n]``
        Node ``i``'s KV slots are ``node_tokens[tok_ptr[i] : tok_ptr[i] + seqlen[i]]``.
    node_tokens : int32 ``[T]`` or None
        Slot table; ``None`` means the identity (node ``i`` holds slots
        ``tok_ptr[i] ..``), as in the seed's contiguous ``KV_ptrs`` layout.
    req_end : int64 ``[B]``
        Node where each request's path ends (request ``b`` is query row ``b``).
    growable : bool ``[B]`` or None
        Requests whose end node may grow in place (plan reserves headroom for them).
    node_runs : bool ``[n]`` or None
        With a slot table: whether each node's slots form one run (``node_tokens[tok_ptr[i]
        + j] == node_tokens[tok_ptr[i]] + j``), as its owner already knows them (a
        :class:`~treecache.TreeKVCache` keeps them per node). ``None``: the planner finds
        them with a pass over the table. Only its length is checked: a node marked as a
        run that is not one makes the kernels read the wrong slots.
    """

    parent: np.ndarray
    seqlen: np.ndarray
    tok_ptr: np.ndarray
    req_end: np.ndarray
    node_tokens: np.ndarray | None = None
    growable: np.ndarray | None = None
    node_runs: np.ndarray | None = None


def normalize_device(device: torch.device | str) -> torch.device:
    """``torch.device`` with an explicit index for CUDA (``"cuda"`` -> ``cuda:N``), so
    that device comparisons with tensors' devices are exact."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def to_device_async(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """Copy a small host array to ``device`` without blocking the host.

    The copy is staged in pinned memory from torch's caching host allocator, which
    keeps the block alive until the copy has run (measured on the GPU machine: ~16 us
    of host time per call, against ~30 us for a hand-made ring of pinned buffers with
    events). A copy straight from pageable memory took 13 us against 25 us pinned on an
    idle GPU (``benchmarks/host.py``), but CUDA documents that such a copy may first
    wait for the stream: behind a queued decode step the host would stall, so it is
    not used.
    """
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class PlanBuffers:
    """Fixed-capacity device buffers that plans write into (CUDA-graph friendly).

    All int32 index arrays live in one device tensor at fixed offsets, filled from one
    host staging tensor with a single copy; ``mid_o``/``mid_stats`` are float32 buffers
    (``mid_lse`` is the first ``num_qo_heads`` columns of ``mid_stats``, the rest hold
    the shifts of scaled bfloat16 partials, see :meth:`DecodePlan.kernel_tensors`).
    A GPU plan expands its ``kv_indices`` (and the row masks of a masked plan) on the
    device from a table of runs that travels in the same copy (one kernel,
    :func:`kernels.plan_ops.expand_runs`): over contiguous node runs the runs are the
    slots themselves; with a slot table (a cache's plan) they are ranges of that
    table, which is copied as it is (see :meth:`upload`). The staging tensor's kv
    region then does not hold them; the append-only step of a cache also writes the
    device buffer alone. On a GPU read plans through the device tensors (:meth:`dev_view`).
    Capacities grow (doubling) when a plan needs more; :attr:`generation` counts the
    reallocations, so a captured CUDA graph is valid while it stays the same.
    """

    _SMALL = ("vnode_kv_start", "vnode_kv_len", "vnode_q_start", "vnode_q_len",
              "vnode_slot0", "req_mid_start", "req_mid_len", "mid_q_rows", "req_mid_rows")

    def __init__(self, num_qo_heads: int, head_dim: int, device: torch.device | str,
                 *, vnodes: int = 256, requests: int = 64, mid_rows: int = 1024,
                 kv_entries: int = 4096, runs: int = 256, slots: int = 0):
        self.num_qo_heads = int(num_qo_heads)
        self.head_dim = int(head_dim)
        self.device = normalize_device(device)
        self.generation = 0
        #: Incremented by every plan written into these buffers; a plan is valid while
        #: its own serial is the latest.
        self.serial = 0
        self._uploaded = None  # event after the last staging-buffer upload
        self._waited = None  # that event once the host has waited for it (until re-recorded)
        # The device may read the pinned staging buffer after upload returns (see
        # ZERO_COPY_UPLOAD): it is not released, with these buffers or on growth, before
        # that read has run.
        self._upload_event = [None]
        weakref.finalize(self, _wait_event, self._upload_event)
        #: False once the device failed to read the staging buffer in place (see
        #: :data:`ZERO_COPY_UPLOAD`): uploads then copy it.
        self._zero_copy = True
        self._stream = self._stream_raw = None  # see _current_stream
        self._alloc(vnodes, requests, mid_rows, kv_entries, runs, slots)

    def _alloc(self, vnodes, requests, mid_rows, kv_entries, runs, slots) -> None:
        self.cap_vnodes = int(vnodes)
        self.cap_requests = int(requests)
        self.cap_mid_rows = int(mid_rows)
        self.cap_kv = int(kv_entries)
        self.cap_runs = int(runs)
        self.cap_slots = int(slots)
        caps = {
            "vnode_kv_start": self.cap_vnodes, "vnode_kv_len": self.cap_vnodes,
            "vnode_q_start": self.cap_vnodes, "vnode_q_len": self.cap_vnodes,
            "vnode_slot0": self.cap_vnodes, "req_mid_start": self.cap_requests, "req_mid_len": self.cap_requests,
            "mid_q_rows": self.cap_mid_rows, "req_mid_rows": self.cap_mid_rows,
            # The run table of a contiguous GPU plan (count, then RUN_FIELDS per run).
            "runs": 1 + RUN_FIELDS * self.cap_runs,
        }
        self.offsets: dict[str, int] = {}
        off = 0
        for name in self._SMALL + ("runs",):
            self.offsets[name] = off
            off += caps[name]
        # The slot table of a plan whose runs are gathered on the device (a cache's),
        # right after the run table: the two travel in one copy (see upload).
        self.offsets["slots"] = off
        off += self.cap_slots
        self.offsets["kv_indices"] = off
        # Row masks of a masked plan's kv entries (DecodePlan.masked), one per entry.
        self.offsets["kv_mask"] = off + self.cap_kv
        self.caps = dict(caps, kv_indices=self.cap_kv, kv_mask=self.cap_kv,
                         slots=self.cap_slots)
        total = off + 2 * self.cap_kv
        pin = self.device.type == "cuda"
        self.host = torch.zeros(total, dtype=torch.int32, device="cpu", pin_memory=pin)
        self.host_np = self.host.numpy()
        # On the CPU the staging tensor is the device tensor: uploads cost nothing.
        self.dev = (self.host if self.device.type == "cpu"
                    else torch.zeros(total, dtype=torch.int32, device=self.device))
        self.mid_o = torch.empty(self.cap_mid_rows, self.num_qo_heads, self.head_dim,
                                 dtype=torch.float32, device=self.device)
        # Log-sum-exps in the first num_qo_heads columns; scaled partials (bfloat16
        # inputs, kernels.tree_decode.scaled_partials) keep their shifts in the rest.
        self.mid_stats = torch.empty(self.cap_mid_rows, 2 * self.num_qo_heads,
                                     dtype=torch.float32, device=self.device)
        self.mid_lse = self.mid_stats[:, :self.num_qo_heads]
        self._expand = {}  # prepared run expansions (CUDA) by (gather, masks)
        self._staged = None  # see staged_slot_table
        #: Views of these buffers as the kernels take them, shared by the plans written
        #: here (see DecodePlan.tensors), by request count and masking.
        self.views: dict = {}
        #: Prepared launch sets of the plans written into these buffers, by tensor
        #: layout, phases and modes (see DecodePlan._launcher); dropped with the buffers.
        self.launchers: dict = {}
        #: The newest launch set per tensor layout, launch form and modes (see
        #: DecodePlan._launcher, RESIZED_LAUNCHERS); dropped with the buffers.
        self.launch_forms: dict = {}
        self.generation += 1

    def ensure(self, vnodes: int, requests: int, mid_rows: int, kv_entries: int,
               runs: int = 0, slots: int = 0) -> None:
        """Grow (to at least double) any capacity that is too small."""
        need = (vnodes > self.cap_vnodes or requests > self.cap_requests
                or mid_rows > self.cap_mid_rows or kv_entries > self.cap_kv
                or runs > self.cap_runs or slots > self.cap_slots)
        if not need:
            return

        def grow(cap, want):
            return cap if want <= cap else max(want, 2 * cap)

        logger.debug("plan buffers grow: vnodes %d, requests %d, mid rows %d, kv %d, runs %d, "
                     "slots %d", vnodes, requests, mid_rows, kv_entries, runs, slots)
        self.host_writable()  # the old staging buffer is released below
        self._alloc(grow(self.cap_vnodes, vnodes), grow(self.cap_requests, requests),
                    grow(self.cap_mid_rows, mid_rows), grow(self.cap_kv, kv_entries),
                    grow(self.cap_runs, runs), grow(self.cap_slots, slots))

    def staged_slot_table(self, n: int) -> np.ndarray | None:
        """The staging region of a slot table of ``n`` entries (int32; grown first if
        needed), for a caller to write the table into: passed on as the plan's
        ``node_tokens`` (that very array), the next :meth:`upload` does not copy it
        again. Waits for the last upload's reads of the staging buffer first. None
        where the buffers live on the CPU (their plans read any table in place)."""
        if self.dev is self.host:
            return None
        self.ensure(0, 0, 0, 0, slots=n)
        self.host_writable()
        self._staged = self.host_view("slots", n)
        return self._staged

    def scratch(self, n: int, which: int = 0) -> np.ndarray:
        """A reusable int64 host work array of length ``n`` (two independent ones)."""
        pool = self.__dict__.setdefault("_scratch", [np.empty(0, np.int64), np.empty(0, np.int64)])
        if pool[which].size < n:
            pool[which] = np.empty(max(n, 2 * pool[which].size), dtype=np.int64)
        return pool[which][:n]

    def host_view(self, name: str, n: int) -> np.ndarray:
        off = self.offsets[name]
        return self.host_np[off:off + n]

    def dev_view(self, name: str, n: int | None = None) -> torch.Tensor:
        off = self.offsets[name]
        n = self.caps[name] if n is None else n
        return self.dev[off:off + n]

    def scatter(self, positions: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` at ``positions`` of the staging and the device buffer."""
        self.write_host(positions, values)
        self.send(positions, values)

    def write_host(self, positions: np.ndarray, values: np.ndarray) -> None:
        """The host half of :meth:`scatter` (the device half is :meth:`send`)."""
        self.host_writable()
        self.host_np[positions] = values

    def send(self, positions: np.ndarray, values: np.ndarray,
             prefix: np.ndarray | None = None) -> torch.Tensor | None:
        """The device half of :meth:`scatter`, with room for a caller's own array.

        One host-to-device copy carries ``prefix`` (int64, returned on the device: the
        cache sends a step's new slots this way), the int64 ``positions`` and the int32
        ``values`` packed two to a word (read back through a view, so no cast kernel
        runs); one ``index_copy_`` writes the values. Nothing is copied when the buffers
        live on the CPU (the staging tensor is the device tensor): then ``prefix`` comes
        back as a CPU tensor.
        """
        n = 0 if prefix is None else prefix.size
        m = positions.size
        if self.dev is self.host:
            return None if prefix is None else torch.from_numpy(prefix)
        buf = np.empty(n + m + (m + 1) // 2, dtype=np.int64)
        if n:
            buf[:n] = prefix
        buf[n:n + m] = positions
        buf[n + m:].view(np.int32)[:m] = values
        packed = to_device_async(buf, self.device)
        if m:
            self.dev.index_copy_(0, packed[n:n + m], packed[n + m:].view(torch.int32)[:m])
        return None if prefix is None else packed[:n]

    def upload(self, kv_used: int, runs: tuple, masks: bool = False,
               table: np.ndarray | None = None) -> None:
        """Copy the small regions to the device and write the first ``kv_used`` kv
        entries (``masks``: their row masks too) from a table of runs.

        ``runs=(starts, lens, dst, bits)``: entries ``dst_i + [0, lens_i)`` (``dst``
        None: the runs one after the other) get ``starts_i + [0, lens_i)``, or with a
        slot ``table`` those entries of it, and with ``masks`` the row mask ``bits_i``
        (int32). They are expanded where the device buffer lives: in the staging buffer
        on the CPU; otherwise the run table (at most :attr:`cap_runs` runs, see
        :meth:`ensure`) and the slot table (at most :attr:`cap_slots` entries) are
        written to the staging buffer after the small regions, and one kernel expands
        them on the device: the host's work is O(runs) plus the slot table, not
        O(entries), and the staging buffer's kv and mask regions do not hold them. On a
        GPU that kernel reads the staging buffer (pinned) in place and copies the small
        regions to the device itself: one launch, no copy (:data:`ZERO_COPY_UPLOAD`;
        off, or where the device cannot read the staging buffer, the used part is
        copied first). With :data:`DEVICE_EXPAND` off only runs without ``dst`` or
        ``table`` are expanded on the device; the others in the staging buffer, then
        copied.
        """
        starts, lens, dst, bits = runs
        if not masks:
            bits = None
        staged, self._staged = self._staged, None
        on_device = self.dev is not self.host and (
            DEVICE_EXPAND or (dst is None and table is None))
        n_table = 0 if table is None else int(np.size(table))
        if not on_device:
            _expand_run_table(self.host_view("kv_indices", kv_used),
                              self.host_view("kv_mask", kv_used) if masks else None,
                              starts, lens, dst, bits, table, self.scratch)
            if self.dev is self.host:
                return
            # The small regions, then the kv entries (and masks) expanded here.
            k0 = self.offsets["kv_indices"]
            copies = [(0, self.offsets["runs"]), (k0, k0 + kv_used)]
            if masks and kv_used:
                m0 = self.offsets["kv_mask"]
                copies.append((m0, m0 + kv_used))
        else:
            end = self._stage_runs(starts, lens, dst, bits)
            if n_table:
                if n_table > self.cap_slots:
                    raise PlanMismatchError(
                        f"a slot table of {n_table} entries does not fit the buffers "
                        f"({self.cap_slots}); call ensure(..., slots={n_table}) before "
                        "writing the plan")
                # The slot table follows the run table: one copy holds both. It may be
                # there already (see staged_slot_table).
                end = self.offsets["slots"] + n_table
                if table is not staged:
                    self.host_np[end - n_table:end] = table
            copies = [(0, end)]
        src_off = self.offsets["slots"] if n_table else -1
        mask_off = self.offsets["kv_mask"] if masks else -1
        if self.device.type == "cuda":
            if on_device and ZERO_COPY_UPLOAD and self._zero_copy:
                # One launch reads the staging buffer in place: no copy.
                if self._expansion(src_off, mask_off, copy=True):
                    self._record_upload()
                    return
            for a, e in copies:
                self.dev[a:e].copy_(self.host[a:e], non_blocking=True)
            self._record_upload()
            if on_device and kv_used:
                self._expansion(src_off, mask_off, copy=False)
            return
        for a, e in copies:
            self.dev[a:e].copy_(self.host[a:e], non_blocking=True)
        if not on_device or kv_used == 0:
            return
        if interpreter_enabled():
            expand_runs(self.dev, self.offsets["runs"], self.offsets["kv_indices"],
                        int(np.size(starts)), src_off, mask_off)
        elif dst is None and not n_table and not masks:
            _expand_ranges_device(starts, lens, self.dev_view("kv_indices", kv_used))
        else:  # a device Triton does not run on: expanded on the host, then copied
            views = [self.dev_view("kv_indices", kv_used)]
            if masks:
                views.append(self.dev_view("kv_mask", kv_used))
            arrays = [v.cpu().numpy().copy() for v in views]
            _expand_run_table(arrays[0], arrays[1] if masks else None, starts, lens, dst, bits,
                              table)
            for v, a in zip(views, arrays):
                v.copy_(torch.from_numpy(a))

    def _stage_runs(self, starts: np.ndarray, lens: np.ndarray, dst: np.ndarray | None = None,
                    bits: np.ndarray | None = None) -> int:
        """Write the run table of ``(starts, lens, dst, bits)`` into the staging buffer
        (after the small regions); returns the end of what must be copied."""
        n = int(np.size(starts))
        if n > self.cap_runs:
            raise PlanMismatchError(
                f"{n} runs do not fit the buffers' run table ({self.cap_runs}); "
                "call ensure(..., runs=n) before writing the plan")
        off = self.offsets["runs"]
        table = self.host_np[off + 1:off + 1 + RUN_FIELDS * n].reshape(n, RUN_FIELDS)
        self.host_np[off] = n
        table[:, 0] = starts
        if dst is None:
            np.cumsum(lens, out=table[:, 1])
            table[:, 1] -= lens
        else:
            table[:, 1] = dst
        table[:, 2] = lens
        table[:, 3] = 0 if bits is None else np.asarray(bits).astype(np.int32)
        return off + 1 + RUN_FIELDS * n

    def _expansion(self, src_off: int, mask_off: int, copy: bool) -> bool:
        """Launch the run expansion on the current stream (:func:`expand_runs_launcher`;
        ``copy``: reading the staging buffer in place and copying its small regions).
        False, and no launch, where the device cannot read the staging buffer (then
        :attr:`_zero_copy` goes off for good and the caller copies instead)."""
        key = (src_off >= 0, mask_off >= 0, copy)
        launch = self._expand.get(key)
        if launch is None:
            launch = self._expand[key] = expand_runs_launcher(
                self.dev, self.offsets["runs"], self.offsets["kv_indices"], src_off, mask_off,
                src=self.host if copy else None, n_copy=self.offsets["runs"])
        try:
            launch(self.dev)
        except (ValueError, RuntimeError, TypeError) as err:
            if not copy:
                raise
            logger.warning("plan upload: the device cannot read the pinned staging "
                           "buffer (%s); copying it instead", err)
            del self._expand[key]
            self._zero_copy = False
            return False
        return True

    def _record_upload(self) -> None:
        """Mark the end of the device's reads of the staging buffer (see
        :meth:`host_writable`)."""
        if self._uploaded is None:
            self._uploaded = self._upload_event[0] = torch.cuda.Event()
        self._uploaded.record(self._current_stream())
        self._waited = None

    def _current_stream(self) -> torch.cuda.Stream:
        """The current CUDA stream of the buffers' device, kept while it stays the
        current one (``torch.cuda.current_stream`` builds a new object every call, about
        9 us on the H100's host)."""
        raw = _raw_stream(self.device.index)
        if raw is None or raw != self._stream_raw:
            self._stream = torch.cuda.current_stream(self.device)
            self._stream_raw = raw
        return self._stream

    def host_writable(self) -> None:
        """Wait until the last :meth:`upload` has read the staging buffer (it copies
        asynchronously from pinned memory, so the next plan must not overwrite it
        earlier)."""
        ev = self._uploaded
        if ev is not None and ev is not self._waited:  # once per upload (a re-plan asks twice)
            ev.synchronize()
            self._waited = ev


def _wait_event(cell: list) -> None:
    """Wait for the event in ``cell[0]`` (if any): a finaliser of :class:`PlanBuffers`,
    so that its staging buffer outlives the device's last read of it."""
    if cell[0] is not None:
        try:
            cell[0].synchronize()
        except Exception:  # CUDA already torn down (interpreter exit): nothing runs
            pass


def _raw_stream(index: int) -> int | None:
    """The handle of device ``index``'s current CUDA stream (what Triton launches on),
    or None where torch does not expose it."""
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return None if get is None else get(index)


def _put_newest(cache: dict, key, value, limit: int) -> None:
    """Put ``value`` into ``cache`` (insertion order: least recently used first) as its
    newest entry, first dropping the oldest ones so that at most ``limit`` remain
    (a ``limit`` of 0 keeps the one entry)."""
    while cache and len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value


@attrs.define(eq=False)
class DecodePlan:
    """A built plan: vnodes, tiles and index tensors, ready for decode.

    The plan carries its own tile sizes and phase layout, so decode can never run with
    tiles the plan was not built for. Index tensors are views into :class:`PlanBuffers`.

    Attributes
    ----------
    num_requests, num_qo_heads, num_kv_heads, head_dim : int
        The problem the plan was built for (``q`` is ``[num_requests, num_qo_heads, head_dim]``).
    phases : tuple[kernels.Phase, ...]
        Vnode ranges launched together, with their query and KV tiles.
    q_tiles, kv_tiles : tuple[int, int]
        Effective tiles of phase 0 and 1 (after parallelism adjustment and GQA clamp).
    requested_q_tiles, requested_kv_tiles : tuple[int, int]
        The tiles the caller's params asked for.
    kv_split_sizes : tuple[int, int]
        KV chunk length used in phase 0 and 1.
    node_assignments : list[int]
        0 (split-K) or 1 (split-Q) for each node; roots are 0.
    parallelism : tuple[int, int]
        Stage-1 programs per phase (vnodes x kv heads) as the cost model counted them.
    num_vnodes, num_mid_rows, num_kv_entries : int
        Sizes of the used parts of the buffers.
    buffers : PlanBuffers
        Where the index tensors live.
    tail_vnode, tail_limit : int64 ``[num_requests]``
        For requests that may grow in place: the vnode holding their last tokens and the
        first kv-entry position they may not write; -1 where growth needs a re-plan.
    tail_rank, tail_count, tail_bit : int64 ``[num_requests]``
        Where several growing requests share a vnode's kv range (masked vnodes), the
        range holds ``headroom`` entries for each of its ``count`` growing requests, and
        each new entry takes the range's next free one, with its request's row mask
        ``bit`` (-1 in unmasked plans); in a step of every request they take them in
        the order of ``rank``. 0, 1 and -1 for a request alone in its range (and
        where it cannot grow).
    vnode_kv_len_host : int64 ``[num_vnodes]``
        Host copy of the vnode lengths (kept in sync by :meth:`extend_tails`).
    vnode_kv_start_host : int64 ``[num_vnodes]``
    """

    num_requests: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    phases: tuple
    q_tiles: tuple
    kv_tiles: tuple
    requested_q_tiles: tuple
    requested_kv_tiles: tuple
    kv_split_sizes: tuple
    node_assignments: list
    parallelism: tuple
    num_vnodes: int
    num_mid_rows: int
    num_kv_entries: int
    buffers: PlanBuffers
    tail_vnode: np.ndarray
    tail_limit: np.ndarray
    vnode_kv_start_host: np.ndarray
    vnode_kv_len_host: np.ndarray
    generation: int = 0
    serial: int = 0
    #: Some requests have exactly one partial: stage 1 writes their output directly.
    direct: bool = False
    #: False when every request has exactly one partial (no stage-2 launch).
    needs_stage2: bool = True
    #: Two phases, every request with exactly one partial in phase 1: phase 1 merges each
    #: request's partials and writes its output, with no stage 2 (see
    #: :data:`FINISH_MIN_GROUP`, :data:`FINISH_MIN_PROGRAMS` and :data:`FINISH_MAX_PROGRAMS`).
    finish: bool = False
    #: With float16 or bfloat16 inputs, stage 1 stores the partial outputs in float16
    #: (in the first half of each float32 row of ``buffers.mid_o``: half the partial
    #: traffic; scaled by a power of two per row for bfloat16, see
    #: :func:`kernels.tree_decode.scaled_partials`); float32 inputs, or ``False``, keep
    #: float32 partials. See :data:`HALF_PARTIALS`.
    half_partials: bool = True
    #: Some phase-1 vnodes hold several requests over the union of their contexts, each
    #: kv entry with a mask of the queries that attend it (``kv_mask``; see
    #: :data:`FUSE_PHASE1`).
    masked: bool = False
    #: Rows the caller's k/v buffers must have (set by the functional API), or None.
    total_tokens: int | None = None
    #: See the class docstring (None: every request alone in its range).
    tail_rank: np.ndarray | None = None
    tail_count: np.ndarray | None = None
    tail_bit: np.ndarray | None = None
    # Per-object caches, not copied by attrs.evolve (a copy may differ in its modes):
    # the prepared Triton launches per tensor layout (see run), the captured CUDA
    # graphs, and request-ordered mirrors of the tail vnodes for the every-request
    # append step (see _all_tails; False when some request cannot grow). The kernels'
    # views are the buffers' (PlanBuffers.views).
    _launchers: dict = attrs.field(factory=dict, init=False, repr=False)
    _graphs: tuple | None = attrs.field(default=None, init=False, repr=False)
    _tails: object = attrs.field(default=None, init=False, repr=False)
    _ranges: object = attrs.field(default=None, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.buffers.device

    @property
    def launch_modes(self) -> dict[str, bool]:
        """``direct``, ``needs_stage2`` and ``finish`` as keyword arguments of the
        kernels' entry points (:func:`kernels.tree_decode.tree_decode` and its kin)."""
        return dict(direct=self.direct, needs_stage2=self.needs_stage2, finish=self.finish)

    @property
    def launch_key(self) -> tuple:
        """What this plan's launches depend on beyond the contents of its buffers: the
        buffers (and their allocation), the phases, the modes and the request count.
        For the same ``q``, ``k``, ``v``, ``o`` and scales, two plans with equal keys
        launch the same kernels with the same grids and arguments, so a CUDA graph
        captured from one computes the other once the other is written (the later plan
        overwrites the buffers). See ``pad_phases`` in :func:`build_plan`."""
        return (self.buffers, self.generation, self.phases) + self._modes()

    def _modes(self) -> tuple:
        """The modes and sizes, besides the phases, that a plan's launches depend on."""
        return (self.direct, self.needs_stage2, self.finish, self.masked, self.half_partials,
                self.num_requests)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The index tensors and mid buffers as keyword arguments of the kernels.

        The plans written into the same buffers with the same request count and
        masking share one dict (:attr:`PlanBuffers.views`): read it, do not modify it."""
        b = self.buffers
        key = (self.num_requests, self.masked)
        t = b.views.get(key)
        if t is None:
            t = dict(
                kv_indices=b.dev_view("kv_indices"),
                vnode_kv_start=b.dev_view("vnode_kv_start"),
                vnode_kv_len=b.dev_view("vnode_kv_len"),
                vnode_q_start=b.dev_view("vnode_q_start"),
                vnode_q_len=b.dev_view("vnode_q_len"),
                vnode_slot0=b.dev_view("vnode_slot0"),
                mid_q_rows=b.dev_view("mid_q_rows"),
                req_mid_start=b.dev_view("req_mid_start", self.num_requests),
                req_mid_len=b.dev_view("req_mid_len", self.num_requests),
                req_mid_rows=b.dev_view("req_mid_rows"),
                mid_o=b.mid_o,
                mid_lse=b.mid_lse,
            )
            if self.masked:
                t["kv_mask"] = b.dev_view("kv_mask")
            b.views[key] = t
        return t

    def kernel_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """:meth:`tensors` as decode uses them for inputs of ``dtype``: with
        :attr:`half_partials` and float16 or bfloat16 inputs, ``mid_o`` is a float16
        view of the float32 buffer (row stride unchanged, the first half of each row
        used); for bfloat16 the partials are scaled and ``mid_lse`` has their shifts
        after the log-sum-exps (``[R, 2 * Hq]``, see
        :func:`kernels.tree_decode.scaled_partials`). Shared like :meth:`tensors`."""
        t = self.tensors()
        if not (self.half_partials and dtype in (torch.float16, torch.bfloat16)):
            return t
        scaled = dtype == torch.bfloat16
        key = (self.num_requests, self.masked, "scaled" if scaled else "half")
        half_t = self.buffers.views.get(key)
        if half_t is None:
            mid = t["mid_o"]
            half = mid.view(torch.float16)[..., :mid.shape[-1]]
            half_t = dict(t, mid_o=half)
            if scaled:
                half_t["mid_lse"] = self.buffers.mid_stats
            self.buffers.views[key] = half_t
        return half_t

    def run_stage1(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phase,
                   sm_scale: float, *, o: torch.Tensor | None = None, **launch) -> None:
        """Launch stage 1 of ``phase`` (one of :attr:`phases`, or two adjacent ones in one
        launch) alone, with this plan's index tensors, contiguity hints and row masks
        (:meth:`kernel_tensors`): its partials go to the plan's mid buffers, or with
        ``o`` (direct mode) single-partial requests' outputs to ``o``. For profiling and
        ablations; :meth:`run` is the decode. ``launch``: further keywords of
        :func:`kernels.tree_decode.tree_decode_stage1` (``logit_cap``, ``num_warps``,
        ``num_stages``). Arguments are not checked."""
        t = self.kernel_tensors(q.dtype)
        tree_decode_stage1(q, k, v, t["mid_o"], t["mid_lse"], t["kv_indices"],
                           t["vnode_kv_start"], t["vnode_kv_len"], t["vnode_q_start"],
                           t["vnode_q_len"], t["mid_q_rows"], phase, sm_scale,
                           vnode_slot0=t["vnode_slot0"], o=o,
                           req_mid_len=None if o is None else t["req_mid_len"],
                           kv_mask=t.get("kv_mask"), **launch)

    def kv_tokens_read(self) -> int:
        """KV tokens stage 1 reads per KV head (sum of vnode lengths)."""
        return int(self.vnode_kv_len_host.sum())

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     o: torch.Tensor, num_slots_min: int | None = None) -> None:
        """Raise :class:`ShapeMismatchError` unless q, k, v, o fit this plan."""
        want_q = (self.num_requests, self.num_qo_heads, self.head_dim)
        for name, t in (("q", q), ("o", o)):
            if not isinstance(t, torch.Tensor):
                raise ShapeMismatchError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != want_q:
                raise ShapeMismatchError(
                    f"{name} has shape {tuple(t.shape)}, the plan was built for "
                    f"[num_requests, num_qo_heads, head_dim] = {list(want_q)}")
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ShapeMismatchError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[1] != self.num_kv_heads or t.shape[2] != self.head_dim:
                raise ShapeMismatchError(
                    f"{name} has shape {tuple(t.shape)}, expected [num_slots, "
                    f"{self.num_kv_heads}, {self.head_dim}]")
        if num_slots_min is not None and k.shape[0] < num_slots_min:
            raise ShapeMismatchError(
                f"k has {k.shape[0]} rows, the plan reads slots up to {num_slots_min - 1}")
        if k.shape[0] != v.shape[0]:
            raise ShapeMismatchError(f"k has {k.shape[0]} rows but v has {v.shape[0]}")
        if q.dtype not in SUPPORTED_DTYPES:
            raise ShapeMismatchError(
                f"q has dtype {q.dtype}, expected one of float16, bfloat16, float32")
        for name, t in (("k", k), ("v", v), ("o", o)):
            if t.dtype != q.dtype:
                raise ShapeMismatchError(f"{name} has dtype {t.dtype}, q has {q.dtype}")
        for name, t in (("q", q), ("k", k), ("v", v), ("o", o)):
            if t.device != self.device:
                raise ShapeMismatchError(
                    f"{name} is on {t.device}, the plan's index tensors are on {self.device}")
            if t.stride(-1) != 1:
                raise ShapeMismatchError(f"{name} must have a contiguous last dimension")

    def check_current(self) -> None:
        """Raise :class:`PlanMismatchError` if a newer plan was written into the buffers."""
        if self.serial != self.buffers.serial:
            raise PlanMismatchError(
                "a newer plan was written into this plan's buffers; use the newest plan")

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, *,
            sm_scale: float | None = None, logit_cap: float = 0.0,
            backend: str | Backend = "auto", check: bool = True,
            graph: bool = False) -> torch.Tensor:
        """Compute decode attention into ``o`` (``[B, Hq, D]``) and return it.

        ``graph=True`` (CUDA, Triton backend): the first call with a given set of
        tensors (the same storage, shapes and strides) runs normally and then captures
        its launches in a CUDA graph; later calls with the same tensors replay it, which
        costs one graph launch of host time instead of two or three kernel launches.
        Replays read the current contents of ``q``, ``k``, ``v`` and of the plan's
        buffers (append-only steps grow the plan in place and stay valid). Inside a
        caller's own graph capture the kernels are launched as usual.
        """
        if check:
            self.check_inputs(q, k, v, o)
            self.check_current()
        if sm_scale is None:
            sm_scale = 1.0 / math.sqrt(self.head_dim)
        be = backend if isinstance(backend, Backend) else select_backend(q.device, backend)
        if graph and be is Backend.TRITON and q.device.type == "cuda":
            return self._run_graphed(q, k, v, o, float(sm_scale), float(logit_cap or 0.0))
        if be is Backend.TORCH:
            torch_tree_decode(q, k, v, o, phases=self.phases, sm_scale=float(sm_scale),
                              logit_cap=float(logit_cap or 0.0), check=False,
                              **self.launch_modes, **self.kernel_tensors(q.dtype))
            return o
        self._launcher(q, k, v, o, float(sm_scale), float(logit_cap or 0.0))(q, k, v, o)
        return o

    #: Prepared launch sets a plan keeps (one per tensor layout and scale).
    MAX_LAUNCHERS = 16

    def _launcher(self, q, k, v, o, sm_scale, logit_cap):
        """The prepared launches of this plan for tensors laid out like these (dtype,
        shape and strides of q, k, v, o, and the scales): computed on the first call,
        then reused, so a repeated eager call costs the Triton launches and little more.
        Dropped when the buffers are reallocated."""
        key = (q.dtype, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(),
               o.dtype, o.shape, o.stride(), q.device, sm_scale, logit_cap,
               self.half_partials)
        gen = self.buffers.generation
        cache = self._launchers
        if cache.get("generation") != gen:
            cache.clear()
            cache["generation"] = gen
        fn = cache.get(key)
        if fn is None:
            # A launch set binds the buffers' index regions, which every plan written
            # into these buffers shares: plans of the same phases and modes (a decode
            # loop re-planning a tree of the same shape) reuse one set, already
            # compiled and launched directly.
            shared = self.buffers.launchers if SHARED_LAUNCHERS else {}
            modes = (key,) + self._modes()
            skey = (modes, self.phases)
            fn = shared.pop(skey, None)
            if fn is None:
                # A set of another plan of these buffers whose phases differ only in
                # their sizes (a decode loop whose tree changes shape every step) is
                # resized instead of building one.
                forms = (self.buffers.launch_forms
                         if RESIZED_LAUNCHERS and SHARED_LAUNCHERS else None)
                if forms is not None:
                    form = launch_form(self.phases, q.shape[1] // k.shape[1], k.shape[1],
                                       self.finish)
                    fkey = (modes, form)
                    template = forms.pop(fkey, None)
                    if template is not None:
                        fn = template.resized(self.phases, form)
                if fn is None:
                    fn = tree_decode_launcher(q, k, v, o, phases=self.phases,
                                              sm_scale=sm_scale, logit_cap=logit_cap,
                                              **self.launch_modes,
                                              **self.kernel_tensors(q.dtype))
                if forms is not None:
                    _put_newest(forms, fkey, fn, SHARED_LAUNCHERS)
            _put_newest(shared, skey, fn, SHARED_LAUNCHERS)
            if len(cache) > self.MAX_LAUNCHERS:
                cache.clear()
                cache["generation"] = gen
            cache[key] = fn
        return fn

    #: CUDA graphs a plan keeps for different tensor sets (least recently used dropped).
    MAX_GRAPHS = 8

    def _run_graphed(self, q, k, v, o, sm_scale, logit_cap):
        if torch.cuda.is_current_stream_capturing():
            self._launcher(q, k, v, o, sm_scale, logit_cap)(q, k, v, o)
            return o
        # The replay path is the hot one: a flat key, and the prepared launches are only
        # looked up when a graph is captured.
        key = (sm_scale, logit_cap,
               q.data_ptr(), q.dtype, q.shape, q.stride(),
               k.data_ptr(), k.dtype, k.shape, k.stride(),
               v.data_ptr(), v.dtype, v.shape, v.stride(),
               o.data_ptr(), o.dtype, o.shape, o.stride())
        graphs = self._graphs
        if graphs is None or graphs[0] != self.buffers.generation:
            # Buffers were reallocated: graphs of the old ones must not be replayed.
            graphs = self._graphs = (self.buffers.generation, {})
        cache = graphs[1]
        g = cache.pop(key, None)
        if g is None:
            prepared = self._launcher(q, k, v, o, sm_scale, logit_cap)

            def launch():
                prepared(q, k, v, o)

            launch()  # compiles the kernels (if needed) and computes this call's result
            g = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream(device=q.device)
            stream.wait_stream(torch.cuda.current_stream(q.device))
            with torch.cuda.graph(g, stream=stream):
                launch()
            torch.cuda.current_stream(q.device).wait_stream(stream)
            _put_newest(cache, key, g, self.MAX_GRAPHS)
            return o
        cache[key] = g  # most recently used last
        g.replay()
        return o

    def extend_tail(self, row: int, slots: np.ndarray) -> bool:
        """Append several KV slots to the tail vnode of one request (in place).

        Returns False (and changes nothing) if the request cannot grow by that much.
        """
        slots = np.asarray(slots, dtype=np.int64)
        tv = int(self.tail_vnode[row])
        if tv < 0:
            return False
        if self._ranged_tails():
            upd = self._prepare_ranged(np.full(slots.size, row, dtype=np.int64))
            if upd is None:
                return False
            self.buffers.scatter(upd[0], np.concatenate([slots, upd[1]]))
            return True
        pos = int(self.vnode_kv_start_host[tv] + self.vnode_kv_len_host[tv])
        if pos + slots.size > self.tail_limit[row]:
            return False
        b = self.buffers
        kv_off = b.offsets["kv_indices"] + pos
        len_off = b.offsets["vnode_kv_len"] + tv
        self._tails = None  # the request-ordered mirrors are rebuilt when next needed
        self.vnode_kv_len_host[tv] += slots.size
        b.scatter(np.append(np.arange(kv_off, kv_off + slots.size), len_off),
                  np.append(slots, self.vnode_kv_len_host[tv]))
        return True

    def extend_tails(self, rows: np.ndarray | None, slots: np.ndarray, *,
                     assume_unique: bool = False) -> bool:
        """Append one KV slot to the tail vnode of each request in ``rows`` (in place).

        ``rows=None`` means every request of the plan, in order (``slots`` has one
        entry per request). Returns False (and changes nothing) if some request cannot
        grow in place; the caller must then rebuild the plan. O(len(rows)) numpy work
        plus one small copy and one launch on the device.
        """
        upd = self.prepare_tails(rows, slots, assume_unique=assume_unique)
        if upd is None:
            return False
        self.send_tails(upd, np.asarray(slots, dtype=np.int64))
        return True

    def prepare_tails(self, rows: np.ndarray | None, slots: np.ndarray, *,
                      assume_unique: bool = False):
        """:meth:`extend_tails` up to the device write: updates the host arrays and
        returns the device update for :meth:`send_tails`, or None (nothing changed) if
        some request cannot grow."""
        if rows is None:
            if np.size(slots) != self.num_requests:
                raise ValueError(f"extend_tails(None, slots) needs {self.num_requests} slots, "
                                 f"got {np.size(slots)}")
            return self._prepare_all_tails(slots)
        rows = np.asarray(rows, dtype=np.int64)
        tv, limit = self.tail_vnode[rows], self.tail_limit[rows]
        if tv.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if tv.min() < 0:
            return None
        if not assume_unique and np.unique(rows).size != rows.size:
            return None
        if self._ranged_tails():
            upd = self._prepare_ranged(rows)
            if upd is None:
                return None
            positions, tail_values = upd
            values = np.concatenate([np.asarray(slots, dtype=np.int64), tail_values])
            self.buffers.write_host(positions, values)
            return positions, values
        pos = self.vnode_kv_start_host[tv] + self.vnode_kv_len_host[tv]
        if (pos >= limit).any():
            return None
        # Distinct rows have distinct tail vnodes (a tail vnode serves one request).
        b = self.buffers
        self._tails = None  # the request-ordered mirrors are rebuilt when next needed
        self.vnode_kv_len_host[tv] += 1
        positions = np.concatenate([b.offsets["kv_indices"] + pos, b.offsets["vnode_kv_len"] + tv])
        values = np.concatenate([slots, self.vnode_kv_len_host[tv]])
        b.write_host(positions, values)
        return positions, values

    def _ranged_tails(self) -> bool:
        """Whether growth goes through :class:`_TailRanges` (made at the first growth):
        where some tail range is shared by several growing requests, or the plan is
        masked (each new entry carries its request's row mask). Elsewhere each request
        grows its own vnode."""
        r = self._ranges
        if r is None:
            ranged = self.tail_count is not None and (
                int(self.tail_count.max(initial=1)) > 1
                or (self.masked and bool((self.tail_vnode >= 0).any())))
            r = self._ranges = _TailRanges(self) if ranged else False
        return r is not False

    def _prepare_ranged(self, entries: np.ndarray):
        """Host half of a growth by one entry per item of ``entries`` (request rows,
        repeated for several entries of one request) in a plan with ranged tails
        (:meth:`_ranged_tails`): each entry takes its range's next free entry, in
        order, with its request's row mask; every tail vnode of a listed request then
        spans its range's filled entries. Returns ``(positions, values)`` (the
        positions of the slots first, then of the lengths and masks, whose values
        follow) with the host mirrors updated, or None (nothing changed) where some
        range is full."""
        r = self._ranges
        rid = r.rid[entries]
        pos = r.next[rid] + _rank_within(rid)
        added = np.bincount(rid, minlength=r.next.size)
        new_next = r.next + added
        if (new_next > r.limit).any():
            return None
        r.next = new_next
        self._tails = None  # the request-ordered mirrors are rebuilt when next needed
        tv = self.tail_vnode[entries]
        new_len = new_next[rid] - self.vnode_kv_start_host[tv]
        self.vnode_kv_len_host[tv] = new_len
        b = self.buffers
        positions = [b.offsets["kv_indices"] + pos, b.offsets["vnode_kv_len"] + tv]
        values = [new_len]
        if self.masked:
            positions.append(b.offsets["kv_mask"] + pos)
            values.append(self.tail_bit[entries])
        return np.concatenate(positions), np.concatenate(values)

    def send_tails(self, upd, slots: np.ndarray) -> torch.Tensor:
        """Apply an update from :meth:`prepare_tails` to the device buffer; returns
        ``slots`` (int64) on the plan's device, copied with the update."""
        if isinstance(upd, _TailSteps):
            dev_slots = to_device_async(slots, self.device)
            upd.launch(dev_slots)
            return dev_slots
        out = self.buffers.send(upd[0], upd[1], prefix=slots)
        return torch.from_numpy(slots) if out is None else out

    def send_tails_from_stack(self, upd, free_stack: torch.Tensor, top: int,
                              page_size: int) -> torch.Tensor | None:
        """:meth:`send_tails` for an every-request step whose slots are fresh pages taken
        from a page allocator: request ``i``'s slot is ``free_stack[top - 1 - i] *
        page_size``, read on the device from ``free_stack`` (int64, the plan's device; a
        mirror of the allocator's free stack up to ``top``, its top before the
        allocation), so nothing is copied from the host. Returns the slots (int64, on
        the device), or None where the update is not a device step (then use
        :meth:`send_tails`)."""
        if not isinstance(upd, _TailSteps) or upd.launch is None:
            return None
        b = self.buffers
        if upd.stack_launch is None or upd.stack_launch.consts["PAGE"] != page_size:
            upd.stack_launch = grow_tails_stack_launcher(
                b.dev, upd.tails, b.offsets["kv_indices"], b.offsets["vnode_kv_len"], page_size,
                mask_off=b.offsets["kv_mask"] if upd.bits is not None else -1)
        slots = torch.empty(self.num_requests, dtype=torch.int64, device=b.dev.device)
        upd.stack_launch(slots, free_stack, int(top))
        return slots

    def _prepare_all_tails(self, slots: np.ndarray):
        """:meth:`prepare_tails` for every request in order (the model loop's step).

        Works on request-ordered mirrors of the tail vnodes (next kv entry, length), so
        a step costs a few vector operations and no gathers. Where the buffers have a
        device copy that Triton runs on, the device keeps its own copy of the tail
        positions and one kernel applies the step (:class:`_TailSteps`); the host
        staging buffer is not written. Otherwise the step is a list of positions and
        values (reused arrays) for :meth:`PlanBuffers.send`.
        """
        t = self._tails
        if t is None:
            t = self._tails = self._all_tails()
        if t is False:
            return None
        b = self.num_requests
        if b == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if t.room <= 0:  # some request's next entry would reach its limit
            return None
        t.room -= 1
        t.tail_len += t.stride
        self.vnode_kv_len_host[self.tail_vnode] = t.tail_len
        if t.ranges is not None:
            t.ranges.next += t.ranges.count  # every range grows by its requests
        if t.launch is not None:
            t.kv_pos += t.stride
            return t
        positions, values = t.positions, t.values
        np.add(t.kv_pos, self.buffers.offsets["kv_indices"], out=positions[:b])
        if t.bits is not None:
            np.add(t.kv_pos, self.buffers.offsets["kv_mask"], out=positions[2 * b:])
        t.kv_pos += t.stride
        values[:b] = slots
        values[b:2 * b] = t.tail_len
        self.buffers.write_host(positions, values)
        return positions, values

    def _all_tails(self):
        tv = self.tail_vnode
        if tv.size and tv.min() < 0:
            return False
        return _TailSteps(self, tv)


class _TailRanges:
    """The tail ranges of a plan whose growth is ranged (some range shared by several
    growing requests, or a masked plan; see ``DecodePlan._ranged_tails``): per request
    its range (``rid``, -1 where it cannot grow); per range its growing requests
    (``count``), its next free entry (``next``) and the end of its room (``limit``).
    An entry appended by any of a range's requests takes the next free one (with that
    request's row mask); the tail vnodes of the range's requests (one per q tile) span
    the filled entries."""

    __slots__ = ("rid", "count", "next", "limit")

    def __init__(self, plan: DecodePlan):
        tv = plan.tail_vnode
        ok = (tv >= 0).nonzero()[0]
        start = plan.vnode_kv_start_host[tv[ok]]
        uniq, inv = np.unique(start, return_inverse=True)
        self.rid = np.full(tv.size, -1, dtype=np.int64)
        self.rid[ok] = inv
        self.count = np.bincount(inv, minlength=uniq.size).astype(np.int64)
        self.next = np.zeros(uniq.size, dtype=np.int64)
        np.maximum.at(self.next, inv, start + plan.vnode_kv_len_host[tv[ok]])
        self.limit = np.zeros(uniq.size, dtype=np.int64)
        self.limit[inv] = plan.tail_limit[ok]


class _TailSteps:
    """Request-ordered mirrors of a plan's tail vnodes for the every-request step:
    each request's next kv entry (``kv_pos``), tail length and growth per step
    (``stride``: the growing requests sharing its range, see ``DecodePlan.tail_count``;
    they take the range's next entries in the order of ``DecodePlan.tail_rank``), the
    steps left before some request reaches its limit (``room``), the row masks of the
    entries in a masked plan (``bits``), and either reused
    position/value arrays (host path) or a prepared device step (``launch``) with the
    tail positions kept on the device."""

    __slots__ = ("kv_pos", "tail_len", "stride", "room", "positions", "values", "launch",
                 "tails", "stack_launch", "ranges", "bits")

    def __init__(self, plan: DecodePlan, tv: np.ndarray):
        b = tv.size
        buffers = plan.buffers
        start = plan.vnode_kv_start_host[tv]
        self.ranges = self.bits = None
        if b and plan._ranged_tails():
            r = self.ranges = plan._ranges
            self.stride = r.count[r.rid]
            self.tail_len = r.next[r.rid] - start  # the range's filled entries
            self.kv_pos = r.next[r.rid] + plan.tail_rank
            self.room = int(((r.limit - r.next) // r.count).min())
            if plan.masked:
                self.bits = plan.tail_bit
        else:
            self.stride = 1
            self.tail_len = plan.vnode_kv_len_host[tv].copy()
            self.kv_pos = start + self.tail_len
            self.room = int((plan.tail_limit - self.kv_pos).min()) if b else 0
        self.launch = self.tails = self.stack_launch = None
        self.positions = self.values = None
        dev = buffers.dev
        if b and dev is not buffers.host and (dev.device.type == "cuda" or interpreter_enabled()):
            # Per request: next entry, tail vnode, the entry the length counts from (the
            # length after a step is next entry - it), the growth per step and the mask.
            step = np.broadcast_to(np.asarray(self.stride, dtype=np.int64), (b,))
            # The length after a step is tail_len + stride (the same for every request
            # of a range), read on the device as kv_pos - base.
            base = self.kv_pos - self.tail_len - step
            rows = [self.kv_pos, tv, base, step] + ([] if self.bits is None else [self.bits])
            self.tails = to_device_async(np.concatenate(rows).astype(np.int32), dev.device)
            self.launch = grow_tails_launcher(
                dev, self.tails, buffers.offsets["kv_indices"], buffers.offsets["vnode_kv_len"],
                buffers.offsets["kv_mask"] if self.bits is not None else -1)
        else:
            k = 3 if self.bits is not None else 2
            self.positions = np.empty(k * b, dtype=np.int64)
            self.positions[b:2 * b] = buffers.offsets["vnode_kv_len"] + tv
            self.values = np.empty(k * b, dtype=np.int64)
            if self.bits is not None:
                self.values[2 * b:] = self.bits


# ----------------------------------------------------------------------------- planning
#
# A plan makes a few hundred numpy calls on arrays of about the tree's size, so the cost
# per call matters as much as the work: the planner counts its passes, and calls
# np.add.accumulate (np.cumsum without its Python-level dispatch) and array methods
# (a.argsort, a.repeat) rather than their np.* wrappers.


def _depths(parent: np.ndarray) -> np.ndarray:
    """Depth of every node (roots 0) by pointer jumping: O(depth) numpy passes."""
    n = parent.size
    live = (parent >= 0).nonzero()[0]
    anc = parent[live]  # the current ancestor of every live node
    passes = []
    while live.size:
        passes.append(live)
        if len(passes) > n:
            raise ValueError("parent array has a cycle")
        up = parent[anc]
        keep = up >= 0
        live, anc = live[keep], up[keep]
    # A node's depth is the number of passes it was live in.
    if not passes:
        return np.zeros(n, dtype=np.int64)
    return np.bincount(np.concatenate(passes), minlength=n).astype(np.int64, copy=False)


def _walk_paths(parent: np.ndarray, req_end: np.ndarray):
    """Every request's path, walked up from its end node, one numpy pass per level:
    ``(path_req, path_node, has_up)`` with one entry per (request, node on its path).
    Levels follow each other (level 0: the end nodes in request order), and level l + 1
    holds, in order, the entries of level l whose node has a parent (``has_up``).
    Raises ValueError when a path runs into a cycle."""
    r, cur = np.arange(req_end.size, dtype=np.int64), req_end
    rs, ns, has_up = [], [], []
    while cur.size:
        up = parent[cur]
        keep = up >= 0
        rs.append(r)
        ns.append(cur)
        has_up.append(keep)
        if len(ns) > parent.size:
            raise ValueError("parent array has a cycle")
        r, cur = r[keep], up[keep]
    if not ns:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=bool)
    return np.concatenate(rs), np.concatenate(ns), np.concatenate(has_up)


def _effective_q_tile(tile: int, group: int) -> int:
    return max(1, min(int(tile), MAX_BLOCK_M // group))


class _Topology:
    """Per-build derived arrays: request paths, request counts, children lists.

    Only a cycle on some request's path is detected here (ValueError); :attr:`depth`
    detects any.
    """

    def __init__(self, inp: PlanInput):
        parent = np.asarray(inp.parent, dtype=np.int64)
        self.n = n = parent.size
        self.parent = parent
        self.seqlen = np.asarray(inp.seqlen, dtype=np.int64)
        self.req_end = req_end = np.asarray(inp.req_end, dtype=np.int64)
        #: Whether some node holds no tokens.
        self.empty_nodes = np.count_nonzero(self.seqlen) < n
        # Every request's path: entry i is request path_req[i] at node path_node[i].
        self.path_req, self.path_node, has_up = _walk_paths(parent, req_end)
        # The entries above level 0 were reached from these nodes, in order.
        self.path_below = self.path_node[has_up]
        # Requests through each node: the entries of all paths at that node.
        self.nq = np.bincount(self.path_node, minlength=n).astype(np.int64, copy=False)
        # Children CSR, children in increasing id order (the seed's edge order).
        nonroot = (parent >= 0).nonzero()[0]
        pn = parent[nonroot]
        order = pn.argsort(kind="stable")
        self.ch_ids = nonroot[order]
        self.ch_parent = pn[order]
        self.ch_ptr = np.zeros(n + 1, dtype=np.int64)
        np.add.accumulate(np.bincount(pn, minlength=n), out=self.ch_ptr[1:])

    @functools.cached_property
    def depth(self) -> np.ndarray:
        return _depths(self.parent)

    @functools.cached_property
    def bfs_order(self) -> np.ndarray:
        """Nodes by depth (ids increasing within a level)."""
        return np.argsort(self.depth, kind="stable")


def _cmm_tables(q_tiles, kv_tiles, ag, max_nq: int) -> tuple[list, list]:
    """The factors of ``Cmm(nQ, nK)`` that depend on ``nQ`` alone, for ``nQ`` = 0 ..
    ``max_nq``: ``ag * padq`` (``padq`` the query tile's padding rows) and the KV tile
    (the phase-1 tiles where ``nQ`` fits one). ``Cmm(nQ, nK) = qf[nQ] * nK + bg * padk
    * nQ``, ``padk = tk[nQ] - nK`` where ``nK < tk[nQ]``, else 0 (the cost model of
    :func:`_tree_heuristic`)."""
    tq0, tq1 = q_tiles
    tk0, tk1 = kv_tiles
    qf, tk = [], []
    for nQ in range(max_nq + 1):
        tq, t = (tq0, tk0) if nQ > tq1 else (tq1, tk1)
        qf.append(ag * (tq - ((nQ - 1) % tq + 1)))
        tk.append(t)
    return qf, tk


def _tree_heuristic(topo: _Topology, q_tiles, kv_tiles, group, alpha, beta, gamma):
    """Greedy split-K / split-Q choice for every edge; returns (assign, chain length).

    The scalar form of the FastTree heuristic; :func:`_tree_heuristic_vec` is the
    vectorised one, and tests check that both decide identically. Plans run this one on
    small trees (see :func:`_heuristic`). ``Cmm`` is written out in the loop (four per
    edge, from :func:`_cmm_tables`), in the same float operations as there.
    """
    n = topo.n
    L = topo.seqlen.tolist()
    nq = topo.nq.tolist()
    ch_ptr = topo.ch_ptr.tolist()
    ch_ids = topo.ch_ids.tolist()
    assign = [0] * n
    bg = beta * group
    qf, tk = _cmm_tables(q_tiles, kv_tiles, alpha * group, max(nq) if n else 0)
    # Parents are decided before their children (a child's decision reads its parent's
    # final chain length); any such order gives the same decisions. Ids are one when
    # every parent's id is smaller (a cache's trees, generated trees), else depth order.
    parents = (topo.ch_ptr[1:] > topo.ch_ptr[:-1]).nonzero()[0]
    if not (topo.ch_parent < topo.ch_ids).all():
        parents = parents[topo.depth[parents].argsort(kind="stable")]
    for x in parents.tolist():
        nq_cur = nq[x]
        if nq_cur == 0:
            continue
        lenv = L[x]
        for c in ch_ids[ch_ptr[x]:ch_ptr[x + 1]]:
            nql = nq[c]
            if nql == 0:
                continue
            lenl = L[c]
            # split_k = Cmm(nq_cur, lenv) + Cmm(nql, lenl) + gamma * nql
            t = tk[nq_cur]
            a1 = qf[nq_cur] * lenv + bg * (t - lenv if lenv < t else 0) * nq_cur
            t = tk[nql]
            a2 = qf[nql] * lenl + bg * (t - lenl if lenl < t else 0) * nql
            split_k = a1 + a2 + gamma * nql
            # split_q = Cmm(nq_cur - nql, lenv) + Cmm(nql, lenl + lenv)
            rest = nq_cur - nql
            t = tk[rest]
            b1 = qf[rest] * lenv + bg * (t - lenv if lenv < t else 0) * rest
            both = lenl + lenv
            t = tk[nql]
            b2 = qf[nql] * both + bg * (t - both if both < t else 0) * nql
            if split_k > b1 + b2:
                assign[c] = 1
                nq_cur = rest
                L[c] = both
    return np.asarray(assign, dtype=np.int8), np.asarray(L, dtype=np.int64)


def _tree_heuristic_vec(topo: _Topology, q_tiles, kv_tiles, group, alpha, beta, gamma):
    """:func:`_tree_heuristic`, vectorised over all children at once.

    The scalar pass decides children in depth order and siblings in id order, because a
    split-Q child lowers its parent's query count and lengthens its own chain. Here every
    decision is recomputed from the previous round's decisions until none changes (see
    the comment below); the float expressions are evaluated in the same order as in the
    scalar version, so both make identical decisions (tests check it).
    """
    n = topo.n
    L = topo.seqlen
    assign = np.zeros(n, dtype=np.int8)
    c = topo.ch_ids  # grouped by parent, siblings in id order
    k = c.size
    if k == 0:
        return assign, L.copy()
    tq0, tq1 = q_tiles
    tk0, tk1 = kv_tiles
    ag = alpha * group
    bg = beta * group
    p = topo.ch_parent
    nq = topo.nq
    nql = nq[c]
    own = L[c]
    cur0 = nq[p]

    # The factors of Cmm that depend on nQ alone, tabulated for nQ = 0 .. max(cur0) (no
    # query count below exceeds its parent's): row 0 ag * padq, row 1 the KV tile. padq
    # is tq - ((nQ - 1) % tq + 1) == (-nQ) % tq for nQ >= 1, and 0 for nQ = 0. The tile is
    # a float too: tk - nK and max(., 0) stay exact integers, so cmm multiplies the same
    # values in the same order as the scalar version (its in-place updates swap operands
    # only, and a * b == b * a, a + b == b + a exactly).
    m = int(cur0.max()) + 1
    neg_nq = -np.arange(m)
    small = min(tq1 + 1, m)  # nQ <= tq1: the phase-1 tiles
    tab = np.empty((2, m))
    np.multiply(ag, neg_nq % tq0, out=tab[0])
    tab[0, :small] = ag * (neg_nq[:small] % tq1)
    tab[1] = tk0
    tab[1, :small] = tk1

    def cmm(nQ, nK):
        # ag * padq * nK + bg * padk * nQ
        agp, tk = tab.take(nQ, axis=1)
        pad = tk - nK
        np.maximum(pad, 0, out=pad)
        pad *= bg
        pad *= nQ
        pad += agp * nK
        return pad

    # Every child's decision depends on its parent's chain length (set when the parent
    # was decided) and on its parent's query count after the split-Q choices of its
    # earlier siblings. Those dependencies form a DAG (parents first, then siblings in
    # id order), so iterating all decisions at once to their fixed point ends with
    # exactly the sequential decisions: each round recomputes every child from the
    # previous round's choices and the chain lengths they give, and a decision that only
    # depends on final ones is final. It usually takes two or three rounds. A round
    # evaluates split-K's Cmm(cur, lenv) and split-Q's Cmm(cur - nql, lenv) and
    # Cmm(nql, own + lenv) as the three rows of one array. (Children without queries
    # never split: both sides then add Cmm(0, .) == 0 to the same Cmm(cur, lenv).)
    nK_add = np.zeros((3, k))  # the rows' nK: lenv + nK_add
    nK_add[2] = own
    c_own = cmm(nql, nK_add[2])
    g_nql = gamma * nql
    first_sibling = topo.ch_ptr[p]
    nQ = np.array([cur0, cur0 - nql, nql])
    before = nQ[:2].copy()  # rows 0 and 1 before earlier siblings take queries
    nK = np.empty((3, k))
    taken = np.zeros(k + 1, dtype=np.int64)
    chain = L.copy()
    lenv = L[p]
    pick = np.zeros(k, dtype=bool)
    for _ in range(k + 1):
        np.add(lenv, nK_add, out=nK)
        cost = cmm(nQ, nK)
        split_k = cost[0]
        split_k += c_own
        split_k += g_nql
        split_q = cost[1]
        split_q += cost[2]
        new = split_k > split_q
        if not np.count_nonzero(new != pick):
            break
        pick = new
        # The chain lengths these choices give: a split-Q child appends its tokens to
        # its parent's chain; repeat down the split-Q chains until nothing changes.
        while True:
            chain[c] = own + pick * lenv
            lenv_next = chain[p]
            if not np.count_nonzero(lenv_next != lenv):
                break
            lenv = lenv_next
        # Queries that earlier split-Q siblings took from the parent: a prefix sum of
        # the choices, less its value at the first sibling.
        np.add.accumulate(nql * pick, out=taken[1:])
        np.subtract(before, taken[:-1] - taken[first_sibling], out=nQ[:2])
    assign.view(bool)[c] = pick
    return assign, chain


def _heuristic(topo: _Topology, q_tiles, kv_tiles, group, alpha, beta, gamma):
    """The cost model's split choices: :func:`_tree_heuristic` for trees of at most
    :data:`SCALAR_HEURISTIC_MAX_NODES` nodes, else :func:`_tree_heuristic_vec`."""
    fn = _tree_heuristic if topo.n <= SCALAR_HEURISTIC_MAX_NODES else _tree_heuristic_vec
    return fn(topo, q_tiles, kv_tiles, group, alpha, beta, gamma)


def _flat_assignment(topo: _Topology):
    """Every non-root node split-Q: chains are whole root-to-node paths."""
    assign = (topo.parent >= 0).astype(np.int8)
    chain = topo.seqlen.copy()
    order = topo.bfs_order  # parents before children
    nonroot = order[topo.parent[order] >= 0]
    depth = topo.depth[nonroot]
    bounds = np.searchsorted(depth, np.arange(int(depth.max()) + 2)) if nonroot.size else [0]
    for d in range(len(bounds) - 1):
        lvl = nonroot[bounds[d]:bounds[d + 1]]
        chain[lvl] += chain[topo.parent[lvl]]
    return assign, chain


class _Groups:
    """Groups: nodes with the queries that attend their (chain of) tokens."""

    def __init__(self, topo: _Topology, assign: np.ndarray, chain_len: np.ndarray):
        b = topo.req_end.size
        self.num_requests = b
        # Pairs (request, group node): the end node, plus the parent of every split-K
        # node on the path, i.e. the path entries above level 0 reached from a split-K node.
        keep = np.empty(topo.path_node.size, dtype=bool)
        keep[:b] = True
        np.equal(assign[topo.path_below], 0, out=keep[b:])
        if topo.empty_nodes:
            # Drop groups with no tokens (empty chains): nothing to attend there.
            keep &= chain_len[topo.path_node] > 0
        pr = topo.path_req[keep]
        pg = topo.path_node[keep]
        # Sort pairs by (group node, request) with one argsort on a combined key.
        order = (pg * max(b, 1) + pr).argsort(kind="stable")
        self.pair_req = pr[order]
        cnt = np.bincount(pg, minlength=topo.n)
        self.node = cnt.nonzero()[0]
        self.nreq = cnt[self.node].astype(np.int64, copy=False)
        self.req_start = np.add.accumulate(self.nreq) - self.nreq
        self.length = chain_len[self.node]


class _Tiling:
    """Phase, KV chunk and query tile of every group, and the vnodes they make."""

    def __init__(self, groups: _Groups, q_tiles, splits, num_kv_heads):
        nreq = groups.nreq
        #: Groups of at most ``q_tiles[1]`` queries run in phase 1.
        self.phase1 = ph1 = nreq <= q_tiles[1]
        self.split = np.where(ph1, splits[1], splits[0])
        self.q_tile = np.where(ph1, q_tiles[1], q_tiles[0])
        #: KV chunks per group and their length (see :data:`BALANCE_CHUNKS`).
        self.nch, self.chunk = _chunking(groups.length, self.split)
        self.nqt = -(-nreq // self.q_tile)
        self.nv = self.nch * self.nqt
        nv1 = int(np.add.reduce(self.nv[ph1]))
        self.nv_phase = (int(np.add.reduce(self.nv)) - nv1, nv1)
        #: Stage-1 programs per phase, as the seed's threshold rule counts them.
        self.par = [x * int(num_kv_heads) for x in self.nv_phase]


def _chunking(length: np.ndarray, split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(chunks, chunk length)`` of chains of ``length`` entries cut at ``split``
    (elementwise): ``ceil(length / split)`` chunks of ``split`` entries, the last one
    holding the rest; a last chunk of at most :data:`CHUNK_TAIL_ABSORB` x ``split``
    entries joins the one before it; with :data:`BALANCE_CHUNKS` the chunks then have
    equal lengths (up to one entry; the last may be shorter)."""
    nch = -(-length // split)
    if CHUNK_TAIL_ABSORB:
        tail = length - (nch - 1) * split
        nch = nch - ((nch > 1) & (tail <= CHUNK_TAIL_ABSORB * split))
    if not BALANCE_CHUNKS:
        return nch, split
    chunk = np.maximum(-(-length // np.maximum(nch, 1)), 1)
    return -(-length // chunk), chunk


class _Layout:
    """The groups a plan's vnodes are cut from: per group its phase, KV chunks (count
    and length), q tile, requests (``pair_req[req_start:req_start + nreq]``) and chain
    length, and the segments of the chains (``seg_group``, ``seg_node``, by group, in
    chain order; ``seg_mask`` the row masks of each, or None), with the phases' q tiles;
    vnode counts follow (``nv_g``, ``n0``/``n1`` per phase, ``par`` programs)."""

    def __init__(self, phase1, nch, split, q_tile, nreq, length, pair_req, req_start,
                 seg_group, seg_node, seg_mask, q_tiles, num_kv_heads):
        self.phase1, self.nch, self.split, self.q_tile = phase1, nch, split, q_tile
        self.nreq, self.length = nreq, length
        self.pair_req, self.req_start = pair_req, req_start
        self.seg_group, self.seg_node, self.seg_mask = seg_group, seg_node, seg_mask
        self.q_tiles = q_tiles
        self.ng = length.size
        self.nqt = -(-nreq // q_tile)
        self.nv_g = nch * self.nqt
        self.n1 = int(self.nv_g[phase1].sum())
        self.n0 = int(self.nv_g.sum()) - self.n1
        self.nv = self.n0 + self.n1
        self.par = [self.n0 * num_kv_heads, self.n1 * num_kv_heads]


def _cost_model_layout(topo, assign, groups: _Groups, tiling: _Tiling, q_tiles,
                       num_kv_heads: int) -> _Layout:
    """The cost model's groups as :class:`_Tiling` cut them (no masks)."""
    cg, cn = _chain_segments(assign, topo.parent, groups.node)
    return _Layout(tiling.phase1, tiling.nch, tiling.chunk, tiling.q_tile, groups.nreq,
                   groups.length, groups.pair_req, groups.req_start, cg, cn, None,
                   list(q_tiles), num_kv_heads)


def _inline_layout(inline, reqs: int, b: int, q_tiles, num_kv_heads: int) -> _Layout:
    """One masked phase: a vnode per block of ``reqs`` requests over their paths' union
    (:func:`_inline_blocks`'s ``inline``)."""
    pair_req, cg, cn, seg_mask, length = inline
    ng = length.size
    gid = np.arange(ng, dtype=np.int64)
    ones = np.ones(ng, dtype=np.int64)
    return _Layout(np.ones(ng, dtype=bool), ones, np.maximum(length, 1), ones * reqs,
                   np.minimum(reqs, b - gid * reqs), length, pair_req, gid * reqs, cg, cn,
                   seg_mask, [int(q_tiles[0]), reqs], num_kv_heads)


def _shared_layout(topo, groups: _Groups, tiling: _Tiling, reqs: int, split0: int, q_tiles,
                   num_kv_heads: int) -> _Layout | None:
    """Long nodes shared in phase 0, the rest inlined in masked phase-1 blocks
    (:data:`SHARED_INLINE`): every node of at least that many tokens that some request
    passes is a group of all requests through it (chunked at ``split0``, one segment,
    mask -1), followed by :func:`_inline_blocks` of ``reqs`` requests over the other
    nodes. None where no node is long, the blocks do not fit :data:`INLINE_MAX_KV`, or
    the plan would read more than :data:`SHARED_INLINE_MAX_READS` x the KV entries of
    the cost model's plan (each q tile of a group reads its chain, a block the union of
    its requests' nodes)."""
    seqlen, b = topo.seqlen, topo.req_end.size
    q0 = int(q_tiles[0])
    long = seqlen >= int(SHARED_INLINE)
    nodes = (long & (topo.nq > 0)).nonzero()[0]
    if nodes.size == 0:
        return None
    most = SHARED_INLINE_MAX_READS * int((tiling.nqt * groups.length).sum())
    # A node is in at least ceil(requests / block) blocks: an O(nodes) lower bound on
    # the reads rules most plans out before the blocks are built.
    if int(seqlen @ -(-topo.nq // np.where(long, q0, reqs))) > most:
        return None
    inline = _inline_blocks(topo, reqs, INLINE_MAX_KV, skip=long)
    if inline is None:
        return None
    rows, seg_block, seg_node, seg_bits, blk_len = inline
    nreq_long = topo.nq[nodes]
    if (-(-nreq_long // q0) * seqlen[nodes]).sum() + blk_len.sum() > most:
        return None
    # The long groups' requests, by node then request; then the blocks' rows.
    on = long[topo.path_node]
    pr, pn = topo.path_req[on], topo.path_node[on]
    pair_long = pr[(pn * b + pr).argsort(kind="stable")]
    nl, nb = nodes.size, blk_len.size
    first = np.arange(nb, dtype=np.int64) * reqs
    length = np.concatenate([seqlen[nodes], blk_len])
    phase1 = np.arange(nl + nb) >= nl
    nch = np.ones(nl + nb, dtype=np.int64)
    split = np.maximum(length, 1)
    nch[:nl], split[:nl] = _chunking(length[:nl], np.full(nl, split0, dtype=np.int64))
    return _Layout(phase1, nch, split, np.where(phase1, reqs, q0),
                   np.concatenate([nreq_long, np.minimum(reqs, b - first)]), length,
                   np.concatenate([pair_long, rows]),
                   np.concatenate([np.add.accumulate(nreq_long) - nreq_long,
                                   pair_long.size + first]),
                   np.concatenate([np.arange(nl, dtype=np.int64), nl + seg_block]),
                   np.concatenate([nodes, seg_node]),
                   np.concatenate([np.full(nl, -1, dtype=np.int64), seg_bits]),
                   [q0, reqs], num_kv_heads)


def _fused_layout(lay: _Layout, groups: _Groups, tiling: _Tiling, seqlen, b: int,
                  num_kv_heads: int) -> _Layout | None:
    """The cost model's layout with sets of phase-1 groups fused into masked vnodes
    (:data:`FUSE_PHASE1`, packing with :data:`FUSE_PACK`), or None where no set
    qualifies or the phase would leave the programs' bounds."""
    hk, q_tile = num_kv_heads, int(lay.q_tiles[1])
    fused = None
    packs = (False,)
    hi = int(lay.nv_g[tiling.phase1].sum()) * hk  # phase 1's programs unfused
    if FUSE_PACK and q_tile > 1:
        # Packing at most shrinks phase 1 to a q tile's share of its vnodes: try it
        # only where that can land within its program bounds.
        lo = -(-hi // (q_tile * hk)) * hk
        if lo <= (FUSE_PACK_MAX_PROGRAMS or lo) and hi >= (FUSE_PACK_MIN_PROGRAMS or 0):
            packs = (True, False)

    def within(eff, rep, pack):
        # Phase 1's programs after fusion: new groups of two or more old ones have one
        # vnode each.
        is_set = np.bincount(eff, minlength=rep.size) > 1
        programs = int(np.where(is_set, 1, lay.nv_g[rep])[tiling.phase1[rep]].sum()) * hk
        return _fused_programs_ok(programs, pack)

    for pack in packs:
        if not pack and not _fused_programs_ok(hi, False):
            # Fusion without packing never adds vnodes: below the bound unfused, it
            # stays below.
            continue
        fused = _fuse_phase1(groups, tiling, b, q_tile, pack,
                             accept=functools.partial(within, pack=pack))
        if fused is not None:
            break
    if fused is None:
        return None
    # The fused sets become groups: one chunk, one q tile, their chains one after the
    # other (the groups' segments re-sorted by their new group).
    eff, rep, seg_bits, pair_req, req_start, nreq = fused
    is_set = np.bincount(eff, minlength=rep.size) > 1
    seg_mask = seg_bits[lay.seg_group]
    cg = eff[lay.seg_group]
    order = cg.argsort(kind="stable")
    cg, cn, seg_mask = cg[order], lay.seg_node[order], seg_mask[order]
    length = np.bincount(cg, weights=seqlen[cn], minlength=rep.size).astype(np.int64)
    return _Layout(tiling.phase1[rep], np.where(is_set, 1, tiling.nch[rep]),
                   np.where(is_set, np.maximum(length, 1), lay.split[rep]), lay.q_tile[rep],
                   nreq, length, pair_req, req_start, cg, cn, seg_mask, lay.q_tiles, hk)


def _fused_programs_ok(programs: int, pack: bool) -> bool:
    """Whether a fused phase 1 of ``programs`` programs (vnodes x KV heads) is kept:
    packed, within :data:`FUSE_PACK_MIN_PROGRAMS` .. :data:`FUSE_PACK_MAX_PROGRAMS` (the
    measured range; outside it the fusion is tried without packing), else at least
    :data:`FUSE_MIN_PROGRAMS`."""
    if pack:
        return ((FUSE_PACK_MIN_PROGRAMS or 0) <= programs
                <= (FUSE_PACK_MAX_PROGRAMS or programs))
    return programs >= (FUSE_MIN_PROGRAMS or 0)


def _fuse_phase1(groups: _Groups, tiling: _Tiling, b: int, q_tile: int, pack: bool,
                 accept=None):
    """Sets of phase-1 groups to fuse into masked vnodes (see :data:`FUSE_PHASE1`), or
    None when no set qualifies, or when ``accept(eff, rep)`` (``eff`` and ``rep`` as
    returned below) is false: that is asked before the rows and masks are built.

    A request's phase-1 groups lie on its path; the one with the most requests holds
    all requests of every phase-1 group linked to it through shared requests (the
    groups below it reached through split-K edges): it names their *component*. A
    component of at least two groups whose chains hold at most the phase's KV chunk is
    a set; with ``pack`` (:data:`FUSE_PACK`), components of one group of one request whose chain
    holds at most the chunk / ``q_tile`` are packed ``q_tile`` at a time, in group
    order. Returns ``(eff, rep, seg_bits, rows, row_start, row_len)``: the new group
    of every group (each set under its first naming group's id, the others keep
    theirs), the group each new group takes its tiles from, every group's mask (its
    requests' bits among its set's rows; -1 outside the sets), and the new groups'
    requests (``rows[row_start[e] : row_start[e] + row_len[e]]``)."""
    ng = groups.node.size
    gid = np.arange(ng, dtype=np.int64)
    ph1 = tiling.phase1
    nreq = groups.nreq
    pair_g = gid.repeat(nreq)
    sel = ph1[pair_g]
    if not sel.any():
        return None
    pg, pr = pair_g[sel], groups.pair_req[sel]
    packable = (ph1 & (nreq == 1) & (groups.length * q_tile <= tiling.split)
                if pack and q_tile > 1 else None)
    if (np.bincount(pr, minlength=b).max() < 2
            and (packable is None or np.count_nonzero(packable) < 2)):
        return None  # no request has two phase-1 groups, and nothing to pack
    # Per request, its phase-1 group with the most requests (ties: the lowest id).
    order = np.lexsort((pg, -nreq[pg], pr))
    first = np.ones(order.size, dtype=bool)
    first[1:] = pr[order][1:] != pr[order][:-1]
    top_of_req = np.full(b, -1, dtype=np.int64)
    top_of_req[pr[order][first]] = pg[order][first]
    top = np.full(ng, -1, dtype=np.int64)
    top[pg] = top_of_req[pr]
    has_top = top >= 0
    members = np.bincount(top[has_top], minlength=ng)
    total = np.bincount(top[has_top], weights=groups.length[has_top], minlength=ng)
    is_top = has_top & (top == gid)
    # Set of every naming group (-1: none), numbered by the set's first naming group.
    set_of = np.full(ng, -1, dtype=np.int64)
    multi = is_top & (members >= 2) & (total <= tiling.split) & (nreq <= 32)
    set_of[multi] = gid[multi]
    if packable is not None:
        single = (is_top & (members == 1) & packable).nonzero()[0]
        if single.size > 1:
            set_of[single] = single[(np.arange(single.size) // q_tile) * q_tile]
    in_set = has_top & (set_of[np.maximum(top, 0)] >= 0)
    if not in_set.any():
        return None
    key = np.where(in_set, set_of[np.maximum(top, 0)], gid)
    # The distinct keys (sorted) and each group's index among them, by a scatter (the
    # keys are group ids).
    present = np.zeros(ng, dtype=bool)
    present[key] = True
    rep = present.nonzero()[0]
    eff = (np.cumsum(present) - 1)[key]
    if accept is not None and not accept(eff, rep):
        return None
    # The new groups' rows: a set's naming groups' requests one after the other, every
    # other group's own.
    src = (~in_set | (is_top & in_set)).nonzero()[0]
    src = src[np.argsort(eff[src], kind="stable")]
    rows = groups.pair_req[_expand_ranges(groups.req_start[src], nreq[src])]
    row_len = np.bincount(eff[src], weights=nreq[src], minlength=rep.size).astype(np.int64)
    row_start = np.add.accumulate(row_len) - row_len
    # Bits: a request's position among its set's rows.
    pos = np.arange(rows.size, dtype=np.int64) - row_start.repeat(row_len)
    local = np.zeros(b, dtype=np.int64)
    e_of_row = np.arange(rep.size).repeat(row_len)
    set_row = np.bincount(eff[in_set], minlength=rep.size)[e_of_row] > 0
    local[rows[set_row]] = pos[set_row]
    bits = np.left_shift(np.int64(1), local[groups.pair_req])
    # Every group holds at least one request: its pairs are one non-empty run.
    seg_bits = np.where(in_set, np.bitwise_or.reduceat(bits, groups.req_start), -1)
    return (eff.astype(np.int64), rep.astype(np.int64), seg_bits.astype(np.int64),
            rows.astype(np.int64), row_start, row_len)


def _preorder_positions(topo: _Topology) -> np.ndarray:
    """Every node's position in a depth-first preorder of the forest (roots, and each
    node's children, in increasing id order): subtree sizes bottom-up, then offsets
    top-down, one numpy pass per level."""
    n = topo.n
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    parent, order = topo.parent, topo.bfs_order
    depth = topo.depth[order]
    bounds = np.searchsorted(depth, np.arange(int(depth[-1]) + 2))
    size = np.ones(n, dtype=np.int64)
    for d in range(len(bounds) - 2, 0, -1):
        lvl = order[bounds[d]:bounds[d + 1]]
        size += np.bincount(parent[lvl], weights=size[lvl], minlength=n).astype(np.int64)
    pos = np.zeros(n, dtype=np.int64)
    for d in range(len(bounds) - 1):
        lvl = order[bounds[d]:bounds[d + 1]]  # ids increasing
        if d:
            lvl = lvl[parent[lvl].argsort(kind="stable")]  # by parent, then id
        s = size[lvl]
        before = np.add.accumulate(s) - s  # exclusive prefix over the level
        if d:
            p = parent[lvl]
            first = np.ones(lvl.size, dtype=bool)
            first[1:] = p[1:] != p[:-1]
            # Subtract the prefix at each parent's first child: siblings before it.
            start = np.maximum.accumulate(np.where(first, np.arange(lvl.size), 0))
            pos[lvl] = pos[p] + 1 + before - before[start]
        else:
            pos[lvl] = before
    return pos


def _inline_blocks(topo: _Topology, reqs: int, max_len: int, skip: np.ndarray | None = None):
    """A plan of whole request paths (see :data:`INLINE`): requests in depth-first order
    of their end nodes, ``reqs`` a block; each block's segments are the nodes on its
    requests' paths, once each, with the bits of the requests through them. None where
    some block would hold more than ``max_len`` entries, or some request would have no
    entries. ``skip`` (bool per node): nodes left out of the blocks (see
    :data:`SHARED_INLINE`). Returns ``(rows, seg_block, seg_node, seg_bits, length)``:
    the requests in block order, the segments (by block, then node id) and every
    block's entries."""
    b = topo.req_end.size
    seqlen = topo.seqlen if skip is None else np.where(skip, 0, topo.seqlen)
    nblocks = -(-b // reqs)
    # A node is read by at least ceil(requests through it / reqs) blocks: where that
    # many reads average over max_len per block, some block is over (O(nodes)).
    if b == 0 or int(seqlen @ -(-topo.nq // reqs)) > max_len * nblocks:
        return None
    path_len = np.bincount(topo.path_req, weights=seqlen[topo.path_node], minlength=b)
    if path_len.max() > max_len or path_len.min() == 0:
        return None
    pos = _preorder_positions(topo)
    rows = np.argsort(pos[topo.req_end], kind="stable")
    rank = np.empty(b, dtype=np.int64)
    rank[rows] = np.arange(b, dtype=np.int64)
    block, bit = np.divmod(rank, reqs)
    key = block[topo.path_req] * topo.n + topo.path_node
    srt = key.argsort(kind="stable")
    key = key[srt]
    first = np.ones(key.size, dtype=bool)
    first[1:] = key[1:] != key[:-1]
    starts = first.nonzero()[0]
    bits = np.bitwise_or.reduceat(np.left_shift(np.int64(1), bit[topo.path_req[srt]]), starts)
    seg_block, seg_node = np.divmod(key[starts], topo.n)
    keep = seqlen[seg_node] > 0
    if not keep.all():
        seg_block, seg_node, bits = seg_block[keep], seg_node[keep], bits[keep]
    length = np.bincount(seg_block, weights=seqlen[seg_node], minlength=nblocks).astype(np.int64)
    if length.max() > max_len:
        return None
    return rows, seg_block, seg_node, bits, length


def _shortable(kv_tile: int, group: int) -> bool:
    """Whether phase 1 may take :data:`SHORT_KV_TILE` instead of ``kv_tile`` at GQA
    group ``group`` (see :func:`_phase1_kv_tile`)."""
    return bool(SHORT_KV_TILE) and kv_tile > SHORT_KV_TILE and group <= SHORT_KV_MAX_GROUP


def _phase1_kv_tile(kv_tile: int, group: int, tokens, vnodes):
    """Phase 1's KV tile for vnodes holding ``tokens`` KV entries in all, ``vnodes`` of
    them (Python ints, or arrays elementwise): :data:`SHORT_KV_TILE` where they average
    at most :data:`SHORT_KV_MAX_MEAN` entries and the GQA group is at most
    :data:`SHORT_KV_MAX_GROUP`, else ``kv_tile``; an int for ints (one plan's phase 1,
    without numpy calls), else an int64 array."""
    scalar = isinstance(vnodes, int) and isinstance(tokens, int)
    if not scalar:
        vnodes, tokens = np.asarray(vnodes), np.asarray(tokens)
    shortable = _shortable(kv_tile, group)
    short = shortable & (vnodes > 0) & (tokens <= SHORT_KV_MAX_MEAN * vnodes)
    if scalar:
        return int(SHORT_KV_TILE if short else kv_tile)
    return np.where(short, SHORT_KV_TILE if shortable else kv_tile, kv_tile).astype(np.int64)


#: Columns of a group's phase indicator (phase 0, phase 1); see _split_costs.
_PHASES = np.array([False, True])


def _split_costs(groups: _Groups, q_tiles, kv_tiles, chunks, group: int,
                 num_kv_heads: int) -> np.ndarray:
    """Estimated cost of the plan over ``groups`` with each pair of KV chunk lengths
    (phase 0, phase 1) of ``chunks``, in KV steps (see :data:`AUTO_KV_CHUNKS`): per
    phase the longer of its longest program's KV steps and its total KV steps (plus
    :data:`AUTO_PROGRAM_STEPS` per program) spread over :data:`AUTO_SLOTS` programs at a
    time, plus :data:`AUTO_PARTIAL_WEIGHT` per 8,448 partial rows x heads (132 SMs x 64
    rows), plus :data:`AUTO_MERGE_WEIGHT` per merge step (:func:`_merge_chain_steps`).
    Chains are cut into whole chunks and the rest (a rest that
    :data:`CHUNK_TAIL_ABSORB` joins to the chunk before it is counted as its own).
    Float arithmetic (exact for these integers), one pass over ``[chunks, groups]``
    for both phases. A phase without groups adds 0 (its programs, steps and partials
    are all 0); the phases' terms are added phase 1 first."""
    pairs = np.asarray(chunks, dtype=np.float64).reshape(-1, 2)
    if groups.length.size == 0:
        return np.zeros(pairs.shape[0])
    ph1 = groups.nreq <= q_tiles[1]
    length = groups.length.astype(np.float64)
    nreq = groups.nreq.astype(np.float64)
    # Both phases in one pass over [chunks, groups]: per group its phase's chunk length
    # and q tile; per phase sums through weights that are zero on the other phase's
    # groups (sums of integers, exact in any order).
    per_phase = ph1[:, None] == _PHASES  # [groups, 2]: in phase 0, in phase 1
    nqt = np.ceil(nreq / np.where(ph1, q_tiles[1], q_tiles[0]))
    w_q = per_phase * nqt[:, None]
    c = np.where(ph1, pairs[:, 1:2], pairs[:, 0:1])
    nch = np.ceil(length / c)  # [chunks, groups]
    nv = nch @ w_q  # [chunks, 2]
    kv = np.empty_like(nv)
    kv[:, 0] = kv_tiles[0]
    kv[:, 1] = (_phase1_kv_tile(kv_tiles[1], group, length @ w_q[:, 1], nv[:, 1])
                if _shortable(kv_tiles[1], group) else kv_tiles[1])
    last = length - (nch - 1) * c  # the last chunk's length
    kv_g = np.where(ph1, kv[:, 1:2], kv[:, 0:1])  # [chunks, groups]
    # The whole chunks' steps (nv less one chunk per q tile of every group), then the
    # last chunks'.
    steps = (nv - w_q.sum(axis=0)) * np.ceil(pairs / kv) + np.ceil(last / kv_g) @ w_q
    work = (steps + AUTO_PROGRAM_STEPS * nv) * num_kv_heads / AUTO_SLOTS
    partials = _partial_row_cost(group, num_kv_heads) * (nch @ (per_phase * nreq[:, None]))
    # Each phase's longest chain (0 without groups) cut at its chunk length.
    longest = np.ceil(np.minimum(np.where(per_phase, length[:, None], 0.0).max(axis=0), pairs)
                      / kv)
    term = np.maximum(longest, work)
    term += partials
    total = term[:, 1] + term[:, 0]
    if AUTO_MERGE_WEIGHT:
        total += AUTO_MERGE_WEIGHT * _merge_chain_steps(groups, pairs, nch, group * num_kv_heads)
    return total


def _retiled_cost_floor(topo: _Topology, q_tile: int, kv_tile: int, splits, group: int,
                        num_kv_heads: int) -> float:
    """A lower bound of :func:`_split_costs` for a plan of ``topo`` with the q tile
    ``q_tile`` in both phases, KV tiles of at most ``kv_tile`` and the KV chunk lengths
    ``splits`` (phase 0, phase 1), whatever its groups (a re-tiled rule plan's before
    its cost model runs). Every request's path is cut into its groups' chains, so it
    has at least ``ceil(path / max(splits))`` partials (the partial and merge terms);
    every node's tokens are read by at least ``ceil(queries / q_tile)`` q tiles in
    steps of at most ``kv_tile`` entries (the work term); and the node with the most
    tokens among those with queries lies in some chain, cut at ``min(splits)`` at least
    (the longest program). Each phase's term is at least its work and its longest
    program, so the sum of the phases' terms is at least the larger of all work and
    the longest program."""
    seqlen, nq = topo.seqlen, topo.nq
    b = topo.req_end.size
    used = nq > 0
    if b == 0 or not used.any():
        return 0.0
    path = np.bincount(topo.path_req, weights=seqlen[topo.path_node], minlength=b)
    parts = np.ceil(path / max(splits))
    partials = _partial_row_cost(group, num_kv_heads) * float(parts.sum())
    reads = float(np.dot(seqlen, -(-nq // q_tile)))
    work = reads / kv_tile * num_kv_heads / AUTO_SLOTS
    longest = -(-min(int(seqlen[used].max()), min(splits)) // kv_tile)
    total = max(longest, work) + partials
    if AUTO_MERGE_WEIGHT:
        total += AUTO_MERGE_WEIGHT * float(_merge_steps(parts.max(), b, group * num_kv_heads))
    return total


def _partial_row_cost(group: int, num_kv_heads: int) -> float:
    """The estimate's cost of one partial row (all query heads of a KV head's group, all
    KV heads): :data:`AUTO_PARTIAL_WEIGHT` per 8,448 rows x heads (132 SMs x 64 rows)."""
    return AUTO_PARTIAL_WEIGHT * (group * num_kv_heads) / (132 * 64)


def _merge_steps(most, num_requests: int, num_heads: int):
    """Stage 2's merge steps beyond :data:`AUTO_MERGE_FREE_STEPS` (at least 0) for a
    request of ``most`` partials (a float, or an array elementwise)."""
    # Stage 2's partials per step (its shape does not depend on the head dimension).
    per_step = stage2_blocks(num_requests, num_heads, 128)[1]
    return np.maximum(np.ceil(most / per_step) - AUTO_MERGE_FREE_STEPS, 0.0)


def _merge_chain_steps(groups: _Groups, pairs: np.ndarray, nch: np.ndarray,
                       num_heads: int) -> np.ndarray:
    """For each pair of chunk lengths (phase 0, phase 1) of ``pairs``: the merge steps of
    the request with the most partials, less :data:`AUTO_MERGE_FREE_STEPS` (at least 0).
    ``nch``: every group's chunk count under each pair, ``[pairs, groups]``."""
    if groups.pair_req.size == 0:
        return np.zeros(pairs.shape[0])
    # Each (request, group) pair contributes its group's chunk count: every pair's
    # per-request sums in one count over (pair, request).
    nr = groups.num_requests
    at = (groups.pair_req + nr * np.arange(pairs.shape[0])[:, None]).ravel()
    most = np.bincount(at, weights=np.repeat(nch, groups.nreq, axis=1).ravel(),
                       minlength=nr * pairs.shape[0]).reshape(pairs.shape[0], nr).max(axis=1)
    return _merge_steps(most, nr, num_heads)


def path_token_indices(parent: np.ndarray, seqlen: np.ndarray, tok_ptr: np.ndarray,
                       req_end: np.ndarray, node_tokens: np.ndarray | None = None) -> list[np.ndarray]:
    """KV slots of every request's whole path, root first (vectorised over requests).

    Used by references and baselines: request ``b`` attends exactly these slots.
    """
    parent = np.asarray(parent, dtype=np.int64)
    seqlen = np.asarray(seqlen, dtype=np.int64)
    tok_ptr = np.asarray(tok_ptr, dtype=np.int64)
    req_end = np.asarray(req_end, dtype=np.int64)
    b = req_end.size
    if b == 0:
        return []
    depth = _depths(parent)
    r, nodes, _ = _walk_paths(parent, req_end)
    order = np.lexsort((depth[nodes], r))
    r, nodes = r[order], nodes[order]
    pos = _expand_ranges(tok_ptr[nodes], seqlen[nodes])
    toks = pos if node_tokens is None else np.asarray(node_tokens)[pos]
    per_req = np.bincount(r, weights=seqlen[nodes], minlength=b).astype(np.int64)
    return np.split(toks, np.cumsum(per_req)[:-1])


def _expand_run_table(kv: np.ndarray, mask: np.ndarray | None, starts, lens, dst, bits,
                      table: np.ndarray | None, scratch=None) -> None:
    """A run table's expansion on the host (see :meth:`PlanBuffers.upload`): entries
    ``dst_i + [0, lens_i)`` of ``kv`` (``dst`` None: the runs one after the other) get
    ``starts_i + [0, lens_i)``, or those entries of ``table``; of ``mask``, ``bits_i``.
    ``scratch(n, which)``: reusable int64 work arrays (see :meth:`PlanBuffers.scratch`)."""
    lens = np.asarray(lens, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    total = int(lens.sum())
    if dst is None and table is None:  # the runs themselves, one after the other
        _expand_ranges(starts, lens, out=kv[:total])
        where = slice(0, total)
    else:
        pos = _expand_ranges(starts, lens, out=None if scratch is None else scratch(total, 0))
        where = slice(0, total) if dst is None else _expand_ranges(
            np.asarray(dst, np.int64), lens, out=None if scratch is None else scratch(total, 1))
        kv[where] = pos if table is None else np.asarray(table)[pos]
    if mask is not None:
        mask[where] = np.repeat(np.asarray(bits).astype(np.int32), lens)


def _expand_ranges_device(starts: np.ndarray, lens: np.ndarray, out: torch.Tensor) -> None:
    """:func:`_expand_ranges` into a tensor ``out`` (length ``lens.sum()``, any integer
    dtype, on any device), computed where ``out`` lives: only the ``(start, length)``
    pairs are copied there, so the host's work is O(runs), not O(tokens). Asynchronous
    on a GPU (a few kernels on the current stream; no synchronisation)."""
    total = out.numel()
    if total == 0:
        return
    starts = np.asarray(starts, dtype=np.int64)
    lens = np.asarray(lens, dtype=np.int64)
    nz = lens > 0
    starts, lens = starts[nz], lens[nz]
    n = starts.size
    pairs = np.empty(2 * n, dtype=np.int64)
    # Entry j of run i is starts[i] + (j - first[i]) = (starts[i] - first[i]) + j.
    np.cumsum(lens, out=pairs[n:])
    pairs[:n] = starts - (pairs[n:] - lens)
    pairs[n:] = lens
    dev = to_device_async(pairs, out.device)
    shift = torch.repeat_interleave(dev[:n], dev[n:], output_size=total)
    shift += torch.arange(total, device=out.device)
    out.copy_(shift)


def _expand_ranges(starts: np.ndarray, lens: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Concatenate ``arange(s, s + l)`` for every pair, vectorised.

    Written into ``out`` (any integer dtype, length ``lens.sum()``) when given: a reused
    buffer avoids the page faults of a fresh multi-megabyte array.
    """
    total = int(lens.sum())
    if out is None:
        out = np.empty(total, dtype=np.int64)
    if total == 0:
        return out[:0]
    nz = lens > 0
    starts, lens = starts[nz], lens[nz]
    out.fill(1)
    out[0] = starts[0]
    ends = np.cumsum(lens)[:-1]
    out[ends] = starts[1:] - (starts[:-1] + lens[:-1]) + 1
    np.cumsum(out, dtype=out.dtype, out=out)
    return out


def build_plan(
    inp: PlanInput,
    *,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    params: FastTreeParams | None = None,
    kv_split_sizes: Sequence[int] | None = None,
    para_threshs1: Sequence[int] = DEFAULT_PARA_THRESHS1,
    para_threshs2: Sequence[int] = DEFAULT_PARA_THRESHS2,
    device: torch.device | str = "cpu",
    buffers: PlanBuffers | None = None,
    headroom: int = 0,
    flat: bool = False,
    pad_phases: bool = False,
) -> DecodePlan:
    """Build a :class:`DecodePlan` for ``inp``.

    Parameters
    ----------
    inp : PlanInput
        The forest, the slot table and the requests (one query row each).
    num_qo_heads, num_kv_heads, head_dim : int
        Attention shape; ``num_qo_heads`` must be a multiple of ``num_kv_heads``.
    params : FastTreeParams, optional
        Cost model and tiles (defaults if omitted). Never modified.
    kv_split_sizes : (int, int), optional
        KV chunk length, and the smaller one used when a phase has too few programs
        (the seed's rule). None (default): the rule with
        :data:`DEFAULT_KV_SPLIT_SIZES`, or, where a single chunk length for both phases
        has a lower estimated cost, that one (see :data:`AUTO_KV_CHUNKS`; flat plans
        keep the rule).
    para_threshs1, para_threshs2 : (int, int)
        Program-count thresholds per phase that trigger the smaller chunk, then a single
        tile shape for both phases (the seed's rule).
    device : torch device of the index tensors.
    buffers : PlanBuffers, optional
        Reuse these buffers (grown if needed) instead of allocating new ones.
    headroom : int
        Extra kv entries reserved after each growable request's tail vnode, so that
        append-only steps can extend it without a re-plan (where several growing
        requests share a masked vnode's range, ``headroom`` per request, filled in the
        order entries arrive: see :attr:`DecodePlan.tail_rank`). Its phases and vnodes
        do not depend on it.
    flat : bool
        Skip the cost model: every node is merged into its children (split-Q), so each
        request end node is one group over its whole path, and requests ending at the
        same node share it. Paths within ``kv_split_sizes[0]`` tokens then have one
        partial each, which stage 1 writes to the output directly (one launch in all
        when every request has one).
    pad_phases : bool
        Round each phase's vnode count up to a power of two with empty vnodes (no
        queries, no KV entries: their programs store nothing). Plans of a tree that
        changes shape a little every step (beam search, draft trees) then mostly have
        the same phases, hence the same launches (:attr:`DecodePlan.launch_key`): a CUDA
        graph captured from one replays the next. The vnodes' work is unchanged; the
        empty programs cost a little launch time.
    """
    num_qo_heads, num_kv_heads, head_dim = int(num_qo_heads), int(num_kv_heads), int(head_dim)
    if params is None:
        params = FastTreeParams.for_heads(num_qo_heads, max(1, num_kv_heads), head_dim)
    params.validate()
    if num_kv_heads < 1 or num_qo_heads % num_kv_heads:
        raise UnsupportedConfigError(
            f"num_qo_heads ({num_qo_heads}) must be a positive multiple of num_kv_heads "
            f"({num_kv_heads})")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise UnsupportedConfigError(
            f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    group = num_qo_heads // num_kv_heads
    if params.kv_group_num not in (1, group):
        logger.debug("params.kv_group_num = %s ignored: the heads give group %d",
                     params.kv_group_num, group)
    if group > MAX_BLOCK_M:
        raise UnsupportedConfigError(f"GQA group size {group} exceeds {MAX_BLOCK_M}")
    auto = kv_split_sizes is None and bool(AUTO_KV_CHUNKS) and not flat
    if kv_split_sizes is None:
        kv_split_sizes = DEFAULT_KV_SPLIT_SIZES
    splits_in = [int(x) for x in kv_split_sizes]
    if len(splits_in) != 2 or min(splits_in) < 1:
        raise PlanMismatchError(f"KV_SPLIT_SIZES must be two positive ints, got {kv_split_sizes!r}")
    th1 = [int(x) for x in para_threshs1]
    th2 = [int(x) for x in para_threshs2]
    if len(th1) != 2 or len(th2) != 2:
        raise PlanMismatchError(
            f"para_threshs1/2 must have two entries each, got {para_threshs1!r}, {para_threshs2!r}")

    if inp.node_runs is not None and np.size(inp.node_runs) != np.size(inp.parent):
        raise PlanMismatchError(
            f"inp.node_runs must have one entry per node ({np.size(inp.parent)}), got "
            f"{np.size(inp.node_runs)}")
    topo = _Topology(inp)
    req_q = (int(params.TSQs[0]), int(params.TSQs[1]))
    req_k = (int(params.TSKs[0]), int(params.TSKs[1]))
    q_tiles = [_effective_q_tile(t, group) for t in req_q]
    kv_tiles = list(req_k)
    splits = [splits_in[0], splits_in[0]]
    alpha, beta, gamma = float(params.alpha), float(params.beta), float(params.gamma)
    if flat:
        assign, chain = _flat_assignment(topo)
    else:
        assign, chain = _heuristic(topo, q_tiles, kv_tiles, group, alpha, beta, gamma)
    groups = _Groups(topo, assign, chain)
    # Before the rule's adjustment: the plans of single chunk lengths start from here.
    base = (assign, chain, groups, tuple(q_tiles), tuple(kv_tiles))
    tiling = _Tiling(groups, q_tiles, splits, num_kv_heads)
    par = tiling.par
    # The seed's adjustment loop (not for flat plans): smaller KV chunks when a phase has
    # too few programs, then one tile shape for both phases (re-running the cost model).
    changed = False
    retiled = None  # (q tiles, kv tiles) of a re-tiled rule plan not built yet
    for phase in range(2):
        if not flat and 0 < par[phase] < th1[phase]:
            splits[phase] = splits_in[1]
            changed = True
    if changed:
        tiling = _Tiling(groups, q_tiles, splits, num_kv_heads)
        par = tiling.par
        retile = None
        if 0 < par[0] < th2[0]:
            retile = 1
        elif 0 < par[1] < th2[1]:
            retile = 0
        if retile is not None:
            # One tile shape for both phases; the cost model re-runs below, where this
            # plan is kept or the choice must cost it.
            retiled = ([q_tiles[retile]] * 2, [kv_tiles[retile]] * 2)
            tiling = None

    def retiled_plan():
        # The rule's plan with one tile shape for both phases: the cost model re-run.
        qt, kt = (list(t) for t in retiled)
        a, ch = _heuristic(topo, qt, kt, group, alpha, beta, gamma)
        return qt, kt, a, ch, _Groups(topo, a, ch)

    if auto and 0 < int(base[2].length.sum()) <= AUTO_MAX_KV_ENTRIES:
        # The chunk length chosen per plan: the rule's plan against one chunk length
        # for both phases (over the cost model's own groups), by estimated cost; the
        # rule's plan is costed in the same pass unless it is re-tiled. A re-tiled rule
        # plan is built and costed only where its cost's lower bound does not already
        # exceed the best single chunk length's (:func:`_retiled_cost_floor`).
        cand = [(c, c) for c in AUTO_KV_CHUNKS]
        costs = _split_costs(groups, q_tiles, kv_tiles,
                             ([splits] if retiled is None else []) + cand, group, num_kv_heads)
        if retiled is None:
            rule_cost, costs = costs[0], costs[1:]
        best = int(costs.argmin())
        if retiled is not None:
            floor = _retiled_cost_floor(topo, retiled[0][0], retiled[1][0], splits, group,
                                        num_kv_heads)
            if floor > costs[best] + 1e-9 * max(1.0, costs[best]):
                rule_cost = math.inf  # the rule's plan cannot win
            else:
                q_tiles, kv_tiles, assign, chain, groups = retiled_plan()
                retiled = None
                rule_cost = _split_costs(groups, q_tiles, kv_tiles, [splits], group,
                                         num_kv_heads)[0]
        if costs[best] < rule_cost:
            assign, chain, groups = base[:3]
            q_tiles, kv_tiles = list(base[3]), list(base[4])
            splits = [int(AUTO_KV_CHUNKS[best])] * 2
            tiling = _Tiling(groups, q_tiles, splits, num_kv_heads)
            retiled = None
    if retiled is not None:  # the re-tiled rule plan is kept
        q_tiles, kv_tiles, assign, chain, groups = retiled_plan()
    if tiling is None:
        tiling = _Tiling(groups, q_tiles, splits, num_kv_heads)
    logger.debug("plan: parallelism %s, q tiles %s, kv tiles %s, kv splits %s",
                 tiling.par, q_tiles, kv_tiles, splits)

    return _materialise(inp, topo, assign, groups, tiling, q_tiles, kv_tiles, splits,
                        req_q, req_k, num_qo_heads, num_kv_heads, head_dim, device,
                        buffers, headroom, inline_ok=not flat, pad_phases=pad_phases)


def _contiguous_slot0(inp, ng, cg, seg_node, seg_start, seg_len, seg_dst, grow_g, v_g,
                      v_kv_start, v_kv_len) -> np.ndarray:
    """First slot of every vnode whose slots form one contiguous run, else -1.

    A group's chain is a list of node segments (``cg``: their groups, sorted, each chain
    top first); in the seed layout (no slot table) each segment is a run
    ``tok_ptr[n] + [0, seqlen[n])``. A vnode (a range of its group's chain) is contiguous
    when every segment it overlaps is a run and each segment boundary inside it continues
    the previous segment's run. With a slot table the per-node runs are
    ``inp.node_runs`` where given, else checked once over the table (O(tokens)).
    ``seg_node``: each segment's node. ``seg_dst``: each segment's first kv position. ``grow_g``:
    each group's growth headroom, or None if no group has any; vnodes of groups with
    headroom stay -1: their tail grows by arbitrary slots. Every vnode holds at least
    one entry.

    Most chains are one run as a whole: their vnodes are hinted without a search.
    """
    if v_g.size == 0:
        return np.zeros(0, dtype=np.int64)
    if inp.node_tokens is None:
        first, run_ok = seg_start, None
    else:
        tokens = np.asarray(inp.node_tokens)
        last = max(tokens.size - 1, 0)
        # Empty segments may start past the table's end: clamp (their flags are unused).
        a = np.minimum(seg_start, last)
        first = (tokens[a].astype(np.int64) if tokens.size
                 else np.zeros(a.size, dtype=np.int64))
        if inp.node_runs is not None:
            # The owner's per-node flags: no pass over the table (nor a conversion of it).
            run_ok = np.asarray(inp.node_runs, dtype=bool)[seg_node] | (seg_len == 0)
        else:
            # Per node: is node_tokens[tok_ptr : tok_ptr + seqlen] a +1 run? It is when no
            # step i in [tok_ptr, tok_ptr + seqlen - 1) has node_tokens[i + 1] !=
            # node_tokens[i] + 1; such steps are few, so count them in a sorted list.
            t64 = tokens.astype(np.int64, copy=False)
            steps = (t64[1:] - t64[:-1] != 1).nonzero()[0]
            e = np.minimum(a + np.maximum(seg_len, 1) - 1, last)  # each segment's last token
            run_ok = (seg_len == 0) | (steps.searchsorted(e) == steps.searchsorted(a))
    # Empty segments hold no positions: drop them.
    if np.count_nonzero(seg_len) < seg_len.size:
        nz = seg_len.nonzero()[0]
        cg, first, seg_len, seg_dst = cg[nz], first[nz], seg_len[nz], seg_dst[nz]
        if run_ok is not None:
            run_ok = run_ok[nz]
    # A boundary breaks the run unless the segment continues its predecessor's slots.
    same = cg[1:] == cg[:-1]
    follows = first[1:] == first[:-1] + seg_len[:-1]
    # Groups whose chain breaks somewhere: a boundary inside it that does not continue,
    # or a segment that is no run.
    broken = np.zeros(ng, dtype=bool)
    broken[cg[1:][same & ~follows]] = True
    if run_ok is not None:
        broken[cg[~run_ok]] = True
    # In a chain without a break, kv position x holds slot x + shift (any segment gives it).
    shift = np.empty(ng, dtype=np.int64)
    shift[cg] = first - seg_dst
    search = broken
    if grow_g is not None:
        search = broken & (grow_g == 0)
        broken = broken | (grow_g > 0)
    out = np.where(broken[v_g], -1, v_kv_start + shift[v_g])
    rest = search[v_g].nonzero()[0]
    if rest.size:
        # Vnodes of broken chains: find the segments holding their first and last
        # positions; no break may lie between them.
        brk = np.ones(cg.size, dtype=np.int64)
        brk[1:] = ~(same & follows)
        if run_ok is not None:
            brk |= ~run_ok
        np.add.accumulate(brk, out=brk)  # breaks among entries 0..i
        S = v_kv_start[rest]
        lo = seg_dst.searchsorted(S, "right") - 1
        hi = seg_dst.searchsorted(S + v_kv_len[rest] - 1, "right") - 1
        ok = brk[hi] == brk[lo]
        if run_ok is not None:
            ok &= run_ok[lo]
        rest, lo = rest[ok], lo[ok]
        out[rest] = first[lo] + (v_kv_start[rest] - seg_dst[lo])
    return out


def _spread(a: np.ndarray, pos: np.ndarray, n: int, fill) -> np.ndarray:
    """An array of ``n`` entries: ``a[i]`` at ``pos[i]``, ``fill`` elsewhere."""
    out = np.full(n, fill, dtype=a.dtype)
    out[pos] = a
    return out


def _chain_segments(assign: np.ndarray, parent: np.ndarray, group_node: np.ndarray):
    """``(cg, cn)``: the chain nodes ``cn`` of every group ``cg`` (groups by id, each
    chain top first). Walks up the split-Q edges (``assign`` is 0/1, read as bool), one
    level per pass; the levels are concatenated top level first, so a stable sort by
    group keeps each chain top first."""
    gid = np.arange(group_node.size, dtype=np.int64)
    split_q = assign.view(bool)
    lg, ln = [gid], [group_node]
    cur_g, cur = gid, group_node
    while True:
        up = split_q[cur]
        cur_g, cur = cur_g[up], parent[cur[up]]
        if not cur.size:
            break
        lg.append(cur_g)
        ln.append(cur)
    if len(lg) == 1:
        return gid, group_node
    cg, cn = np.concatenate(lg[::-1]), np.concatenate(ln[::-1])
    order = cg.argsort(kind="stable")
    return cg[order], cn[order]


def _rank_within(keys: np.ndarray) -> np.ndarray:
    """Each item's rank among the items of ``keys`` with the same key, in their order."""
    order = keys.argsort(kind="stable")
    ks = keys[order]
    first = np.ones(ks.size, dtype=bool)
    first[1:] = ks[1:] != ks[:-1]
    idx = np.arange(ks.size, dtype=np.int64)
    rank = np.empty(ks.size, dtype=np.int64)
    rank[order] = idx - np.maximum.accumulate(np.where(first, idx, 0))
    return rank


def _tails(lay: _Layout, topo: _Topology, tail_req: np.ndarray):
    """Where the growing requests ``tail_req`` (each the only query of its end node)
    grow in ``lay``: ``(requests, group, rank, count, q tile, segment)`` per request
    that can grow: the group whose chain holds its end node (segment ``segment``), its
    rank among that group's growing requests and their count (the group's room after
    its chain is ``headroom`` x count entries, shared by them; a step of every request
    fills it in rank order), and the q tile of the group that holds its query.
    Requests whose end node is in no chain (an empty node) cannot grow; None where none
    can."""
    seg_of = np.full(topo.n, -1, dtype=np.int64)
    seg_of[lay.seg_node] = np.arange(lay.seg_node.size, dtype=np.int64)
    seg = seg_of[topo.req_end[tail_req]]
    ok = seg >= 0
    req, seg = tail_req[ok], seg[ok]
    if req.size == 0:
        return None
    g = lay.seg_group[seg]
    rank = _rank_within(g)  # by request (tail_req is increasing)
    count = np.bincount(g, minlength=lay.ng)[g]
    tile = np.zeros(req.size, dtype=np.int64)
    multi = (lay.nqt[g] > 1).nonzero()[0]
    if multi.size:
        # Groups of several q tiles (no layout the planner builds puts a growing request
        # in one today): each request's position among its group's rows gives its tile.
        sel = np.unique(g[multi])
        tg_of_req = np.full(topo.req_end.size, -1, dtype=np.int64)
        tg_of_req[req[multi]] = g[multi]
        pos = _expand_ranges(lay.req_start[sel], lay.nreq[sel])
        rows = lay.pair_req[pos]
        pg = sel.repeat(lay.nreq[sel])
        hit = (tg_of_req[rows] == pg).nonzero()[0]
        first = np.add.accumulate(lay.nreq[sel]) - lay.nreq[sel]
        within = np.empty(topo.req_end.size, dtype=np.int64)
        within[rows[hit]] = hit - first[np.searchsorted(sel, pg[hit])]
        tile[multi] = within[req[multi]] // lay.q_tile[g[multi]]
    return req, g, rank, count, tile, seg


def _materialise(inp, topo, assign, groups, tiling, q_tiles, kv_tiles, splits, req_q, req_k,
                 hq, hk, d, device, buffers, headroom, inline_ok=True,
                 pad_phases=False) -> DecodePlan:
    seqlen = topo.seqlen
    b = topo.req_end.size

    # Growth headroom for the requests that end alone at their node (its only query).
    tail_req = None
    if headroom > 0 and inp.growable is not None:
        end = topo.req_end
        tail_req = (np.asarray(inp.growable, dtype=bool) & (topo.nq[end] == 1)).nonzero()[0]
    grown = tail_req is not None and tail_req.size > 0

    # The groups the vnodes are cut from: whole request paths inlined (INLINE), else long
    # nodes shared beside inlined short ones (SHARED_INLINE), else the cost model's
    # groups, with phase-1 sets fused (FUSE_PHASE1); flat plans are not inlined. Growing
    # requests keep their room in whichever group holds their end node (see _tails).
    group = hq // max(hk, 1)
    inline_reqs = max(1, min(32, INLINE_ROWS // group))
    lay = tails = None
    if inline_ok:
        if INLINE and -(-b // inline_reqs) * hk >= (INLINE_MIN_PROGRAMS or 0):
            inline = _inline_blocks(topo, inline_reqs, INLINE_MAX_KV)
            if inline is not None:
                lay = _inline_layout(inline, inline_reqs, b, q_tiles, hk)
        if lay is None and SHARED_INLINE:
            lay = _shared_layout(topo, groups, tiling, inline_reqs, splits[0], q_tiles, hk)
    if lay is None:
        lay = _cost_model_layout(topo, assign, groups, tiling, q_tiles, hk)
        if (FUSE_PHASE1 and 1 <= q_tiles[1] <= 32
                and int(lay.length.sum()) <= (FUSE_MAX_KV_ENTRIES or int(lay.length.sum()))):
            lay = _fused_layout(lay, groups, tiling, seqlen, b, hk) or lay
    if grown:
        tails = _tails(lay, topo, tail_req)
        grown = tails is not None
    ng, nreq, length, split_g, nqt, nv_g = (lay.ng, lay.nreq, lay.length, lay.split,
                                            lay.nqt, lay.nv_g)
    n0, n1, nv, par, q_tiles = lay.n0, lay.n1, lay.nv, lay.par, lay.q_tiles
    cg, cn, seg_mask = lay.seg_group, lay.seg_node, lay.seg_mask
    pair_req, req_start = lay.pair_req, lay.req_start
    gid = np.arange(ng, dtype=np.int64)
    seg_len = seqlen[cn]
    seg_start = np.asarray(inp.tok_ptr, dtype=np.int64)[cn]

    # KV layout: group g's chain tokens at kv_base[g] .. + length[g], then its headroom:
    # `headroom` entries per growing request whose end node is in g (shared by them,
    # see _TailRanges).
    grow_g = np.zeros(ng, dtype=np.int64)
    if grown:
        t_req, t_g, t_rank, t_cnt, t_tile, t_seg = tails
        grow_g[t_g] = headroom * t_cnt
    span = length + grow_g if grown else length
    kv_end = np.add.accumulate(span)
    kv_total = int(kv_end[-1]) if ng else 0
    kv_base = kv_end - span

    # Vnodes: (group, kv chunk, q tile), phase-0 groups first (a stable order by phase),
    # so the vnode arrays come out in launch order. within: index among the group's vnodes.
    vorder = lay.phase1.argsort(kind="stable") if n0 and n1 else gid
    nv_o = nv_g[vorder]
    v_g = vorder.repeat(nv_o)
    v_end = np.add.accumulate(nv_o)
    within = np.arange(nv, dtype=np.int64) - (v_end - nv_o).repeat(nv_o)
    nqt_v = nqt[v_g]
    v_chunk, v_tile = np.divmod(within, nqt_v)
    split_v = split_g[v_g]
    kv_off = v_chunk * split_v
    v_kv_start = kv_base[v_g] + kv_off
    # The last chunk holds the rest (more than a chunk where a short tail joined it).
    v_kv_len = np.where(v_chunk == lay.nch[v_g] - 1, length[v_g] - kv_off, split_v)
    # Mid rows: per group, per chunk, one per request of the group.
    rows_g = lay.nch * nreq
    mid_end = np.add.accumulate(rows_g)
    nmid = int(mid_end[-1]) if ng else 0
    mid_base = mid_end - rows_g
    nreq_v, qt_v = nreq[v_g], lay.q_tile[v_g]
    q_off = v_tile * qt_v
    v_q_start = mid_base[v_g] + v_chunk * nreq_v + q_off
    v_q_len = np.minimum(qt_v, nreq_v - q_off)
    if seg_mask is None and nmid == pair_req.size:  # one chunk per group: the pairs
        mid_q_rows = pair_req
    else:
        m_g = gid.repeat(rows_g)
        m_off = np.arange(nmid, dtype=np.int64) - mid_base[m_g]
        mid_q_rows = pair_req[req_start[m_g] + m_off % nreq[m_g]]

    # Kv position of each segment: the chains one after the other, each followed by its
    # group's headroom.
    seg_dst = np.add.accumulate(seg_len) - seg_len
    if grown:
        seg_dst += (np.add.accumulate(grow_g) - grow_g)[cg]
    v_slot0 = _contiguous_slot0(inp, ng, cg, cn, seg_start, seg_len, seg_dst,
                                grow_g if grown else None, v_g, v_kv_start, v_kv_len)

    kv_tiles = list(kv_tiles)
    kv_tiles[1] = _phase1_kv_tile(kv_tiles[1], group, int(v_kv_len[n0:].sum()), int(n1))
    # Which phases hold masked entries (phase-1 fusion masks phase 1 only).
    masked_ph = [True, True]
    if seg_mask is not None and UNMASKED_PHASES:
        seg_ph1 = lay.phase1[cg]
        real = seg_mask != -1
        masked_ph = [bool((real & ~seg_ph1).any()), bool((real & seg_ph1).any())]

    # Stage-2 map: each request's mid rows.
    req_order = mid_q_rows.argsort(kind="stable")
    req_cnt = np.bincount(mid_q_rows, minlength=b)
    single = req_cnt == 1
    req_start = np.add.accumulate(req_cnt) - req_cnt
    finish = False
    # Fused (masked) phase-1 vnodes merge their rows' partials side by side, so such
    # plans finish at every GQA group.
    if (FINISH_MIN_GROUP and (group >= FINISH_MIN_GROUP or seg_mask is not None)
            and n0 and n1
            and n1 * hk >= (FINISH_MIN_PROGRAMS or 0)
            and (not FINISH_MAX_PROGRAMS or n1 * hk <= FINISH_MAX_PROGRAMS)):
        # Every request with exactly one partial in phase 1: phase 1 merges (no stage 2).
        last = lay.phase1[gid.repeat(rows_g)]
        finish = bool((np.bincount(mid_q_rows[last], minlength=b) == 1).all())

    # Padded phases: each phase's vnodes followed by empty ones (see build_plan);
    # v_pos is every vnode's position among them.
    v_pos = None
    padded = [next_pow2(n) if n else 0 for n in (n0, n1)] if pad_phases else [n0, n1]
    if padded != [n0, n1]:
        v_pos = np.arange(nv, dtype=np.int64)
        v_pos[n0:] += padded[0] - n0
        n0, n1 = padded
        nv = n0 + n1
        v_kv_start, v_kv_len, v_q_start, v_q_len = (
            _spread(a, v_pos, nv, 0) for a in (v_kv_start, v_kv_len, v_q_start, v_q_len))
        v_slot0 = _spread(v_slot0, v_pos, nv, -1)
    phases = []
    if n0:
        phases.append(Phase(0, n0, q_tiles[0], kv_tiles[0], masked_ph[0]))
    if n1:
        phases.append(Phase(n0, n1, q_tiles[1], kv_tiles[1], masked_ph[1]))

    tail_vnode = np.full(b, -1, dtype=np.int64)
    tail_limit = tail_vnode.copy()
    tail_rank = np.zeros(b, dtype=np.int64)
    tail_count = np.ones(b, dtype=np.int64)
    tail_bit = np.full(b, -1, dtype=np.int64)
    if grown:
        # Tail vnode of growable requests: the last chunk of their group, at their q tile.
        v_first = np.empty(ng, dtype=np.int64)
        v_first[vorder] = v_end - nv_o
        tail_vnode[t_req] = v_first[t_g] + (lay.nch[t_g] - 1) * nqt[t_g] + t_tile
        if v_pos is not None:
            tail_vnode[t_req] = v_pos[tail_vnode[t_req]]
        tail_limit[t_req] = kv_base[t_g] + length[t_g] + headroom * t_cnt
        tail_rank[t_req] = t_rank
        tail_count[t_req] = t_cnt
        if seg_mask is not None:  # the request's own row mask (int32 values)
            tail_bit[t_req] = seg_mask[t_seg].astype(np.int32)

    table = inp.node_tokens
    n_table = 0 if table is None else int(np.size(table))
    if buffers is None:
        buffers = PlanBuffers(hq, d, device, vnodes=max(nv, 1), requests=max(b, 1),
                              mid_rows=max(nmid, 1), kv_entries=max(kv_total, 1),
                              runs=max(seg_len.size, 1),
                              slots=n_table if normalize_device(device).type != "cpu" else 0)
    else:
        if (buffers.num_qo_heads, buffers.head_dim) != (hq, d):
            raise PlanMismatchError(
                f"buffers were made for num_qo_heads={buffers.num_qo_heads}, "
                f"head_dim={buffers.head_dim}; this plan needs {hq}, {d}")
        if buffers.device != device and buffers.device != normalize_device(device):
            raise PlanMismatchError(
                f"buffers are on {buffers.device}, the plan was asked for {device}")
        buffers.ensure(nv, b, nmid, kv_total, runs=seg_len.size,
                       slots=n_table if buffers.dev is not buffers.host else 0)
    buffers.host_writable()
    hv = buffers.host_view
    hv("vnode_kv_start", nv)[:] = v_kv_start
    hv("vnode_kv_len", nv)[:] = v_kv_len
    hv("vnode_q_start", nv)[:] = v_q_start
    hv("vnode_q_len", nv)[:] = v_q_len
    hv("vnode_slot0", nv)[:] = v_slot0
    hv("mid_q_rows", nmid)[:] = mid_q_rows
    hv("req_mid_rows", nmid)[:] = req_order
    hv("req_mid_start", b)[:] = req_start
    hv("req_mid_len", b)[:] = req_cnt
    # The kv entries are the segments' token runs, each group's chain followed by its
    # headroom; each segment's entries carry its row mask (int32: bit 31 wraps to the
    # sign bit), headroom entries get theirs when they are filled.
    buffers.upload(kv_total, (seg_start, seg_len, seg_dst if grown else None, seg_mask),
                   masks=seg_mask is not None, table=table)
    buffers.serial += 1

    return DecodePlan(
        num_requests=b, num_qo_heads=hq, num_kv_heads=hk, head_dim=d,
        phases=tuple(phases), q_tiles=tuple(q_tiles), kv_tiles=tuple(kv_tiles),
        requested_q_tiles=tuple(req_q), requested_kv_tiles=tuple(req_k),
        kv_split_sizes=tuple(splits), node_assignments=assign.tolist(),
        parallelism=tuple(par), num_vnodes=nv, num_mid_rows=nmid,
        num_kv_entries=kv_total, buffers=buffers, tail_vnode=tail_vnode,
        tail_limit=tail_limit, tail_rank=tail_rank, tail_count=tail_count, tail_bit=tail_bit,
        vnode_kv_start_host=v_kv_start.copy(),
        vnode_kv_len_host=v_kv_len.copy(), generation=buffers.generation,
        serial=buffers.serial, direct=bool(single.any()),
        needs_stage2=not bool(single.all()) if b else True, finish=finish,
        half_partials=HALF_PARTIALS, masked=seg_mask is not None,
    )
