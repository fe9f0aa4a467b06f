"""Tests of treecache.plan: the cost model, the vnode decomposition and plan buffers.

Small hand-built trees with exact expectations (assignments, vnode counts, chunk and
tile layout, phases), structural invariants of every plan (each request attends exactly
the KV slots of its root-to-node path, computed here independently of the planner), and
the plan's runtime side: buffer reuse and in-place tail growth.
"""

from __future__ import annotations

import copy
import importlib
import math

import attrs
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import Phase, launch_form, reference_decode
from plan_helpers import NO_ADJUST, plan_input, stand_in_buffers
from treecache import plan as plan_module
from treecache.errors import PlanMismatchError, TreeCacheError, UnsupportedConfigError
from treecache.plan import (
    DEFAULT_KV_SPLIT_SIZES,
    DecodePlan,
    FastTreeParams,
    PlanBuffers,
    PlanInput,
    build_plan,
    path_token_indices,
)

# ------------------------------------------------------------------------- helpers


def expected_paths(inp: PlanInput) -> list[list[int]]:
    """KV slots of every request's path, root first, by walking parent pointers."""
    out = []
    for end in inp.req_end.tolist():
        nodes = []
        v = end
        while v != -1:
            nodes.append(v)
            v = int(inp.parent[v])
        slots = []
        for v in reversed(nodes):
            pos = range(int(inp.tok_ptr[v]), int(inp.tok_ptr[v] + inp.seqlen[v]))
            if inp.node_tokens is None:
                slots += list(pos)
            else:
                slots += [int(inp.node_tokens[p]) for p in pos]
        out.append(slots)
    return out


def host(plan: DecodePlan, name: str, n: int) -> list[int]:
    return plan.buffers.host_view(name, n).tolist()


def vnode_table(plan: DecodePlan) -> list[tuple[int, int, int, int]]:
    """(kv_start, kv_len, q_start, q_len) of every vnode, in launch order."""
    nv = plan.num_vnodes
    return list(zip(host(plan, "vnode_kv_start", nv), host(plan, "vnode_kv_len", nv),
                    host(plan, "vnode_q_start", nv), host(plan, "vnode_q_len", nv)))


def plan_slots(plan: DecodePlan) -> list[list[int]]:
    """Sorted KV slots each request attends through the plan's vnodes."""
    # The device copy: GPU plans may expand their kv entries there only.
    kv = plan.buffers.dev_view("kv_indices", plan.num_kv_entries).cpu().numpy()
    mask = (plan.buffers.dev_view("kv_mask", plan.num_kv_entries).cpu().numpy()
            if plan.masked else None)
    mid_q_rows = host(plan, "mid_q_rows", plan.num_mid_rows)
    out = [[] for _ in range(plan.num_requests)]
    for ks, kl, qs, ql in vnode_table(plan):
        slots = kv[ks:ks + kl].tolist()
        for i, j in enumerate(range(qs, qs + ql)):
            if mask is None:
                out[mid_q_rows[j]] += slots
            else:
                # A masked plan: query i of the vnode attends entries with bit min(i, 31).
                seen = (mask[ks:ks + kl] >> min(i, 31)) & 1
                out[mid_q_rows[j]] += [x for x, m in zip(slots, seen) if m]
    return [sorted(s) for s in out]


def check_plan(plan: DecodePlan, inp: PlanInput, group: int) -> None:
    """Invariants every plan satisfies, whatever the cost model chose."""
    nv, nm, b = plan.num_vnodes, plan.num_mid_rows, plan.num_requests
    assert b == inp.req_end.size
    assert plan.num_qo_heads == group * plan.num_kv_heads
    # Phases partition the vnodes, in order; every vnode fits its phase's q tile.
    table = vnode_table(plan)
    start = 0
    for ph in plan.phases:
        assert ph.vnode_offset == start and ph.num_vnodes > 0
        assert ph.q_tile * group <= 128
        for ks, kl, qs, ql in table[start:start + ph.num_vnodes]:
            assert 1 <= ql <= ph.q_tile
            assert kl >= 1 and ks + kl <= plan.num_kv_entries
        start += ph.num_vnodes
    assert start == nv
    assert len(plan.phases) <= 2
    # Vnodes own disjoint mid-row ranges covering 0..nm-1.
    owned = sorted(r for _, _, qs, ql in table for r in range(qs, qs + ql))
    assert owned == list(range(nm))
    # Stage 2 map: request r merges exactly the mid rows whose query row is r.
    mid_q_rows = host(plan, "mid_q_rows", nm)
    starts, lens = host(plan, "req_mid_start", b), host(plan, "req_mid_len", b)
    req_rows = host(plan, "req_mid_rows", nm)
    for r in range(b):
        mine = req_rows[starts[r]:starts[r] + lens[r]]
        assert sorted(mine) == [j for j in range(nm) if mid_q_rows[j] == r]
    # The device tensors hold what the host staging buffer holds (kv entries and masks:
    # except where a GPU plan expanded them on the device; plan_slots checks those).
    names = [("vnode_kv_start", nv), ("vnode_kv_len", nv), ("vnode_q_start", nv),
             ("vnode_q_len", nv), ("vnode_slot0", nv), ("mid_q_rows", nm), ("req_mid_rows", nm),
             ("req_mid_start", b), ("req_mid_len", b)]
    on_host = plan.buffers.dev is plan.buffers.host or not plan_module.DEVICE_EXPAND
    if on_host and (plan.buffers.dev is plan.buffers.host or inp.node_tokens is not None
                    or (plan.tail_limit >= 0).any()):
        names.append(("kv_indices", plan.num_kv_entries))
    if plan.masked:
        if on_host:
            names.append(("kv_mask", plan.num_kv_entries))
        # A phase marked unmasked has no masks on its entries (its launches skip them).
        mask = plan.buffers.dev_view("kv_mask", plan.num_kv_entries).cpu().tolist()
        for ph in plan.phases:
            if not ph.masked:
                for ks, kl, _, _ in table[ph.vnode_offset:ph.vnode_offset + ph.num_vnodes]:
                    assert all(m == -1 for m in mask[ks:ks + kl])
    else:
        assert all(ph.masked for ph in plan.phases)
    for name, n in names:
        assert plan.buffers.dev_view(name, n).cpu().tolist() == host(plan, name, n), name
    # A contiguity hint is a promise: the vnode's slots are slot0, slot0 + 1, ... In the
    # seed layout without growth headroom, every vnode whose slots are such a run has it.
    kv = plan.buffers.dev_view("kv_indices", plan.num_kv_entries).cpu().numpy()
    complete = inp.node_tokens is None and not (plan.tail_limit >= 0).any()
    for (ks, kl, _, _), s0 in zip(table, host(plan, "vnode_slot0", nv)):
        if s0 >= 0:
            assert kv[ks:ks + kl].tolist() == list(range(s0, s0 + kl))
        else:
            assert s0 == -1
            if complete:
                assert kv[ks:ks + kl].tolist() != list(range(kv[ks], kv[ks] + kl))
    # Each request attends exactly its path's tokens, each once.
    assert plan_slots(plan) == [sorted(p) for p in expected_paths(inp)]
    assert len(plan.node_assignments) == inp.parent.size
    assert set(plan.node_assignments) <= {0, 1}
    assert all(plan.node_assignments[i] == 0 for i in np.flatnonzero(inp.parent < 0))


def build(inp, group=1, hk=1, head_dim=16, **kw) -> DecodePlan:
    """build_plan + check_plan; params default to the seed's FastTreeParams()."""
    kw.setdefault("params", FastTreeParams())
    plan = build_plan(inp, num_qo_heads=group * hk, num_kv_heads=hk, head_dim=head_dim, **kw)
    check_plan(plan, inp, group)
    return plan


def seed_cmm(nq, nk, alpha, beta, group=1, tsq=(64, 16), tsk=(32, 128)):
    """The documented matmul cost: alpha * Q-tile padding + beta * K-tile padding."""
    tq, tk = (tsq[0], tsk[0]) if nq > tsq[1] else (tsq[1], tsk[1])
    padq = (-nq) % tq
    padk = max(tk - nk, 0)
    return alpha * group * padq * nk + beta * group * padk * nq


# -------------------------------------------------------------------- cost model


def test_cost_model_long_shared_prefix_is_split_k():
    # Root of 100 tokens, three leaves of 20 tokens, one request each (tiles 16 / 128):
    # first edge, split-K = cmm(3, 100) + cmm(1, 20) + 0.1 = 885.72 + 233.64 + 0.1
    # = 1119.46; split-Q = cmm(2, 100) + cmm(1, 120) = 942.48 + 1190.64 = 2133.12.
    assert math.isclose(seed_cmm(3, 100, 0.66, 0.33) + seed_cmm(1, 20, 0.66, 0.33) + 0.1,
                        1119.46)
    assert math.isclose(seed_cmm(2, 100, 0.66, 0.33) + seed_cmm(1, 120, 0.66, 0.33), 2133.12)
    inp = plan_input([-1, 0, 0, 0], [100, 20, 20, 20], [1, 2, 3])
    plan = build(inp, **NO_ADJUST)
    assert plan.node_assignments == [0, 0, 0, 0]
    # One vnode for the root (3 queries) and one per leaf.
    assert vnode_table(plan) == [(0, 100, 0, 3), (100, 20, 3, 1), (120, 20, 4, 1), (140, 20, 5, 1)]
    assert plan.num_mid_rows == 6


def test_cost_model_short_prefix_is_split_q():
    # Root of 4 tokens, two leaves of 4 tokens. With beta only (K padding), sharing the
    # root does not pay: edge 1, split-K = cmm(2,4) + cmm(1,4) + 0.1 = 81.84 + 40.92 + 0.1
    # = 122.86 > split-Q = cmm(1,4) + cmm(1,8) = 40.92 + 39.6 = 80.52; edge 2 (the root
    # now has 1 query), split-K = 40.92 + 40.92 + 0.1 = 81.94 > split-Q = 0 + 39.6.
    inp = plan_input([-1, 0, 0], [4, 4, 4], [1, 2])
    plan = build(inp, params=FastTreeParams(alpha=0.0, beta=0.33, gamma=0.1), **NO_ADJUST)
    assert plan.node_assignments == [0, 1, 1]
    # The root keeps no query: each leaf's vnode reads root + leaf, root first.
    assert vnode_table(plan) == [(0, 8, 0, 1), (8, 8, 1, 1)]
    kv = host(plan, "kv_indices", 16)
    assert kv == [0, 1, 2, 3, 4, 5, 6, 7] + [0, 1, 2, 3, 8, 9, 10, 11]
    # With alpha only (Q padding), split-K = 36.96 + 39.6 + 0.1 = 76.66 < split-Q =
    # 39.6 + 79.2 = 118.8 on both edges.
    plan = build(inp, params=FastTreeParams(alpha=0.66, beta=0.0, gamma=0.1), **NO_ADJUST)
    assert plan.node_assignments == [0, 0, 0]
    assert plan.num_vnodes == 3


def test_cost_model_mixed_and_greedy():
    # Root 8 tokens; leaf 1 (8 tokens, 1 request); leaf 2 (200 tokens, 5 requests).
    # Edge to 1: split-K = cmm(6,8) + cmm(1,8) + 0.1 = 290.4 + 118.8 + 0.1 = 409.3 <
    #   split-Q = cmm(5,8) + cmm(1,16) = 256.08 + 195.36 = 451.44  -> 0.
    # Edge to 2: split-K = cmm(6,8) + cmm(5,200) + 0.5 = 290.4 + 1452 + 0.5 = 1742.9 >
    #   split-Q = cmm(1,8) + cmm(5,208) = 118.8 + 1510.08 = 1628.88  -> 1.
    c = lambda nq, nk: seed_cmm(nq, nk, 0.66, 0.33)  # noqa: E731
    assert math.isclose(c(6, 8) + c(1, 8) + 0.1, 409.3)
    assert math.isclose(c(5, 8) + c(1, 16), 451.44)
    assert math.isclose(c(6, 8) + c(5, 200) + 0.5, 1742.9)
    assert math.isclose(c(1, 8) + c(5, 208), 1628.88)
    inp = plan_input([-1, 0, 0], [8, 8, 200], [1, 2, 2, 2, 2, 2])
    plan = build(inp, **NO_ADJUST)
    assert plan.node_assignments == [0, 0, 1]
    # Groups: root {0} (8 tokens), leaf 1 {0} (8), leaf 2 {1..5} (root + leaf, 208).
    assert vnode_table(plan) == [(0, 8, 0, 1), (8, 8, 1, 1), (16, 208, 2, 5)]
    assert host(plan, "mid_q_rows", 7) == [0, 0, 1, 2, 3, 4, 5]


def test_split_q_chain_accumulates():
    # Chain root(4) -> 1(4) -> 2(4), one request at 2, beta only: both edges go split-Q
    # (root edge 81.94 vs 39.6, next edge cmm(1,8)+cmm(1,4)+0.1 = 80.62 vs cmm(1,12) =
    # 38.28); one vnode reads the 12 tokens in path order.
    inp = plan_input([-1, 0, 1], [4, 4, 4], [2])
    plan = build(inp, params=FastTreeParams(alpha=0.0, beta=0.33, gamma=0.1), **NO_ADJUST)
    assert plan.node_assignments == [0, 1, 1]
    assert vnode_table(plan) == [(0, 12, 0, 1)]
    assert host(plan, "kv_indices", 12) == list(range(12))


def test_gamma_penalises_split_k():
    # Root 4, leaves 4, defaults: the first edge differs by exactly gamma
    # (split-K 199.32 + gamma vs split-Q 199.32), so gamma = 0 keeps split-K (ties go
    # to split-K) and gamma = 1 makes both edges split-Q.
    inp = plan_input([-1, 0, 0], [4, 4, 4], [1, 2])
    assert build(inp, params=FastTreeParams(gamma=0.0), **NO_ADJUST).node_assignments == [0, 0, 0]
    assert build(inp, params=FastTreeParams(gamma=1.0), **NO_ADJUST).node_assignments == [0, 1, 1]


# --------------------------------------------------------- chunks, tiles, phases


@pytest.mark.parametrize("length, split", [(1000, 100), (1000, 128), (37, 5), (8, 8), (8, 100),
                                           (264, 128), (1010, 100), (1011, 100)])
@pytest.mark.parametrize("absorb", [0.0, 0.1])
def test_kv_chunking(monkeypatch, length, split, absorb):
    # Whole chunks and the rest; with CHUNK_TAIL_ABSORB a rest of at most that fraction
    # of a chunk joins the chunk before it (264 at 128: 128 + 136; 1010 at 100: ten
    # chunks, the last 110; 1011 keeps its 11-entry rest).
    monkeypatch.setattr(plan_module, "CHUNK_TAIL_ABSORB", absorb)
    inp = plan_input([-1], [length], [0])
    plan = build(inp, **dict(NO_ADJUST, kv_split_sizes=(split, split)))
    n = -(-length // split)
    if n > 1 and length - split * (n - 1) <= absorb * split:
        n -= 1
    assert plan.num_vnodes == n
    last = length - split * (n - 1)
    assert [kl for _, kl, _, _ in vnode_table(plan)] == [split] * (n - 1) + [last]
    assert [ks for ks, _, _, _ in vnode_table(plan)] == [i * split for i in range(n)]
    assert plan.num_mid_rows == n
    if (length, split, absorb) == (264, 128, 0.1):
        assert [kl for _, kl, _, _ in vnode_table(plan)] == [128, 136]


@pytest.mark.parametrize("length, split, lens", [(264, 128, [88, 88, 88]), (1000, 128, [125] * 8),
                                                 (37, 5, [5] * 7 + [2]), (8, 100, [8])])
def test_kv_chunking_balanced(monkeypatch, length, split, lens):
    # BALANCE_CHUNKS: the same number of chunks, of equal length up to the last (37 at 5
    # keeps its 2-entry rest without CHUNK_TAIL_ABSORB).
    monkeypatch.setattr(plan_module, "BALANCE_CHUNKS", True)
    monkeypatch.setattr(plan_module, "CHUNK_TAIL_ABSORB", 0.0)
    plan = build(plan_input([-1], [length], [0]), **dict(NO_ADJUST, kv_split_sizes=(split, split)))
    assert [kl for _, kl, _, _ in vnode_table(plan)] == lens
    assert [ks for ks, _, _, _ in vnode_table(plan)] == [sum(lens[:i]) for i in range(len(lens))]


def test_kv_chunk_shared_by_every_query_tile():
    # 20 requests on one 250-token node, q tiles 8: 3 chunks x 3 tiles = 9 vnodes, and
    # each chunk has one mid row per request (60 rows).
    inp = plan_input([-1], [250], [0] * 20)
    plan = build(inp, params=FastTreeParams(TSQs=[8, 8]), **dict(NO_ADJUST, kv_split_sizes=(100, 100)))
    assert plan.num_vnodes == 9 and plan.num_mid_rows == 60
    assert [(kl, ql) for _, kl, _, ql in vnode_table(plan)] == [
        (100, 8), (100, 8), (100, 4), (100, 8), (100, 8), (100, 4), (50, 8), (50, 8), (50, 4)]
    assert host(plan, "req_mid_len", 20) == [3] * 20


def test_smaller_chunks_when_parallelism_is_low():
    # One 1000-token node: 10 chunks of 100 = 10 programs < para_threshs1[1] = 528, so
    # phase 1 switches to KV_SPLIT_SIZES[1] = 50 (20 chunks); para_threshs2 = 0 keeps
    # the tiles.
    inp = plan_input([-1], [1000], [0])
    plan = build(inp, kv_split_sizes=(100, 50), para_threshs1=(132, 528), para_threshs2=(0, 0))
    assert plan.kv_split_sizes == (100, 50)
    assert plan.num_vnodes == 20
    assert plan.parallelism == (0, 20)
    assert plan.q_tiles == (64, 16) and plan.kv_tiles == (32, 128)


def test_single_tile_shape_when_parallelism_stays_low():
    # Still 20 programs < para_threshs2[1]: both phases take phase 0's tiles (the
    # seed's rule); the plan reports them and what the params asked for.
    inp = plan_input([-1], [1000], [0])
    params = FastTreeParams()
    plan = build(inp, params=params, kv_split_sizes=(100, 50))
    assert plan.q_tiles == (64, 64) and plan.kv_tiles == (32, 32)
    assert plan.requested_q_tiles == (64, 16) and plan.requested_kv_tiles == (32, 128)
    assert [(p.q_tile, p.kv_tile) for p in plan.phases] == [(64, 32)]
    assert params == FastTreeParams()


def test_query_tiling():
    # 40 requests ending at one node, TSQs [16, 8]: 40 > 8 puts the group in phase 0,
    # cut into tiles of 16, 16, 8 queries sharing the node's 30 tokens.
    inp = plan_input([-1], [30], [0] * 40)
    plan = build(inp, params=FastTreeParams(TSQs=[16, 8], TSKs=[32, 64]), **NO_ADJUST)
    assert vnode_table(plan) == [(0, 30, 0, 16), (0, 30, 16, 16), (0, 30, 32, 8)]
    assert list(plan.phases) == [Phase(0, 3, 16, 32)]
    assert plan.num_kv_entries == 30
    assert host(plan, "mid_q_rows", 40) == list(range(40))


def test_phases():
    # Root (50 tokens) shared by 20 requests, each ending at its own 5-token leaf.
    # The root's group has 20 > TSQs[1] = 16 requests: phase 0; the leaves: phase 1.
    inp = plan_input([-1] + [0] * 20, [50] + [5] * 20, list(range(1, 21)))
    plan = build(inp, **NO_ADJUST)
    assert plan.node_assignments == [0] * 21
    # Phase 1's vnodes are 5 tokens long: its KV tile 128 is lowered to SHORT_KV_TILE.
    assert list(plan.phases) == [Phase(0, 1, 64, 32), Phase(1, 20, 16, 16)]
    assert plan.kv_tiles == (32, 16) and plan.requested_kv_tiles == (32, 128)
    table = vnode_table(plan)
    assert table[0] == (0, 50, 0, 20)
    assert table[1:] == [(50 + 5 * i, 5, 20 + i, 1) for i in range(20)]
    # 16 requests or fewer: everything in phase 1.
    inp = plan_input([-1] + [0] * 16, [50] + [5] * 16, list(range(1, 17)))
    plan = build(inp, **NO_ADJUST)
    assert list(plan.phases) == [Phase(0, 17, 16, 16)]


@pytest.mark.parametrize("leaves,group,enabled,expected", [
    ([5] * 20, 1, True, 16), ([20] * 20, 4, True, 16),   # short vnodes, small group
    ([21] * 20, 1, True, 128), ([5] * 20, 8, True, 128),  # mean above 20, group above 4
    ([2] * 19 + [400], 1, True, 128),  # mostly tiny, but the mean (21.9) is above 20
    ([5] * 20, 1, False, 128),         # rule off
])
def test_short_kv_tile_rule(monkeypatch, leaves, group, enabled, expected):
    """Phase 1's KV tile is lowered to SHORT_KV_TILE only when the mean KV length of
    its vnodes is at most SHORT_KV_MAX_MEAN and the GQA group at most
    SHORT_KV_MAX_GROUP (check_plan's invariants hold either way; the kernels run
    every tile in the kernel tests)."""
    import treecache.plan as plan_mod

    if not enabled:
        monkeypatch.setattr(plan_mod, "SHORT_KV_TILE", None)
    inp = plan_input([-1] + [0] * 20, [50] + leaves, list(range(1, 21)))
    plan = build(inp, group=group, **NO_ADJUST)
    q_tile1 = min(16, 128 // group)  # the seed tiles, clamped to 128 rows
    last = plan.phases[-1]
    assert (last.num_vnodes, last.q_tile, last.kv_tile) == (20, q_tile1, expected)
    assert plan.requested_kv_tiles == (32, 128)


def test_phase_zero_only():
    inp = plan_input([-1], [10], [0] * 17)
    plan = build(inp, **NO_ADJUST)
    assert list(plan.phases) == [Phase(0, 1, 64, 32)]


# ------------------------------------------------- chunk length chosen per plan


def estimated_cost(plan: DecodePlan, group: int) -> float:
    """The estimate of plan_module._split_costs, computed from a built plan's vnodes."""
    kv_len = plan.vnode_kv_len_host[:plan.num_vnodes]
    total = 0.0
    for ph in plan.phases:
        if ph.num_vnodes == 0:
            continue
        steps = -(-kv_len[ph.vnode_offset:ph.vnode_offset + ph.num_vnodes] // ph.kv_tile)
        work = ((steps.sum() + plan_module.AUTO_PROGRAM_STEPS * ph.num_vnodes)
                * plan.num_kv_heads / plan_module.AUTO_SLOTS)
        total += max(float(steps.max()), work)
    rows = plan.num_mid_rows * group * plan.num_kv_heads
    total += plan_module.AUTO_PARTIAL_WEIGHT * rows / (132 * 64)
    # The merge chain: the request with the most partials, in stage 2's steps.
    from kernels.tree_decode import stage2_blocks

    most = int(plan.tensors()["req_mid_len"].max())
    per_step = stage2_blocks(plan.num_requests, plan.num_qo_heads, plan.head_dim)[1]
    steps = max(0, -(-most // per_step) - plan_module.AUTO_MERGE_FREE_STEPS)
    return total + plan_module.AUTO_MERGE_WEIGHT * steps


def spec_input(spec: str) -> PlanInput:
    """The PlanInput of the generated tree of ``spec`` (one request per leaf)."""
    from treecache.fasttree import tree_plan_input
    from treecache.tree import generate_tree_from_spec, kv_ptrs

    nodes = generate_tree_from_spec(spec)
    return tree_plan_input(nodes, kv_ptrs(nodes))


CHOICE_TREES = ["1,2,64 8,256,32", "1,256 256,32", "1,10 4000,400", "1,4,16,512 1024,256,128,32",
                "1,16,64 1024,256,32", "1,4,8,256 8,256,256,32"]


@pytest.mark.parametrize("spec", CHOICE_TREES)
@pytest.mark.parametrize("hq, hk", [(32, 32), (32, 8), (16, 1)])
def test_chunk_length_chosen_by_the_estimate(monkeypatch, spec, hq, hk):
    # kv_split_sizes=None: the plan is the rule's, or the plan with one chunk length for
    # both phases, whichever the estimate (recomputed here from each built plan) rates
    # lower; the rule wins ties, the shorter chunk loses ties. The choice is made on
    # the cost model's groups, before any fusion of phase 1: plans unfused here, so
    # that their tables are those groups'; the estimate counts whole chunks and the
    # rest, so short rests are not joined here.
    monkeypatch.setattr(plan_module, "FUSE_PHASE1", False)
    monkeypatch.setattr(plan_module, "CHUNK_TAIL_ABSORB", 0.0)
    inp = spec_input(spec)
    kw = dict(num_qo_heads=hq, num_kv_heads=hk, head_dim=128,
              params=FastTreeParams.for_heads(hq, hk))
    calls = []
    estimate = plan_module._split_costs

    def spy(*args):
        calls.append(args)
        return estimate(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_module, "_split_costs", spy)
        chosen = build_plan(inp, **kw)
    rule = build_plan(inp, kv_split_sizes=DEFAULT_KV_SPLIT_SIZES, **kw)
    best, best_cost = rule, estimated_cost(rule, hq // hk)
    groups, q_tiles, kv_tiles = calls[0][:3]
    for c in plan_module.AUTO_KV_CHUNKS:
        p = build_plan(inp, kv_split_sizes=(c, c), para_threshs1=(0, 0), **kw)
        cost = estimated_cost(p, hq // hk)
        # The vectorised estimate over the planner's groups equals the plan's own.
        assert estimate(groups, q_tiles, kv_tiles, [(c, c)], hq // hk, hk)[0] == (
            pytest.approx(cost, rel=1e-12))
        if cost < best_cost - 1e-9:
            best, best_cost = p, cost
    assert chosen.kv_split_sizes == best.kv_split_sizes
    assert vnode_table(chosen) == vnode_table(best)
    assert chosen.phases == best.phases
    check_plan(chosen, inp, hq // hk)


def split_costs_by_group(groups, q_tiles, kv_tiles, chunks, group, num_kv_heads):
    """plan_module._split_costs written out group by group in Python integers."""
    from kernels.tree_decode import stage2_blocks

    pm = plan_module
    length, nreq = groups.length.tolist(), groups.nreq.tolist()
    phase = [int(n <= q_tiles[1]) for n in nreq]
    nqt = [-(-n // q_tiles[p]) for n, p in zip(nreq, phase)]
    owner = np.arange(len(nreq)).repeat(groups.nreq).tolist()  # each pair's group
    out = []
    for pair in chunks:
        nch = [-(-L // pair[p]) for L, p in zip(length, phase)]
        nv, rows, longest, tokens1 = [0, 0], [0, 0], [None, None], 0
        for L, n, p, q, k in zip(length, nreq, phase, nqt, nch):
            nv[p] += k * q
            rows[p] += k * n
            longest[p] = L if longest[p] is None else max(longest[p], L)
            tokens1 += L * q if p else 0
        kv = list(kv_tiles)
        if (pm.SHORT_KV_TILE and kv[1] > pm.SHORT_KV_TILE and group <= pm.SHORT_KV_MAX_GROUP
                and nv[1] > 0 and tokens1 <= pm.SHORT_KV_MAX_MEAN * nv[1]):
            kv[1] = pm.SHORT_KV_TILE
        steps = [0, 0]
        for L, p, q, k in zip(length, phase, nqt, nch):
            last = L - (k - 1) * pair[p]
            steps[p] += (k - 1) * q * -(-pair[p] // kv[p]) + -(-last // kv[p]) * q
        total = 0.0
        for p in (1, 0):
            if longest[p] is None:
                continue
            work = (steps[p] + pm.AUTO_PROGRAM_STEPS * nv[p]) * num_kv_heads / pm.AUTO_SLOTS
            partials = pm.AUTO_PARTIAL_WEIGHT * (group * num_kv_heads) / (132 * 64) * rows[p]
            total += max(-(-min(longest[p], pair[p]) // kv[p]), work) + partials
        if pm.AUTO_MERGE_WEIGHT and len(owner):
            per_req = [0] * groups.num_requests
            for r, g in zip(groups.pair_req.tolist(), owner):
                per_req[r] += nch[g]
            per_step = stage2_blocks(groups.num_requests, group * num_kv_heads, 128)[1]
            steps_m = max(-(-max(per_req) // per_step) - pm.AUTO_MERGE_FREE_STEPS, 0)
            total += pm.AUTO_MERGE_WEIGHT * steps_m
        out.append(total)
    return out


def test_split_costs_equal_a_group_by_group_sum():
    # The vectorised estimate is exact: the same floats as the sums written out, on
    # random groups (either phase may be empty).
    import types

    rng = np.random.default_rng(7)
    chunks = [(c, c) for c in plan_module.AUTO_KV_CHUNKS] + [(1024, 128), (128, 1024), (48, 80)]
    for trial in range(60):
        ng = int(rng.integers(1, 30))
        nr = int(rng.integers(1, 200))
        nreq = rng.integers(1, min(nr, 70) + 1, size=ng)
        if trial % 3 == 0:
            nreq[:] = rng.integers(1, min(nr, 16) + 1, size=ng)  # phase 1 alone
        length = rng.integers(1, 3000, size=ng)
        pair_req = np.concatenate([np.sort(rng.choice(nr, size=n, replace=False)) for n in nreq])
        groups = types.SimpleNamespace(nreq=nreq.astype(np.int64), length=length.astype(np.int64),
                                       pair_req=pair_req.astype(np.int64), num_requests=nr)
        q_tiles = [(64, 16), (16, 16), (128, 32), (64, 1)][trial % 4]
        kv_tiles = [(32, 64), (64, 16), (16, 32)][trial % 3]
        group, hk = [(1, 32), (4, 8), (16, 1), (2, 4)][trial % 4]
        got = plan_module._split_costs(groups, q_tiles, kv_tiles, chunks, group, hk)
        want = split_costs_by_group(groups, q_tiles, kv_tiles, chunks, group, hk)
        assert got.tolist() == want, (trial, got, want)


def seed_rule_choice(inp, hq, hk, splits_in):
    """The seed's adjustment of KV splits and tiles, one tiling per step: returns the
    (q tiles, kv tiles, splits) a rule plan (``kv_split_sizes`` given) is built with."""
    pm = plan_module
    group = hq // hk
    params = FastTreeParams.for_heads(hq, hk)
    topo = pm._Topology(inp)
    q_tiles = [pm._effective_q_tile(t, group) for t in params.TSQs]
    kv_tiles = list(params.TSKs)
    weights = (params.alpha, params.beta, params.gamma)
    groups = pm._Groups(topo, *pm._heuristic(topo, q_tiles, kv_tiles, group, *weights))
    splits = [splits_in[0]] * 2
    par = pm._Tiling(groups, q_tiles, splits, hk).par
    changed = False
    for phase in range(2):
        if 0 < par[phase] < pm.DEFAULT_PARA_THRESHS1[phase]:
            splits[phase], changed = splits_in[1], True
    if changed:
        par = pm._Tiling(groups, q_tiles, splits, hk).par
        th2 = pm.DEFAULT_PARA_THRESHS2
        retile = 1 if 0 < par[0] < th2[0] else 0 if 0 < par[1] < th2[1] else None
        if retile is not None:
            q_tiles, kv_tiles = [q_tiles[retile]] * 2, [kv_tiles[retile]] * 2
    return q_tiles, kv_tiles, splits


@pytest.mark.parametrize("hq, hk", [(32, 32), (32, 8), (16, 1)])
def test_rule_plans_follow_the_seed_adjustment(monkeypatch, hq, hk):
    # With kv_split_sizes given, the plan's tiles and splits are the seed's rule's,
    # including the smaller splits of the second size and the re-tiling.
    seen = []
    materialise = plan_module._materialise

    def spy(inp, topo, assign, groups, tiling, q_tiles, kv_tiles, splits, *rest, **kw):
        seen.append([list(q_tiles), list(kv_tiles), list(splits)])
        return materialise(inp, topo, assign, groups, tiling, q_tiles, kv_tiles, splits,
                           *rest, **kw)

    monkeypatch.setattr(plan_module, "_materialise", spy)
    kinds = set()
    for spec in CHOICE_TREES + ["1,16 4096,16", "1,4,16,64,256,1024 256,8,256,64,32,256"]:
        inp = spec_input(spec)
        for splits_in in [(1024, 128), (256, 64), (64, 16)]:
            want = seed_rule_choice(inp, hq, hk, splits_in)
            seen.clear()
            build_plan(inp, num_qo_heads=hq, num_kv_heads=hk, head_dim=128,
                       params=FastTreeParams.for_heads(hq, hk), kv_split_sizes=splits_in)
            assert seen == [list(want)], (spec, splits_in)
            kinds.add((want[2][0] != want[2][1], want[0][0] == want[0][1]))
    assert len(kinds) >= 2  # some plans adjusted, some not


def test_retiled_cost_floor_is_a_lower_bound():
    # Whatever the cost model makes of a tree with one tile shape in both phases (and
    # the flat plan's groups), the estimate is at least the floor, and the floor is
    # reached on some trees (it is not vacuous).
    pm = plan_module
    rng = np.random.default_rng(5)
    ratios = []
    for trial in range(150):
        n = int(rng.integers(1, 60))
        parent = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
        if trial % 5 == 0 and n > 2:
            parent[int(rng.integers(1, n))] = -1  # a forest
        seqlen = rng.integers(0 if trial % 7 == 0 else 1, 600, size=n)
        seqlen[0] = int(rng.integers(1, 5000))
        kids = np.bincount([x for x in parent if x >= 0], minlength=n)
        ends = [i for i in range(n) if kids[i] == 0 or rng.random() < 0.2]
        req_end = [int(x) for x in np.repeat(ends, rng.integers(1, 4, size=len(ends)))]
        topo = pm._Topology(plan_input(parent, seqlen, req_end))
        q = int(rng.choice([1, 2, 4, 16, 64]))
        k = int(rng.choice([16, 32, 64]))
        splits = [int(x) for x in rng.choice([16, 64, 128, 512, 1024], size=2)]
        group, hk = [(1, 32), (4, 8), (16, 1), (8, 2)][trial % 4]
        floor = pm._retiled_cost_floor(topo, q, k, splits, group, hk)
        for assign, chain in (pm._heuristic(topo, [q, q], [k, k], group, 0.6, 0.3, 0.5),
                              pm._flat_assignment(topo)):
            groups = pm._Groups(topo, assign, chain)
            cost = pm._split_costs(groups, [q, q], [k, k], [splits], group, hk)[0]
            assert floor <= cost * (1 + 1e-12), (trial, floor, cost)
            ratios.append(floor / cost)
    assert max(ratios) > 0.999 and min(ratios) > 0


def test_retiled_rule_plans_skipped_only_where_they_lose(monkeypatch):
    # Plans with the floor's shortcut equal plans that build and cost every re-tiled
    # rule plan (the floor pushed to 0), and the shortcut is taken.
    floor, heuristic = plan_module._retiled_cost_floor, plan_module._heuristic
    calls = []
    runs = {"fast": 0, "full": 0}

    def spy(*args):
        calls.append(floor(*args))
        return calls[-1]

    def counted(which):
        def run(*args):
            runs[which] += 1
            return heuristic(*args)
        return run

    for spec in CHOICE_TREES + ["1,16 4096,16", "1,4 4096,8"]:
        inp = spec_input(spec)
        for hq, hk in [(16, 1), (32, 8)]:
            kw = dict(num_qo_heads=hq, num_kv_heads=hk, head_dim=128,
                      params=FastTreeParams.for_heads(hq, hk))
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(plan_module, "_retiled_cost_floor", spy)
                mp.setattr(plan_module, "_heuristic", counted("fast"))
                fast = build_plan(inp, **kw)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(plan_module, "_retiled_cost_floor", lambda *a: 0.0)
                mp.setattr(plan_module, "_heuristic", counted("full"))
                full = build_plan(inp, **kw)
            assert vnode_table(fast) == vnode_table(full), (spec, hq, hk)
            assert (fast.phases, fast.q_tiles, fast.kv_tiles, fast.kv_split_sizes) == (
                full.phases, full.q_tiles, full.kv_tiles, full.kv_split_sizes)
    assert calls  # some plans were re-tiled
    assert runs["fast"] < runs["full"]  # and some re-tiled plans were not built


def test_chunk_length_choice_can_be_turned_off(monkeypatch):
    from treecache.tree import generate_tree_from_spec, kv_ptrs
    from treecache.fasttree import tree_plan_input

    nodes = generate_tree_from_spec("1,4,16,512 1024,256,128,32")
    inp = tree_plan_input(nodes, kv_ptrs(nodes), 512)
    kw = dict(num_qo_heads=16, num_kv_heads=1, head_dim=128,
              params=FastTreeParams.for_heads(16, 1))
    rule = build_plan(inp, kv_split_sizes=DEFAULT_KV_SPLIT_SIZES, **kw)
    assert rule.kv_split_sizes == (1024, 128)
    # Here the estimate picks 512-token chunks (measured 0.74x the rule's time).
    assert build_plan(inp, **kw).kv_split_sizes == (512, 512)
    assert build_plan(inp, flat=True, **kw).kv_split_sizes == build_plan(
        inp, flat=True, kv_split_sizes=DEFAULT_KV_SPLIT_SIZES, **kw).kv_split_sizes
    monkeypatch.setattr(plan_module, "AUTO_MAX_KV_ENTRIES", 1000)  # a larger plan
    assert vnode_table(build_plan(inp, **kw)) == vnode_table(rule)
    monkeypatch.setattr(plan_module, "AUTO_MAX_KV_ENTRIES", 10**9)
    monkeypatch.setattr(plan_module, "AUTO_KV_CHUNKS", ())
    assert vnode_table(build_plan(inp, **kw)) == vnode_table(rule)


def test_merge_chain_weighs_in_the_chunk_choice(monkeypatch):
    # 10 requests over a 4000-token root at 32/8: 128-token chunks give each request 36
    # partials (5 stage-2 steps of 8), 256-token chunks 18 (3 steps); the merge chain
    # tips the estimate to 256 (measured 0.82x replayed, 0.88x eager). Without it the
    # estimate keeps 128.
    from treecache.tree import generate_tree_from_spec, kv_ptrs
    from treecache.fasttree import tree_plan_input

    nodes = generate_tree_from_spec("1,10 4000,400")
    inp = tree_plan_input(nodes, kv_ptrs(nodes), 10)
    kw = dict(num_qo_heads=32, num_kv_heads=8, head_dim=128,
              params=FastTreeParams.for_heads(32, 8))
    assert plan_module.AUTO_MERGE_WEIGHT > 0
    plan = build_plan(inp, **kw)
    assert plan.kv_split_sizes == (256, 256)
    assert int(plan.tensors()["req_mid_len"].max()) == 16 + 2
    monkeypatch.setattr(plan_module, "AUTO_MERGE_WEIGHT", 0.0)
    plan = build_plan(inp, **kw)
    assert plan.kv_split_sizes == (128, 128)
    assert int(plan.tensors()["req_mid_len"].max()) == 32 + 4


# ----------------------------------------------------------------- tree shapes


def test_forest():
    # Root 0 (30) -> 1 (5), 2 (7); root 3 (12) -> 4 (3); root 5 (9) alone.
    inp = plan_input([-1, 0, 0, -1, 3, -1], [30, 5, 7, 12, 3, 9], [1, 2, 4, 5])
    plan = build(inp, **NO_ADJUST)
    assert plan.node_assignments[0] == plan.node_assignments[3] == plan.node_assignments[5] == 0
    assert plan_slots(plan) == [
        list(range(0, 35)), list(range(0, 30)) + list(range(35, 42)),
        list(range(42, 57)), list(range(57, 66))]


def test_requests_ending_at_internal_nodes():
    # Request 0 ends at the root, request 1 at the internal node 1, requests 2, 3 at
    # the leaves below 1, request 4 at leaf 2.
    inp = plan_input([-1, 0, 0, 1, 1], [40, 20, 6, 3, 4], [0, 1, 3, 4, 2])
    plan = build(inp, **NO_ADJUST)
    assert plan.node_assignments == [0, 0, 0, 0, 0]
    # Groups: root {0,1,2,3,4}, node 1 {1,2,3}, node 2 {4}, node 3 {2}, node 4 {3}.
    assert [(kl, ql) for _, kl, _, ql in vnode_table(plan)] == [
        (40, 5), (20, 3), (6, 1), (3, 1), (4, 1)]
    assert host(plan, "req_mid_len", 5) == [1, 2, 3, 3, 2]


def test_zero_length_nodes():
    # Node 1 and node 3 hold no tokens; request 0 ends at node 1 (it attends the root
    # only); request 2's whole path (root 4, 0 tokens) is empty: no mid row at all.
    inp = plan_input([-1, 0, 1, 0, -1], [10, 0, 5, 0, 0], [1, 2, 3, 4])
    plan = build(inp, **NO_ADJUST)
    assert host(plan, "req_mid_len", 4)[3] == 0
    assert plan_slots(plan) == [list(range(10)), list(range(15)), list(range(10)), []]
    assert all(kl > 0 for _, kl, _, _ in vnode_table(plan))


def test_all_paths_empty():
    inp = plan_input([-1, 0], [0, 0], [1, 0])
    plan = build(inp, **NO_ADJUST)
    assert plan.num_vnodes == 0 and plan.phases == ()
    q = torch.randn(2, 1, 16)
    for backend in ("torch", "auto"):
        o = plan.run(q, torch.zeros(1, 1, 16), torch.zeros(1, 1, 16),
                     torch.full_like(q, float("nan")), backend=backend)
        assert torch.count_nonzero(o) == 0 and not torch.isnan(o).any()


def assert_both_backends_match_reference(plan: DecodePlan, inp: PlanInput, num_slots: int,
                                         seed: int) -> None:
    """``plan.run`` with the torch backend and with "auto" (the Triton kernels, in the
    interpreter on a CPU) on poisoned outputs against the float32 reference (float32
    inputs, head_dim 16, scale 0.25)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(plan.num_requests, plan.num_qo_heads, 16, generator=g)
    k = torch.randn(num_slots, plan.num_kv_heads, 16, generator=g)
    v = torch.randn(num_slots, plan.num_kv_heads, 16, generator=g)
    ref = reference_decode(q, k, v, [torch.tensor(p) for p in expected_paths(inp)], 0.25)
    for backend in ("torch", "auto"):
        o = plan.run(q, k, v, torch.full_like(q, float("nan")), sm_scale=0.25, backend=backend)
        assert not torch.isnan(o).any()
        assert ((o - ref).norm() / ref.norm()).item() <= 1e-4

def test_flat_plan_one_partial_per_request():
    # flat=True: every request end node is one group over its whole path; requests
    # ending at the same node share it; each request has one partial (paths within the
    # KV split), so stage 1 writes every output and stage 2 is not launched.
    inp = plan_input([-1, 0, 0, 1, -1], [30, 5, 7, 2, 9], [3, 2, 1, 1, 4])
    plan = build(inp, group=2, hk=1, flat=True, **NO_ADJUST)
    assert plan.node_assignments == [0, 1, 1, 1, 0]
    assert host(plan, "req_mid_len", 5) == [1, 1, 1, 1, 1]
    assert plan.direct and not plan.needs_stage2
    # Requests 2 and 3 end at node 1: one vnode with both queries.
    assert sorted(ql for _, _, _, ql in vnode_table(plan)) == [1, 1, 1, 2]
    assert_both_backends_match_reference(plan, inp, num_slots=53, seed=3)


def phase1_partials(plan: DecodePlan) -> np.ndarray:
    """Mid rows of every request in the plan's last phase."""
    mid_q_rows = host(plan, "mid_q_rows", plan.num_mid_rows)
    counts = np.zeros(plan.num_requests, dtype=np.int64)
    last = plan.phases[-1]
    for _, _, qs, ql in vnode_table(plan)[last.vnode_offset:]:
        for j in range(qs, qs + ql):
            counts[mid_q_rows[j]] += 1
    return counts


def expected_finish(plan: DecodePlan, group: int) -> bool:
    """Whether a plan may merge in phase 1, from its tables: two phases, a group of at
    least FINISH_MIN_GROUP or a fused (masked) phase 1, FINISH_MIN_PROGRAMS to FINISH_MAX_PROGRAMS programs in phase 1,
    and every request with exactly one mid row in phase 1."""
    live = [ph for ph in plan.phases if ph.num_vnodes]
    if len(live) != 2 or not plan_module.FINISH_MIN_GROUP:
        return False
    if group < plan_module.FINISH_MIN_GROUP and not plan.masked:
        return False
    programs = live[1].num_vnodes * plan.num_kv_heads
    if programs < (plan_module.FINISH_MIN_PROGRAMS or 0):
        return False
    if plan_module.FINISH_MAX_PROGRAMS and programs > plan_module.FINISH_MAX_PROGRAMS:
        return False
    return bool((phase1_partials(plan) == 1).all())


@pytest.mark.parametrize("group,rule,programs,most,finish",
                         [(1, 1, 0, 0, True), (16, 16, 0, 0, True), (8, 16, 0, 0, False),
                          (4, 4, 0, 0, True), (16, 0, 0, 0, False), (16, 16, 20, 0, True),
                          (16, 16, 21, 0, False), (16, 16, None, None, True),
                          (16, 16, 0, 20, True), (16, 16, 0, 19, False)])
def test_finish_flag_and_result(monkeypatch, group, rule, programs, most, finish):
    # A shared root (phase 0) and one leaf per request (phase 1, 20 programs): each
    # request has one partial in phase 1, so the plan finishes there when the group is
    # large enough and phase 1 has enough programs, and not too many.
    monkeypatch.setattr(plan_module, "FINISH_MIN_GROUP", rule)
    monkeypatch.setattr(plan_module, "FINISH_MIN_PROGRAMS", programs)
    monkeypatch.setattr(plan_module, "FINISH_MAX_PROGRAMS", most)
    inp = plan_input([-1] + [0] * 20, [300] + [3 + i for i in range(20)], list(range(1, 21)))
    plan = build(inp, group=group, hk=1, head_dim=16)
    assert len(plan.phases) == 2
    assert plan.finish is finish
    assert plan.finish == expected_finish(plan, group)
    assert plan.launch_modes == dict(direct=plan.direct, needs_stage2=plan.needs_stage2,
                                     finish=finish)
    assert_both_backends_match_reference(plan, inp, num_slots=600, seed=5)


def test_no_finish_with_two_partials_in_phase_1(monkeypatch):
    # Every node small: both levels land in phase 1, so requests have two partials there.
    monkeypatch.setattr(plan_module, "FINISH_MIN_GROUP", 1)
    inp = plan_input([-1, 0, 0, 1, 1, 2, 2], [300, 40, 40, 5, 5, 5, 5], [3, 4, 5, 6])
    plan = build(inp, group=1, hk=1, head_dim=16,
                 params=FastTreeParams(gamma=0.0, TSQs=[64, 2]), **NO_ADJUST)
    assert plan.finish == expected_finish(plan, 1)
    assert not plan.finish

def test_direct_flags_of_tree_plans():
    # A shared root split off (split-K): request 1 ends at the root and has one partial,
    # the others two; a request with an empty path has none.
    inp = plan_input([-1, 0, 0, -1], [40, 5, 7, 0], [1, 0, 2, 3])
    plan = build(inp, params=FastTreeParams(gamma=0.0), **NO_ADJUST)
    assert host(plan, "req_mid_len", 4) == [2, 1, 2, 0]
    assert plan.direct and plan.needs_stage2
    g = torch.Generator().manual_seed(4)
    q = torch.randn(4, 1, 16, generator=g)
    k = torch.randn(52, 1, 16, generator=g)
    v = torch.randn(52, 1, 16, generator=g)
    paths = [torch.tensor(p, dtype=torch.long) for p in expected_paths(inp)]
    ref = reference_decode(q, k, v, paths, 0.25)
    o = plan.run(q, k, v, torch.full_like(q, float("nan")), sm_scale=0.25)
    assert torch.count_nonzero(o[3]) == 0
    assert ((o - ref).norm() / ref.norm()).item() <= 1e-4


def test_graph_flag_off_cuda_runs_normally():
    # graph=True needs CUDA and the compiled kernels; elsewhere run() launches as usual.
    inp = plan_input([-1, 0, 0], [20, 5, 7], [1, 2])
    plan = build(inp, group=2, hk=1)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 16, generator=g)
    k = torch.randn(32, 1, 16, generator=g)
    v = torch.randn(32, 1, 16, generator=g)
    a = plan.run(q, k, v, torch.full_like(q, float("nan")), backend="torch")
    b = plan.run(q, k, v, torch.full_like(q, float("nan")), backend="torch", graph=True)
    assert torch.equal(a, b) and not torch.isnan(a).any()
    assert plan._graphs is None


def test_node_tokens_slot_table():
    # Nodes point into a slot table instead of contiguous rows.
    slots = np.array([7, 3, 9, 0, 1, 5, 8, 2, 6, 4], dtype=np.int32)
    inp = plan_input([-1, 0, 0], [4, 3, 3], [1, 2], node_tokens=slots)
    plan = build(inp, **NO_ADJUST)
    assert plan_slots(plan) == [sorted([7, 3, 9, 0, 1, 5, 8]), sorted([7, 3, 9, 0, 2, 6, 4])]


def hints(plan: DecodePlan) -> list[int]:
    return host(plan, "vnode_slot0", plan.num_vnodes)


def hinted_runs(plan: DecodePlan) -> dict[tuple[int, ...], int]:
    """Each vnode's slots (as a tuple) -> its contiguity hint."""
    kv = plan.buffers.host_view("kv_indices", plan.num_kv_entries)
    return {tuple(kv[ks:ks + kl].tolist()): s0
            for (ks, kl, _, _), s0 in zip(vnode_table(plan), host(plan, "vnode_slot0", plan.num_vnodes))}


def test_contiguity_hint_seed_layout():
    # Seed layout: every node is a run of rows. A split-Q chain (child merged with its
    # parent) is one run only where the parent's rows end where the child's begin.
    inp = plan_input([-1, 0, 0], [40, 3, 5], [1, 2])
    p = build(inp, params=FastTreeParams(gamma=1000.0), **NO_ADJUST)  # split-Q children
    assert p.node_assignments == [0, 1, 1]
    # Node 1's chain is 0..39 then 40..42: one run. Node 2's is 0..39 then 43..47: not.
    assert hinted_runs(p) == {tuple(range(43)): 0,
                              tuple(range(40)) + tuple(range(43, 48)): -1}
    # Split-K everywhere: every vnode is a single node, so every vnode is hinted.
    p = build(inp, params=FastTreeParams(gamma=0.0), **NO_ADJUST)
    assert p.node_assignments == [0, 0, 0]
    assert hinted_runs(p) == {tuple(range(40)): 0, (40, 41, 42): 40, (43, 44, 45, 46, 47): 43}


def test_contiguity_hint_slot_table():
    # A slot table: node 0 is a run (20..29), node 1 is not, node 2 is a run that
    # continues node 0 (30..33).
    table = list(range(20, 30)) + [5, 3, 4] + [30, 31, 32, 33]
    inp = plan_input([-1, 0, 0], [10, 3, 4], [1, 2], node_tokens=table)
    p = build(inp, params=FastTreeParams(gamma=0.0), **NO_ADJUST)
    assert hinted_runs(p) == {tuple(range(20, 30)): 20, (5, 3, 4): -1, (30, 31, 32, 33): 30}
    p = build(inp, params=FastTreeParams(gamma=1000.0), **NO_ADJUST)
    assert hinted_runs(p) == {tuple(range(20, 34)): 20, tuple(range(20, 30)) + (5, 3, 4): -1}


def test_contiguity_hint_from_node_runs():
    # The owner's run flags give the hints of the planner's own pass over the table
    # (both groupings); flags of another length are refused, naming the field.
    table = list(range(20, 30)) + [5, 3, 4] + [30, 31, 32, 33]
    base = plan_input([-1, 0, 0], [10, 3, 4], [1, 2], node_tokens=table)
    inp = attrs.evolve(base, node_runs=np.array([True, False, True]))
    for gamma in (0.0, 1000.0):
        params = FastTreeParams(gamma=gamma)
        want = hinted_runs(build(base, params=params, **NO_ADJUST))
        assert hinted_runs(build(inp, params=params, **NO_ADJUST)) == want
    # The flags are trusted: a node marked as no run is gathered.
    none = attrs.evolve(base, node_runs=np.zeros(3, dtype=bool))
    assert set(hinted_runs(build(none, params=FastTreeParams(gamma=0.0), **NO_ADJUST)).values()) == {-1}
    with pytest.raises(PlanMismatchError,
                       match=r"inp.node_runs must have one entry per node \(3\), got 2"):
        build(attrs.evolve(base, node_runs=np.ones(2, dtype=bool)))


def test_contiguity_hint_not_on_growable_tails():
    # A request that may grow in place gets arbitrary slots appended: its tail vnode is
    # never hinted, and stays correct after growing.
    inp = plan_input([-1, 0, 0], [40, 3, 5], [1, 2], growable=[True, False])
    p = build(inp, params=FastTreeParams(gamma=0.0), headroom=8, **NO_ADJUST)
    tail = int(p.tail_vnode[0])
    assert tail >= 0 and hints(p)[tail] == -1
    assert p.extend_tails(np.array([0]), np.array([999]))
    assert hinted_runs(p)[(40, 41, 42, 999)] == -1


# -------------------------------------------------------------- GQA tile clamp


@pytest.mark.parametrize("group, tiles", [
    (1, (64, 16)), (2, (64, 16)), (4, (32, 16)), (7, (18, 16)), (8, (16, 16)),
    (16, (8, 8)), (128, (1, 1))])
def test_gqa_clamps_q_tiles(group, tiles):
    inp = plan_input([-1], [20], [0] * 40)
    plan = build(inp, group=group, **NO_ADJUST)
    assert plan.q_tiles == tiles
    assert plan.requested_q_tiles == (64, 16)
    assert all(ph.q_tile * group <= 128 for ph in plan.phases)
    assert plan.num_vnodes == -(-40 // tiles[0 if 40 > tiles[1] else 1])


def test_gqa_group_too_large():
    inp = plan_input([-1], [20], [0])
    with pytest.raises(UnsupportedConfigError, match=r"GQA group size 256 exceeds 128"):
        build_plan(inp, num_qo_heads=256, num_kv_heads=1, head_dim=16)


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(num_qo_heads=6, num_kv_heads=4), UnsupportedConfigError,
     r"num_qo_heads \(6\) must be a positive multiple of num_kv_heads \(4\)"),
    (dict(head_dim=48), UnsupportedConfigError, r"head_dim must be one of .*, got 48"),
    (dict(kv_split_sizes=(0, 8)), PlanMismatchError, r"KV_SPLIT_SIZES must be two positive ints"),
    (dict(para_threshs1=(1,)), PlanMismatchError, r"para_threshs1/2 must have two entries"),
    (dict(params=FastTreeParams(TSQs=[0, 4])), PlanMismatchError,
     r"params.TSQs must be two positive ints, got \[0, 4\]"),
    (dict(params=FastTreeParams(TSKs=[32])), PlanMismatchError, r"params.TSKs must be two"),
    (dict(params=FastTreeParams(alpha=float("nan"))), PlanMismatchError, r"params.alpha"),
    (dict(params=FastTreeParams(gamma=-1.0)), PlanMismatchError, r"params.gamma .* got -1.0"),
])
def test_bad_configuration(kwargs, exc, message):
    args = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16)
    args.update(kwargs)
    with pytest.raises(exc, match=message):
        build_plan(plan_input([-1], [10], [0]), **args)


# ---------------------------------------------------------------- params


def test_build_plan_never_mutates_params():
    # This tree triggers the whole adjustment (smaller chunks, then one tile shape),
    # where the seed wrote the new tiles back into params.
    params = FastTreeParams(alpha=0.5, beta=0.25, gamma=0.2, TSQs=[32, 8], TSKs=[16, 64],
                            kv_group_num=2)
    before = copy.deepcopy(params)
    tsqs, tsks = params.TSQs, params.TSKs
    inp = plan_input([-1, 0, 0], [300, 20, 20], [1, 2])
    plan = build(inp, group=2, hk=2, params=params, kv_split_sizes=(64, 16))
    assert plan.q_tiles != plan.requested_q_tiles  # the adjustment did happen
    assert params == before
    assert attrs.asdict(params) == attrs.asdict(before)
    assert params.TSQs is tsqs and params.TSKs is tsks
    assert tsqs == [32, 8] and tsks == [16, 64]


def test_params_have_their_own_lists():
    a, b = FastTreeParams(), FastTreeParams()
    assert a.TSQs is not b.TSQs and a.TSKs is not b.TSKs
    a.TSQs.append(1)
    a.TSKs[0] = 7
    assert b.TSQs == [64, 16] and b.TSKs == [32, 128]
    assert FastTreeParams().TSQs == [64, 16] and FastTreeParams().TSKs == [32, 128]
    tiles = [8, 4]
    a.set_q_tile_sizes(tiles)
    a.set_kv_tile_sizes(tiles)
    c = FastTreeParams(TSQs=tiles, TSKs=tiles)
    tiles[0] = 99
    assert a.TSQs == [8, 4] and a.TSKs == [8, 4] and a.TSQs is not a.TSKs
    assert c.TSQs == [8, 4] and c.TSKs == [8, 4] and c.TSQs is not c.TSKs


def test_params_setters_and_defaults():
    p = FastTreeParams()
    assert (p.alpha, p.beta, p.gamma, p.kv_group_num) == (0.66, 0.33, 0.1, 1)
    p.set_values(0.7, 0.35, 0.12)
    p.set_kv_group_num(4)
    assert (p.alpha, p.beta, p.gamma, p.kv_group_num) == (0.7, 0.35, 0.12, 4)


def test_default_params_when_omitted():
    # Without params the planner uses the tiles tuned for the head layout.
    inp = plan_input([-1, 0, 0], [100, 20, 20], [1, 2, 2, 2])
    a = build_plan(inp, num_qo_heads=8, num_kv_heads=2, head_dim=16, **NO_ADJUST)
    b = build(inp, group=4, hk=2, params=FastTreeParams.for_heads(8, 2), **NO_ADJUST)
    check_plan(a, inp, 4)
    assert vnode_table(a) == vnode_table(b) and a.phases == b.phases
    assert a.requested_q_tiles == tuple(FastTreeParams.for_heads(8, 2).TSQs)


# ------------------------------------------------------------ path_token_indices


def test_path_token_indices():
    # Forest: 0 (3) -> 1 (2) -> 3 (1); 0 -> 2 (0 tokens); root 4 (2). Requests end at
    # 3, 0 (internal), 2 (zero-length leaf), 4, 1.
    parent = np.array([-1, 0, 0, 1, -1])
    seqlen = np.array([3, 2, 0, 1, 2])
    tok_ptr = np.array([0, 3, 5, 5, 6])
    got = path_token_indices(parent, seqlen, tok_ptr, np.array([3, 0, 2, 4, 1]))
    assert [g.tolist() for g in got] == [
        [0, 1, 2, 3, 4, 5], [0, 1, 2], [0, 1, 2], [6, 7], [0, 1, 2, 3, 4]]
    table = np.array([10, 11, 12, 13, 14, 15, 16, 17]) * 2
    got = path_token_indices(parent, seqlen, tok_ptr, np.array([3, 4]), node_tokens=table)
    assert [g.tolist() for g in got] == [[20, 22, 24, 26, 28, 30], [32, 34]]


def test_path_token_indices_deep_chain_and_empty():
    n = 12
    parent = np.arange(-1, n - 1)
    seqlen = np.arange(n) % 3
    tok_ptr = np.concatenate([[0], np.cumsum(seqlen)[:-1]])
    got = path_token_indices(parent, seqlen, tok_ptr, np.array([n - 1, 0, 1]))
    assert got[0].tolist() == list(range(int(seqlen.sum())))
    assert got[1].tolist() == [] and got[2].tolist() == [0]


def test_path_token_indices_no_requests():
    got = path_token_indices(np.array([-1]), np.array([3]), np.array([0]),
                             np.array([], dtype=np.int64))
    assert len(got) == 0


# ----------------------------------------------------------------- plan buffers


def _qkv(plan, num_slots, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(plan.num_requests, plan.num_qo_heads, plan.head_dim, generator=g).to(dtype)
    k = torch.randn(num_slots, plan.num_kv_heads, plan.head_dim, generator=g).to(dtype)
    v = torch.randn(num_slots, plan.num_kv_heads, plan.head_dim, generator=g).to(dtype)
    return q, k, v


def _check_run(plan, paths, q, k, v, backend, tol=1e-4):
    o = torch.full_like(q, float("nan"))
    plan.run(q, k, v, o, backend=backend)
    assert not torch.isnan(o).any()
    ref = reference_decode(q, k, v, paths, 1 / math.sqrt(plan.head_dim))
    assert ((o.float() - ref).norm() / ref.norm()).item() <= tol


def test_default_tiles_follow_the_head_dim():
    # for_heads: phase 0 takes 64-token KV tiles with GQA at head_dim 64 (the one
    # measured); without GQA, or at other head dims, both phases take 32.
    assert FastTreeParams.for_heads(32, 8).TSKs == [32, 32]
    assert FastTreeParams.for_heads(32, 8, 128).TSKs == [32, 32]
    assert FastTreeParams.for_heads(32, 8, 64).TSKs == [64, 32]
    assert FastTreeParams.for_heads(16, 1, 64).TSKs == [64, 32]
    assert FastTreeParams.for_heads(16, 1, 32).TSKs == [32, 32]
    assert FastTreeParams.for_heads(32, 8, 16).TSKs == [32, 32]
    assert FastTreeParams.for_heads(32, 32, 64).TSKs == [32, 32]
    assert FastTreeParams.for_heads(16, 1, 256).TSKs == [32, 32]
    assert FastTreeParams.for_heads(32, 8, 64).TSQs == FastTreeParams.for_heads(32, 8).TSQs


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_default_plan_at_each_head_dim_decodes_like_the_reference(head_dim):
    # A plan built with params=None asks for_heads with its head dim: at 64 its
    # shared-prefix phase runs 64-token KV tiles, at 32 and 128 32-token ones; every plan
    # decodes like the reference (the GPU tests run such plans at head_dim 16-256). A
    # cache with the same heads takes the same tiles.
    inp = spec_input("1,3,6 100,40,8")
    plan = build_plan(inp, num_qo_heads=8, num_kv_heads=2, head_dim=head_dim)
    want = 64 if head_dim == 64 else 32
    assert plan.requested_kv_tiles == (want, 32)
    assert plan.phases[0].num_vnodes > 0 and plan.phases[0].kv_tile == want
    paths = [torch.tensor(p) for p in expected_paths(inp)]
    q, k, v = _qkv(plan, int((inp.tok_ptr + inp.seqlen).max()), seed=head_dim)
    _check_run(plan, paths, q, k, v, "auto")  # the interpreter where there is no GPU
    from treecache import TreeKVCache

    cache = TreeKVCache(1, 8, 2, head_dim, 64)
    assert cache.params.TSKs == [want, 32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_half_partials(dtype):
    # float16 and bfloat16 inputs: the partials go through a float16 view of the
    # float32 buffer (first half of each row), for bfloat16 scaled, with their shifts in
    # the second half of the buffers' lse rows; float32 inputs keep float32 partials.
    # Both modes agree with the reference, and switching the mode off gives float32
    # partials again.
    inp = plan_input([-1, 0, 0, 1, 1], [40, 5, 7, 3, 9], [3, 4, 2, 0])
    plan = build(inp, group=2, params=FastTreeParams(gamma=0.0), **NO_ADJUST)
    assert plan.half_partials and int(np.max(host(plan, "req_mid_len", 4))) >= 2
    q, k, v = _qkv(plan, 64, seed=6, dtype=dtype)
    t = plan.kernel_tensors(dtype)
    if dtype != torch.float32:
        mid = t["mid_o"]
        assert mid.dtype == torch.float16
        assert mid.data_ptr() == plan.buffers.mid_o.data_ptr()
        assert mid.stride() == (2 * plan.buffers.mid_o.stride(0), 2 * plan.buffers.mid_o.stride(1), 1)
        assert plan.kernel_tensors(dtype) is t  # cached
        lse, hq = t["mid_lse"], plan.num_qo_heads
        assert lse.data_ptr() == plan.tensors()["mid_lse"].data_ptr()
        assert lse.shape[1] == (2 * hq if dtype == torch.bfloat16 else hq)
        assert lse.stride(0) == 2 * hq
    else:
        assert t is plan.tensors()
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}[dtype]
    paths = expected_paths(inp)
    for mode in (True, False):
        p = attrs.evolve(plan, half_partials=mode)
        _check_run(p, paths, q, k, v, "auto", tol=tol)
    assert attrs.evolve(plan, half_partials=False).kernel_tensors(dtype)["mid_o"].dtype == torch.float32


def test_plans_of_one_buffer_share_their_views():
    # A decode loop writes a new plan into the same buffers at every topology change:
    # plans with the same request count and masking share one dict of views, which
    # are the buffers' regions; another request count or a reallocation gives new ones.
    inp = plan_input([-1, 0, 0, 1, 1], [40, 5, 7, 3, 9], [3, 4, 2, 0])
    first = build(inp, group=2, **NO_ADJUST)
    bufs = first.buffers
    t = first.tensors()
    second = build(plan_input([-1, 0, 0], [30, 2, 6], [1, 2, 1, 2]), group=2, buffers=bufs,
                   **NO_ADJUST)
    assert second.tensors() is t and second.kernel_tensors(torch.float16) is \
        first.kernel_tensors(torch.float16)
    base = bufs.dev.data_ptr()
    for name, view in t.items():
        if name not in ("mid_o", "mid_lse"):
            assert view.data_ptr() == base + 4 * bufs.offsets[name], name
    assert t["req_mid_len"].numel() == 4 and t["mid_o"] is bufs.mid_o
    third = build(plan_input([-1, 0], [20, 3], [1, 1, 0]), group=2, buffers=bufs, **NO_ADJUST)
    assert third.tensors() is not t and third.tensors()["req_mid_len"].numel() == 3
    assert third.tensors()["req_mid_len"].tolist() == list(host(third, "req_mid_len", 3))
    bufs.ensure(vnodes=4 * bufs.cap_vnodes, requests=1, mid_rows=1, kv_entries=1)
    fourth = build(inp, group=2, buffers=bufs, **NO_ADJUST)
    u = fourth.tensors()
    assert u is not t
    assert u["kv_indices"].data_ptr() == bufs.dev.data_ptr() + 4 * bufs.offsets["kv_indices"]


def test_prepared_launches_reused_per_layout():
    # run() prepares the Triton launches once per tensor layout and reuses them with new
    # tensors of that layout; another layout gets its own; reallocated buffers drop them;
    # a copy of the plan (attrs.evolve) starts without any. Results stay exact.
    from kernels.backend import interpreter_enabled

    # The Triton kernels: compiled on a GPU, else the interpreter on the CPU.
    dev = "cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu"
    inp = plan_input([-1, 0, 0], [30, 10, 10], [1, 2, 0])
    plan = build(inp, group=2, hk=2, device=dev, **NO_ADJUST)
    paths = [torch.tensor(p, device=dev) for p in expected_paths(inp)]
    q, k, v = (t.to(dev) for t in _qkv(plan, 50, seed=8))
    _check_run(plan, paths, q, k, v, "triton")
    assert len(plan._launchers) == 2  # the generation and one prepared set
    prepared = [fn for key, fn in plan._launchers.items() if key != "generation"]
    q2, k2, v2 = (t.to(dev) for t in _qkv(plan, 50, seed=9))
    _check_run(plan, paths, q2, k2, v2, "triton")  # same layout: reused
    assert [fn for key, fn in plan._launchers.items() if key != "generation"] == prepared
    # A strided q (every other row of a bigger tensor) is another layout.
    big = torch.randn(2 * q.shape[0], q.shape[1], q.shape[2], device=dev)
    q3 = big[::2]
    _check_run(plan, paths, q3, k, v, "triton")
    assert len(plan._launchers) == 3
    copy = attrs.evolve(plan)
    assert copy._launchers == {}
    plan.buffers.ensure(plan.buffers.cap_vnodes * 2, 1, 1, 1)  # reallocates
    assert plan.buffers.generation != plan.generation
    fn = plan._launcher(q, k, v, torch.empty_like(q), 0.25, 0.0)  # prepares, runs nothing
    assert plan._launchers == {"generation": plan.buffers.generation,
                               next(kk for kk in plan._launchers if kk != "generation"): fn}
    assert fn not in prepared


def test_plans_of_one_shape_share_prepared_launches(monkeypatch):
    # Plans written into the same buffers with the same phases and modes (the same tree
    # over another slot table) reuse one prepared launch set, and each gives its own
    # exact result; a plan with more vnodes (modes and tensors the same) gets its own
    # set and its exact result; reallocated buffers drop them.
    from kernels.backend import interpreter_enabled

    dev = "cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu"
    rng = np.random.default_rng(4)
    buffers = PlanBuffers(4, 16, dev, slots=64)  # room for the slot tables: no reallocation
    kw = dict(group=2, hk=2, device=dev, buffers=buffers, kv_split_sizes=(16, 16),
              para_threshs1=(0, 0), para_threshs2=(0, 0))
    plans, launch_sets = [], []
    for seqlen, table in (([30, 10, 10], None), ([30, 10, 10], rng.permutation(50)),
                          ([30, 10, 10], rng.permutation(50)), ([40, 10, 10], None)):
        inp = plan_input([-1, 0, 0], seqlen, [1, 2, 0], node_tokens=table)
        plan = build(inp, **kw)
        paths = [torch.tensor(p, device=dev) for p in expected_paths(inp)]
        q, k, v = (t.to(dev) for t in _qkv(plan, 60, seed=len(plans)))
        _check_run(plan, paths, q, k, v, "triton")
        plans.append(plan)
        launch_sets += [fn for key, fn in plan._launchers.items() if key != "generation"]
    assert plans[3].phases[0].num_vnodes > plans[0].phases[0].num_vnodes
    assert plans[3].launch_modes == plans[0].launch_modes
    assert len(launch_sets) == 4 and launch_sets[0] is launch_sets[1] is launch_sets[2]
    assert launch_sets[3] is not launch_sets[0]
    assert len(buffers.launchers) == 2 and buffers.generation == plans[0].generation
    buffers.ensure(buffers.cap_vnodes * 2, 1, 1, 1)  # reallocates
    assert buffers.launchers == {}
    monkeypatch.setattr(plan_module, "SHARED_LAUNCHERS", 0)  # off: each plan its own
    for _ in range(2):
        plan = build(inp, **kw)
        _check_run(plan, paths, q, k, v, "triton")
    assert buffers.launchers == {}


@pytest.mark.parametrize("merged", [True, False], ids=["one-launch", "two-launches"])
def test_plans_of_one_form_resize_a_launch_set(monkeypatch, merged):
    # A plan with no shared set of its phases takes the newest set of a plan of the same
    # buffers, modes and tile shapes whose phases have other sizes, resized: no new
    # build, and on a GPU no first call through the JIT (its launches go direct at
    # once, with the new grids, vnode offsets and first-phase counts). Each plan gets
    # its exact result; its phases again find their own set; off, each plan of new
    # phases builds one. Two phases of two tile shapes, in one launch or in two.
    from kernels.backend import interpreter_enabled

    td = importlib.import_module("kernels.tree_decode")
    if not merged:
        monkeypatch.setattr(td, "MERGE_MAX_PROGRAMS", 0)
    dev = "cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu"
    builds = []
    real_build = plan_module.tree_decode_launcher

    def counted(*args, **kwargs):
        builds.append(kwargs["phases"])
        return real_build(*args, **kwargs)

    monkeypatch.setattr(plan_module, "tree_decode_launcher", counted)
    keys = []  # first calls through the JIT's key (CUDA)
    real_key = td._specialisation

    def counted_key(*args):
        keys.append(1)
        return real_key(*args)

    monkeypatch.setattr(td, "_specialisation", counted_key)
    buffers = PlanBuffers(4, 16, dev, slots=512)  # room for every plan: no reallocation
    kw = dict(group=2, hk=2, device=dev, buffers=buffers, kv_split_sizes=(16, 16),
              para_threshs1=(0, 0), para_threshs2=(0, 0),
              params=FastTreeParams(TSQs=[16, 1], TSKs=[16, 16]))

    def plan_and_check(root, leaf, seed):
        # A root shared by twelve requests (phase 0: 24 rows, more than the 16 of the
        # phase-1 tile), twelve one-request leaves (phase 1).
        inp = plan_input([-1] + [0] * 12, [root] + [10] * 11 + [leaf], list(range(1, 13)))
        plan = build(inp, **kw)
        paths = [torch.tensor(p, device=dev) for p in expected_paths(inp)]
        q, k, v = (t.to(dev) for t in _qkv(plan, 300, seed=seed))
        _check_run(plan, paths, q, k, v, "triton")
        (fn,) = [fn for key, fn in plan._launchers.items() if key != "generation"]
        return plan, fn

    plans, sets = [], []
    for n, (root, leaf) in enumerate(((30, 10), (40, 20), (70, 40), (40, 12), (70, 50))):
        plan, fn = plan_and_check(root, leaf, n)
        if dev == "cuda":
            if n == 0:  # the built set's first call: through the JIT's key
                built_keys = len(keys)
                assert built_keys >= 1
            else:  # a resized set's: direct at once
                assert all(kern.fast_calls >= 1 for kern, _ in fn._calls)
                assert len(keys) == built_keys
        plans.append(plan)
        sets.append(fn)
    assert len({p.phases for p in plans}) == 5  # every plan has phases of its own sizes
    assert len({p.phases[0].num_vnodes for p in plans[:3]}) == 3
    assert len({launch_form(p.phases, 2, 2, p.finish) for p in plans}) == 1
    assert len(builds) == 1 and builds[0] == plans[0].phases
    assert len({id(fn) for fn in sets}) == 5
    for plan, fn in zip(plans, sets):
        first, second = plan.phases
        if merged:
            ((kern, _),) = fn._calls
            assert kern.consts["TWO_SHAPES"]
            assert kern.grid[0] == first.num_vnodes + second.num_vnodes
            bound = [kern.args] + ([kern.fast_args] if dev == "cuda" else [])
            for args in bound:  # the direct path's arguments too
                assert [args[i] for i in td._STAGE1_SIZE_POS] == [0, first.num_vnodes]
        else:
            assert [kern.grid[0] for kern, _ in fn._calls] == [first.num_vnodes,
                                                               second.num_vnodes]
            for kern, _ in fn._calls:
                bound = [kern.args] + ([kern.fast_args] if dev == "cuda" else [])
                for args in bound:
                    assert args[td._STAGE1_SIZE_POS[0]] == (
                        0 if kern is fn._calls[0][0] else first.num_vnodes)
    # Phases met before find their own set again.
    plan, fn = plan_and_check(40, 20, 5)
    assert plan.phases == plans[1].phases and fn is sets[1] and len(builds) == 1
    monkeypatch.setattr(plan_module, "RESIZED_LAUNCHERS", False)
    plan, fn = plan_and_check(50, 20, 7)
    assert len(builds) == 2 and builds[1] == plan.phases


def test_buffers_send_packs_one_copy():
    # PlanBuffers.send packs an int64 prefix, int64 positions and int32 values into one
    # copy and writes the values into the device buffer. On the CPU the staging tensor
    # is the device tensor; a separate tensor stands in for a device buffer here so the
    # packing runs (on a GPU the cache tests exercise it).
    b = PlanBuffers(2, 16, "cpu")
    b.dev = b.host.clone()
    pos = np.array([3, 7, 11], dtype=np.int64)
    val = np.array([5, 2**31 - 1, 9], dtype=np.int64)
    b.scatter(pos, val)
    assert b.host[pos].tolist() == val.tolist() and b.dev[pos].tolist() == val.tolist()
    for m in (0, 1, 4):  # odd and even value counts, and none
        pos = np.arange(20, 20 + m, dtype=np.int64)
        val = np.arange(100, 100 + m, dtype=np.int64)
        prefix = np.array([42, -1, 7], dtype=np.int64)
        out = b.send(pos, val, prefix=prefix)
        assert out.dtype == torch.int64 and out.tolist() == [42, -1, 7]
        assert b.dev[20:20 + m].tolist() == val.tolist()
    assert b.send(np.zeros(0, np.int64), np.zeros(0, np.int64)) is None


def test_buffers_reuse_invalidates_older_plan():
    buffers = PlanBuffers(4, 16, "cpu")
    inp1 = plan_input([-1, 0, 0], [30, 10, 10], [1, 2])
    inp2 = plan_input([-1, 0], [20, 25], [1, 0, 1])
    p1 = build(inp1, group=2, hk=2, buffers=buffers, **NO_ADJUST)
    q1, k1, v1 = _qkv(p1, 50)
    _check_run(p1, expected_paths(inp1), q1, k1, v1, "torch")
    p2 = build(inp2, group=2, hk=2, buffers=buffers, **NO_ADJUST)
    assert p2.buffers is buffers and p2.serial == p1.serial + 1
    with pytest.raises(PlanMismatchError, match="newer plan"):
        p1.run(q1, k1, v1, torch.empty_like(q1))
    q2, k2, v2 = _qkv(p2, 45, seed=1)
    _check_run(p2, expected_paths(inp2), q2, k2, v2, "torch")
    _check_run(p2, expected_paths(inp2), q2, k2, v2, "auto")


class _CountedEvent:
    """Stands in for the upload's CUDA event: counts waits, records what the buffers
    held at each."""

    def __init__(self, buffers=None):
        self.buffers, self.waits = buffers, []

    def synchronize(self):
        self.waits.append(None if self.buffers is None else self.buffers.host)


def test_buffers_keep_the_staging_buffer_until_the_last_upload_ran():
    # The device may read the staging buffer after upload() returns: growing the
    # buffers waits for the last upload before the old staging tensor goes, and so does
    # dropping the buffers (a finaliser).
    import gc

    buffers = PlanBuffers(1, 16, "cpu", vnodes=1, requests=1, mid_rows=1, kv_entries=1)
    old = buffers.host
    ev = _CountedEvent(buffers)
    buffers._uploaded = buffers._upload_event[0] = ev
    buffers.ensure(1, 1, 1, 1)  # fits: no wait
    assert ev.waits == []
    buffers.ensure(5, 1, 1, 1)
    assert len(ev.waits) == 1 and ev.waits[0] is old and buffers.host is not old
    ev2 = _CountedEvent()
    buffers._upload_event[0] = ev2
    del buffers, ev  # ev referred to the buffers
    gc.collect()
    assert ev2.waits == [None]


def test_buffers_grow():
    buffers = PlanBuffers(1, 16, "cpu", vnodes=1, requests=1, mid_rows=1, kv_entries=1)
    assert buffers.generation == 1
    caps = lambda: (buffers.cap_vnodes, buffers.cap_requests, buffers.cap_mid_rows,  # noqa: E731
                    buffers.cap_kv)
    assert caps() == (1, 1, 1, 1)
    # 3 vnodes, 2 requests, 4 mid rows, 1020 kv entries: each capacity grows to at
    # least double.
    inp = plan_input([-1, 0, 0], [1000, 10, 10], [1, 2])
    p1 = build(inp, buffers=buffers, **NO_ADJUST)
    assert (p1.num_vnodes, p1.num_requests, p1.num_mid_rows, p1.num_kv_entries) == (3, 2, 4, 1020)
    assert caps() == (3, 2, 4, 1020)
    assert buffers.generation == 2 and p1.generation == 2
    assert buffers.mid_o.shape == (4, 1, 16) and buffers.mid_lse.shape == (4, 1)
    # A plan that fits: no reallocation.
    p2 = build(plan_input([-1], [50], [0]), buffers=buffers, **NO_ADJUST)
    assert buffers.generation == 2 and p2.generation == 2
    # One more vnode than fits: doubled.
    p3 = build(plan_input([-1, 0, 0, 0], [10, 10, 10, 10], [1, 2, 3]), buffers=buffers, **NO_ADJUST)
    assert p3.num_vnodes == 4 and buffers.cap_vnodes == 6 and buffers.cap_requests == 4
    assert buffers.generation == 3
    q, k, v = _qkv(p3, 40)
    _check_run(p3, expected_paths(plan_input([-1, 0, 0, 0], [10] * 4, [1, 2, 3])), q, k, v, "torch")


def test_buffers_for_other_heads_are_rejected():
    # Buffers sized for 1 query head of dim 16 cannot hold a 4-head, dim-32 plan's mid
    # rows; building into them must fail up front instead of running over them.
    buffers = PlanBuffers(1, 16, "cpu")
    inp = plan_input([-1, 0, 0], [40, 10, 10], [1, 2])
    with pytest.raises(TreeCacheError, match=r"(num_qo_heads|heads).*4|head_dim.*32"):
        build_plan(inp, num_qo_heads=4, num_kv_heads=1, head_dim=32, buffers=buffers)


# ---------------------------------------------------------------- extend_tails


def test_extend_tails():
    # Root (40) -> leaves 1 (10), 2 (10), 3 (5); requests 0, 1 end alone at leaves 1
    # and 2 (growable); request 2 ends at the root; request 3 at leaf 3 (not growable).
    inp = plan_input([-1, 0, 0, 0], [40, 10, 10, 5], [1, 2, 0, 3],
                     growable=[True, True, True, False])
    plan = build(inp, group=2, hk=1, headroom=4, **NO_ADJUST)
    assert plan.node_assignments == [0, 0, 0, 0]
    assert plan.tail_vnode[2] == -1 and plan.tail_vnode[3] == -1  # shared end / not growable
    paths = expected_paths(inp)
    q, k, v = _qkv(plan, 65 + 8, seed=3)
    table_before = vnode_table(plan)
    next_slot = 65
    for step in range(4):
        assert plan.extend_tails(np.array([0, 1]), np.array([next_slot, next_slot + 1]))
        paths[0].append(next_slot)
        paths[1].append(next_slot + 1)
        next_slot += 2
        assert plan_slots(plan) == [sorted(p) for p in paths]
        for backend in ("torch", "auto"):
            _check_run(plan, paths, q, k, v, backend)
    lens = [kl for _, kl, _, _ in vnode_table(plan)]
    assert lens == [40, 14, 14, 5]
    assert [t[0] for t in vnode_table(plan)] == [t[0] for t in table_before]

    # Beyond the headroom of 4: False, nothing changes (host, device, results).
    dev_before = plan.buffers.dev.clone()
    host_before = plan.buffers.host.clone()
    lens_host = plan.vnode_kv_len_host.copy()
    assert not plan.extend_tails(np.array([0]), np.array([0]))
    assert not plan.extend_tails(np.array([1, 0]), np.array([0, 1]))
    # Requests that cannot grow in place.
    assert not plan.extend_tails(np.array([2]), np.array([0]))
    assert not plan.extend_tails(np.array([3]), np.array([0]))
    assert torch.equal(plan.buffers.dev, dev_before)
    assert torch.equal(plan.buffers.host, host_before)
    assert np.array_equal(plan.vnode_kv_len_host, lens_host)
    _check_run(plan, paths, q, k, v, "torch")
    assert plan.extend_tails(np.array([], dtype=np.int64), np.array([], dtype=np.int64))


def test_extend_tails_every_request_interleaved():
    # The every-request step (rows=None, request-ordered mirrors) interleaved with
    # single-request and subset appends: the slots, the lengths and the results stay
    # those of the paths; at the headroom limit every call refuses and changes nothing.
    inp = plan_input([-1, 0, 0, 0], [40, 10, 10, 5], [1, 2, 3],
                     growable=[True, True, True])
    plan = build(inp, group=2, hk=1, headroom=6, **NO_ADJUST)
    assert (plan.tail_vnode >= 0).all()
    paths = expected_paths(inp)
    q, k, v = _qkv(plan, 65 + 3 * 6, seed=4)
    nxt = [65]

    def new(n):
        out = np.arange(nxt[0], nxt[0] + n)
        nxt[0] += n
        return out

    steps = [None, None, ("one", 1, 2), None, ([0, 2],), None]
    for st in steps:
        if st is None:
            sl = new(3)
            assert plan.extend_tails(None, sl)
            for r in range(3):
                paths[r].append(int(sl[r]))
        elif st[0] == "one":
            sl = new(st[2])
            assert plan.extend_tail(st[1], sl)
            paths[st[1]].extend(sl.tolist())
        else:
            rows = np.array(st[0])
            sl = new(rows.size)
            assert plan.extend_tails(rows, sl)
            for r, x in zip(rows, sl):
                paths[r].append(int(x))
        assert plan_slots(plan) == [sorted(p) for p in paths]
        lens = [kl for _, kl, _, _ in vnode_table(plan)]
        assert plan.vnode_kv_len_host.tolist() == lens
        _check_run(plan, paths, q, k, v, "auto")
    # Request 1 has used its 6 entries: the every-request step refuses, unchanged.
    host_before = plan.buffers.host.clone()
    lens_host = plan.vnode_kv_len_host.copy()
    assert not plan.extend_tails(None, np.array([0, 1, 2]))
    assert torch.equal(plan.buffers.host, host_before)
    assert np.array_equal(plan.vnode_kv_len_host, lens_host)
    assert plan.extend_tails(np.array([0, 2]), new(2))
    # A copy of the plan does not share the mirrors (nor the other per-object caches).
    copy = attrs.evolve(plan)
    assert copy._tails is None and copy._graphs is None and copy._launchers == {}


def test_extend_tails_duplicate_request_is_refused():
    # One call appends one slot per request; naming a request twice is a caller bug. It
    # must not succeed with one of the two slots silently dropped: either refuse (False,
    # nothing changed) or raise.
    inp = plan_input([-1, 0, 0], [20, 5, 5], [1, 2], growable=[True, True])
    plan = build(inp, headroom=4, **NO_ADJUST)
    before = plan.buffers.host.clone()
    lens = plan.vnode_kv_len_host.copy()
    try:
        ok = plan.extend_tails(np.array([0, 0]), np.array([30, 31]))
    except (TreeCacheError, ValueError):
        ok = False
    assert not ok, "extend_tails accepted a request twice (kept one slot of two)"
    assert torch.equal(plan.buffers.host, before)
    assert np.array_equal(plan.vnode_kv_len_host, lens)


def test_extend_tails_chunked_and_split_q():
    # The growable request's group is split-Q (root + leaf) and cut into chunks of 8:
    # the tail is its last chunk.
    inp = plan_input([-1, 0, 0], [4, 14, 4], [1, 2], growable=[True, True])
    params = FastTreeParams(alpha=0.0, beta=0.33, gamma=0.1)
    plan = build(inp, params=params, headroom=2,
                 **dict(NO_ADJUST, kv_split_sizes=(8, 8)))
    assert plan.node_assignments == [0, 1, 1]
    paths = expected_paths(inp)
    q, k, v = _qkv(plan, 30, seed=4)
    for step in range(2):
        assert plan.extend_tails(np.array([0, 1]), np.array([22 + 2 * step, 23 + 2 * step]))
        paths[0].append(22 + 2 * step)
        paths[1].append(23 + 2 * step)
    assert not plan.extend_tails(np.array([0]), np.array([29]))
    assert plan_slots(plan) == [sorted(p) for p in paths]
    _check_run(plan, paths, q, k, v, "torch")


def test_extend_tails_joined_last_chunk():
    # One request over 42 tokens at chunk 20: the 2-token rest joins the chunk before it
    # (20 + 22), and that last chunk is the tail that grows in place.
    inp = plan_input([-1], [42], [0], growable=[True])
    plan = build(inp, headroom=3, **dict(NO_ADJUST, kv_split_sizes=(20, 20)))
    assert [kl for _, kl, _, _ in vnode_table(plan)] == [20, 22]
    assert plan.tail_vnode[0] == 1
    paths = expected_paths(inp)
    q, k, v = _qkv(plan, 50, seed=5)
    for slot in (42, 43, 44):
        assert plan.extend_tails(np.array([0]), np.array([slot]))
        paths[0].append(slot)
    assert not plan.extend_tails(np.array([0]), np.array([45]))
    assert [kl for _, kl, _, _ in vnode_table(plan)] == [20, 25]
    assert plan_slots(plan) == [sorted(p) for p in paths]
    _check_run(plan, paths, q, k, v, "torch")


def test_no_headroom_without_growable():
    inp = plan_input([-1, 0], [10, 5], [1])
    plan = build(inp, headroom=4, **NO_ADJUST)
    assert (plan.tail_vnode == -1).all()
    assert not plan.extend_tails(np.array([0]), np.array([15]))
    plan = build(plan_input([-1, 0], [10, 5], [1], growable=[True]), **NO_ADJUST)
    assert not plan.extend_tails(np.array([0]), np.array([15]))  # headroom 0


# ---------------------------------------------------------- random forests


@st.composite
def forests(draw):
    """(PlanInput, group, build kwargs): random forest, requests ending anywhere."""
    n = draw(st.integers(1, 12))
    parent = [-1] + [draw(st.integers(-1, i - 1)) for i in range(1, n)]
    seqlen = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))
    b = draw(st.integers(1, 24))
    req_end = draw(st.lists(st.integers(0, n - 1), min_size=b, max_size=b))
    permute = draw(st.booleans())
    node_tokens = None
    if permute:
        node_tokens = np.random.default_rng(draw(st.integers(0, 99))).permutation(sum(seqlen))
    inp = plan_input(parent, seqlen, req_end, node_tokens=node_tokens)
    group = draw(st.sampled_from([1, 2, 4, 7, 8, 16]))
    tiles = st.integers(1, 32)
    params = FastTreeParams(
        alpha=draw(st.sampled_from([0.0, 0.66, 5.0])), beta=draw(st.sampled_from([0.0, 0.33, 2.0])),
        gamma=draw(st.sampled_from([0.0, 0.1, 10.0])),
        TSQs=[draw(tiles), draw(tiles)], TSKs=[draw(st.sampled_from([16, 32, 64])), 128])
    split = draw(st.sampled_from([(1024, 128), (16, 4), (7, 3), None]))  # None: chosen
    thresh = draw(st.sampled_from([dict(para_threshs1=(0, 0), para_threshs2=(0, 0)), {}]))
    flat = draw(st.booleans())
    return inp, group, dict(params=params, kv_split_sizes=split, flat=flat, **thresh)


@settings(max_examples=100, deadline=None)
@given(forests())
def test_random_forests_cover_each_path_once(case):
    inp, group, kwargs = case
    params = kwargs["params"]
    before = copy.deepcopy(params)
    plan = build(inp, group=group, hk=1, **kwargs)
    assert params == before
    # The direct-write flags describe the stage-2 map.
    counts = np.asarray(host(plan, "req_mid_len", plan.num_requests))
    assert plan.direct == bool((counts == 1).any())
    assert plan.needs_stage2 == (not bool((counts == 1).all()))
    assert plan.finish == expected_finish(plan, group)


def relabel(inp: PlanInput, perm: np.ndarray) -> PlanInput:
    """``inp`` with node ``i`` renamed ``perm[i]`` (tokens and requests unchanged)."""
    inv = np.argsort(perm)
    parent = np.where(inp.parent[inv] >= 0, perm[np.maximum(inp.parent[inv], 0)], -1)
    return attrs.evolve(inp, parent=parent, seqlen=inp.seqlen[inv], tok_ptr=inp.tok_ptr[inv],
                        req_end=perm[inp.req_end])


@pytest.mark.parametrize("seed", range(6))
def test_node_ids_in_any_order(seed):
    # Parents may come after their children: every request still attends its path once
    # (check_plan), with and without a slot table and growth headroom.
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    parent = [-1] + [int(rng.integers(-1, i)) for i in range(1, n)]
    seqlen = rng.integers(0, 50, size=n)
    req_end = rng.integers(0, n, size=int(rng.integers(1, 30)))
    table = rng.permutation(int(seqlen.sum())) if seed % 2 else None
    inp = plan_input(parent, seqlen, req_end, node_tokens=table,
                     growable=rng.random(req_end.size) < 0.5)
    shuffled = relabel(inp, rng.permutation(n))
    assert (shuffled.parent > np.arange(n)).any()
    for flat in (False, True):
        build(shuffled, group=4, params=FastTreeParams(gamma=float(seed)), headroom=4 * (seed % 3),
              kv_split_sizes=(16, 4), flat=flat)


def test_cycle_on_a_request_path_is_rejected():
    inp = plan_input([2, 0, 1, -1], [3, 3, 3, 3], [1, 3])
    with pytest.raises(ValueError, match="cycle"):
        build_plan(inp, num_qo_heads=1, num_kv_heads=1, head_dim=16)


def test_upload_expands_runs_where_the_device_buffer_lives():
    # A contiguous plan hands its kv entries to PlanBuffers.upload as runs: expanded in
    # the staging buffer on the CPU, and from the runs alone when the buffers have a
    # separate device copy (a CPU tensor stands in for a GPU buffer here): the device
    # copy then holds the same entries as the CPU plan, the staging kv region does not.
    inp = plan_input([-1, 0, 0, 1, 1], [40, 5, 7, 3, 9], [3, 4, 2, 0])
    cpu = build(inp, group=2, **NO_ADJUST)
    stand_in = PlanBuffers(2, 16, "cpu", kv_entries=4 * cpu.num_kv_entries)
    stand_in.dev = stand_in.host.clone()
    stand_in.dev.fill_(-5)
    stand_in.host.fill_(-7)
    plan = build_plan(inp, num_qo_heads=2, num_kv_heads=1, head_dim=16,
                      params=FastTreeParams(), buffers=stand_in, **NO_ADJUST)
    assert plan.buffers.dev is not plan.buffers.host  # no reallocation happened
    n = plan.num_kv_entries
    want = cpu.tensors()["kv_indices"][:n].tolist()
    assert plan.buffers.dev_view("kv_indices", n).tolist() == want
    assert set(plan.buffers.host_view("kv_indices", n).tolist()) == {-7}
    for name, m in (("vnode_kv_start", plan.num_vnodes), ("vnode_kv_len", plan.num_vnodes),
                    ("vnode_slot0", plan.num_vnodes), ("mid_q_rows", plan.num_mid_rows)):
        assert torch.equal(plan.tensors()[name][:m], cpu.tensors()[name][:m]), name


# ---------------------------------------------------------- fused phase 1


# Levels of 16-token nodes: with the default tiles (FastTreeParams.for_heads) the top
# levels are phase 0 and the groups below them each give a request a phase-1 partial.
DEEP_SPEC = "1,2,4,8,16,128 16,16,16,16,16,16"


def deep_input() -> PlanInput:
    return spec_input(DEEP_SPEC)


@pytest.mark.parametrize("node_tokens", [False, True], ids=["seed-layout", "slot-table"])
def test_fused_phase1_one_partial_per_request(monkeypatch, node_tokens):
    monkeypatch.setattr(plan_module, "FUSE_MIN_PROGRAMS", 0)
    inp = deep_input()
    if node_tokens:
        inp = attrs.evolve(inp, node_tokens=np.random.default_rng(3).permutation(
            int(inp.seqlen.sum())).astype(np.int32))
    monkeypatch.setattr(plan_module, "FUSE_PHASE1", False)
    plain = build(inp, group=1, hk=2, params=None)
    monkeypatch.setattr(plan_module, "FUSE_PHASE1", True)
    fused = build(inp, group=1, hk=2, params=None)  # check_plan: every request sees its path once
    assert not plain.masked and fused.masked
    assert len(plain.phases) == len(fused.phases) == 2
    assert phase1_partials(plain).max() >= 2
    assert (phase1_partials(fused) == 1).all()
    assert fused.num_vnodes < plain.num_vnodes
    # Phase 0 is untouched but for its mark (no masks there: its launch skips them);
    # fused vnodes hold at most the phase's q tile (<= 32).
    assert fused.phases[0] == plain.phases[0]._replace(masked=False)
    assert fused.phases[1].masked and fused.phases[1].q_tile <= 32
    # The masks: -1 outside fused vnodes; inside, each entry is attended by someone.
    mask = host(fused, "kv_mask", fused.num_kv_entries)
    assert all(m == -1 for m in mask[:vnode_table(fused)[fused.phases[1].vnode_offset][0]])
    assert all(m != 0 for m in mask)
    # Fused plans merge in phase 1 at every group (the program bounds allow it here).
    assert fused.finish == expected_finish(fused, 1)


def test_unmasked_phases_switch(monkeypatch):
    # UNMASKED_PHASES off: every phase of a masked plan is marked masked, the plan
    # otherwise the same.
    monkeypatch.setattr(plan_module, "FUSE_MIN_PROGRAMS", 0)
    inp = deep_input()
    on = build(inp, group=1, hk=2, params=None)
    monkeypatch.setattr(plan_module, "UNMASKED_PHASES", False)
    off = build(inp, group=1, hk=2, params=None)
    assert [ph.masked for ph in on.phases] == [False, True]
    assert [ph.masked for ph in off.phases] == [True, True]
    assert [ph._replace(masked=True) for ph in on.phases] == list(off.phases)
    assert vnode_table(on) == vnode_table(off)


def test_fused_phase1_off_by_guard(monkeypatch):
    inp = deep_input()
    monkeypatch.setattr(plan_module, "FUSE_MIN_PROGRAMS", 10 ** 6)
    assert not build(inp, params=None).masked
    monkeypatch.setattr(plan_module, "FUSE_MIN_PROGRAMS", 0)
    assert build(inp, params=None).masked
    total = int(inp.seqlen.sum())  # the groups hold at least every token once
    monkeypatch.setattr(plan_module, "FUSE_MAX_KV_ENTRIES", total - 1)
    assert not build(inp, params=None).masked
    monkeypatch.setattr(plan_module, "FUSE_MAX_KV_ENTRIES", None)
    assert build(inp, params=None).masked
    # With growth headroom too (the growing requests share their sets' room).
    grow = attrs.evolve(inp, growable=np.ones(inp.req_end.size, dtype=bool))
    plan = build(grow, headroom=4, params=None)
    assert plan.masked and (plan.tail_vnode >= 0).all() and plan.tail_count.max() > 1


def decode_device(backend: str) -> torch.device:
    """The device a decode test of ``backend`` runs on (skips Triton without a GPU or
    the interpreter)."""
    from kernels.backend import interpreter_enabled

    on_gpu = torch.cuda.is_available() and not interpreter_enabled()
    if backend == "triton" and not (on_gpu or interpreter_enabled()):
        pytest.skip("Triton needs a GPU or the interpreter")
    return torch.device("cuda" if on_gpu else "cpu")


def decode_error(plan: DecodePlan, inp: PlanInput, backend: str, seed: int,
                 decode=None) -> float:
    """Relative error of ``plan.run`` (or of ``decode(q, k, v, o)``; float16, head_dim
    32, NaN-poisoned output) against the float32 reference over each request's path;
    fails on NaN."""
    dev = plan.buffers.device
    hq, hk = plan.num_qo_heads, plan.num_kv_heads
    g = torch.Generator().manual_seed(seed)
    b, s = inp.req_end.size, int(inp.seqlen.sum())
    q = torch.randn(b, hq, 32, generator=g).to(dev, torch.float16)
    k = torch.randn(s, hk, 32, generator=g).to(dev, torch.float16)
    v = torch.randn(s, hk, 32, generator=g).to(dev, torch.float16)
    o = torch.full_like(q, float("nan"))
    if decode is None:
        plan.run(q, k, v, o, backend=backend)
    else:
        decode(q, k, v, o)
    slots = [torch.as_tensor(p, device=dev) for p in expected_paths(inp)]
    ref = reference_decode(q, k, v, slots, 1 / math.sqrt(32))
    assert not torch.isnan(o).any()
    return ((o.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("finish", [False, True], ids=["stage2", "finish"])
def test_fused_plan_matches_reference(monkeypatch, backend, finish):
    # A fused plan merged by stage 2, or by its masked phase 1 (the finishing launch).
    dev = decode_device(backend)
    monkeypatch.setattr(plan_module, "FUSE_MIN_PROGRAMS", 0)
    monkeypatch.setattr(plan_module, "FINISH_MIN_PROGRAMS", 0 if finish else 10 ** 6)
    inp = deep_input()
    plan = build_plan(inp, num_qo_heads=2, num_kv_heads=2, head_dim=32, device=dev)
    assert plan.masked and plan.finish == finish
    assert decode_error(plan, inp, backend, seed=21) <= 2e-3


def test_run_stage1_phase_by_phase_matches_reference(monkeypatch):
    # A fused plan (phase 0 unmasked, phase 1 masked) launched a phase at a time through
    # run_stage1 (NaN-poisoned partials), then stage 2 over every mid row: the reference.
    from kernels.tree_decode import tree_decode_stage2

    dev = decode_device("triton")
    monkeypatch.setattr(plan_module, "FUSE_MIN_PROGRAMS", 0)
    inp = deep_input()
    plan = build_plan(inp, num_qo_heads=2, num_kv_heads=2, head_dim=32, device=dev)
    assert plan.masked and [ph.masked for ph in plan.phases] == [False, True]

    def by_phase(q, k, v, o):
        t = plan.kernel_tensors(q.dtype)
        t["mid_o"].fill_(float("nan"))
        for ph in plan.phases:
            plan.run_stage1(q, k, v, ph, 1 / math.sqrt(32))
        tree_decode_stage2(t["mid_o"], t["mid_lse"], o, t["req_mid_start"],
                           t["req_mid_len"], t["req_mid_rows"])

    assert decode_error(plan, inp, "triton", seed=22, decode=by_phase) <= 2e-3


@settings(max_examples=100, deadline=None)
@given(forests(), st.booleans())
def test_random_forests_fused_and_packed(case, pack):
    # Every fusion the planner may make keeps each request's path once (check_plan reads
    # the masks), with sets of one to many groups and packed single-request groups.
    inp, group, kwargs = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_module, "FUSE_MIN_PROGRAMS", 0)
        mp.setattr(plan_module, "FUSE_PACK_MIN_PROGRAMS", 0)
        mp.setattr(plan_module, "FUSE_PACK", pack)
        plan = build(inp, group=group, hk=1, **kwargs)
    if plan.masked:
        mask = np.asarray(host(plan, "kv_mask", plan.num_kv_entries))
        assert (mask != 0).all()
        assert plan.finish == expected_finish(plan, group)


def test_packed_leaves_share_vnodes(monkeypatch):
    # 40 leaves of one request under a shared root: packing puts q_tile of them in a
    # vnode (16 at group 1), each leaf's entries masked to its own request.
    inp = plan_input([-1] + [0] * 40, [100] + [5] * 40, list(range(1, 41)))
    monkeypatch.setattr(plan_module, "FUSE_MIN_PROGRAMS", 0)
    monkeypatch.setattr(plan_module, "FUSE_PACK_MIN_PROGRAMS", 0)
    monkeypatch.setattr(plan_module, "FUSE_PACK", False)
    plain = build(inp, params=None, **NO_ADJUST)
    monkeypatch.setattr(plan_module, "FUSE_PACK", True)
    packed = build(inp, params=None, **NO_ADJUST)
    assert not plain.masked and packed.masked
    assert plain.phases[-1].num_vnodes == 40
    assert packed.phases[-1].num_vnodes == 3  # 16 + 16 + 8 requests
    # Outside the program bounds nothing packs.
    monkeypatch.setattr(plan_module, "FUSE_PACK_MAX_PROGRAMS", 2)
    assert not build(inp, params=None, **NO_ADJUST).masked
    mask = host(packed, "kv_mask", packed.num_kv_entries)
    off = vnode_table(packed)[packed.phases[-1].vnode_offset][0]
    assert mask[off:off + 10] == [1] * 5 + [2] * 5


def test_fused_programs_ok_bounds():
    # A packed phase 1 is kept within FUSE_PACK_MIN_PROGRAMS .. FUSE_PACK_MAX_PROGRAMS,
    # an unpacked one from FUSE_MIN_PROGRAMS up; None or 0 is no bound.
    lo, hi, least = (plan_module.FUSE_PACK_MIN_PROGRAMS, plan_module.FUSE_PACK_MAX_PROGRAMS,
                     plan_module.FUSE_MIN_PROGRAMS)
    ok = plan_module._fused_programs_ok
    assert [ok(n, True) for n in (lo - 1, lo, hi, hi + 1)] == [False, True, True, False]
    assert [ok(n, False) for n in (least - 1, least, 10 ** 6)] == [False, True, True]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_module, "FUSE_PACK_MIN_PROGRAMS", None)
        mp.setattr(plan_module, "FUSE_PACK_MAX_PROGRAMS", 0)
        mp.setattr(plan_module, "FUSE_MIN_PROGRAMS", None)
        assert ok(0, True) and ok(10 ** 9, True) and ok(0, False)


@pytest.mark.parametrize("pack_min", [0, 4], ids=["packed", "pack-refused"])
def test_fusion_bounds_asked_before_rows_same_plans(monkeypatch, pack_min):
    # The fusion analysis asks its program bounds once the new groups are known, before
    # it builds their rows and masks: the plans are those of asking afterwards. 40 leaves
    # of one request, and 8 pairs of two-request groups, under a shared root: packing
    # gives 3 + 8 phase-1 programs, refused below 4 + 8 = 12 (then fused without packing).
    from benchmarks.replan_ab import plan_summary, same_plans

    parent = [-1] + [0] * 40 + [0] * 8 + [n for n in range(41, 49) for _ in range(2)]
    seqlen = [100] + [5] * 40 + [30] * 8 + [4] * 16
    inp = plan_input(parent, seqlen, list(range(1, 41)) + list(range(49, 65)) * 2)
    monkeypatch.setattr(plan_module, "FUSE_MIN_PROGRAMS", 0)
    monkeypatch.setattr(plan_module, "FUSE_PACK_MIN_PROGRAMS", pack_min + 8 if pack_min else 0)
    early = build(inp, params=None, **NO_ADJUST)
    real = plan_module._fuse_phase1
    calls = []

    def late(groups, tiling, b, q_tile, pack, accept=None):
        fused = real(groups, tiling, b, q_tile, pack)
        calls.append((pack, fused is not None and accept(*fused[:2])))
        return fused if fused is None or accept(*fused[:2]) else None

    monkeypatch.setattr(plan_module, "_fuse_phase1", late)
    assert same_plans(plan_summary(early), plan_summary(build(inp, params=None, **NO_ADJUST)))
    assert early.masked
    assert calls[0] == (True, not pack_min)  # packing kept, or refused by its bound
    if pack_min:
        assert calls[1][0] is False


# ---------------------------------------------------------- inlined request paths


@settings(max_examples=60, deadline=None)
@given(forests())
def test_preorder_positions_match_a_depth_first_walk(case):
    inp = case[0]
    parent = inp.parent.tolist()
    children = [[] for _ in parent]
    roots = []
    for i, p in enumerate(parent):
        (children[p] if p >= 0 else roots).append(i)
    walk = []

    def visit(x):
        walk.append(x)
        for c in children[x]:
            visit(c)

    for r in roots:
        visit(r)
    pos = plan_module._preorder_positions(plan_module._Topology(inp))
    assert pos.tolist() == np.argsort(walk).tolist()


def inline_settings(mp, programs=0, max_kv=1024):
    mp.setattr(plan_module, "INLINE_MIN_PROGRAMS", programs)
    mp.setattr(plan_module, "INLINE_MAX_KV", max_kv)


def test_inline_plan_one_masked_launch(monkeypatch):
    # DEEP_SPEC: 128 leaves under 16 level-4 nodes (8 each). At GQA group 4 a vnode holds
    # 64 // 4 = 16 neighbouring leaves: the paths' union is 4 shared nodes, two level-4
    # nodes and 16 leaves, 22 nodes of 16 tokens.
    inline_settings(monkeypatch)
    inp = deep_input()
    plan = build(inp, group=4, hk=2, params=None)  # check_plan: each path once
    assert plan.masked and len(plan.phases) == 1 and plan.phases[0].masked
    assert plan.phases[0].q_tile == 16 and plan.num_vnodes == 128 // 16
    assert not plan.needs_stage2 and plan.direct and not plan.finish
    assert plan.num_mid_rows == inp.req_end.size
    assert {kl for _, kl, _, _ in vnode_table(plan)} == {22 * 16}
    mask = np.asarray(host(plan, "kv_mask", plan.num_kv_entries))
    assert (mask != 0).all()
    # The shared nodes are attended by all 16 requests of a vnode, a leaf by one.
    assert (mask == 0xFFFF).sum() == 8 * 4 * 16
    assert sorted(set(mask[np.bitwise_and(mask, mask - 1) == 0].tolist())) == [
        1 << i for i in range(16)]


def inlined(inp, group, hk=1, **kw) -> bool:
    """Whether the plan built for ``inp`` is not the one built with INLINE off."""
    plan = build(inp, group=group, hk=hk, params=None, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_module, "INLINE", False)
        off = build(inp, group=group, hk=hk, params=None, **kw)
    return (vnode_table(plan), plan.phases) != (vnode_table(off), off.phases)


def test_inline_plan_conditions(monkeypatch):
    inp = deep_input()
    inline_settings(monkeypatch)
    assert inlined(inp, 2) and inlined(inp, 1, hk=2)
    # Not over the KV bound (at group 2 a vnode holds 32 leaves: the union of their paths
    # is 41 nodes of 16 tokens, one path 6) or under the program bound, not in flat
    # plans; with growth headroom too.
    with pytest.MonkeyPatch.context() as mp:
        inline_settings(mp, max_kv=6 * 16)  # one path fits, no union of 32 does
        assert not inlined(inp, 2)
    with pytest.MonkeyPatch.context() as mp:
        inline_settings(mp, programs=128 // 32 * 2 + 1)  # 4 vnodes x 2 heads = 8
        assert not inlined(inp, 2, hk=2)
        inline_settings(mp, programs=128 // 32 * 2)
        assert inlined(inp, 2, hk=2)
    assert not inlined(inp, 2, flat=True)
    grow = attrs.evolve(inp, growable=np.ones(inp.req_end.size, dtype=bool))
    assert inlined(grow, 2, headroom=4)
    plan = build(grow, group=2, hk=1, headroom=4, params=None)
    assert plan.masked and (plan.tail_vnode >= 0).all() and plan.tail_count.max() > 1
    # A request without tokens keeps the usual plan.
    assert not inlined(plan_input([-1, 0, 0], [0, 0, 3], [1, 2]), 4)
    assert inlined(plan_input([-1, 0, 0], [2, 0, 3], [1, 2]), 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("group", [1, 2, 4, 16])
def test_inline_plan_matches_reference(monkeypatch, backend, group):
    dev = decode_device(backend)
    inline_settings(monkeypatch)
    inp = deep_input()
    plan = build_plan(inp, num_qo_heads=group, num_kv_heads=1, head_dim=32, device=dev)
    assert plan.masked and len(plan.phases) == 1 and not plan.needs_stage2
    assert decode_error(plan, inp, backend, seed=22) <= 2e-3


@settings(max_examples=100, deadline=None)
@given(forests())
def test_random_forests_inlined(case):
    # Wherever the planner inlines, each request attends its path once (check_plan reads
    # the masks) from a single masked phase without stage 2.
    inp, group, kwargs = case
    with pytest.MonkeyPatch.context() as mp:
        inline_settings(mp, max_kv=10 ** 6)
        plan = build(inp, group=group, hk=1, **kwargs)
    expect = not kwargs["flat"] and min(map(len, expected_paths(inp))) > 0
    if expect:
        assert plan.masked and len(plan.phases) == 1 and not plan.needs_stage2
        assert plan.phases[0].q_tile == min(32, 64 // group)
        assert plan.num_vnodes == -(-inp.req_end.size // plan.phases[0].q_tile)


@settings(max_examples=100, deadline=None)
@given(forests(), st.integers(1, 32), st.integers(0, 200))
def test_inline_blocks_bounds_only_reject_what_is_over(case, reqs, max_len):
    # The early bounds (average reads per block, longest path) never turn down a plan
    # whose blocks all fit.
    topo = plan_module._Topology(case[0])
    full = plan_module._inline_blocks(topo, reqs, 10 ** 9)
    got = plan_module._inline_blocks(topo, reqs, max_len)
    if full is None:  # an empty request
        assert got is None
    else:
        assert (got is None) == (int(full[4].max()) > max_len)


def drafts_input(seqs=3, context=100, branching=(3, 2)) -> PlanInput:
    """Speculative verification: ``seqs`` contexts of ``context`` tokens, each with a
    draft tree of 1-token nodes (``branching`` children per level), one request ending
    at every draft node."""
    parent, seqlen = [], []
    for _ in range(seqs):
        level = [len(parent)]
        parent.append(-1)
        seqlen.append(context)
        for fan in branching:
            nxt = []
            for p in level:
                for _ in range(fan):
                    nxt.append(len(parent))
                    parent.append(p)
                    seqlen.append(1)
            level = nxt
    req_end = [i for i, p in enumerate(parent) if p >= 0]
    return plan_input(parent, seqlen, req_end)


def shared_inline_settings(mp, min_len=64, max_kv=1024, max_reads=10.0):
    """Long nodes from ``min_len`` tokens, blocks of at most ``max_kv`` entries, and by
    default whatever the plans read (the read bound has its own test)."""
    mp.setattr(plan_module, "SHARED_INLINE", min_len)
    mp.setattr(plan_module, "INLINE_MAX_KV", max_kv)
    mp.setattr(plan_module, "SHARED_INLINE_MAX_READS", max_reads)


def test_shared_inline_plan_layout(monkeypatch):
    # Three contexts of 100 tokens with 3 + 6 drafts each: 27 requests. Whole paths
    # (101-102 entries) are over a 64-entry bound, so INLINE refuses; with long nodes
    # from 64 tokens the contexts stay shared and the drafts are inlined, at GQA group 4
    # 64 // 4 = 16 requests a block: two blocks.
    inp = drafts_input()
    shared_inline_settings(monkeypatch, max_kv=64)
    monkeypatch.setattr(plan_module, "FINISH_MIN_PROGRAMS", 0)
    kw = dict(NO_ADJUST, kv_split_sizes=(64, 64), params=None)
    plan = build(inp, group=4, hk=2, **kw)
    assert plan.masked and plan.finish and len(plan.phases) == 2
    ph0, ph1 = plan.phases
    assert not ph0.masked and ph1.masked and ph1.q_tile == 16
    table = vnode_table(plan)
    # Phase 0: each context cut 64 + 36, one q tile of its 9 requests.
    assert sorted(kl for _, kl, _, _ in table[:ph0.num_vnodes]) == [36] * 3 + [64] * 3
    assert [ql for _, _, _, ql in table[:ph0.num_vnodes]] == [9] * 6
    # Phase 1: blocks of 16 and 11 requests (depth-first) over their drafts' union (one
    # token each): the first 9 + 7 drafts; then the second context's last draft with
    # its two children (the block's first two requests), and the third context's 9.
    assert [(kl, ql) for _, kl, _, ql in table[ph0.num_vnodes:]] == [(16, 16), (12, 11)]
    # Every request has one partial in phase 1, after its context's two.
    assert host(plan, "req_mid_len", inp.req_end.size) == [3] * inp.req_end.size
    # Off, or where no node is long, or the drafts do not fit: the usual plans.
    for mp_args in (dict(min_len=0), dict(min_len=101), dict(max_kv=15)):
        with pytest.MonkeyPatch.context() as mp:
            shared_inline_settings(mp, **dict(dict(min_len=64, max_kv=64), **mp_args))
            other = build(inp, group=4, hk=2, **kw)
            assert (vnode_table(other), other.phases) != (table, plan.phases)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("group", [1, 4, 16])
def test_shared_inline_plan_matches_reference(monkeypatch, backend, group):
    dev = decode_device(backend)
    inp = drafts_input(seqs=2, context=70, branching=(2, 2, 2))
    shared_inline_settings(monkeypatch, max_kv=64)
    plan = build_plan(inp, num_qo_heads=group, num_kv_heads=1, head_dim=32, device=dev,
                      kv_split_sizes=(32, 32))
    assert plan.masked and len(plan.phases) == 2 and not plan.phases[0].masked
    check_plan(plan, inp, group)
    assert decode_error(plan, inp, backend, seed=23) <= 2e-3


@settings(max_examples=100, deadline=None)
@given(forests(), st.integers(0, 10 ** 6))
def test_random_forests_shared_inline(case, pick):
    # Wherever long nodes (from one of the tree's longer node lengths) stay shared beside
    # inlined short ones, each request attends its path once (check_plan reads the
    # masks) and has exactly one partial in the masked phase 1.
    inp, group, kwargs = case
    lens = sorted({int(x) for x in inp.seqlen if x > 0}) or [1]
    min_len = lens[len(lens) // 2 + pick % (len(lens) - len(lens) // 2)]
    with pytest.MonkeyPatch.context() as mp:
        shared_inline_settings(mp, min_len=min_len, max_kv=10 ** 6)
        mp.setattr(plan_module, "INLINE", False)
        mp.setattr(plan_module, "FUSE_PHASE1", False)  # masked plans are then this form
        plan = build(inp, group=group, hk=1, **kwargs)
    if plan.masked:
        last = plan.phases[-1]
        assert last.masked and last.q_tile == min(32, 64 // group)
        table = vnode_table(plan)[last.vnode_offset:]
        rows = host(plan, "mid_q_rows", plan.num_mid_rows)
        reqs = [rows[r] for _, _, qs, ql in table for r in range(qs, qs + ql)]
        assert sorted(reqs) == list(range(inp.req_end.size))


def shared_inlined(inp, group, hk=1, **kw) -> bool:
    """Whether the plan built for ``inp`` keeps long nodes shared beside inlined ones
    (an unmasked phase 0 and a masked phase 1 of ``min(32, 64 // group)``-request
    tiles, every request with one partial there)."""
    plan = build(inp, group=group, hk=hk, params=None, **kw)
    return (plan.masked and len(plan.phases) == 2 and not plan.phases[0].masked
            and plan.phases[1].q_tile == min(32, 64 // group))


def test_shared_inline_rule(monkeypatch):
    # With the defaults (long nodes from 256 tokens, at most 0.8x the entries read):
    # four 300-token contexts with 3 + 6 + 12 drafts each, at GQA group 1. The cost
    # model gives some draft groups their context's tokens (2,516 entries read); kept
    # shared, each context is read once (1,286).
    drafts = drafts_input(seqs=4, context=300, branching=(3, 2, 2))
    assert shared_inlined(drafts, 1, hk=4)
    monkeypatch.setattr(plan_module, "SHARED_INLINE_MAX_READS", 0.5)
    assert not shared_inlined(drafts, 1, hk=4)
    monkeypatch.setattr(plan_module, "SHARED_INLINE_MAX_READS", 0.8)
    # A shared root with 40 leaves of 8 tokens: the usual plan reads each entry once
    # already, so packing the leaves beside the root is not used.
    fan = plan_input([-1] + [0] * 40, [300] + [8] * 40, list(range(1, 41)))
    assert not shared_inlined(fan, 1, hk=4)
    monkeypatch.setattr(plan_module, "SHARED_INLINE_MAX_READS", 10.0)
    assert shared_inlined(fan, 1, hk=4)
    monkeypatch.setattr(plan_module, "SHARED_INLINE_MAX_READS", 0.8)
    # With growth headroom too; not in flat plans, not where no node is long.
    grow = attrs.evolve(drafts, growable=np.ones(drafts.req_end.size, dtype=bool))
    assert shared_inlined(grow, 1, hk=4, headroom=4)
    assert not shared_inlined(drafts, 1, hk=4, flat=True)
    monkeypatch.setattr(plan_module, "SHARED_INLINE", 301)
    assert not shared_inlined(drafts, 1, hk=4)


# ------------------------------------------------- growth in masked layouts


def _masked_growth_input(form, mp):
    """An input whose plan takes a masked form, every leaf request growable, and the
    build keywords: whole paths inlined, fused phase-1 sets, long nodes shared beside
    inlined short ones."""
    if form == "inline":
        inline_settings(mp)
        inp, kw = deep_input(), dict(group=2, hk=1)
    elif form == "fused":
        mp.setattr(plan_module, "FUSE_MIN_PROGRAMS", 0)
        inp, kw = deep_input(), dict(group=1, hk=2)
    else:
        shared_inline_settings(mp, max_kv=64)
        inp = drafts_input()
        kw = dict(group=4, hk=1, **dict(NO_ADJUST, kv_split_sizes=(64, 64)))
    # Requests ending at leaves grow; the others (drafts at inner nodes) cannot.
    leaf = np.ones(inp.parent.size, dtype=bool)
    leaf[inp.parent[inp.parent >= 0]] = False
    return attrs.evolve(inp, growable=leaf[inp.req_end]), dict(kw, params=None)


def _shuffled_runs(n: int, rng) -> np.ndarray:
    """A slot table of ``n`` entries: runs of consecutive slots in random order."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, max(1, n // 20)), replace=False))
    blocks = np.split(np.arange(n), cuts)
    return np.concatenate([blocks[i] for i in rng.permutation(len(blocks))])


@pytest.mark.parametrize("table", [False, True], ids=["seed-layout", "slot-table"])
@pytest.mark.parametrize("headroom", [0, 3])
@pytest.mark.parametrize("form", ["cost-model", "inline", "fused", "shared"])
def test_plans_expanded_on_a_device_copy_match_the_cpu_plans(monkeypatch, form, headroom, table):
    # With a separate device copy of the buffers (a CPU tensor stands in for a GPU
    # buffer), a plan's kv entries and row masks are expanded there from its run table
    # (ranges of the slot table, each group's chain placed before its headroom): on
    # every entry a vnode reads they equal the CPU plan's, the other arrays are the
    # same, and the staging buffer's kv and mask regions stay as they were (poisoned).
    if form == "cost-model":
        monkeypatch.setattr(plan_module, "INLINE", False)
        monkeypatch.setattr(plan_module, "SHARED_INLINE", 0)
        monkeypatch.setattr(plan_module, "FUSE_PHASE1", False)
        inp = deep_input()
        leaf = np.ones(inp.parent.size, dtype=bool)
        leaf[inp.parent[inp.parent >= 0]] = False
        inp, kw = attrs.evolve(inp, growable=leaf[inp.req_end]), dict(group=2, hk=2)
    else:
        inp, kw = _masked_growth_input(form, monkeypatch)
    if table:
        rng = np.random.default_rng(len(form) + headroom)
        inp = attrs.evolve(inp, node_tokens=_shuffled_runs(int(inp.seqlen.sum()), rng))
    cpu = build(inp, headroom=headroom, **kw)
    assert cpu.masked == (form != "cost-model")
    assert (cpu.tail_vnode >= 0).any() == (headroom > 0)
    sb = stand_in_buffers(kw["group"] * kw["hk"], 16, vnodes=1024, requests=1024,
                          mid_rows=4096, kv_entries=1 << 14, runs=1024, slots=1 << 14)
    sb.host.fill_(-7)
    dev = build(inp, headroom=headroom, buffers=sb, **kw)
    assert dev.buffers.dev is not dev.buffers.host  # not reallocated
    n = cpu.num_kv_entries
    assert dev.num_kv_entries == n and dev.num_vnodes == cpu.num_vnodes
    live = np.zeros(n, dtype=bool)
    for s, ln in zip(cpu.vnode_kv_start_host, cpu.vnode_kv_len_host):
        live[s:s + ln] = True
    names = ["kv_indices"] + (["kv_mask"] if cpu.masked else [])
    for name in names:
        want = cpu.buffers.dev_view(name, n).numpy()[live]
        assert np.array_equal(dev.buffers.dev_view(name, n).numpy()[live], want), name
        assert (dev.buffers.host_view(name, n) == -7).all(), name
    for name, m in (("vnode_kv_start", cpu.num_vnodes), ("vnode_kv_len", cpu.num_vnodes),
                    ("vnode_slot0", cpu.num_vnodes), ("mid_q_rows", cpu.num_mid_rows)):
        assert torch.equal(dev.tensors()[name][:m], cpu.tensors()[name][:m]), name


@pytest.mark.parametrize("device_step", [False, True], ids=["host-step", "device-step"])
@pytest.mark.parametrize("form", ["inline", "fused", "shared"])
def test_masked_plans_grow_in_place(monkeypatch, form, device_step):
    # The masked forms keep their layout with growth headroom: the requests growing in
    # one masked range share its room (headroom entries each), every new entry taking
    # the range's next free one with its request's row bit. Random steps (every request;
    # a random subset in random order; several tokens for one request) keep the paths,
    # lengths and results exact until a range is full; then the step is refused and
    # nothing changes. The device step runs the tail kernel on the GPU, or without one
    # on a separate CPU copy of the buffers in the interpreter.
    from kernels.backend import interpreter_enabled

    inp, kw = _masked_growth_input(form, monkeypatch)
    headroom = 3
    ref = build(attrs.evolve(inp, growable=None), **kw)
    on_gpu = torch.cuda.is_available() and not interpreter_enabled()
    if device_step and not (on_gpu or interpreter_enabled()):
        pytest.skip("the tail kernel needs a GPU or TRITON_INTERPRET=1")
    # Room for the plans below, so that the stand-in is not reallocated as plain buffers.
    buffers = (stand_in_buffers(ref.num_qo_heads, ref.head_dim, vnodes=1024, requests=1024,
                                mid_rows=4096, kv_entries=1 << 14, runs=1024)
               if device_step and not on_gpu else None)
    device = "cuda" if device_step and on_gpu else "cpu"
    plan = build(inp, headroom=headroom, buffers=buffers, device=device, **kw)
    assert plan.masked and plan.phases == ref.phases
    assert (plan.buffers.dev is not plan.buffers.host) == device_step
    grow = np.flatnonzero(plan.tail_vnode >= 0)
    assert np.array_equal(grow, np.flatnonzero(inp.growable))
    assert (plan.tail_count[grow] > 1).any()
    paths = expected_paths(inp)
    nslots = int(inp.seqlen.sum())
    q, k, v = (t.to(plan.device) for t in _qkv(plan, nslots + headroom * len(paths), seed=11))
    rng = np.random.default_rng(len(form))
    nxt = [nslots]
    used = {int(r): 0 for r in grow}
    every = grow.size == len(paths)  # the every-request step needs every request growing

    def state():
        return (plan.buffers.host.clone(), plan.buffers.dev.clone(),
                plan.vnode_kv_len_host.copy())

    def check():
        if device_step:
            # The every-request step writes the device copy alone (the runs read it).
            nv = plan.num_vnodes
            assert plan.buffers.dev_view("vnode_kv_len", nv).tolist() == \
                plan.vnode_kv_len_host.tolist()
        else:
            assert plan_slots(plan) == [sorted(p) for p in paths]
        _check_run(plan, paths, q, k, v, "torch")

    steps = refusals = 0
    for _ in range(4 * headroom):
        kind = rng.integers(3) if every else 1 + rng.integers(2)
        if kind == 0:
            rows, counts = None, {int(r): 1 for r in grow}
        elif kind == 1:
            rows = rng.permutation(grow)[:rng.integers(1, grow.size + 1)]
            counts = {int(r): 1 for r in rows}
        else:
            rows = int(rng.choice(grow))
            counts = {rows: int(rng.integers(1, 3))}
        n = sum(counts.values())
        # A range holds headroom entries per growing request: full when its requests
        # would use more than that together.
        rid = plan._ranges.rid if plan._ranges else None
        fits = True
        if rid is not None:
            per = {}
            for r, c in counts.items():
                per[int(rid[r])] = per.get(int(rid[r]), 0) + c
            fill = {}
            for r, c in used.items():
                fill[int(rid[r])] = fill.get(int(rid[r]), 0) + c
            fits = all(fill.get(g, 0) + c <= headroom * int((rid[grow] == g).sum())
                       for g, c in per.items())
        before = state()
        sl = np.arange(nxt[0], nxt[0] + n)
        if kind == 0:
            ok = plan.extend_tails(None, sl)
            assert not ok or (plan._tails.launch is not None) == device_step  # the kernel ran
        elif kind == 1:
            ok = plan.extend_tails(rows, sl)
        else:
            ok = plan.extend_tail(rows, sl)
        if rid is not None:
            assert ok == fits
        if not ok:
            refusals += 1
            after = state()
            assert all(torch.equal(a, b) for a, b in zip(after[:2], before[:2]))
            assert np.array_equal(after[2], before[2])
            continue
        steps += 1
        nxt[0] += n
        it = iter(sl.tolist())
        order = ([int(r) for r in grow] if kind == 0 else
                 [int(r) for r in rows] if kind == 1 else [rows] * n)
        for r in order:
            paths[r].append(next(it))
            used[r] += 1
        check()
    assert steps >= 2 and refusals >= 1
    # Triton's float32 dots on a GPU may round through TF32.
    _check_run(plan, paths, q, k, v, "auto", tol=2e-3 if plan.device.type == "cuda" else 1e-4)
