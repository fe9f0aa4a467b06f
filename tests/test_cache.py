"""Tests of treecache.TreeKVCache on CPU.

Two layers of tests:

* Deterministic tests with exact expectations: page ids, stats after known sequences,
  node splits and merges, page_size > 1, the append-only decode loop (no re-plan), lazy
  re-planning after fork/prune, ``tree_info`` feeding the functional API, ``to_networkx``,
  every error type and message, and the memory of a beam search.
* A hypothesis state machine of random new_request / append / fork / prune /
  decode-step / speculative-draft / attend sequences, checked against a plain model in
  which every request owns its list of K/V tokens: ``check()`` after every step, and
  ``attend`` (all layers, plus random subsets and orders of requests) against
  ``kernels.reference_decode`` over the model's tokens. The pool is small, so
  OutOfPagesError happens; each time, the cache must be exactly as before the call.

Attention runs through the Triton kernels (the Triton interpreter on a CPU-only machine)
or the torch implementation of the same plan; ``reference_decode`` is the oracle.

Environment variables (for longer randomized runs; defaults keep the file fast):

* ``TREECACHE_HYPOTHESIS_EXAMPLES`` - examples of the float32 Triton state machine
  (default 20; the float16 run uses half as many, the torch-backend run as many).
* ``TREECACHE_HYPOTHESIS_STEPS`` - steps per example (default 15).

Example: ``TREECACHE_HYPOTHESIS_EXAMPLES=500 python -m pytest tests/test_cache.py``.
"""

from __future__ import annotations

import os

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kv_model import RequestKV
from treecache import (
    OutOfPagesError,
    ShapeMismatchError,
    TreeCacheError,
    TreeKVCache,
    UnknownRequestError,
    fasttree_decode,
    fasttree_preparation,
)

L, HQ, HK, D = 2, 4, 2, 16
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

EXAMPLES = int(os.environ.get("TREECACHE_HYPOTHESIS_EXAMPLES", "20"))
STEPS = int(os.environ.get("TREECACHE_HYPOTHESIS_STEPS", "15"))


# ============================================================================ helpers


def make_cache(capacity=64, *, num_layers=L, page_size=1, dtype=torch.float32,
               backend="torch", **kw) -> TreeKVCache:
    return TreeKVCache(num_layers, HQ, HK, D, capacity, page_size=page_size, dtype=dtype,
                       device="cpu", backend=backend, **kw)


def Model(num_layers=L, dtype=torch.float32, generator=None) -> RequestKV:
    """The per-request oracle at this file's head layout."""
    return RequestKV(num_layers, HQ, HK, D, dtype=dtype, generator=generator)


def assert_attends(cache, model, q, layer=0, requests=None, out=None):
    """cache.attend(q, layer, requests) equals the model's reference (row order of requests)."""
    reqs = cache.requests if requests is None else list(requests)
    got = cache.attend(q, layer, requests, out=out)
    ref = model.reference(q, layer, reqs, cache.sm_scale, cache.logit_cap)
    tol = TOL[cache.dtype]
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)
    return got


def assert_all_layers(cache, model, requests=None):
    reqs = cache.requests if requests is None else list(requests)
    for layer in range(cache.num_layers):
        assert_attends(cache, model, model.queries(len(reqs)), layer, requests)


def ids(a) -> list[int]:
    return np.asarray(a).tolist()


def snapshot(cache: TreeKVCache) -> dict:
    """Everything observable about the cache's state (used to assert 'unchanged')."""
    g = cache.to_networkx()
    alloc = cache.pool.allocator
    return dict(
        requests=cache.requests,
        lengths={r: cache.length(r) for r in cache.requests},
        slots={r: ids(cache.slots(r)) for r in cache.requests},
        nodes=sorted((n, d["seqlen"], tuple(d["slots"]), tuple(d["pages"]), tuple(d["requests"]))
                     for n, d in g.nodes(data=True)),
        edges=sorted(g.edges()),
        free=ids(alloc.free_pages()),
        refcount=ids(alloc.refcount),
        stats=cache.stats(),
        plan_version=cache.plan_version,
        k=cache.k_pool.clone(),
        v=cache.v_pool.clone(),
    )


def assert_same_state(before: dict, after: dict) -> None:
    for key in before:
        if key in ("k", "v"):
            assert torch.equal(before[key], after[key]), f"{key} pool changed"
        else:
            assert before[key] == after[key], f"{key} changed"


def graph_path_slots(g: nx.DiGraph, r: int) -> list[int]:
    """Slots of request r's root-to-node path, read from the networkx export."""
    (end,) = [n for n, d in g.nodes(data=True) if r in d["requests"]]
    path = [end]
    while g.in_degree(path[-1]):
        (p,) = g.predecessors(path[-1])
        path.append(p)
    return [s for n in reversed(path) for s in g.nodes[n]["slots"]]


def decode_step(cache, model, reqs=None):
    """reserve + write every layer (the model-loop path); returns the slots."""
    reqs = cache.requests if reqs is None else list(reqs)
    slots = cache.reserve(reqs)
    k, v = model.tokens(len(reqs))
    for layer in range(cache.num_layers):
        cache.write(layer, slots, k[layer], v[layer])
    for i, r in enumerate(reqs):
        model.append(r, k[:, i:i + 1], v[:, i:i + 1])
    return slots


def new_with(cache, model, n):
    r = cache.new_request()
    model.new(r)
    if n:
        k, v = model.tokens(n)
        cache.append(r, k, v)
        model.append(r, k, v)
    return r


def append(cache, model, r, n):
    k, v = model.tokens(n)
    slots = cache.append(r, k, v)
    model.append(r, k, v)
    return slots


def fork(cache, model, r):
    f = cache.fork(r)
    model.fork(r, f)
    return f


# ============================================================================ stats, sharing


def test_stats_after_known_sequence():
    cache = make_cache(64)
    model = Model()
    per_token = 2 * L * HK * D * 4

    def check_stats(requests, nodes, pages, unique, logical):
        s = cache.stats()
        assert (s["requests"], s["nodes"], s["pages_used"]) == (requests, nodes, pages)
        assert s["pages_free"] == 64 - pages and s["pages_total"] == 64 and s["page_size"] == 1
        assert (s["unique_tokens"], s["logical_tokens"]) == (unique, logical)
        assert s["sharing_ratio"] == pytest.approx(logical / unique if unique else 1.0)
        assert s["kv_bytes_used"] == pages * per_token
        assert s["kv_bytes_unshared"] == logical * per_token
        cache.check()

    check_stats(0, 0, 0, 0, 0)
    r0 = new_with(cache, model, 10)
    check_stats(1, 1, 10, 10, 10)
    r1 = fork(cache, model, r0)
    check_stats(2, 1, 10, 10, 20)
    assert cache.stats()["sharing_ratio"] == 2.0
    append(cache, model, r1, 3)  # r1 -> new leaf of 3 under the 10-token root
    check_stats(2, 2, 13, 13, 23)
    r2 = fork(cache, model, r1)
    append(cache, model, r2, 2)  # r2 -> new leaf of 2 under r1's node
    check_stats(3, 3, 15, 15, 10 + 13 + 15)
    assert [cache.length(r) for r in (r0, r1, r2)] == [10, 13, 15]
    assert_all_layers(cache, model)
    cache.prune(r1)  # r1's node keeps its tokens (r2 reads them), merges into r2's leaf
    check_stats(2, 2, 15, 15, 25)
    cache.prune(r0)  # the root merges into the single remaining path
    check_stats(1, 1, 15, 15, 15)
    assert cache.stats()["sharing_ratio"] == 1.0
    assert_all_layers(cache, model)
    cache.prune(r2)
    check_stats(0, 0, 0, 0, 0)
    assert cache.stats()["backend"] == "torch"


def test_fork_shares_pages_until_append():
    cache = make_cache(32)
    model = Model()
    r = new_with(cache, model, 6)
    assert ids(cache.slots(r)) == [0, 1, 2, 3, 4, 5]
    forks = [fork(cache, model, r) for _ in range(3)]
    s = cache.stats()
    assert s["pages_used"] == 6 and s["nodes"] == 1 and s["logical_tokens"] == 24
    for f in forks:
        assert ids(cache.slots(f)) == ids(cache.slots(r))
        assert cache.length(f) == 6
    g = cache.to_networkx()
    assert g.number_of_nodes() == 1
    assert g.nodes[0]["requests"] == [r] + forks
    # One token for the first fork: one new page, a new leaf; the others untouched.
    slots = append(cache, model, forks[0], 1)
    assert ids(slots) == [6]
    assert ids(cache.slots(forks[0])) == [0, 1, 2, 3, 4, 5, 6]
    assert ids(cache.slots(r)) == [0, 1, 2, 3, 4, 5]
    assert cache.stats()["pages_used"] == 7
    assert cache.stats()["nodes"] == 2
    cache.check()
    assert_all_layers(cache, model)


def test_prune_returns_exactly_the_expected_pages():
    cache = make_cache(32)
    model = Model()
    alloc = cache.pool.allocator
    r0 = new_with(cache, model, 10)            # pages 0..9
    r1 = fork(cache, model, r0)
    assert ids(append(cache, model, r1, 3)) == [10, 11, 12]
    assert ids(append(cache, model, r0, 2)) == [13, 14]
    assert alloc.num_used == 15
    cache.prune(r1)
    model.prune(r1)
    assert alloc.num_used == 12
    assert ids(alloc.refcount[10:13]) == [0, 0, 0]
    # Freed pages are next, lowest first.
    assert ids(alloc.free_pages()[-3:]) == [12, 11, 10]
    # The root (no request left there, one child) merged into r0's leaf.
    g = cache.to_networkx()
    assert g.number_of_nodes() == 1
    (node,) = g.nodes
    assert g.nodes[node]["pages"] == list(range(10)) + [13, 14]
    assert g.nodes[node]["slots"] == list(range(10)) + [13, 14]
    assert g.nodes[node]["requests"] == [r0]
    cache.check()
    # r0 grows in place into the freed pages, lowest first.
    assert ids(append(cache, model, r0, 2)) == [10, 11]
    assert_all_layers(cache, model)
    cache.prune(r0)
    assert alloc.num_used == 0 and alloc.num_free == 32


def test_prune_of_a_request_ending_at_an_internal_node_frees_nothing():
    cache = make_cache(32)
    model = Model()
    r0 = new_with(cache, model, 5)
    r1 = fork(cache, model, r0)
    append(cache, model, r1, 4)
    cache.prune(r0)  # r0's tokens are r1's prefix
    model.prune(r0)
    assert cache.stats()["pages_used"] == 9
    assert cache.stats()["nodes"] == 1
    assert ids(cache.slots(r1)) == list(range(9))
    cache.check()
    assert_all_layers(cache, model)


def _pruned_tree(page_size, seed, together):
    """A random tree of requests (forks, appends of 1-6 tokens), then a random half of
    its requests pruned, in one call (``together``) or one call each."""
    rng = np.random.default_rng(seed)
    cache = make_cache(256, page_size=page_size)
    model = Model(generator=torch.Generator().manual_seed(seed))
    reqs = [new_with(cache, model, 5)]
    for _ in range(14):
        r = fork(cache, model, reqs[int(rng.integers(len(reqs)))])
        append(cache, model, r, int(rng.integers(1, 7)))
        reqs.append(r)
    dead = [int(x) for x in rng.permutation(reqs)[:len(reqs) // 2]]
    if together:
        cache.prune(np.asarray(dead))  # numpy ids too
    else:
        for r in dead:
            cache.prune(r)
    for r in dead:
        model.prune(r)
    return cache, model


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("seed", range(3))
def test_prune_of_a_list_ends_the_same_requests_as_one_prune_each(page_size, seed):
    one, _ = _pruned_tree(page_size, seed, together=False)
    many, model = _pruned_tree(page_size, seed, together=True)
    a, b = snapshot(one), snapshot(many)
    # The same requests, nodes, slots, pages and reference counts; the free pages are
    # the same set (a list returns them to the pool in one call, so their order on the
    # free stack may differ).
    assert sorted(a.pop("free")) == sorted(b.pop("free"))
    assert_same_state(a, b)
    many.check()
    assert_all_layers(many, model)


def test_prune_of_a_list_rejects_bad_ids_without_change():
    cache = make_cache(32)
    model = Model()
    r = new_with(cache, model, 4)
    f = fork(cache, model, r)
    g = fork(cache, model, r)
    append(cache, model, g, 2)
    cache.prune(g)
    before = snapshot(cache)
    with pytest.raises(TreeCacheError, match=f"request {f} twice"):
        cache.prune([f, r, f])
    with pytest.raises(UnknownRequestError, match=f"request {g} was pruned"):
        cache.prune([f, g])
    with pytest.raises(UnknownRequestError, match="unknown request id 99"):
        cache.prune([r, 99])
    cache.prune([])
    assert_same_state(before, snapshot(cache))
    cache.check()
    cache.prune((f, r))
    assert len(cache) == 0 and cache.pool.allocator.num_used == 0


def test_new_request_is_an_empty_root():
    cache = make_cache(16)
    model = Model()
    r = cache.new_request()
    model.new(r)
    assert cache.length(r) == 0 and ids(cache.slots(r)) == []
    assert r in cache and len(cache) == 1 and cache.requests == [r]
    g = cache.to_networkx()
    assert g.number_of_nodes() == 1 and g.nodes[0]["seqlen"] == 0
    # An empty request attends nothing: zeros, as the reference says.
    out = cache.attend(model.queries(1), 0)
    assert torch.equal(out, torch.zeros_like(out))
    cache.prune(r)
    assert cache.stats()["nodes"] == 0 and len(cache) == 0


def test_request_ids_are_never_reused():
    cache = make_cache(16)
    a = cache.new_request()
    cache.prune(a)
    b = cache.new_request()
    assert b != a
    c = cache.fork(b)
    assert len({a, b, c}) == 3
    assert cache.requests == [b, c]


# ============================================================================ page_size > 1


def test_page_size_rounds_capacity_up():
    cache = make_cache(30, page_size=4)
    s = cache.stats()
    assert s["pages_total"] == 8 and s["page_size"] == 4
    assert cache.k_pool.shape == (L, 32, HK, D)


def test_page_size_4_node_layout():
    cache = make_cache(32, page_size=4)
    model = Model()
    alloc = cache.pool.allocator
    r = new_with(cache, model, 6)
    assert ids(cache.slots(r)) == [0, 1, 2, 3, 4, 5]
    assert alloc.num_used == 2
    b = fork(cache, model, r)
    assert alloc.num_used == 2
    # Each new node starts on a fresh page; a fork never writes into the shared tail page.
    assert ids(append(cache, model, r, 1)) == [8]
    assert ids(append(cache, model, b, 1)) == [12]
    assert alloc.num_used == 4
    # r's leaf is exclusive: it fills its tail page, then takes a new one.
    assert ids(append(cache, model, r, 3)) == [9, 10, 11]
    assert alloc.num_used == 4
    assert ids(append(cache, model, r, 1)) == [16]
    assert alloc.num_used == 5
    s = cache.stats()
    assert (s["unique_tokens"], s["logical_tokens"]) == (6 + 5 + 1, 11 + 7)
    assert s["kv_bytes_used"] == 5 * 4 * 2 * L * HK * D * 4
    cache.check()
    assert_all_layers(cache, model)

    cache.prune(b)
    model.prune(b)
    assert alloc.num_used == 4
    assert ids(alloc.free_pages()[-1:]) == [3]
    g = cache.to_networkx()
    (node,) = g.nodes
    assert g.nodes[node]["pages"] == [0, 1, 2, 4]
    assert g.nodes[node]["slots"] == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 16]
    # The merged node keeps growing in its tail page.
    assert ids(append(cache, model, r, 1)) == [17]
    cache.check()
    assert_all_layers(cache, model)

    # A request that becomes exclusive again (its fork pruned) reuses its tail page.
    r2 = new_with(cache, model, 2)
    assert ids(cache.slots(r2)) == [12, 13]  # page 3, freed above
    f = fork(cache, model, r2)
    cache.prune(f)
    model.prune(f)
    assert ids(append(cache, model, r2, 1)) == [14]
    assert alloc.num_used == 5
    cache.check()
    assert_all_layers(cache, model)


def test_page_size_3_fork_inside_a_page():
    cache = make_cache(30, page_size=3)
    model = Model()
    r = new_with(cache, model, 4)               # pages 0, 1 (slots 0..3, 4 and 5 free)
    forks = [fork(cache, model, r) for _ in range(2)]
    for i, f in enumerate(forks):
        append(cache, model, f, 2)              # one fresh page each
    append(cache, model, r, 2)                  # r's node has children now: a new leaf
    assert cache.pool.allocator.num_used == 5
    assert cache.stats()["unique_tokens"] == 4 + 3 * 2
    cache.check()
    assert_all_layers(cache, model)
    for x in [r] + forks:
        cache.prune(x)
    assert cache.pool.allocator.num_free == 10


def test_page_size_out_of_pages_keeps_tail_slots():
    cache = make_cache(16, page_size=4)  # 4 pages
    model = Model()
    r = new_with(cache, model, 6)       # pages 0, 1; two free slots in page 1
    before = snapshot(cache)
    k, v = model.tokens(2 + 4 * 2 + 1)  # one token more than the tail + 2 free pages hold
    with pytest.raises(OutOfPagesError):
        cache.append(r, k, v)
    assert_same_state(before, snapshot(cache))
    cache.check()
    assert ids(append(cache, model, r, 10)) == [6, 7] + list(range(8, 16))
    assert cache.pool.allocator.num_free == 0
    assert_all_layers(cache, model)


# ============================================================================ planning


def _decode_loop_setup(backend, plan_headroom, num_layers=3):
    cache = make_cache(512, num_layers=num_layers, backend=backend, plan_headroom=plan_headroom)
    model = Model(num_layers=num_layers)
    r0 = new_with(cache, model, 12)
    r1 = fork(cache, model, r0)
    r2 = fork(cache, model, r0)
    r3 = new_with(cache, model, 5)  # an unrelated root: a forest
    return cache, model, [r0, r1, r2, r3]


@pytest.mark.parametrize("backend, attend_every_step", [("torch", True), ("auto", False)],
                         ids=["torch-every-step", "triton-checkpoints"])
def test_append_only_decode_loop_never_replans(backend, attend_every_step):
    """100 decode steps (reserve + write per layer + attend per layer): 0 re-plans.

    The first step creates a leaf per forked request (a topology change), the first
    attend builds the plan; after that every step only grows the plan's tail vnodes.
    The Triton run attends at checkpoints only (the interpreter is slow); its plan is
    extended by every step all the same.
    """
    num_layers = 3
    cache, model, reqs = _decode_loop_setup(backend, plan_headroom=128, num_layers=num_layers)
    checkpoints = {1, 2, 37, 64, 65, 100}
    rebuilds = version = None
    for step in range(1, 101):
        slots = cache.reserve(reqs)
        assert slots.dtype == torch.int64 and slots.shape == (4,)
        k, v = model.tokens(4)
        for i, r in enumerate(reqs):
            model.append(r, k[:, i:i + 1], v[:, i:i + 1])
        attend = attend_every_step or step in checkpoints
        for layer in range(num_layers):
            cache.write(layer, slots, k[layer], v[layer])
            if attend:
                q = model.queries(4)
                if step in checkpoints:
                    assert_attends(cache, model, q, layer, reqs)
                else:
                    cache.attend(q, layer, reqs)
        if step == 1:
            rebuilds = cache.stats()["plan_rebuilds"]
            version = cache.plan_version
            assert rebuilds == 1
        else:
            assert cache.stats()["plan_rebuilds"] == rebuilds, f"re-planned at step {step}"
            assert cache.plan_version == version
    assert [cache.length(r) for r in reqs] == [112, 112, 112, 105]
    assert cache.stats()["pages_used"] == 12 + 5 + 4 * 100
    cache.check()


def test_one_token_appends_are_append_only_steps():
    """append(req, k, v) with one token per request is the same fast path as reserve."""
    cache, model, reqs = _decode_loop_setup("torch", plan_headroom=64, num_layers=2)
    decode_step(cache, model, reqs)
    assert_all_layers(cache, model, reqs)
    version = cache.plan_version
    for _ in range(10):
        for r in reqs:
            append(cache, model, r, 1)
        assert_all_layers(cache, model, reqs)
    assert cache.plan_version == version
    cache.check()


def test_append_only_loop_replans_only_when_headroom_runs_out():
    headroom = 8
    cache, model, reqs = _decode_loop_setup("torch", plan_headroom=headroom, num_layers=2)
    replanned = []
    for step in range(1, 31):
        before = cache.plan_version
        decode_step(cache, model, reqs)
        for layer in range(2):
            assert_attends(cache, model, model.queries(4), layer, reqs)
        if cache.plan_version != before:
            replanned.append(step)
            assert cache.plan_version == before + 1  # once per step, not per layer
    # The plan built at step 1 has room for `headroom` more tokens per request.
    assert replanned == [1 + j * (headroom + 1) for j in range(4)]  # 1, 10, 19, 28


def test_fork_or_prune_replans_once_across_layers():
    num_layers = 3
    cache, model, reqs = _decode_loop_setup("torch", plan_headroom=64, num_layers=num_layers)

    def attend_all_layers():
        for layer in range(num_layers):
            assert_attends(cache, model, model.queries(len(cache.requests)), layer)

    decode_step(cache, model)
    attend_all_layers()
    v0, n0 = cache.plan_version, cache.stats()["plan_rebuilds"]
    decode_step(cache, model)
    attend_all_layers()
    assert (cache.plan_version, cache.stats()["plan_rebuilds"]) == (v0, n0)

    f = fork(cache, model, reqs[1])   # marks the plan dirty, builds nothing yet
    assert cache.plan_version == v0
    attend_all_layers()               # one rebuild for all three layers
    assert (cache.plan_version, cache.stats()["plan_rebuilds"]) == (v0 + 1, n0 + 1)

    decode_step(cache, model)         # r1 and f get leaves: topology change
    attend_all_layers()
    assert cache.plan_version == v0 + 2
    decode_step(cache, model)         # append-only again
    attend_all_layers()
    assert cache.plan_version == v0 + 2

    cache.prune(reqs[2])
    model.prune(reqs[2])
    assert cache.plan_version == v0 + 2
    attend_all_layers()
    assert cache.plan_version == v0 + 3

    # prepare() builds it ahead of time; the attends then reuse it.
    cache.prune(f)
    model.prune(f)
    plan = cache.prepare()
    assert cache.plan_version == v0 + 4 and cache.plan is plan
    assert cache.prepare() is plan
    attend_all_layers()
    assert cache.plan_version == v0 + 4 and cache.stats()["plan_rebuilds"] == n0 + 4
    cache.check()


@pytest.mark.parametrize("form", ["inline", "fused"])
def test_decode_loop_on_masked_plans_grows_in_place(monkeypatch, form):
    """With the planner's masked forms on (bounds lowered for this small tree), the
    decode loop's plan is masked and grows in place: every-request steps, listed
    steps of some requests and one-token appends to single requests, no re-plan until
    the requests sharing a range have used its room; every attend exact."""
    from treecache import plan as plan_module

    if form == "inline":
        monkeypatch.setattr(plan_module, "INLINE_MIN_PROGRAMS", 0)
    else:
        monkeypatch.setattr(plan_module, "INLINE", False)
        monkeypatch.setattr(plan_module, "FUSE_MIN_PROGRAMS", 0)
    headroom = 6
    cache, model, reqs = _decode_loop_setup("torch", plan_headroom=headroom, num_layers=2)
    f = fork(cache, model, reqs[1])  # two leaves under r1's node: a fusable set
    reqs = reqs + [f]
    decode_step(cache, model, reqs)
    assert_all_layers(cache, model, reqs)
    plan = cache.plan
    assert plan.masked and (plan.tail_vnode >= 0).all() and plan.tail_count.max() > 1
    n = cache.plan_rebuilds
    rng = np.random.default_rng(1)
    for step in range(8):
        kind = step % 3
        if kind == 0:
            decode_step(cache, model)  # reserve(): every live request
        elif kind == 1:
            decode_step(cache, model, [reqs[i] for i in rng.permutation(len(reqs))[:3]])
        else:
            append(cache, model, reqs[int(rng.integers(len(reqs)))], 1)
        assert_all_layers(cache, model, reqs)
        assert cache.plan_rebuilds == n, f"re-planned at step {step}"
    cache.check()


def _beam_cache(width, prompt=330, **kw):
    """A cache (and its model) of ``width`` requests sharing one ``prompt``-token root."""
    cache = make_cache(2048, plan_headroom=2, **kw)
    model = Model()
    beams = [new_with(cache, model, prompt)]
    beams += [fork(cache, model, beams[0]) for _ in range(width - 1)]
    return cache, model, beams


def _beam_forks(cache, model, beams, rng, span):
    """A topology change: each new beam forked from one of the first ``span`` beams, the
    old beams pruned; returns the new beams."""
    new = [fork(cache, model, beams[i]) for i in rng.integers(0, span, size=len(beams))]
    for b in beams:
        cache.prune(b)
        model.prune(b)
    return new


def _padded_beam_steps(backend, steps, checked):
    """Beam steps (10 beams of a 330-token prompt: two phases, the first of 6 vnodes) on a
    cache with padded phases, every third step append-only; the attends of the steps in
    ``checked`` are compared with the model. Yields (step, plan, beams) after each step."""
    cache, model, beams = _beam_cache(10, backend=backend, pad_phases=True)
    rng = np.random.default_rng(0)
    for step in range(steps):
        if step % 3 != 2:
            beams = _beam_forks(cache, model, beams, rng, 5)
        decode_step(cache, model, beams)
        if step in checked:
            assert_all_layers(cache, model, beams)
        yield step, cache.prepare(beams), beams


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("headroom", [0, 2])
def test_node_run_flags_give_the_plans_of_a_pass_over_the_slot_table(page_size, headroom,
                                                                     monkeypatch):
    """The per-node run flags a re-plan hands the planner (kept as slots are added,
    through bulk appends, decode steps, forks, prunes that merge a node into its child
    and speculative accepts) give the same plans as the planner's own pass over the slot
    table, and those plans have contiguous vnodes and others."""
    from benchmarks.replan_ab import plan_summary
    from treecache import cache as cache_mod

    cache = make_cache(4096, page_size=page_size, plan_headroom=headroom)
    model = Model()
    rng = np.random.default_rng(page_size + headroom)
    beams = [new_with(cache, model, 37)]
    beams += [fork(cache, model, beams[0]) for _ in range(3)]
    slot0 = []
    for step in range(14):
        if step % 4 == 1:  # bulk appends: leaves of runs
            for b in beams[:2]:
                append(cache, model, b, int(rng.integers(1, 9)))
        elif step % 4 == 2:  # forks and prunes: merges
            beams = _beam_forks(cache, model, beams, rng, 2)
        elif step == 7:  # a speculative accept of a two-token draft
            d = fork(cache, model, beams[0])
            append(cache, model, d, 2)
            cache.accept(beams[0], d)
            model.accept(beams[0], d)
        decode_step(cache, model, beams)
        cache.check()
        # The same stale entries in both (a plan leaves its growth headroom unwritten).
        cache.prepare(beams).buffers.dev.fill_(-7)
        cache._dirty()
        got, got_meta = plan_summary(cache.prepare(beams))
        monkeypatch.setattr(cache_mod, "NODE_RUNS", False)
        cache.plan.buffers.dev.fill_(-7)
        cache._dirty()
        want, want_meta = plan_summary(cache.prepare(beams))
        monkeypatch.setattr(cache_mod, "NODE_RUNS", True)
        assert got_meta == want_meta and got.keys() == want.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"step {step}: {k}")
        slot0.append(got["vnode_slot0"])
    slot0 = np.concatenate(slot0)
    assert (slot0 >= 0).any() and (slot0 < 0).any()
    assert_all_layers(cache, model, beams)


@pytest.mark.parametrize("backend", ["torch", "auto"], ids=["torch", "triton"])
def test_padded_phases_attend_like_the_model_through_beam_and_append_steps(backend):
    """Each phase's vnode count is a power of two, the padding vnodes are empty (no
    query, no KV entry), and a growing request's tail vnode (shifted past the padding)
    takes the append-only steps' tokens: every attend matches the model."""
    checked = set(range(9)) if backend == "torch" else {0, 2, 5, 8}
    shifted_tails = 0
    for step, plan, beams in _padded_beam_steps(backend, 9, checked):
        sizes = [ph.num_vnodes for ph in plan.phases]
        assert all(n & (n - 1) == 0 for n in sizes), sizes
        assert sum(sizes) == plan.num_vnodes
        q_len = plan.buffers.host_view("vnode_q_len", plan.num_vnodes)
        kv_len = plan.buffers.host_view("vnode_kv_len", plan.num_vnodes)
        empty = np.flatnonzero(q_len == 0)
        assert empty.size and (kv_len[empty] == 0).all()
        assert (kv_len[q_len > 0] > 0).all()
        tails = plan.tail_vnode[plan.tail_vnode >= 0]
        assert tails.size and (q_len[tails] > 0).all()
        shifted_tails += int((tails > empty.min()).any())
    assert shifted_tails >= 5  # the append-only steps grow tails placed after padding


def test_launch_version_counts_changes_of_the_launches():
    """launch_version moves exactly when a new plan's launch key differs from the last
    one's; padded plans keep their key across re-plans that plain plans do not (16
    beams, each step forked from the first 8)."""
    versions = {}
    for pad in (False, True):
        cache, model, beams = _beam_cache(16, pad_phases=pad)
        rng = np.random.default_rng(1)
        key, version = None, cache.launch_version
        for step in range(12):
            beams = _beam_forks(cache, model, beams, rng, 8)
            decode_step(cache, model, beams)
            plan = cache.prepare(beams)
            version += plan.launch_key != key
            key = plan.launch_key
            assert cache.launch_version == version
            for _ in range(2):  # append-only steps within the headroom: nothing moves
                decode_step(cache, model, beams)
                assert cache.prepare(beams).launch_key == key
                assert cache.launch_version == version
        assert cache.plan_version == 12  # one plan per topology change
        versions[pad] = cache.launch_version
    assert versions[True] < versions[False]


def test_subset_attend_replans_only_when_the_request_list_changes():
    cache, model, reqs = _decode_loop_setup("torch", plan_headroom=64)
    decode_step(cache, model)
    sub = [reqs[3], reqs[0]]
    assert_attends(cache, model, model.queries(2), 0, sub)
    v = cache.plan_version
    assert_attends(cache, model, model.queries(2), 1, sub)
    decode_step(cache, model, sub)  # append-only for the planned requests
    assert_attends(cache, model, model.queries(2), 0, sub)
    assert cache.plan_version == v
    assert_attends(cache, model, model.queries(4), 0)  # another request list: re-plan
    assert cache.plan_version == v + 1


def test_one_request_list_across_calls_sees_every_change():
    # A model's layers pass one list per step: attend compares it with the last one
    # instead of converting it, and still sees a reorder in place, a request listed
    # twice, a pruned request; the same ids as a tuple reuse the plan.
    cache, model, reqs = _decode_loop_setup("torch", plan_headroom=64)
    sub = [reqs[3], reqs[0], reqs[1]]
    assert_attends(cache, model, model.queries(3), 0, sub)
    v = cache.plan_version
    assert_attends(cache, model, model.queries(3), 1, sub)
    assert cache.plan_version == v
    sub.reverse()  # in place: the rows follow the new order (a new plan)
    assert_attends(cache, model, model.queries(3), 0, sub)
    assert_attends(cache, model, model.queries(3), 2, sub)
    assert cache.plan_version == v + 1
    assert_attends(cache, model, model.queries(3), 1, tuple(sub))
    assert cache.plan_version == v + 1
    sub[0] = sub[1]
    with pytest.raises(TreeCacheError, match="twice"):
        cache.attend(model.queries(3), 0, sub)
    sub[0] = reqs[2]
    assert_attends(cache, model, model.queries(3), 0, sub)
    assert_attends(cache, model, model.queries(3), 1, sub)
    cache.prune(reqs[0])
    model.prune(reqs[0])
    with pytest.raises(UnknownRequestError):
        cache.attend(model.queries(3), 0, sub)
    sub.remove(reqs[0])
    assert_attends(cache, model, model.queries(2), 0, sub)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_sm_scale_and_logit_cap(backend):
    cache = make_cache(64, backend=backend, sm_scale=0.7, logit_cap=2.0)
    assert cache.sm_scale == 0.7 and cache.logit_cap == 2.0
    model = Model()
    r0 = new_with(cache, model, 9)
    r1 = fork(cache, model, r0)
    append(cache, model, r1, 4)
    for layer in range(L):
        q = model.queries(2) * 4  # large logits: the cap matters
        assert_attends(cache, model, q, layer)
        uncapped = model.reference(q, layer, cache.requests, 0.7)
        assert (cache.attend(q, layer) - uncapped).abs().max() > 1e-2


# ============================================================================ exports


def _forest(cache, model):
    """Root A (8) -> B (3, r1) -> C (2, r2); A -> D (4, r3); r0 ends at A; root E (5, r4)."""
    r0 = new_with(cache, model, 8)
    r1 = fork(cache, model, r0)
    append(cache, model, r1, 3)
    r2 = fork(cache, model, r1)
    append(cache, model, r2, 2)
    r3 = fork(cache, model, r0)
    append(cache, model, r3, 4)
    r4 = new_with(cache, model, 5)
    return [r0, r1, r2, r3, r4]


def test_to_networkx_is_a_forest_of_the_requests():
    cache = make_cache(64)
    model = Model()
    reqs = _forest(cache, model)
    g = cache.to_networkx()
    assert isinstance(g, nx.DiGraph)
    assert nx.is_forest(g.to_undirected())
    assert g.number_of_nodes() == 5 and g.number_of_edges() == 3
    assert sorted(d["seqlen"] for _, d in g.nodes(data=True)) == [2, 3, 4, 5, 8]
    roots = [n for n in g.nodes if g.in_degree(n) == 0]
    assert len(roots) == 2
    for n, d in g.nodes(data=True):
        assert d["seqlen"] == len(d["slots"])
        assert sorted({s // cache.page_size for s in d["slots"]}) == sorted(d["pages"])
    used = sorted(p for _, d in g.nodes(data=True) for p in d["pages"])
    assert used == sorted(np.nonzero(cache.pool.allocator.refcount)[0].tolist())
    for r in reqs:
        assert graph_path_slots(g, r) == ids(cache.slots(r))
        assert len(graph_path_slots(g, r)) == model.length(r)
    assert sum(len(d["requests"]) for _, d in g.nodes(data=True)) == len(reqs)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_tree_info_feeds_the_functional_api(backend):
    cache = make_cache(64, backend=backend)
    model = Model()
    reqs = _forest(cache, model)
    nodes, req_ids = cache.tree_info()
    assert req_ids == reqs
    assert [nd.id for nd in nodes] == list(range(len(nodes)))
    assert all(nodes[nd.parent].id < nd.id for nd in nodes if nd.parent >= 0)
    assert sum(nd.seqlen for nd in nodes) == cache.stats()["unique_tokens"]
    # Node tokens from the request paths: node i is at offset sum(ancestors' seqlen).
    node_slots = []
    for nd in nodes:
        row = nd.requests[0]
        off, p = 0, nd.parent
        while p >= 0:
            off += nodes[p].seqlen
            p = nodes[p].parent
        node_slots.append(cache.slots(req_ids[row])[off:off + nd.seqlen])
    perm = torch.from_numpy(np.concatenate(node_slots))
    ptrs = [0] + np.cumsum([nd.seqlen for nd in nodes]).tolist()
    metadata, assignments = fasttree_preparation(nodes, ptrs, len(req_ids), HQ, HK, D,
                                                 device="cpu")
    assert len(assignments) == len(nodes)
    for layer in range(L):
        q = model.queries(len(reqs))
        o = torch.empty_like(q)
        fasttree_decode(q, cache.k_pool[layer][perm].contiguous(),
                        cache.v_pool[layer][perm].contiguous(), o, *metadata,
                        sm_scale=cache.sm_scale, backend=backend)
        torch.testing.assert_close(o, cache.attend(q, layer), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(o, model.reference(q, layer, reqs, cache.sm_scale),
                                   atol=1e-4, rtol=1e-4)


def test_tree_info_subset_lists_rows_of_the_subset():
    cache = make_cache(64)
    model = Model()
    r0, r1, r2, r3, r4 = _forest(cache, model)
    nodes, req_ids = cache.tree_info([r3, r1])
    assert req_ids == [r3, r1]
    listed = sorted(row for nd in nodes for row in nd.requests)
    assert set(listed) == {0, 1}
    # r4's root and r2's leaf are on no listed path.
    assert sum(1 for nd in nodes if not nd.requests) == 2


# ============================================================================ accept


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_accept_with_discard(backend):
    P = 7
    cache = make_cache(32, backend=backend)
    model = Model()
    r = new_with(cache, model, P)
    d1 = fork(cache, model, r)
    append(cache, model, d1, 1)
    d2 = fork(cache, model, r)
    append(cache, model, d2, 1)
    d11 = fork(cache, model, d1)
    append(cache, model, d11, 1)
    d12 = fork(cache, model, d1)
    append(cache, model, d12, 1)
    drafts = [d1, d2, d11, d12]
    assert cache.stats()["pages_used"] == P + 4
    assert_attends(cache, model, model.queries(4), 1, drafts)

    cache.accept(r, d11, discard=[d1, d2, d12])
    model.accept(r, d11, discard=[d1, d2, d12])
    assert cache.requests == [r]
    assert cache.length(r) == P + 2
    s = cache.stats()
    assert (s["pages_used"], s["nodes"], s["unique_tokens"]) == (P + 2, 1, P + 2)
    assert ids(cache.slots(r)) == list(range(P)) + [P, P + 2]
    for d in drafts:
        assert d not in cache
        with pytest.raises(UnknownRequestError):
            cache.length(d)
    cache.check()
    assert_all_layers(cache, model)
    # r keeps decoding in place.
    decode_step(cache, model)
    assert_all_layers(cache, model)


def test_accept_of_the_fork_itself_and_reject_all():
    cache = make_cache(32)
    model = Model()
    r = new_with(cache, model, 4)
    d = fork(cache, model, r)
    cache.accept(r, d)  # the draft added nothing: r is unchanged
    model.accept(r, d)
    assert cache.requests == [r] and cache.length(r) == 4
    cache.check()
    # Rejecting every draft is a prune of each.
    drafts = [fork(cache, model, r) for _ in range(3)]
    for dd in drafts:
        append(cache, model, dd, 2)
    for dd in drafts:
        cache.prune(dd)
        model.prune(dd)
    assert cache.stats()["pages_used"] == 4 and cache.stats()["nodes"] == 1
    cache.check()
    assert_all_layers(cache, model)


def test_accept_rejects_bad_arguments_without_change():
    cache = make_cache(32)
    model = Model()
    r = new_with(cache, model, 4)
    d = fork(cache, model, r)
    append(cache, model, d, 2)
    other = new_with(cache, model, 3)
    before = snapshot(cache)
    with pytest.raises(TreeCacheError, match="descend"):
        cache.accept(d, r)       # r is d's ancestor, not its descendant
    with pytest.raises(TreeCacheError, match="descend"):
        cache.accept(r, other)   # another tree
    with pytest.raises(TreeCacheError, match="discard"):
        cache.accept(r, d, discard=[r])
    with pytest.raises(TreeCacheError, match="discard"):
        cache.accept(r, d, discard=[d])
    with pytest.raises(TreeCacheError, match=f"discard lists request {other} twice"):
        cache.accept(r, d, discard=[other, other])
    assert_same_state(before, snapshot(cache))
    cache.check()


def test_accept_of_a_request_into_itself_is_rejected_without_change():
    cache = make_cache(32)
    model = Model()
    r = new_with(cache, model, 4)
    before = snapshot(cache)
    with pytest.raises(TreeCacheError):
        cache.accept(r, r)
    assert_same_state(before, snapshot(cache))
    cache.check()


# ============================================================================ pruning all


@pytest.mark.parametrize("page_size", [1, 4])
def test_pruning_everything_frees_every_page(page_size):
    cache = make_cache(128, page_size=page_size)
    model = Model()
    rng = np.random.default_rng(page_size)
    reqs = _forest(cache, model)
    for _ in range(12):
        r = reqs[rng.integers(len(reqs))]
        if rng.random() < 0.5:
            reqs.append(fork(cache, model, r))
        else:
            append(cache, model, r, int(rng.integers(1, 5)))
    decode_step(cache, model)
    assert_all_layers(cache, model)
    for r in rng.permutation(reqs).tolist():
        cache.prune(r)
        cache.check()
    alloc = cache.pool.allocator
    assert alloc.num_free == alloc.num_pages and alloc.num_used == 0
    assert sorted(ids(alloc.free_pages())) == list(range(alloc.num_pages))
    assert not alloc.refcount.any()
    s = cache.stats()
    assert (s["requests"], s["nodes"], s["unique_tokens"], s["logical_tokens"]) == (0, 0, 0, 0)
    assert cache.to_networkx().number_of_nodes() == 0
    # The pool is usable again.
    r = cache.new_request()
    assert cache.reserve(r, page_size + 1).shape == (page_size + 1,)
    assert alloc.num_used == 2


# ============================================================================ out of pages


def _attend_outputs(cache, qs):
    return [cache.attend(q, layer).clone() for layer, q in enumerate(qs)]


def _assert_oom_leaves_cache_unchanged(cache, model, call):
    """call() must raise OutOfPagesError and leave state, plan and outputs as before."""
    qs = [model.queries(len(cache.requests)) for _ in range(cache.num_layers)]
    outs = _attend_outputs(cache, qs)  # the plan is clean now
    before = snapshot(cache)
    with pytest.raises(OutOfPagesError) as ei:
        call()
    assert isinstance(ei.value, TreeCacheError) and isinstance(ei.value, MemoryError)
    assert_same_state(before, snapshot(cache))
    cache.check()
    after = _attend_outputs(cache, qs)
    for a, b in zip(outs, after):
        assert torch.equal(a, b)
    assert cache.plan_version == before["plan_version"], "the failed call forced a re-plan"
    for layer, q in enumerate(qs):
        assert_attends(cache, model, q, layer)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_out_of_pages_from_append(backend):
    cache = make_cache(16, backend=backend)
    model = Model()
    r0 = new_with(cache, model, 10)
    r1 = fork(cache, model, r0)
    append(cache, model, r1, 2)          # 12 pages used, 4 free
    k, v = model.tokens(5)
    _assert_oom_leaves_cache_unchanged(cache, model, lambda: cache.append(r0, k, v))
    _assert_oom_leaves_cache_unchanged(cache, model, lambda: cache.append(r1, k, v))
    append(cache, model, r1, 4)          # exactly fits
    assert cache.pool.allocator.num_free == 0
    assert_all_layers(cache, model)


def test_out_of_pages_from_reserve():
    cache = make_cache(16)
    model = Model()
    r0 = new_with(cache, model, 6)
    r1 = fork(cache, model, r0)
    r2 = new_with(cache, model, 4)
    decode_step(cache, model)            # 6 + 4 + 3 = 13 used; every request exclusive
    assert cache.pool.allocator.num_free == 3
    # Single request, several tokens.
    _assert_oom_leaves_cache_unchanged(cache, model, lambda: cache.reserve(r2, 4))
    decode_step(cache, model)            # fast path: 3 pages, pool full
    assert cache.pool.allocator.num_free == 0
    # Fast path (all exclusive leaves), with None and with a list.
    _assert_oom_leaves_cache_unchanged(cache, model, lambda: cache.reserve())
    _assert_oom_leaves_cache_unchanged(cache, model, lambda: cache.reserve([r2, r0]))
    _assert_oom_leaves_cache_unchanged(cache, model, lambda: cache.reserve(r1))
    cache.prune(r2)
    model.prune(r2)                      # 6 pages free
    f = fork(cache, model, r0)
    # Slow path: r0 and f need new leaves, r1 grows in place; 3 pages needed.
    decode_step(cache, model)
    assert cache.pool.allocator.num_free == 3
    g = fork(cache, model, r1)
    h = fork(cache, model, r0)
    decode_step(cache, model, [r1, g])   # 1 free page left
    assert cache.pool.allocator.num_free == 1
    _assert_oom_leaves_cache_unchanged(cache, model, lambda: cache.reserve([r0, h]))
    decode_step(cache, model, [h])
    assert cache.pool.allocator.num_free == 0


@pytest.mark.parametrize("page_size", [1, 3])
def test_reserve_of_a_list_equals_one_reserve_per_request(page_size):
    # A list whose requests need new leaves takes them in one pass: the slots, pages,
    # nodes and free stack must be those of reserving for each request in turn.
    def build():
        cache = make_cache(64, page_size=page_size)
        r0 = cache.new_request()
        cache.reserve(r0, 5)
        a = cache.fork(r0)                 # r0 and a end at one node
        b = cache.fork(r0)
        cache.reserve(b, 2)                # b: own leaf, tail room at page size 3
        c = cache.new_request()
        cache.reserve(c, 3)                # c: exclusive, a full tail page at page size 3
        d = cache.fork(c)
        cache.reserve(d, 1)                # c now ends at an inner node
        e = cache.fork(d)                  # d and e share d's leaf
        cache.prune(b)
        f = cache.fork(r0)
        return cache, [e, r0, c, f, a, d]

    whole, reqs = build()
    one, same = build()
    assert reqs == same
    for _ in range(3):
        got = ids(whole.reserve(reqs))
        want = [ids(one.reserve(r))[0] for r in reqs]
        assert got == want
        assert_same_state(snapshot(whole), snapshot(one))
        whole.check()
    assert len(set(got)) == len(got)


def test_out_of_pages_from_fork_then_append():
    cache = make_cache(8)
    model = Model()
    r = new_with(cache, model, 8)        # pool full
    f = cache.fork(r)                    # forks need no pages
    model.fork(r, f)
    k, v = model.tokens(1)
    _assert_oom_leaves_cache_unchanged(cache, model, lambda: cache.append(f, k, v))
    _assert_oom_leaves_cache_unchanged(cache, model, lambda: cache.reserve([r, f]))
    _assert_oom_leaves_cache_unchanged(cache, model, lambda: cache.reserve(f))
    # The fork still ends where r ends: no empty leaf was left behind.
    assert cache.stats()["nodes"] == 1
    cache.prune(r)
    model.prune(r)
    _assert_oom_leaves_cache_unchanged(cache, model, lambda: cache.append(f, k, v))


# ============================================================================ unknown ids


def _unknown_id_cases():
    """(name, fn(cache, bad, good, child, q1)) for every public method taking request ids."""
    return [
        ("append", lambda c, x, g, ch, q: c.append(x, *(torch.zeros(L, 1, HK, D),) * 2)),
        ("fork", lambda c, x, g, ch, q: c.fork(x)),
        ("prune", lambda c, x, g, ch, q: c.prune(x)),
        ("accept-req", lambda c, x, g, ch, q: c.accept(x, ch)),
        ("accept-draft", lambda c, x, g, ch, q: c.accept(g, x)),
        ("accept-discard", lambda c, x, g, ch, q: c.accept(g, ch, discard=[x])),
        ("reserve-one", lambda c, x, g, ch, q: c.reserve(x)),
        ("reserve-many-tokens", lambda c, x, g, ch, q: c.reserve(x, 3)),
        ("reserve-list", lambda c, x, g, ch, q: c.reserve([g, x])),
        ("attend", lambda c, x, g, ch, q: c.attend(q, 0, [x])),
        ("prepare", lambda c, x, g, ch, q: c.prepare([g, x])),
        ("length", lambda c, x, g, ch, q: c.length(x)),
        ("slots", lambda c, x, g, ch, q: c.slots(x)),
        ("tree_info", lambda c, x, g, ch, q: c.tree_info([x])),
    ]


@pytest.mark.parametrize("kind", ["never-created", "negative", "pruned", "accepted-draft"])
@pytest.mark.parametrize("name, call", _unknown_id_cases(), ids=[n for n, _ in _unknown_id_cases()])
def test_unknown_request_ids(kind, name, call):
    cache = make_cache(32)
    model = Model()
    good = new_with(cache, model, 3)
    child = fork(cache, model, good)
    append(cache, model, child, 1)
    if kind == "never-created":
        bad = 999
    elif kind == "negative":
        bad = -1
    elif kind == "pruned":
        bad = cache.fork(child)
        cache.prune(bad)
    else:
        draft = cache.fork(good)
        bad = cache.fork(draft)
        cache.accept(draft, bad)  # bad's path now belongs to draft; bad is retired
        cache.prune(draft)
    q1 = model.queries(1)
    cache.attend(model.queries(2), 0)
    before = snapshot(cache)
    with pytest.raises(UnknownRequestError) as ei:
        call(cache, bad, good, child, q1)
    assert isinstance(ei.value, TreeCacheError) and isinstance(ei.value, LookupError)
    assert str(bad) in str(ei.value)
    if kind in ("pruned", "accepted-draft"):
        assert "pruned" in str(ei.value)
    assert bad not in cache
    assert_same_state(before, snapshot(cache))
    cache.check()


# ============================================================================ shapes


def _shape_cache():
    cache = make_cache(32)
    model = Model()
    r0 = new_with(cache, model, 4)
    fork(cache, model, r0)
    cache.attend(model.queries(2), 0)
    return cache, model


def _expect_shape_error(cache, call, *needles):
    before = snapshot(cache)
    with pytest.raises(ShapeMismatchError) as ei:
        call()
    assert isinstance(ei.value, TreeCacheError) and isinstance(ei.value, ValueError)
    msg = str(ei.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert_same_state(before, snapshot(cache))
    cache.check()


META = torch.device("meta")  # a device the cache is not on, available without a GPU


@pytest.mark.parametrize("shape", [(3, HQ, D), (1, HQ, D), (2, HQ * 2, D), (2, HQ, 32),
                                   (2, HQ * D), (1, 2, HQ, D)])
def test_attend_q_wrong_shape(shape):
    cache, _ = _shape_cache()
    q = torch.zeros(shape)
    _expect_shape_error(cache, lambda: cache.attend(q, 0), "q", str(tuple(shape)),
                        str([2, HQ, D]))


def test_attend_q_wrong_dtype_device_type():
    cache, _ = _shape_cache()
    q16 = torch.zeros(2, HQ, D, dtype=torch.float16)
    _expect_shape_error(cache, lambda: cache.attend(q16, 0), "q", "torch.float16", "torch.float32")
    qmeta = torch.zeros(2, HQ, D, device=META)
    _expect_shape_error(cache, lambda: cache.attend(qmeta, 0), "q", "meta", "cpu")
    _expect_shape_error(cache, lambda: cache.attend(np.zeros((2, HQ, D), np.float32), 0),
                        "q", "ndarray", str([2, HQ, D]))


@pytest.mark.parametrize("layer", [-1, L, 100, 1.0, "0", None])
def test_layer_out_of_range(layer):
    cache, model = _shape_cache()
    q = model.queries(2)
    _expect_shape_error(cache, lambda: cache.attend(q, layer), "layer", f"[0, {L})", repr(layer))
    slots = torch.zeros(1, dtype=torch.long)
    kv = torch.zeros(1, HK, D)
    _expect_shape_error(cache, lambda: cache.write(layer, slots, kv, kv), "layer", f"[0, {L})",
                        repr(layer))


def test_attend_out_buffer_mismatch():
    cache, model = _shape_cache()
    q = model.queries(2)
    _expect_shape_error(cache, lambda: cache.attend(q, 0, out=torch.zeros(3, HQ, D)),
                        "out", "(3, 4, 16)", "(2, 4, 16)")
    out64 = torch.zeros(2, HQ, D, dtype=torch.float64)
    _expect_shape_error(cache, lambda: cache.attend(q, 0, out=out64),
                        "out", "torch.float64", "torch.float32")
    # The kernels write the last dimension contiguously: a strided one is refused.
    strided = torch.zeros(2, HQ, 2 * D)[..., ::2]
    _expect_shape_error(cache, lambda: cache.attend(q, 0, out=strided),
                        "out", "contiguous last dimension", str(tuple(strided.stride())))
    _expect_shape_error(cache, lambda: cache.attend(q, 0, out=q.numpy()), "out", "ndarray")


@pytest.mark.parametrize("which", ["k", "v"])
def test_append_wrong_shape_dtype_device(which):
    cache, model = _shape_cache()
    r = cache.requests[0]
    good = torch.zeros(L, 2, HK, D)

    def call(bad):
        return lambda: cache.append(r, *((bad, good) if which == "k" else (good, bad)))

    want = f"[{L}, n, {HK}, {D}]"
    for shape in [(L + 1, 2, HK, D), (L, 2, HK + 1, D), (L, 2, HK, D * 2), (2, HK, D)]:
        _expect_shape_error(cache, call(torch.zeros(shape)), which, str(shape), want)
    _expect_shape_error(cache, call(torch.zeros(L, 2, HK, D, dtype=torch.float16)),
                        which, "torch.float16", "torch.float32")
    _expect_shape_error(cache, call(torch.zeros(L, 2, HK, D, device=META)), which, "meta", "cpu")
    _expect_shape_error(cache, call(torch.zeros(L, 3, HK, D)), "k", "v", "2", "3")


@pytest.mark.parametrize("which", ["k", "v"])
def test_write_wrong_shape_dtype_device(which):
    cache, model = _shape_cache()
    slots = cache.reserve(cache.requests)
    good = torch.zeros(2, HK, D)

    def call(bad):
        return lambda: cache.write(0, slots, *((bad, good) if which == "k" else (good, bad)))

    for shape in [(3, HK, D), (2, HK + 1, D), (2, HK, 8), (1, 2, HK, D)]:
        _expect_shape_error(cache, call(torch.zeros(shape)), which, str(shape), str([2, HK, D]))
    _expect_shape_error(cache, call(torch.zeros(2, HK, D, dtype=torch.bfloat16)),
                        which, "torch.bfloat16", "torch.float32")
    _expect_shape_error(cache, call(torch.zeros(2, HK, D, device=META)), which, "meta", "cpu")


def test_write_rejects_bad_slots():
    """slots of write() is a tensor argument like k and v: wrong dtype or shape is a
    ShapeMismatchError naming it, and nothing is written."""
    cache, model = _shape_cache()
    slots = cache.reserve(cache.requests)
    kv = torch.zeros(2, HK, D)
    _expect_shape_error(cache, lambda: cache.write(0, slots.int(), kv, kv),
                        "slots", "torch.int32", "torch.int64")
    _expect_shape_error(cache, lambda: cache.write(0, slots.view(2, 1), kv, kv), "slots", "(2, 1)")
    _expect_shape_error(cache, lambda: cache.write(0, slots.numpy(), kv, kv), "slots", "ndarray")
    # On the CPU the slots' range is checked too (a slot past the pool, or negative).
    n = cache.pool.num_slots
    for bad in ([0, n], [-1, 0]):
        _expect_shape_error(cache, lambda: cache.write(0, torch.tensor(bad), kv, kv),
                            "slots", f"[0, {n})", str(min(bad)), str(max(bad)))


def test_every_error_is_a_treecache_error():
    cache = make_cache(8)
    r = cache.new_request()
    with pytest.raises(TreeCacheError):
        cache.reserve([r], num_tokens=2)
    with pytest.raises(TreeCacheError):
        cache.reserve([r, r])
    with pytest.raises(TreeCacheError):
        cache.reserve(r, -1)
    with pytest.raises(TreeCacheError):
        cache.attend(torch.zeros(2, HQ, D), 0, [r, r])
    with pytest.raises(TreeCacheError):
        TreeKVCache(L, 3, 2, D, 8, device="cpu")
    with pytest.raises(TreeCacheError):
        TreeKVCache(L, HQ, HK, 24, 8, device="cpu")
    with pytest.raises(TreeCacheError):
        TreeKVCache(L, HQ, HK, D, 0, device="cpu")
    with pytest.raises(TreeCacheError):
        TreeKVCache(L, HQ, HK, D, 8, dtype=torch.float64, device="cpu")
    cache.check()


# ============================================================================ beam search memory


def _beam_search(P, W, G, pick_parents, backend="torch", num_layers=1):
    """Beam search over a P-token prompt: every step each beam is kept, forked or pruned
    (``pick_parents(step)`` gives the parent of each of the W next beams), then every
    beam decodes one token. Checks pages against the exact union of the beams' tokens."""
    cache = make_cache(P + W * G + 4, num_layers=num_layers, backend=backend)
    model = Model(num_layers=num_layers)
    root = new_with(cache, model, P)
    beams = [root] + [fork(cache, model, root) for _ in range(W - 1)]
    tokens = {b: frozenset() for b in beams}  # ids of each beam's generated tokens
    next_id = 0
    for step in range(G):
        parents = pick_parents(step)
        counts = np.bincount(parents, minlength=W)
        topology_changed = bool((counts != 1).any())
        before = cache.plan_version
        for b, c in zip(beams, counts):
            if c == 0:
                cache.prune(b)
                model.prune(b)
                del tokens[b]
        new_beams = []
        for b, c in zip(beams, counts):
            if c:
                new_beams.append(b)
                for _ in range(c - 1):
                    f = fork(cache, model, b)
                    tokens[f] = tokens[b]
                    new_beams.append(f)
        beams = new_beams
        decode_step(cache, model, beams)
        for b in beams:
            tokens[b] = tokens[b] | {next_id}
            next_id += 1
        for layer in range(num_layers):
            assert_attends(cache, model, model.queries(W), layer, beams)
        # At most one plan per step, and none when no beam was forked or pruned.
        assert cache.plan_version - before == (1 if topology_changed or step == 0 else 0)
        s = cache.stats()
        unique = P + len(frozenset().union(*tokens.values()))
        assert s["pages_used"] == s["unique_tokens"] == unique
        assert s["logical_tokens"] == W * (P + step + 1)
        cache.check()
    return cache


def test_beam_search_memory_without_pruning_is_prompt_plus_beams():
    P, W, G = 64, 4, 24
    cache = _beam_search(P, W, G, lambda step: np.arange(4))
    s = cache.stats()
    assert s["pages_used"] == P + W * G
    assert s["logical_tokens"] == W * (P + G)
    assert s["kv_bytes_used"] * 2 < s["kv_bytes_unshared"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_memory_with_fork_and_prune(seed):
    P, W, G = 64, 4, 24
    rng = np.random.default_rng(seed)
    probs = [0.4, 0.3, 0.2, 0.1]
    cache = _beam_search(P, W, G, lambda step: np.sort(rng.choice(W, size=W, p=probs)))
    s = cache.stats()
    assert P + G <= s["pages_used"] <= P + W * G
    assert s["pages_used"] < W * (P + G) / 2
    assert s["sharing_ratio"] > 2


def test_beam_search_triton_few_steps():
    _beam_search(16, 3, 4, lambda step: np.array([0, 0, 2]) if step % 2 else np.arange(3),
                 backend="auto", num_layers=2)


# ============================================================================ state machine


def _pick(items, i):
    return items[i % len(items)]


def _has_requests(machine) -> bool:
    return machine.model is not None and bool(machine.model.requests)


def _has_room(machine) -> bool:
    return machine.model is not None and len(machine.model.requests) < machine.MAX_REQUESTS


class CacheMachine(RuleBasedStateMachine):
    """Random operations on a TreeKVCache and on a Model; they must always agree."""

    DTYPE = torch.float32
    BACKEND = "auto"
    MAX_REQUESTS = 8
    MAX_DRAFTS = 6

    def __init__(self):
        super().__init__()
        self.cache: TreeKVCache | None = None
        self.model: Model | None = None
        self.out_of_pages = 0

    @initialize(page_size=st.sampled_from([1, 1, 2, 4]), num_pages=st.integers(6, 30),
                headroom=st.sampled_from([0, 2, 3, 64, 64]), seed=st.integers(0, 2**16),
                prompts=st.lists(st.integers(0, 8), min_size=1, max_size=3))
    def setup(self, page_size, num_pages, headroom, seed, prompts):
        self._setup_cache(page_size, num_pages, headroom, seed, prompts)

    def _setup_cache(self, page_size, num_pages, headroom, seed, prompts):
        self.cache = make_cache(num_pages * page_size, page_size=page_size, dtype=self.DTYPE,
                                backend=self.BACKEND, plan_headroom=headroom)
        self.model = Model(dtype=self.DTYPE, generator=torch.Generator().manual_seed(seed))
        for n in prompts:
            self.new_request(n)

    # ------------------------------------------------------------------ helpers

    def _live(self) -> list[int]:
        return self.model.requests

    def _guarded(self, call):
        """Run a call that may run out of pages; on OutOfPagesError the cache is as before."""
        before = snapshot(self.cache)
        try:
            return call(), True
        except OutOfPagesError:
            self.out_of_pages += 1
            event("out of pages")
            assert_same_state(before, snapshot(self.cache))
            return None, False

    def _write_tokens(self, reqs, slots):
        k, v = self.model.tokens(len(reqs))
        for layer in range(self.cache.num_layers):
            self.cache.write(layer, slots, k[layer], v[layer])
        for i, r in enumerate(reqs):
            self.model.append(r, k[:, i:i + 1], v[:, i:i + 1])

    # ------------------------------------------------------------------ rules

    @precondition(_has_room)
    @rule(n=st.integers(0, 5))
    def new_request(self, n):
        r = self.cache.new_request()
        assert r not in self.model.k
        self.model.new(r)
        if n:
            self.append_tokens(r, n)

    def append_tokens(self, r, n):
        k, v = self.model.tokens(n)
        slots, ok = self._guarded(lambda: self.cache.append(r, k, v))
        if ok:
            assert slots.shape == (n,)
            self.model.append(r, k, v)

    @precondition(_has_requests)
    @rule(i=st.integers(0, 1000), n=st.integers(1, 5))
    def append(self, i, n):
        self.append_tokens(_pick(self._live(), i), n)

    @precondition(lambda self: _has_room(self) and _has_requests(self))
    @rule(i=st.integers(0, 1000))
    def fork(self, i):
        r = _pick(self._live(), i)
        pages = self.cache.stats()["pages_used"]
        f = self.cache.fork(r)
        self.model.fork(r, f)
        assert self.cache.stats()["pages_used"] == pages
        assert ids(self.cache.slots(f)) == ids(self.cache.slots(r))

    @precondition(lambda self: self.model is not None and len(self.model.requests) > 1)
    @rule(i=st.integers(0, 1000))
    def prune(self, i):
        # The last request is pruned by teardown (keeping one live keeps every rule enabled).
        r = _pick(self._live(), i)
        self.cache.prune(r)
        self.model.prune(r)
        with pytest.raises(UnknownRequestError):
            self.cache.length(r)

    @precondition(_has_requests)
    @rule(which=st.none() | st.lists(st.integers(0, 1000), min_size=1, max_size=8))
    def decode_step(self, which):
        """reserve + write every layer, no attend."""
        live = self._live()
        reqs = live if which is None else list(dict.fromkeys(_pick(live, i) for i in which))
        slots, ok = self._guarded(lambda: self.cache.reserve(None if which is None else reqs))
        if ok:
            assert slots.shape == (len(reqs),)
            self._write_tokens(reqs, slots)

    @precondition(_has_requests)
    @rule(steps=st.integers(1, 4),
          which=st.none() | st.lists(st.integers(0, 1000), min_size=1, max_size=8))
    def decode_loop(self, steps, which):
        """The model loop: per step reserve, then write + attend for every layer."""
        live = self._live()
        reqs = live if which is None else list(dict.fromkeys(_pick(live, i) for i in which))
        key = None if which is None else reqs
        for _ in range(steps):
            slots, ok = self._guarded(lambda: self.cache.reserve(key))
            if not ok:
                return
            self._write_tokens(reqs, slots)
            for layer in range(L):
                assert_attends(self.cache, self.model, self.model.queries(len(reqs)), layer, key)

    @precondition(_has_requests)
    @rule(i=st.integers(0, 1000), widths=st.lists(st.integers(1, 3), min_size=1, max_size=3),
          keep=st.none() | st.integers(0, 1000), layer=st.integers(0, L - 1))
    def speculate(self, i, widths, keep, layer):
        """Draft subtree under a request, verify one query per draft, accept one path."""
        req = _pick(self._live(), i)
        drafts, frontier = [], [req]
        ok = True
        for width in widths:
            nxt = []
            for parent in frontier:
                for _ in range(width):
                    if len(drafts) >= self.MAX_DRAFTS or not ok:
                        break
                    d = self.cache.fork(parent)
                    self.model.fork(parent, d)
                    drafts.append(d)
                    slots, ok = self._guarded(lambda: self.cache.reserve(d, 1))
                    if ok:
                        self._write_tokens([d], slots)
                        nxt.append(d)
            frontier = nxt
        if ok:
            q = self.model.queries(len(drafts))
            assert_attends(self.cache, self.model, q, layer, drafts)
        if keep is None or not ok:
            for d in drafts:
                self.cache.prune(d)
                self.model.prune(d)
            return
        chosen = _pick(drafts, keep)
        rest = [d for d in drafts if d != chosen]
        pages = self.cache.stats()["pages_used"]
        self.cache.accept(req, chosen, discard=rest)
        self.model.accept(req, chosen, discard=rest)
        assert self.cache.stats()["pages_used"] <= pages
        for d in drafts:
            assert d not in self.cache

    @precondition(_has_requests)
    @rule()
    def attend_all_layers(self):
        for layer in range(L):
            q = self.model.queries(len(self.model.requests))
            out = torch.full_like(q, float("nan"))
            got = assert_attends(self.cache, self.model, q, layer, out=out)
            assert got is out

    @precondition(_has_requests)
    @rule(order=st.lists(st.integers(0, 1000), min_size=1, max_size=8), layer=st.integers(0, L - 1))
    def attend_subset(self, order, layer):
        live = self._live()
        reqs = list(dict.fromkeys(_pick(live, i) for i in order))
        assert_attends(self.cache, self.model, self.model.queries(len(reqs)), layer, reqs)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def consistent(self):
        if self.cache is None:
            return
        self.cache.check()
        live = self._live()
        assert self.cache.requests == live
        assert [self.cache.length(r) for r in live] == [self.model.length(r) for r in live]
        s = self.cache.stats()
        assert s["logical_tokens"] == sum(self.model.length(r) for r in live)
        assert s["unique_tokens"] <= s["pages_used"] * self.cache.page_size
        assert s["pages_used"] + s["pages_free"] == s["pages_total"]

    def teardown(self):
        if self.cache is None:
            return
        for r in self._live():
            self.cache.prune(r)
        self.cache.check()
        s = self.cache.stats()
        assert s["pages_free"] == s["pages_total"] and s["pages_used"] == 0
        assert s["nodes"] == 0 and s["requests"] == 0


_SETTINGS = dict(deadline=None, stateful_step_count=STEPS,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class TritonFp32Machine(CacheMachine):
    DTYPE, BACKEND = torch.float32, "auto"


class TritonFp16Machine(CacheMachine):
    DTYPE, BACKEND = torch.float16, "auto"


class TorchFp32Machine(CacheMachine):
    DTYPE, BACKEND = torch.float32, "torch"


#: Planner settings that put the machine's small trees into each masked form.
MASKED_FORMS = {
    "inline": dict(INLINE_MIN_PROGRAMS=0),
    "fused": dict(INLINE=False, FUSE_MIN_PROGRAMS=0, FUSE_PACK_MIN_PROGRAMS=None,
                  FUSE_PACK_MAX_PROGRAMS=None),
    "shared": dict(INLINE=False, SHARED_INLINE=4, SHARED_INLINE_MAX_READS=1e9),
}


class MaskedTorchFp32Machine(TorchFp32Machine):
    """The same operations with the planner's masked forms on (plans with growth
    headroom keep them: the requests of a masked range share its room)."""

    @initialize(page_size=st.sampled_from([1, 2]), num_pages=st.integers(6, 30),
                headroom=st.sampled_from([0, 2, 3, 64]), seed=st.integers(0, 2**16),
                prompts=st.lists(st.integers(0, 8), min_size=1, max_size=3),
                form=st.sampled_from(sorted(MASKED_FORMS)))
    def setup(self, page_size, num_pages, headroom, seed, prompts, form):
        from treecache import plan as plan_module

        self._saved = {name: getattr(plan_module, name) for name in MASKED_FORMS[form]}
        for name, value in MASKED_FORMS[form].items():
            setattr(plan_module, name, value)
        self._setup_cache(page_size, num_pages, headroom, seed, prompts)

    def teardown(self):
        from treecache import plan as plan_module

        try:
            super().teardown()
        finally:
            for name, value in getattr(self, "_saved", {}).items():
                setattr(plan_module, name, value)


TestTritonFp32Machine = TritonFp32Machine.TestCase
TestTritonFp32Machine.settings = settings(max_examples=EXAMPLES, **_SETTINGS)
TestTritonFp16Machine = TritonFp16Machine.TestCase
TestTritonFp16Machine.settings = settings(max_examples=max(1, EXAMPLES // 2), **_SETTINGS)
TestTorchFp32Machine = TorchFp32Machine.TestCase
TestTorchFp32Machine.settings = settings(max_examples=EXAMPLES, **_SETTINGS)
TestMaskedTorchFp32Machine = MaskedTorchFp32Machine.TestCase
TestMaskedTorchFp32Machine.settings = settings(max_examples=EXAMPLES, **_SETTINGS)
