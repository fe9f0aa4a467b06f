"""GPU tests of TreeKVCache: real sizes, compiled Triton kernels, CUDA graphs.

Skipped on a machine without a CUDA GPU (the ``cuda`` fixture of conftest.py).

* Random operation sequences (new request, append, fork, prune, decode steps, speculative
  draft trees, accept) at model-like sizes: several layers, 32/8 and 32/32 heads,
  head_dim 128, fp16 and bf16, dozens of requests with a few hundred tokens each.
  ``check()`` after every operation; ``attend`` on every layer (and on a shuffled subset
  of requests) against ``kernels.reference_decode`` over a plain per-request model.
* CUDA graphs: one decode step (``attend`` for every layer into preallocated outputs,
  q from static buffers) is captured once after ``prepare()``; append-only steps
  (``reserve`` + ``write`` outside the graph) then only replay it. ``plan_version`` must
  not change while the steps stay within ``plan_headroom``; past it, the test
  re-captures whenever ``plan_version`` changes and the outputs stay exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_model import RequestKV
from treecache import OutOfPagesError, TreeKVCache

pytestmark = pytest.mark.gpu

TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16"}
HEAD_DIM = 128


def Model(num_layers, num_qo_heads, num_kv_heads, head_dim, dtype, device, seed) -> RequestKV:
    return RequestKV(num_layers, num_qo_heads, num_kv_heads, head_dim, dtype=dtype,
                     device=device, seed=seed)


def assert_attends(cache, model, q, layer, requests=None, out=None):
    reqs = cache.requests if requests is None else list(requests)
    got = cache.attend(q, layer, requests, out=out)
    ref = model.reference(q, layer, reqs, cache.sm_scale)
    tol = TOL[cache.dtype]
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)


def write_step(cache, model, reqs, slots):
    k, v = model.tokens(len(reqs))
    for layer in range(cache.num_layers):
        cache.write(layer, slots, k[layer], v[layer])
    for i, r in enumerate(reqs):
        model.append(r, k[:, i:i + 1], v[:, i:i + 1])


def add_prompts(cache, model, lengths, forks):
    """A new request per prompt length, its tokens appended, then forked ``forks`` times."""
    for n in lengths:
        r = cache.new_request()
        model.new(r)
        k, v = model.tokens(n)
        cache.append(r, k, v)
        model.append(r, k, v)
        for _ in range(forks):
            model.fork(r, cache.fork(r))


# ============================================================================ random operations


class Driver:
    """Seeded random operations on a cache and its model (OutOfPagesError is checked)."""

    def __init__(self, cache, model, seed, max_requests):
        self.cache, self.model = cache, model
        self.rng = np.random.default_rng(seed)
        self.max_requests = max_requests
        self.out_of_pages = 0

    def live(self):
        return list(self.model.k)

    def pick(self):
        live = self.live()
        return live[int(self.rng.integers(len(live)))]

    def guarded(self, call):
        state = (self.cache.requests, self.cache.stats(),
                 {r: self.cache.slots(r).tolist() for r in self.cache.requests})
        try:
            return call(), True
        except OutOfPagesError:
            self.out_of_pages += 1
            after = (self.cache.requests, self.cache.stats(),
                     {r: self.cache.slots(r).tolist() for r in self.cache.requests})
            assert after == state
            return None, False

    def new_request(self, n):
        r = self.cache.new_request()
        self.model.new(r)
        self.append(r, n)
        return r

    def append(self, r, n):
        k, v = self.model.tokens(n)
        _, ok = self.guarded(lambda: self.cache.append(r, k, v))
        if ok:
            self.model.append(r, k, v)

    def fork(self, r):
        f = self.cache.fork(r)
        self.model.fork(r, f)
        return f

    def prune(self, r):
        self.cache.prune(r)
        self.model.prune(r)

    def decode_steps(self, steps, attend):
        reqs = self.live()
        for _ in range(steps):
            slots, ok = self.guarded(lambda: self.cache.reserve(reqs))
            if not ok:
                return
            write_step(self.cache, self.model, reqs, slots)
            if attend:
                for layer in range(self.cache.num_layers):
                    assert_attends(self.cache, self.model, self.model.queries(len(reqs)), layer)

    def speculate(self, req, widths):
        drafts, frontier = [], [req]
        for width in widths:
            nxt = []
            for parent in frontier:
                for _ in range(width):
                    d = self.fork(parent)
                    drafts.append(d)
                    slots, ok = self.guarded(lambda: self.cache.reserve(d, 1))
                    if not ok:
                        for x in drafts:
                            self.prune(x)
                        return
                    write_step(self.cache, self.model, [d], slots)
                    nxt.append(d)
            frontier = nxt
        layer = int(self.rng.integers(self.cache.num_layers))
        assert_attends(self.cache, self.model, self.model.queries(len(drafts)), layer, drafts)
        chosen = drafts[int(self.rng.integers(len(drafts)))]
        rest = [d for d in drafts if d != chosen]
        self.cache.accept(req, chosen, discard=rest)
        self.model.k[req] = self.model.k.pop(chosen)
        self.model.v[req] = self.model.v.pop(chosen)
        for d in rest:
            self.model.prune(d)

    def attend_all(self):
        for layer in range(self.cache.num_layers):
            assert_attends(self.cache, self.model, self.model.queries(len(self.live())), layer)
        live = self.live()
        sub = [live[i] for i in self.rng.permutation(len(live))[: max(1, len(live) // 2)]]
        assert_attends(self.cache, self.model, self.model.queries(len(sub)), 0, sub)

    def random_op(self):
        op = self.rng.choice(["append", "fork", "prune", "decode", "speculate", "new"],
                             p=[0.2, 0.25, 0.15, 0.2, 0.1, 0.1])
        n_live = len(self.live())
        if op == "new" and n_live < self.max_requests:
            self.new_request(int(self.rng.integers(1, 300)))
        elif op == "fork" and n_live < self.max_requests:
            self.fork(self.pick())
        elif op == "prune" and n_live > 1:
            self.prune(self.pick())
        elif op == "append":
            self.append(self.pick(), int(self.rng.integers(1, 40)))
        elif op == "decode":
            self.decode_steps(int(self.rng.integers(1, 4)), attend=bool(self.rng.random() < 0.3))
        elif op == "speculate":
            self.speculate(self.pick(), [int(x) for x in self.rng.integers(1, 3, size=3)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_qo_heads, num_kv_heads", [(32, 8), (32, 32)], ids=["gqa4", "mha"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_random_operations_at_real_sizes(cuda, dtype, num_qo_heads, num_kv_heads, page_size):
    num_layers = 4
    seed = num_kv_heads + page_size
    cache = TreeKVCache(num_layers, num_qo_heads, num_kv_heads, HEAD_DIM, 12_000,
                        page_size=page_size, dtype=dtype, device=cuda)
    model = Model(num_layers, num_qo_heads, num_kv_heads, HEAD_DIM, dtype, cuda, seed)
    drv = Driver(cache, model, seed, max_requests=48)
    # A forest: three prompts of a few hundred tokens, each forked into a dozen requests.
    for n in (200, 300, 250):
        root = drv.new_request(n)
        for _ in range(11):
            f = drv.fork(root)
            drv.append(f, int(drv.rng.integers(1, 60)))
    cache.check()
    drv.attend_all()
    for i in range(60):
        drv.random_op()
        cache.check()
        if i % 10 == 9:
            drv.attend_all()
    drv.decode_steps(3, attend=True)
    s = cache.stats()
    assert s["requests"] >= 12 and s["sharing_ratio"] > 1
    assert min(cache.length(r) for r in cache.requests) > 0
    for r in drv.live():
        drv.prune(r)
    cache.check()
    assert cache.stats()["pages_used"] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_out_of_pages_at_real_sizes(cuda, dtype):
    cache = TreeKVCache(2, 32, 8, HEAD_DIM, 2048, page_size=16, dtype=dtype, device=cuda)
    model = Model(2, 32, 8, HEAD_DIM, dtype, cuda, 7)
    drv = Driver(cache, model, 7, max_requests=64)
    root = drv.new_request(1000)
    for _ in range(40):
        drv.append(drv.fork(root), 30)
    assert drv.out_of_pages > 0
    cache.check()
    drv.attend_all()
    drv.decode_steps(2, attend=True)
    cache.check()


# ============================================================================ device-derived slots


@pytest.mark.parametrize("page_size", [1, 2])
def test_append_steps_derive_their_slots_on_the_device(cuda, monkeypatch, page_size):
    # reserve() for every live request: where every request takes a fresh page, the
    # slots come from the device mirror of the free stack (no host-to-device copy) and
    # equal the cache's own record; frees (a prune) are copied to the mirror once, at
    # the next such step; attention stays exact throughout.
    import treecache.cache as cache_mod
    from treecache.plan import DecodePlan

    cache = TreeKVCache(2, 32, 8, HEAD_DIM, 8192, page_size=page_size, dtype=torch.float16,
                        device=cuda, plan_headroom=64)
    model = Model(2, 32, 8, HEAD_DIM, torch.float16, cuda, 3)
    add_prompts(cache, model, (96, 130), forks=5)
    calls = {"copied": 0, "derived": 0, "mirror": 0}

    def counted(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(DecodePlan, "send_tails", counted("copied", DecodePlan.send_tails))
    monkeypatch.setattr(DecodePlan, "send_tails_from_stack",
                        counted("derived", DecodePlan.send_tails_from_stack))
    alloc = cache.pool.allocator
    monkeypatch.setattr(alloc, "stack_entries", counted("mirror", alloc.stack_entries))

    def step(check):
        reqs = cache.requests
        slots = cache.reserve()
        want = np.array([cache.slots(r)[-1] for r in reqs])
        assert np.array_equal(slots.cpu().numpy(), want)
        write_step(cache, model, reqs, slots)
        if check:
            for layer in range(cache.num_layers):
                assert_attends(cache, model, model.queries(len(reqs)), layer)

    step(check=True)  # first step: new leaves, a re-plan
    before = dict(calls)
    for i in range(2 * page_size):
        step(check=(i % 2 == 1))
    # Every request takes a fresh page once every page_size steps; the other steps
    # (page_size > 1) copy their slots with the plan update.
    assert calls["derived"] - before["derived"] == 2
    assert calls["copied"] - before["copied"] == 2 * (page_size - 1)
    assert before["mirror"] == 0 and calls["mirror"] == 1  # the whole stack, once
    # Free pages (prunes: more pages than the next step takes), re-plan, then steps
    # again: the mirror gets the freed entries once.
    free = alloc.num_free
    for victim in cache.requests[::2]:
        cache.prune(victim)
        model.prune(victim)
    assert alloc.num_free - free > len(cache.requests)
    step(check=True)
    mirrored = calls["mirror"]
    for i in range(2 * page_size):
        step(check=(i % 2 == 1))
    assert calls["mirror"] == mirrored + 1
    cache.check()
    # The same operations with the mirror off give the same slots (host-determined).
    monkeypatch.setattr(cache_mod, "DEVICE_STEP_SLOTS", False)
    derived = calls["derived"]
    step(check=True)
    assert calls["derived"] == derived


def _beam_step_regions(device, steps=6, grow_at=None):
    """Beam-like steps (fork, prune, reserve, re-plan) on a new cache; after each
    re-plan the device buffer's used regions (small arrays, kv entries, masks), and
    attention checked against the model. ``grow_at``: the step before which one request
    appends 700 tokens (the slot table outgrows the buffers). Returns the regions and
    the last plan's buffers."""
    cache = TreeKVCache(2, 32, 8, HEAD_DIM, 16_384, dtype=torch.float16, device=device,
                        plan_headroom=4)
    model = Model(2, 32, 8, HEAD_DIM, torch.float16, device, 11)
    add_prompts(cache, model, (300, 77), forks=3)
    rng = np.random.default_rng(2)
    regions = []
    for step in range(steps):
        reqs = cache.requests
        if step == grow_at:
            k, v = model.tokens(700)
            cache.append(reqs[0], k, v)
            model.append(reqs[0], k, v)
        parents = [reqs[i] for i in rng.integers(0, len(reqs), size=len(reqs))]
        new = [cache.fork(p) for p in parents]
        for p, c in zip(parents, new):
            model.fork(p, c)
        cache.prune(reqs)
        for r in reqs:
            model.prune(r)
        write_step(cache, model, new, cache.reserve(new))
        plan = cache.prepare()
        buf = plan.buffers
        torch.cuda.synchronize()
        used = dict(small=buf.dev[:buf.offsets["runs"]],
                    kv=buf.dev_view("kv_indices", plan.num_kv_entries),
                    slot0=buf.dev_view("vnode_slot0", plan.num_vnodes))
        if plan.masked:
            used["mask"] = buf.dev_view("kv_mask", plan.num_kv_entries)
        regions.append({k: v.cpu().clone() for k, v in used.items()})
        q = torch.randn(len(new), 32, HEAD_DIM, dtype=torch.float16, device=device)
        for layer in range(2):
            assert_attends(cache, model, q, layer)
    return regions, cache.prepare().buffers


def assert_same_regions(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_plan_upload_reads_the_staging_buffer_in_place(cuda, monkeypatch, caplog):
    # Two caches, one uploading with a single launch that reads the pinned staging
    # buffer in place, one copying it first: the device buffers' used regions are equal
    # after every re-plan, and attention is exact. Where the device cannot read the
    # staging buffer (simulated: the launch raises as Triton does for such a pointer),
    # the upload falls back to the copy for good, with a warning, and stays exact.
    import logging

    import treecache.plan as plan_mod

    real_launcher = plan_mod.expand_runs_launcher

    def refusing_launcher(*args, src=None, **kw):
        if src is None:
            return real_launcher(*args, **kw)

        def refuse(dev):
            raise ValueError("Pointer argument (at 1) cannot be accessed from Triton")
        return refuse

    def run(zero_copy, fail=False):
        monkeypatch.setattr(plan_mod, "ZERO_COPY_UPLOAD", zero_copy)
        if fail:
            monkeypatch.setattr(plan_mod, "expand_runs_launcher", refusing_launcher)
        return _beam_step_regions(cuda)

    a, buf_a = run(True)
    b, _ = run(False)
    assert buf_a._zero_copy and any(k[2] for k in buf_a._expand)
    assert_same_regions(a, b)
    with caplog.at_level(logging.WARNING, logger="treecache.plan"):
        c, buf_c = run(True, fail=True)
    assert not buf_c._zero_copy and "copying it instead" in caplog.text
    assert_same_regions(c, b)


def test_replan_slot_table_in_place_and_run_flags_give_the_same_buffers(cuda, monkeypatch):
    # A re-plan that joins the slot table straight into the staging buffer and hands the
    # planner the nodes' run flags writes the same device regions as one that joins a
    # new array (copied by the upload) and lets the planner find the runs, through a
    # growth of the buffers' slot region; the in-place table was used on every re-plan.
    import treecache.cache as cache_mod

    real = TreeKVCache._slot_table
    kinds = []

    def spy(self, parts, total):
        out = real(self, parts, total)
        kinds.append(out.dtype)
        return out

    monkeypatch.setattr(TreeKVCache, "_slot_table", spy)
    monkeypatch.setattr(cache_mod, "NODE_RUNS", True)
    monkeypatch.setattr(cache_mod, "SLOT_TABLE_IN_PLACE", True)
    a, buf_a = _beam_step_regions(cuda, steps=8, grow_at=4)
    assert kinds and all(k == np.int32 for k in kinds[1:]), kinds
    gen_a = buf_a.generation
    monkeypatch.setattr(cache_mod, "NODE_RUNS", False)
    monkeypatch.setattr(cache_mod, "SLOT_TABLE_IN_PLACE", False)
    kinds.clear()
    b, _ = _beam_step_regions(cuda, steps=8, grow_at=4)
    assert all(k == np.int64 for k in kinds)
    assert gen_a >= 2  # the slot region grew during the run
    assert_same_regions(a, b)
    # Both kinds of vnodes: contiguous (a first slot) and gathered (-1).
    assert any((r["slot0"] >= 0).any() for r in a) and any((r["slot0"] < 0).any() for r in a)


def test_a_replan_waits_for_the_last_upload_once(cuda, monkeypatch):
    # A re-plan makes the staging buffer writable before it joins the slot table and
    # again before it writes the plan's arrays: only the first waits for the upload's
    # event; the next upload needs a wait again.
    waits = []
    real = torch.cuda.Event.synchronize

    def counted(self):
        waits.append(self)
        return real(self)

    monkeypatch.setattr(torch.cuda.Event, "synchronize", counted)
    cache = TreeKVCache(1, 32, 8, HEAD_DIM, 4096, dtype=torch.float16, device=cuda,
                        plan_headroom=4)
    model = Model(1, 32, 8, HEAD_DIM, torch.float16, cuda, 3)
    add_prompts(cache, model, (200,), forks=3)
    cache.prepare()
    for step in range(4):
        reqs = cache.requests
        new = [cache.fork(r) for r in reqs[:2] for _ in range(2)]
        for p, c in zip([r for r in reqs[:2] for _ in range(2)], new):
            model.fork(p, c)
        cache.prune(reqs)
        for r in reqs:
            model.prune(r)
        write_step(cache, model, new, cache.reserve(new))
        waits.clear()
        cache.prepare()
        assert len(waits) == 1, step
        q = torch.randn(len(new), 32, HEAD_DIM, dtype=torch.float16, device=cuda)
        assert_attends(cache, model, q, 0)


# ============================================================================ CUDA graphs


def _beam_like_cache(device, dtype, num_layers, plan_headroom, num_qo_heads=32, num_kv_heads=8):
    """Three prompts, each forked into 8 requests, one decode step: 24 exclusive leaves."""
    cache = TreeKVCache(num_layers, num_qo_heads, num_kv_heads, HEAD_DIM, 16_384, dtype=dtype,
                        device=device, plan_headroom=plan_headroom)
    model = Model(num_layers, num_qo_heads, num_kv_heads, HEAD_DIM, dtype, device, 0)
    add_prompts(cache, model, (256, 384, 128), forks=7)
    reqs = cache.requests
    write_step(cache, model, reqs, cache.reserve(reqs))
    return cache, model, reqs


class GraphStep:
    """One captured decode step: attend of every layer, q from static buffers, into outs."""

    def __init__(self, cache, num_requests):
        nl, hq, d = cache.num_layers, cache.num_qo_heads, cache.head_dim
        dev, dt = cache.device, cache.dtype
        self.cache = cache
        self.q = [torch.zeros(num_requests, hq, d, dtype=dt, device=dev) for _ in range(nl)]
        self.out = [torch.zeros(num_requests, hq, d, dtype=dt, device=dev) for _ in range(nl)]
        self.captures = 0
        self.capture()

    def _run(self):
        for layer in range(self.cache.num_layers):
            self.cache.attend(self.q[layer], layer, out=self.out[layer])

    def capture(self):
        self.cache.prepare()
        # Warm up (compiles the kernels) on a side stream, as torch.cuda.graphs asks.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.version = self.cache.plan_version
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._run()
        torch.cuda.synchronize()
        assert self.cache.plan_version == self.version, "planning happened during capture"
        self.captures += 1

    def replay_checked(self, model, reqs, step_index):
        """Fresh queries into the static buffers, poisoned outputs, one replay; every
        layer's output must match the model's reference."""
        cache = self.cache
        qs = [model.queries(len(reqs)) for _ in range(cache.num_layers)]
        for layer in range(cache.num_layers):
            self.q[layer].copy_(qs[layer])
            self.out[layer].fill_(float("nan"))
        self.graph.replay()
        torch.cuda.synchronize()
        tol = TOL[cache.dtype]
        for layer in range(cache.num_layers):
            ref = model.reference(qs[layer], layer, reqs, cache.sm_scale)
            torch.testing.assert_close(self.out[layer].float(), ref, atol=tol, rtol=tol,
                                       msg=lambda m: f"step {step_index} layer {layer}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_cuda_graph_replay_of_append_only_steps(cuda, dtype):
    num_layers = 4
    cache, model, reqs = _beam_like_cache(cuda, dtype, num_layers, plan_headroom=64)
    step = GraphStep(cache, len(reqs))
    version = cache.plan_version
    rebuilds = cache.stats()["plan_rebuilds"]
    for i in range(20):
        slots = cache.reserve(reqs)          # outside the graph: slots for the new token
        write_step(cache, model, reqs, slots)
        step.replay_checked(model, reqs, i)
        assert cache.plan_version == version, f"the plan was rebuilt at append-only step {i}"
    cache.prepare()
    assert cache.plan_version == version and cache.stats()["plan_rebuilds"] == rebuilds
    assert step.captures == 1
    # The eager path agrees with the replayed one.
    for layer in range(num_layers):
        assert_attends(cache, model, model.queries(len(reqs)), layer)
    assert cache.plan_version == version


@pytest.mark.parametrize("num_qo_heads, num_kv_heads", [(32, 8), (32, 32)], ids=["gqa4", "mha"])
def test_cuda_graph_recaptured_past_plan_headroom(cuda, num_qo_heads, num_kv_heads):
    num_layers, headroom, steps = 3, 6, 24
    cache, model, reqs = _beam_like_cache(cuda, torch.float16, num_layers, headroom,
                                          num_qo_heads, num_kv_heads)
    step = GraphStep(cache, len(reqs))
    recaptured_at = []
    for i in range(steps):
        slots = cache.reserve(reqs)
        write_step(cache, model, reqs, slots)
        cache.prepare()                      # re-plans here if the headroom ran out
        if cache.plan_version != step.version:
            step.capture()
            recaptured_at.append(i)
        step.replay_checked(model, reqs, i)
    # The plan captured first had room for `headroom` tokens per request; each re-plan
    # gives the same room again.
    assert recaptured_at == list(range(headroom, steps, headroom + 1))
    assert step.captures == 1 + len(recaptured_at)


@pytest.mark.parametrize("num_qo_heads, num_kv_heads", [(32, 8), (16, 1)], ids=["gqa4", "gqa16"])
def test_cuda_graphs_kept_by_launch_key_replay_beam_steps(cuda, num_qo_heads, num_kv_heads):
    """Beam search with padded phases: every step forks and prunes (a re-plan), and the
    step's attends run as the replay of a graph captured for its plan's launch key,
    captured only for keys not met before. Every replay matches the model, and graphs
    captured for earlier plans serve most steps. (At 32/8 the plans have three keys,
    two of them with the same modes and other phase sizes.)"""
    num_layers, width, steps = 2, 24, 16
    cache = TreeKVCache(num_layers, num_qo_heads, num_kv_heads, HEAD_DIM, 8192,
                        dtype=torch.float16, device=cuda, plan_headroom=4, pad_phases=True)
    model = Model(num_layers, num_qo_heads, num_kv_heads, HEAD_DIM, torch.float16, cuda, 3)
    add_prompts(cache, model, (1500,), forks=width - 1)
    beams = cache.requests
    graphs = {}
    rng = np.random.default_rng(5)
    reused = 0
    for i in range(steps):
        parents = [beams[j] for j in rng.integers(0, width // 2, size=width)]
        new = []
        for p in parents:
            f = cache.fork(p)
            model.fork(p, f)
            new.append(f)
        for b in beams:
            cache.prune(b)
            model.prune(b)
        beams = new
        write_step(cache, model, beams, cache.reserve(beams))
        key = cache.prepare(beams).launch_key
        step = graphs.get(key)
        if step is None:
            step = graphs[key] = GraphStep(cache, width)
        else:
            reused += 1
        assert cache.requests == beams  # GraphStep attends the live requests in order
        step.replay_checked(model, beams, i)
    assert cache.plan_version == steps
    assert reused >= steps // 2, f"{len(graphs)} graphs for {steps} plans"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
def test_fused_kv_write_matches_two_copies(cuda, monkeypatch, dtype):
    # write() stores K and V with one prepared launch (FUSED_KV_WRITE) where the sources'
    # rows are contiguous, else with two index_copy_ calls: the pools must come out the
    # same either way, for the layouts a model passes (contiguous, cut from a fused
    # projection, misaligned by one element) and one the kernel cannot read.
    import treecache.cache as cache_mod

    hk, d, layers = 8, 128, 2
    gen = torch.Generator(device=cuda).manual_seed(7)
    caches = [TreeKVCache(layers, 32, hk, d, capacity_tokens=4096, dtype=dtype, device=cuda)
              for _ in range(2)]
    for c in caches:
        r = c.new_request()
        c.reserve(r, 3)

    def sources(n, layout):
        if layout == "contiguous":
            return (torch.randn(n, hk, d, generator=gen, device=cuda, dtype=dtype),
                    torch.randn(n, hk, d, generator=gen, device=cuda, dtype=dtype))
        if layout == "fused":
            qkv = torch.randn(n, 48, d, generator=gen, device=cuda, dtype=dtype)
            return qkv[:, 32:40], qkv[:, 40:48]
        if layout == "misaligned":
            flat = torch.randn(2 * n * hk * d + 1, generator=gen, device=cuda, dtype=dtype)
            return (flat[1:n * hk * d + 1].view(n, hk, d),
                    flat[n * hk * d + 1:].view(n, hk, d))
        t = torch.randn(n, d, hk, generator=gen, device=cuda, dtype=dtype)
        return t.transpose(1, 2), t.transpose(1, 2)  # heads not major: two copies

    for n, layout in [(300, "contiguous"), (5, "contiguous"), (5, "fused"),
                      (5, "misaligned"), (5, "heads-minor"), (0, "contiguous"),
                      (16, "fused")]:
        k, v = sources(n, layout)
        for fused, c in zip((True, False), caches):
            s = (torch.zeros(0, dtype=torch.int64, device=cuda) if n == 0
                 else c.reserve(c.requests[0], n))
            monkeypatch.setattr(cache_mod, "FUSED_KV_WRITE", fused)
            for layer in range(layers):
                c.write(layer, s, k, v)
        torch.cuda.synchronize()
        assert torch.equal(caches[0].pool.k, caches[1].pool.k), (n, layout)
        assert torch.equal(caches[0].pool.v, caches[1].pool.v), (n, layout)
    assert not caches[1]._kv_writes
    launches = list(caches[0]._kv_writes.values())
    assert launches and sum(x.fast_calls for x in launches) > 0  # the direct path ran


def test_fused_kv_write_only_from_the_cache_device(cuda, monkeypatch):
    # Triton launches on the current device; while another device is current, write()
    # takes the two index_copy_ calls, which torch places on the tensors' device.
    cache = TreeKVCache(1, 8, 2, 64, capacity_tokens=256, dtype=torch.float16, device=cuda)
    r = cache.new_request()
    slots = cache.reserve(r, 4)
    k = torch.randn(4, 2, 64, device=cuda, dtype=torch.float16)
    other = cache.device.index + 1
    monkeypatch.setattr(torch.cuda, "current_device", lambda: other)
    cache.write(0, slots, k, k)
    assert not cache._kv_writes
    monkeypatch.undo()
    torch.cuda.synchronize()
    assert torch.equal(cache.pool.k[0, slots], k) and torch.equal(cache.pool.v[0, slots], k)
    cache.write(0, slots, 2 * k, k)
    torch.cuda.synchronize()
    assert cache._kv_writes and torch.equal(cache.pool.k[0, slots], 2 * k)


def test_fused_kv_write_in_a_captured_graph(cuda):
    # A model's whole decode step may be captured, write() included, without a call
    # before the capture: the replays store the K/V of whatever the static buffers hold.
    cache = TreeKVCache(2, 8, 2, 64, capacity_tokens=256, dtype=torch.float16, device=cuda)
    r = cache.new_request()
    first = cache.reserve(r, 8)
    slots = torch.empty(4, dtype=torch.int64, device=cuda)
    k = torch.empty(4, 2, 64, device=cuda, dtype=torch.float16)
    slots.copy_(first[:4])
    k.normal_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for layer in range(2):
            cache.write(layer, slots, k, 2 * k if layer else k)
    torch.cuda.current_stream().wait_stream(stream)
    for part in (first[:4], first[4:]):
        slots.copy_(part)
        k.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(cache.pool.k[0, part], k) and torch.equal(cache.pool.v[0, part], k)
        assert torch.equal(cache.pool.k[1, part], k)
        assert torch.equal(cache.pool.v[1, part], 2 * k)
