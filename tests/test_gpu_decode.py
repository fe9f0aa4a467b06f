"""GPU checks of the compiled kernels against the float32 reference (skipped without CUDA).

Random forests (requests ending at leaves and at internal nodes), every supported dtype,
head_dim, GQA group size and the soft cap, at sizes the interpreter cannot run.
"""

import importlib
import math

import numpy as np
import pytest
import torch

import treecache as tc
from kernels import reference_decode
from treecache.plan import PlanInput, build_plan

pytestmark = pytest.mark.gpu

# The module (``kernels.tree_decode`` the attribute is the function of that name).
td = importlib.import_module("kernels.tree_decode")

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}


def _random_forest(rng, n_nodes, roots, max_len):
    parent = np.full(n_nodes, -1, dtype=np.int64)
    for i in range(roots, n_nodes):
        parent[i] = rng.integers(0, i)
    seqlen = rng.integers(1, max_len, size=n_nodes)
    is_parent = np.zeros(n_nodes, bool)
    is_parent[parent[parent >= 0]] = True
    ends = list(np.nonzero(~is_parent)[0])
    # Some requests end at internal nodes too.
    ends += list(rng.choice(np.nonzero(is_parent)[0], size=min(3, int(is_parent.sum())), replace=False))
    return parent, seqlen, np.asarray(ends, dtype=np.int64)


def _paths(parent, seqlen, tok_ptr, ends):
    out = []
    for e in ends:
        chain = []
        x = int(e)
        while x >= 0:
            chain.append(x)
            x = int(parent[x])
        out.append(np.concatenate([np.arange(tok_ptr[x], tok_ptr[x] + seqlen[x]) for x in chain[::-1]]))
    return out


def _spec_inputs(spec, hq, hk, device):
    """A tree of the benchmark's spec format with float16 inputs (head_dim 128): the
    nodes, q, k, v, the KV pointers and every request's slots (on ``device``)."""
    nodes = tc.generate_tree_from_spec(spec)
    q, _, _, _, k, v, ptrs = tc.qkv_preparation(nodes, hq, hk, 128, device, torch.float16,
                                                build_cache=False)
    inp = tc.fasttree.tree_plan_input(nodes, ptrs, q.shape[0])
    slots = [torch.from_numpy(s).to(device)
             for s in _paths(inp.parent, inp.seqlen, inp.tok_ptr, inp.req_end)]
    return nodes, q, k, v, ptrs, slots


F16, B16, F32 = torch.float16, torch.bfloat16, torch.float32
# Every dtype x head_dim at group 2; every group size at head_dim 128; the cap on a few.
COMBOS = (
    [(dt, hd, 8, 4, 0.0) for dt in (F16, B16, F32) for hd in (16, 32, 64, 128, 256)]
    + [(F16, 128, hq, hk, 0.0) for hq, hk in ((8, 8), (16, 8), (16, 4), (28, 4), (32, 4), (16, 1))]
    + [(B16, 64, 28, 4, 0.0), (B16, 128, 16, 1, 0.0)]
    + [(F16, 128, 32, 8, 20.0), (B16, 64, 8, 8, 20.0), (F32, 256, 16, 1, 20.0)]
)


@pytest.mark.parametrize("dtype,head_dim,hq,hk,cap", COMBOS)
def test_random_forest_gpu(cuda, dtype, head_dim, hq, hk, cap):
    rng = np.random.default_rng(hash((str(dtype), head_dim, hq, hk, cap)) % 2**32)
    parent, seqlen, ends = _random_forest(rng, 40, 3, 300)
    tok_ptr = np.concatenate([[0], np.cumsum(seqlen)[:-1]])
    perm = rng.permutation(int(seqlen.sum()))  # scattered slots, like a paged pool
    inp = PlanInput(parent=parent, seqlen=seqlen, tok_ptr=tok_ptr, req_end=ends, node_tokens=perm)
    plan = build_plan(inp, num_qo_heads=hq, num_kv_heads=hk, head_dim=head_dim, device=cuda,
                      kv_split_sizes=(256, 64))
    b, t = ends.size, int(seqlen.sum())
    q = torch.randn(b, hq, head_dim, device=cuda, dtype=dtype) * (3.0 if cap else 1.0)
    k = torch.randn(t, hk, head_dim, device=cuda, dtype=dtype)
    v = torch.randn(t, hk, head_dim, device=cuda, dtype=dtype)
    o = torch.full_like(q, float("nan"))
    plan.buffers.mid_o.fill_(float("nan"))
    sm = 1 / math.sqrt(head_dim)
    plan.run(q, k, v, o, sm_scale=sm, logit_cap=cap)
    slots = [torch.from_numpy(perm[p]).to(cuda) for p in _paths(parent, seqlen, tok_ptr, ends)]
    ref = reference_decode(q, k, v, slots, sm, cap)
    assert not torch.isnan(o).any()
    err = ((o.float() - ref).norm() / ref.norm()).item()
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("spec", ["1,16,64 1024,256,32", "1,4,16,512 1024,256,128,32"])
@pytest.mark.parametrize("hq,hk", [(32, 32), (32, 8), (16, 1)])
def test_seed_suite_cases_gpu(cuda, spec, hq, hk):
    nodes, q, k, v, ptrs, slots = _spec_inputs(spec, hq, hk, cuda)
    params = tc.FastTreeParams()
    meta, _ = tc.fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128, [1024, 128],
                                      [132, 528], [132, 132], params, device=cuda)
    o = torch.full_like(q, float("nan"))
    tc.fasttree_decode(q, k, v, o, *meta, params.TSQs, params.TSKs, 1 / math.sqrt(128))
    ref = reference_decode(q, k, v, slots, 1 / math.sqrt(128))
    assert not torch.isnan(o).any()
    assert ((o.float() - ref).norm() / ref.norm()).item() <= 2e-3


def test_repeated_calls_use_fast_launch_correctly(cuda):
    """Repeated calls of one plan with fresh inputs (cached compiled kernels) stay correct."""
    rng = np.random.default_rng(7)
    parent, seqlen, ends = _random_forest(rng, 30, 2, 200)
    tok_ptr = np.concatenate([[0], np.cumsum(seqlen)[:-1]])
    inp = PlanInput(parent=parent, seqlen=seqlen, tok_ptr=tok_ptr, req_end=ends)
    plan = build_plan(inp, num_qo_heads=32, num_kv_heads=8, head_dim=128, device=cuda)
    t = int(seqlen.sum())
    slots = [torch.from_numpy(p).to(cuda) for p in _paths(parent, seqlen, tok_ptr, ends)]
    for _ in range(4):  # fresh inputs each time, same tensors' shapes
        q = torch.randn(ends.size, 32, 128, device=cuda, dtype=torch.float16)
        k = torch.randn(t, 8, 128, device=cuda, dtype=torch.float16)
        v = torch.randn(t, 8, 128, device=cuda, dtype=torch.float16)
        o = torch.full_like(q, float("nan"))
        plan.run(q, k, v, o)
        ref = reference_decode(q, k, v, slots, 1 / math.sqrt(128))
        assert not torch.isnan(o).any()
        assert ((o.float() - ref).norm() / ref.norm()).item() <= 2e-3


def _rel(o, ref):
    return ((o.float() - ref).norm() / ref.norm()).item()


def test_graph_cached_run_replays_current_contents(cuda):
    """run(graph=True): the first call computes and captures, later calls replay; replays
    see new contents of q, k, v and of the plan buffers (tails grown in place)."""
    rng = np.random.default_rng(11)
    parent, seqlen, ends = _random_forest(rng, 25, 2, 150)
    tok_ptr = np.concatenate([[0], np.cumsum(seqlen)[:-1]])
    t = int(seqlen.sum())
    inp = PlanInput(parent=parent, seqlen=seqlen, tok_ptr=tok_ptr, req_end=ends,
                    growable=np.ones(ends.size, bool))
    plan = build_plan(inp, num_qo_heads=16, num_kv_heads=4, head_dim=64, device=cuda,
                      headroom=4)
    spare = ends.size  # room for one new slot per request
    q = torch.randn(ends.size, 16, 64, device=cuda, dtype=torch.float16)
    k = torch.randn(t + spare, 4, 64, device=cuda, dtype=torch.float16)
    v = torch.randn(t + spare, 4, 64, device=cuda, dtype=torch.float16)
    o = torch.empty_like(q)
    paths = _paths(parent, seqlen, tok_ptr, ends)
    sm = 1 / math.sqrt(64)
    for step in range(3):
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        o.fill_(float("nan"))
        plan.run(q, k, v, o, sm_scale=sm, graph=True)
        ref = reference_decode(q, k, v, [torch.from_numpy(p).to(cuda) for p in paths], sm)
        assert not torch.isnan(o).any()
        assert _rel(o, ref) <= 2e-3, step
    assert len(plan._graphs[1]) == 1  # one capture, then replays
    # Grow the tails of the requests that can grow; the captured graph sees it.
    grow = np.flatnonzero(plan.tail_vnode >= 0)
    assert grow.size > 0
    new = np.arange(t, t + grow.size)
    assert plan.extend_tails(grow, new)
    for r, s in zip(grow, new):
        paths[r] = np.append(paths[r], s)
    o.fill_(float("nan"))
    plan.run(q, k, v, o, sm_scale=sm, graph=True)
    ref = reference_decode(q, k, v, [torch.from_numpy(p).to(cuda) for p in paths], sm)
    assert _rel(o, ref) <= 2e-3
    # Other tensors: a second graph; the first stays cached.
    o2 = torch.full_like(q, float("nan"))
    plan.run(q, k, v, o2, sm_scale=sm, graph=True)
    assert torch.equal(o2, o)
    assert len(plan._graphs[1]) == 2


def test_graph_cached_run_inside_callers_capture(cuda):
    """Inside a caller's own CUDA-graph capture, run(graph=True) launches normally."""
    rng = np.random.default_rng(12)
    parent, seqlen, ends = _random_forest(rng, 12, 1, 100)
    tok_ptr = np.concatenate([[0], np.cumsum(seqlen)[:-1]])
    t = int(seqlen.sum())
    plan = build_plan(PlanInput(parent=parent, seqlen=seqlen, tok_ptr=tok_ptr, req_end=ends),
                      num_qo_heads=8, num_kv_heads=8, head_dim=128, device=cuda)
    q = torch.randn(ends.size, 8, 128, device=cuda, dtype=torch.float16)
    k = torch.randn(t, 8, 128, device=cuda, dtype=torch.float16)
    v = torch.randn(t, 8, 128, device=cuda, dtype=torch.float16)
    o = torch.empty_like(q)
    plan.run(q, k, v, o)  # compile
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        plan.run(q, k, v, o, graph=True)
    assert plan._graphs is None  # nothing captured by the plan itself
    q.copy_(torch.randn_like(q))
    o.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ref = reference_decode(q, k, v, [torch.from_numpy(p).to(cuda)
                                     for p in _paths(parent, seqlen, tok_ptr, ends)], 1 / math.sqrt(128))
    assert _rel(o, ref) <= 2e-3


@pytest.mark.parametrize("chain", [False, True], ids=["two-streams", "chained"])
def test_overlapped_phases_match_sequential_launches(cuda, monkeypatch, chain):
    """A plan whose two stage-1 phases are not merged. Two streams: a captured graph
    runs them as two parallel branches (OVERLAP_PHASES), eager calls on one stream.
    Chained (CHAIN_PHASES): the second launch is a programmatic dependent launch that
    waits for the first at its end, eager and captured. Same bits as the sequential
    launches, eager and replayed, on the caller's stream and on another one, and
    ordered against work queued before and after."""
    nodes, q, k, v, ptrs, slots = _spec_inputs("1,256 300,24", 32, 32, cuda)
    # Unfused (packing would make it a plan that merges in phase 1).
    monkeypatch.setattr(tc.plan, "FUSE_PHASE1", False)
    meta, _ = tc.fasttree_preparation(nodes, ptrs, q.shape[0], 32, 32, 128, device=cuda)
    plan = meta.plan
    assert len([ph for ph in plan.phases if ph.num_vnodes]) == 2
    assert not td.merge_phases(plan.phases, 1, 32)  # two launches: the overlapped path
    t = plan.kernel_tensors(q.dtype)
    kw = dict(phases=plan.phases, sm_scale=1 / math.sqrt(128), **plan.launch_modes, **t)
    o_seq = torch.full_like(q, float("nan"))
    monkeypatch.setattr(td, "CHAIN_PHASES", False)
    seq = td.tree_decode_launcher(q, k, v, o_seq, overlap=False, **kw)
    monkeypatch.setattr(td, "CHAIN_PHASES", chain)
    ovl = td.tree_decode_launcher(q, k, v, o_seq, overlap=True, **kw)
    assert seq.overlap_device is None
    assert (ovl.overlap_device is not None) == (not chain)
    for trial in range(3):
        q.copy_(torch.randn_like(q))  # queued on the caller's stream before the call
        seq(q, k, v, o_seq)
        o = torch.full_like(q, float("nan"))
        ovl(q, k, v, o)
        o_after = o.clone()  # queued after: must see the finished output
        torch.cuda.synchronize()
        assert torch.equal(o_after, o_seq)
    # On a stream other than the default one.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        o2 = torch.full_like(q, float("nan"))
        ovl(q, k, v, o2)
        o2_after = o2.clone()
    torch.cuda.synchronize()
    assert torch.equal(o2_after, o_seq)
    # Captured in a CUDA graph (two parallel branches), replayed with new queries.
    o3 = torch.full_like(q, float("nan"))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ovl(q, k, v, o3)
    q.copy_(torch.randn_like(q))
    g.replay()
    seq(q, k, v, o_seq)
    torch.cuda.synchronize()
    assert torch.equal(o3, o_seq)
    ref = reference_decode(q, k, v, slots, 1 / math.sqrt(128))
    assert not torch.isnan(o_seq).any()
    assert _rel(o_seq, ref) <= 2e-3
    # And the plan's own call, eager and from a graph.
    o4 = torch.full_like(q, float("nan"))
    plan.run(q, k, v, o4)
    torch.cuda.synchronize()
    assert torch.equal(o4, o_seq)
    o5 = torch.full_like(q, float("nan"))
    plan.run(q, k, v, o5, graph=True)
    plan.run(q, k, v, o5, graph=True)
    torch.cuda.synchronize()
    assert torch.equal(o5, o_seq)


@pytest.mark.parametrize("spec", ["1,4,16,64 256,8,256,40", "1,10 4000,400"])
def test_gpu_plan_equals_cpu_plan(cuda, spec):
    """A GPU plan expands its kv entries on the device: every index tensor equals the
    same plan built on the CPU (host expansion), also after a smaller plan reused the
    buffers."""
    nodes = tc.generate_tree_from_spec(spec)
    ptrs = tc.kv_ptrs(nodes)
    inp = tc.fasttree.tree_plan_input(nodes, ptrs, sum(1 for n in nodes if not n.num_children))
    small = tc.fasttree.tree_plan_input(*(lambda nd: (nd, tc.kv_ptrs(nd), 2))(
        tc.generate_tree_from_spec("1,2 5,3")))
    for hq, hk in ((32, 8), (16, 1)):
        cpu = build_plan(inp, num_qo_heads=hq, num_kv_heads=hk, head_dim=128, device="cpu")
        gpu = build_plan(inp, num_qo_heads=hq, num_kv_heads=hk, head_dim=128, device=cuda)
        for again in range(2):
            tc_, tg = cpu.tensors(), gpu.tensors()
            for name in ("kv_indices", "vnode_kv_start", "vnode_kv_len", "vnode_q_start",
                         "vnode_q_len", "vnode_slot0", "mid_q_rows", "req_mid_start",
                         "req_mid_len", "req_mid_rows"):
                n = {"kv_indices": cpu.num_kv_entries, "mid_q_rows": cpu.num_mid_rows,
                     "req_mid_rows": cpu.num_mid_rows}.get(name, None)
                a = tc_[name] if n is None else tc_[name][:n]
                b = tg[name] if n is None else tg[name][:n]
                if name.startswith("vnode"):
                    a, b = a[:cpu.num_vnodes], b[:cpu.num_vnodes]
                assert torch.equal(a, b.cpu()), name
            # Reuse the buffers for another plan, then this one again.
            build_plan(small, num_qo_heads=hq, num_kv_heads=hk, head_dim=128, device=cuda,
                       buffers=gpu.buffers)
            gpu = build_plan(inp, num_qo_heads=hq, num_kv_heads=hk, head_dim=128, device=cuda,
                             buffers=gpu.buffers)


def _direct_launch_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def axpy(X, Y, Out, n, alpha, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(X + offs, mask=ok)
        y = tl.load(Y + offs, mask=ok)
        tl.store(Out + offs, x * alpha + y, mask=ok)

    return axpy


def test_kernel_launch_direct_path(cuda):
    """A prepared launch: the first call goes through the JIT, later ones launch the
    compiled kernel directly (counted), with the same results; a call with a
    differently aligned tensor goes through the JIT again (and is right); launches
    follow the caller's stream and are captured by CUDA graphs."""
    axpy = _direct_launch_kernel()
    n = 1000
    x = torch.randn(n, device=cuda)
    y = torch.randn(n, device=cuda)
    out = torch.full_like(x, float("nan"))
    launch = td._KernelLaunch(axpy, (_cdiv(n, 256),), (x, y, out, n, 2.0),
                              dict(BLOCK=256, num_warps=4), slots=(0, 2))
    assert launch.args[0] is None and launch.args[2] is None  # not kept between calls
    launch(x, out)
    assert launch.compiled is not None and launch.fast_calls == 0
    torch.testing.assert_close(out, 2 * x + y, rtol=0, atol=0)
    for _ in range(3):
        x2 = torch.randn(n, device=cuda)
        out2 = torch.full_like(x2, float("nan"))
        launch(x2, out2)
        torch.testing.assert_close(out2, 2 * x2 + y, rtol=0, atol=0)
    assert launch.fast_calls == 3
    # The bound tensor goes to the kernel as its address: an in-place update is read.
    assert launch.fast_args[1] == y.data_ptr() and launch.args[1] is y
    y.add_(1.0)
    out2 = torch.full_like(x2, float("nan"))
    launch(x2, out2)
    assert launch.fast_calls == 4
    torch.testing.assert_close(out2, 2 * x2 + y, rtol=0, atol=0)
    y.sub_(1.0)
    # A tensor whose address is not 16-byte aligned: the JIT (another specialisation).
    buf = torch.randn(n + 1, device=cuda)
    x3 = buf[1:]
    assert x3.data_ptr() % 16 != 0
    out3 = torch.full_like(x3, float("nan"))
    launch(x3, out3)
    assert launch.fast_calls == 4
    torch.testing.assert_close(out3, 2 * x3 + y, rtol=0, atol=0)
    # A launch first called with an unaligned tensor compares each call's alignments.
    other = td._KernelLaunch(axpy, (_cdiv(n, 256),), (x3, y, out3, n, 2.0),
                             dict(BLOCK=256, num_warps=4), slots=(0, 2))
    other(x3, out3)
    assert not other.all_aligned and other.fast_calls == 0
    x6 = torch.randn(n + 1, device=cuda)[1:]
    for xi in (x6, x):  # the first as on the first call, the second not
        out6 = torch.full_like(x, float("nan"))
        other(xi, out6)
        assert other.fast_calls == 1
        torch.testing.assert_close(out6, 2 * xi + y, rtol=0, atol=0)
    # On another stream, ordered after work queued there.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x4 = torch.full((n,), 3.0, device=cuda)
        out4 = torch.full_like(x4, float("nan"))
        launch(x4, out4)
        res4 = out4.clone()
    torch.cuda.synchronize()
    assert launch.fast_calls == 5
    torch.testing.assert_close(res4, 6 + y, rtol=0, atol=0)
    # With a launch hook set (a profiler), calls go through the JIT, which calls it.
    from triton import knobs

    seen = []

    def hook(metadata):
        seen.append(1)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch(x, out)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert seen and launch.fast_calls == 5
    launch(x, out)
    assert launch.fast_calls == 6
    # Captured and replayed.
    x5 = torch.randn(n, device=cuda)
    out5 = torch.full_like(x5, float("nan"))
    g = torch.cuda.CUDAGraph()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(g, stream=s):
        launch(x5, out5)
    x5.copy_(torch.randn_like(x5))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out5, 2 * x5 + y, rtol=0, atol=0)


def _cdiv(a, b):
    return (a + b - 1) // b


def test_kernel_launch_reuses_compiled_kernel(cuda, monkeypatch):
    """A new prepared launch whose arguments specialise like an earlier one's takes its
    compiled kernel at once (no JIT call); one that specialises otherwise (an integer
    equal to 1 or divisible by 16, an unaligned tensor, other constants) does not, and
    every result is right."""
    axpy = _direct_launch_kernel()
    consts = dict(BLOCK=256, num_warps=4)

    def run(n, alpha=2.0, y_offset=0, launch_consts=consts):
        x = torch.randn(n, device=cuda)
        y = torch.randn(n + y_offset, device=cuda)[y_offset:]
        out = torch.full_like(x, float("nan"))
        launch = td._KernelLaunch(axpy, (_cdiv(n, 256),), (x, y, out, n, alpha),
                                  dict(launch_consts), slots=(0, 2))
        launch(x, out)
        torch.testing.assert_close(out, alpha * x + y, rtol=0, atol=0)
        return launch

    one = run(1)  # n == 1: a constant of the compiled kernel
    general = run(1000)
    assert general.fast_calls == 0 and general.compiled is not one.compiled
    again = run(520, alpha=0.5)  # 520 and 1000 specialise alike (8 mod 16)
    assert again.fast_calls == 1 and again.compiled is general.compiled
    by16 = run(512)
    assert by16.fast_calls == 0 and by16.compiled is not general.compiled
    assert run(1000 + 16).compiled is general.compiled
    unaligned = run(1000, y_offset=1)
    assert unaligned.fast_calls == 0 and unaligned.compiled is not general.compiled
    warps = run(1000, launch_consts=dict(BLOCK=256, num_warps=2))
    assert warps.fast_calls == 0 and warps.compiled is not general.compiled
    monkeypatch.setattr(td, "REUSE_MAX", 0)
    off = run(1000)
    assert off.fast_calls == 0


@pytest.mark.parametrize("hq,hk", [(32, 32), (32, 8), (16, 1)])
def test_direct_and_dependent_launches_match_plain_launches(cuda, monkeypatch, hq, hk):
    """Plans' calls with direct launches (FAST_LAUNCH) and stage 2 as a programmatic
    dependent launch (DEPENDENT_LAUNCH) give the same bits as plain launches through
    the JIT: eager, for new query/output tensors each call and for an output whose
    address is not 16-byte aligned, and replayed from a CUDA graph."""
    nodes, q, k, v, ptrs, slots = _spec_inputs("1,4,32 600,40,24", hq, hk, cuda)
    outs = {}
    for fast, pdl in ((False, False), (True, False), (False, True), (True, True)):
        monkeypatch.setattr(td, "FAST_LAUNCH", fast)
        monkeypatch.setattr(td, "DEPENDENT_LAUNCH", pdl)
        meta, _ = tc.fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128, device=cuda)
        assert meta.plan.needs_stage2
        res = []
        for trial in range(5):
            qi = torch.randn(q.shape, generator=torch.Generator().manual_seed(trial)).to(
                cuda, torch.float16)
            if trial == 3:  # an output at an odd address
                o = torch.full((q.numel() + 1,), float("nan"), device=cuda,
                               dtype=q.dtype)[1:].view(q.shape)
            else:
                o = torch.full_like(q, float("nan"))
            if trial == 4:  # captured, then replayed with other queries
                meta.plan.run(qi, k, v, o, graph=True)
                qi.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(9)))
                o.fill_(float("nan"))
                meta.plan.run(qi, k, v, o, graph=True)
            else:
                meta.plan.run(qi, k, v, o)
            torch.cuda.synchronize()
            res.append(o.clone())
            ref = reference_decode(qi, k, v, slots, 1 / math.sqrt(128))
            assert not torch.isnan(o).any()
            assert _rel(o, ref) <= 2e-3
        outs[fast, pdl] = res
    for variant, res in outs.items():
        for a, b in zip(outs[False, False], res):
            assert torch.equal(a, b), variant


@pytest.mark.parametrize("spec", ["1,4,256 8,256,32", "1,2,4,8,16,32,64,128,1024 16,16,16,16,16,16,16,16,16"])
def test_finishing_plans_match_stage2(cuda, monkeypatch, spec):
    """16/1 plans of these trees merge in phase 1 (no stage 2): eager calls with and
    without the dependent launch, and graph replays with new queries, against the float32
    reference and against the same plan through stage 2."""
    nodes, q, k, v, ptrs, slots = _spec_inputs(spec, 16, 1, cuda)
    outs = {}
    for pdl in (False, True):
        monkeypatch.setattr(td, "DEPENDENT_LAUNCH", pdl)
        meta, _ = tc.fasttree_preparation(nodes, ptrs, q.shape[0], 16, 1, 128, device=cuda)
        plan = meta.plan
        assert plan.finish
        o = torch.full_like(q, float("nan"))
        plan.run(q, k, v, o)
        torch.cuda.synchronize()
        outs[pdl] = o
    assert torch.equal(outs[False], outs[True])
    ref = reference_decode(q, k, v, slots, 1 / math.sqrt(128))
    assert not torch.isnan(outs[True]).any()
    assert _rel(outs[True], ref) <= 2e-3
    t = plan.kernel_tensors(q.dtype)
    o2 = torch.full_like(q, float("nan"))
    td.tree_decode(q, k, v, o2, phases=plan.phases, sm_scale=1 / math.sqrt(128),
                   **dict(plan.launch_modes, finish=False), **t)
    assert _rel(outs[True], o2) <= 1e-3
    for trial in range(2):
        q.copy_(torch.randn_like(q))
        o3 = torch.full_like(q, float("nan"))
        plan.run(q, k, v, o3, graph=True)
        torch.cuda.synchronize()
        ref = reference_decode(q, k, v, slots, 1 / math.sqrt(128))
        assert not torch.isnan(o3).any()
        assert _rel(o3, ref) <= 2e-3
