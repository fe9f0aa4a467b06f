"""End-to-end tests of the seed-compatible functional API on CPU.

``fasttree_preparation`` + ``fasttree_decode`` are called the way the seed artifact's
users call them and compared with ``kernels.reference_decode`` over each request's path.
The paths are computed here from the ``KVTreeNode`` parents and ``requests`` lists, not
with the planner's helpers. Both backends run: ``"auto"`` (the Triton kernels, in
Triton's interpreter on a CPU-only machine) and ``"torch"``.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import treecache
from kernels import reference_decode
from treecache import (
    FastTreeParams,
    InvalidTreeError,
    KVTreeNode,
    PlanMismatchError,
    ShapeMismatchError,
    TreeCacheError,
    UnsupportedConfigError,
    assign_requests,
    fasttree_decode,
    kv_ptrs,
    qkv_preparation,
)


def fasttree_preparation(*args, **kwargs):
    """The API under test with CPU metadata unless a device is given: these tests use CPU
    tensors, and the API's own default is CUDA whenever a GPU is present."""
    if len(args) < 11:
        kwargs.setdefault("device", "cpu")
    return treecache.fasttree_preparation(*args, **kwargs)


TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]
BACKENDS = ["auto", "torch"]
SEED_SPLITS, SEED_TH1, SEED_TH2 = [1024, 128], [132, 528], [132, 132]


# ------------------------------------------------------------------------- helpers


def make_tree(parents, seqlens):
    """Nodes with the given parents and seqlens, correct num_children, no requests."""
    nodes = [KVTreeNode(parent=p, id=i, seqlen=s) for i, (p, s) in enumerate(zip(parents, seqlens))]
    for p in parents:
        if p >= 0:
            nodes[p].num_children += 1
    return nodes


def with_requests(nodes, ends):
    """Request r ends at node ends[r]: list it on every node from there to its root."""
    for nd in nodes:
        nd.requests = []
    for r, end in enumerate(ends):
        v = end
        while v != -1:
            nodes[v].requests.append(r)
            v = nodes[v].parent
    return nodes


def request_paths(nodes):
    """Node path (root first) of every request, from the requests lists and parents.

    A request's end node is the node listing it with the most ancestors.
    """
    def depth(i):
        d = 0
        while nodes[i].parent != -1:
            i, d = nodes[i].parent, d + 1
        return d

    ends = {}
    for nd in nodes:
        for r in nd.requests:
            if r not in ends or depth(nd.id) > depth(ends[r]):
                ends[r] = nd.id
    paths = []
    for r in range(len(ends)):
        path, v = [], ends[r]
        while v != -1:
            path.append(v)
            v = nodes[v].parent
        paths.append(path[::-1])
    return paths


def request_slots(nodes, ptrs):
    """Rows of k_buffer each request attends: its path's nodes' rows, root first."""
    return [[t for v in path for t in range(ptrs[v], ptrs[v + 1])] for path in request_paths(nodes)]


def rand_qkv(batch, total, hq, hk, d, dtype, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, hq, d, generator=g) * q_scale).to(dtype)
    k = torch.randn(total, hk, d, generator=g).to(dtype)
    v = torch.randn(total, hk, d, generator=g).to(dtype)
    return q, k, v


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def run_and_check(nodes, hq, hk, d, dtype, *, backend="auto", params=None, splits=SEED_SPLITS,
                  th1=SEED_TH1, th2=SEED_TH2, logit_cap=-1.0, seed=0):
    """Prepare, decode into a NaN-poisoned o and compare with the reference."""
    params = FastTreeParams() if params is None else params
    before = copy.deepcopy(params)
    ptrs = kv_ptrs(nodes)
    slots = request_slots(nodes, ptrs)
    b = len(slots)
    cap = logit_cap if logit_cap and logit_cap > 0 else 0.0
    q, k, v = rand_qkv(b, ptrs[-1], hq, hk, d, dtype, seed, q_scale=4.0 if cap else 1.0)
    metadata, assignments = fasttree_preparation(nodes, ptrs, b, hq, hk, d, splits, th1, th2,
                                                 params)
    assert params == before
    assert len(assignments) == len(nodes) and set(assignments) <= {0, 1}
    o = torch.full_like(q, float("nan"))
    sm_scale = 1.0 / math.sqrt(d)
    out = fasttree_decode(q, k, v, o, *metadata, params.TSQs, params.TSKs, sm_scale,
                          logit_cap=logit_cap, backend=backend)
    assert out is o
    assert not torch.isnan(o).any()
    ref = reference_decode(q, k, v, slots, sm_scale, cap)
    err = rel_err(o, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:g}"
    return metadata, assignments, o, ref


def example_forest():
    """Root 0 (40) -> 1 (12) -> 3 (7), 4 (5); 0 -> 2 (9); root 5 (15) -> 6 (3).

    Requests 0..3 end at the leaves 3, 4, 2, 6; requests 4, 5, 6 at the internal nodes
    1, 0 and 5. 91 tokens.
    """
    nodes = make_tree([-1, 0, 0, 1, 1, -1, 5], [40, 12, 9, 7, 5, 15, 3])
    return with_requests(nodes, [3, 4, 2, 6, 1, 0, 5])


# ---------------------------------------------------------------- seed quick start


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_quick_start(backend, capsys):
    # The seed README's quick start, as written there (device and dtype aside).
    num_qo_heads, num_kv_heads, head_dim = 32, 32, 128
    device, dtype = "cpu", torch.float16

    tree_info = []
    root = KVTreeNode()
    root.parent, root.id, root.seqlen = -1, 0, 128
    root.num_children, root.requests = 2, [0, 1]
    tree_info.append(root)
    child1 = KVTreeNode()
    child1.parent, child1.id, child1.seqlen = 0, 1, 64
    child1.num_children, child1.requests = 0, [0]
    tree_info.append(child1)
    child2 = KVTreeNode()
    child2.parent, child2.id, child2.seqlen = 0, 2, 64
    child2.num_children, child2.requests = 0, [1]
    tree_info.append(child2)

    torch.manual_seed(0)
    K = torch.randn(256, num_kv_heads, head_dim, device=device, dtype=dtype)
    V = torch.randn(256, num_kv_heads, head_dim, device=device, dtype=dtype)
    KV_ptrs = [0, 128, 192, 256]
    Q = torch.randn(2, num_qo_heads, head_dim, device=device, dtype=dtype)
    O = torch.empty(2, num_qo_heads, head_dim, device=device, dtype=dtype)
    O.fill_(float("nan"))

    params = FastTreeParams()
    metadata, _ = fasttree_preparation(
        tree_info, KV_ptrs, 2, num_qo_heads, num_kv_heads, head_dim,
        [1024, 128], [132, 528], [132, 132], params
    )
    sm_scale = 1.0 / (head_dim ** 0.5)
    if backend == "auto":
        fasttree_decode(Q, K, V, O, *metadata, params.TSQs, params.TSKs, sm_scale)
    else:
        fasttree_decode(Q, K, V, O, *metadata, params.TSQs, params.TSKs, sm_scale, backend=backend)

    assert O.shape == (2, 32, 128)
    paths = [list(range(0, 192)), list(range(0, 128)) + list(range(192, 256))]
    ref = reference_decode(Q, K, V, paths, sm_scale)
    assert not torch.isnan(O).any()
    assert rel_err(O, ref) <= TOL[dtype]
    assert capsys.readouterr() == ("", "")
    assert params == FastTreeParams()


def test_seed_api_reference_workflow(capsys):
    # API_REFERENCE's workflow: qkv_preparation, setters, preparation, decode (GQA 4).
    tree_info = assign_requests(make_tree([-1, 0, 0, 0, 1, 1], [64, 16, 20, 8, 5, 9]))
    Q, _, _, _, K_tree, V_tree, KV_ptrs = qkv_preparation(tree_info, 8, 2, 32, "cpu", torch.float16)
    batch_size = Q.shape[0]
    params = FastTreeParams()
    params.set_values(0.66, 0.33, 0.1)
    params.set_kv_group_num(8 // 2)
    params.set_q_tile_sizes([64, 16])
    params.set_kv_tile_sizes([32, 128])
    metadata, node_assignments = fasttree_preparation(
        tree_info, KV_ptrs, batch_size, 8, 2, 32, [1024, 128], [132, 528], [132, 132], params)
    O = torch.full((batch_size, 8, 32), float("nan"), dtype=torch.float16)
    fasttree_decode(Q, K_tree, V_tree, O, *metadata, params.TSQs, params.TSKs, 1 / math.sqrt(32))
    ref = reference_decode(Q, K_tree, V_tree, request_slots(tree_info, KV_ptrs), 1 / math.sqrt(32))
    assert rel_err(O, ref) <= TOL[torch.float16]
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------- deterministic coverage


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_dtype(dtype, backend):
    run_and_check(example_forest(), 4, 2, 32, dtype, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group, hk", [(1, 2), (2, 1), (4, 2), (7, 1), (8, 2), (16, 1)])
def test_gqa_groups(group, hk, backend):
    run_and_check(example_forest(), group * hk, hk, 16, torch.float16, backend=backend, seed=group)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
def test_head_dims(head_dim, backend):
    run_and_check(example_forest(), 2, 1, head_dim, torch.float16, backend=backend, seed=head_dim)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_logit_cap(dtype, backend):
    nodes = example_forest()
    _, _, o, ref = run_and_check(nodes, 4, 2, 32, dtype, backend=backend, logit_cap=5.0)
    ptrs = kv_ptrs(nodes)
    q, k, v = rand_qkv(ref.shape[0], ptrs[-1], 4, 2, 32, dtype, 0, q_scale=4.0)
    uncapped = reference_decode(q, k, v, request_slots(nodes, ptrs), 1 / math.sqrt(32), 0.0)
    assert rel_err(uncapped, ref) > 0.05  # the cap matters with these logits
    assert rel_err(o, uncapped) > 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain(backend):
    # Depth 10, one request at the bottom.
    nodes = assign_requests(make_tree(list(range(-1, 9)), [5, 0, 7, 3, 11, 1, 0, 9, 4, 6]))
    assert [nd.requests for nd in nodes] == [[0]] * 10
    run_and_check(nodes, 2, 2, 16, torch.float32, backend=backend)
    params = FastTreeParams(alpha=0.0, beta=1.0, gamma=1.0)
    _, assignments, _, _ = run_and_check(nodes, 2, 2, 16, torch.float32, backend=backend,
                                         params=params)
    assert 1 in assignments


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_node_several_requests(backend):
    nodes = [KVTreeNode(parent=-1, id=0, seqlen=37, num_children=0, requests=list(range(5)))]
    metadata, assignments, o, _ = run_and_check(nodes, 4, 1, 32, torch.float16, backend=backend)
    assert assignments == [0]
    # All five requests attend the same tokens.
    assert metadata.plan.num_vnodes == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("params, splits, label", [
    pytest.param(FastTreeParams(), SEED_SPLITS, "defaults", id="defaults"),
    # Cheap Q padding, dear K padding: short nodes leave their parent's group.
    pytest.param(FastTreeParams(alpha=0.01, beta=5.0, gamma=1.0), SEED_SPLITS, "split-Q",
                 id="split-Q"),
    pytest.param(FastTreeParams(alpha=0.0, beta=0.0, gamma=0.0), SEED_SPLITS, "free", id="free"),
    pytest.param(FastTreeParams(TSQs=[4, 2], TSKs=[16, 16]), [8, 3], "tiny-chunks",
                 id="tiny-chunks"),
    pytest.param(FastTreeParams(TSQs=[2, 1], TSKs=[16, 32], alpha=0.1, beta=5.0, gamma=0.0),
                 [5, 5], "q-tiles", id="q-tiles"),
])
def test_params_and_chunking(params, splits, label, backend):
    nodes = example_forest()
    metadata, assignments, _, _ = run_and_check(
        nodes, 4, 2, 16, torch.float16, backend=backend, params=params, splits=splits,
        th1=[0, 0], th2=[0, 0])
    plan = metadata.plan
    if label == "split-Q":
        assert 1 in assignments
    if label in ("tiny-chunks", "q-tiles"):
        assert plan.vnode_kv_len_host.max() <= splits[0]
        assert plan.num_vnodes > len(nodes)
    if label == "q-tiles":
        assert max(ph.q_tile for ph in plan.phases) <= 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_adjusted_tiles_and_both_tile_spellings(backend):
    # The seed's parallelism rule changes the tiles here; decode accepts the tiles the
    # params asked for (the seed call) and the plan's own tiles, with the same result.
    nodes = example_forest()
    params = FastTreeParams()
    ptrs = kv_ptrs(nodes)
    metadata, _ = fasttree_preparation(nodes, ptrs, 7, 2, 1, 16, SEED_SPLITS, SEED_TH1, SEED_TH2,
                                       params)
    plan = metadata.plan
    assert plan.q_tiles != (64, 16) or plan.kv_tiles != (32, 128)
    q, k, v = rand_qkv(7, ptrs[-1], 2, 1, 16, torch.float32)
    o1 = fasttree_decode(q, k, v, torch.empty_like(q), *metadata, params.TSQs, params.TSKs, 0.25,
                         backend=backend)
    o2 = fasttree_decode(q, k, v, torch.empty_like(q), *metadata, list(plan.q_tiles),
                         list(plan.kv_tiles), 0.25, backend=backend)
    o3 = fasttree_decode(q, k, v, torch.empty_like(q), *metadata, sm_scale=0.25, backend=backend)
    assert torch.equal(o1, o2) and torch.equal(o1, o3)
    ref = reference_decode(q, k, v, request_slots(nodes, ptrs), 0.25)
    assert rel_err(o1, ref) <= TOL[torch.float32]


def test_metadata_reuse_and_independent_preparations():
    # Metadata is reusable across decode calls, and a second preparation does not
    # disturb the first one's metadata.
    nodes_a = example_forest()
    nodes_b = assign_requests(make_tree([-1, 0, 0, 0], [20, 5, 6, 7]))
    pa, pb = kv_ptrs(nodes_a), kv_ptrs(nodes_b)
    meta_a, _ = fasttree_preparation(nodes_a, pa, 7, 2, 1, 16, params=FastTreeParams())
    meta_b, _ = fasttree_preparation(nodes_b, pb, 3, 2, 1, 16, params=FastTreeParams())
    for seed in range(2):
        q, k, v = rand_qkv(7, pa[-1], 2, 1, 16, torch.float32, seed)
        o = fasttree_decode(q, k, v, torch.full_like(q, float("nan")), *meta_a, sm_scale=0.25)
        assert rel_err(o, reference_decode(q, k, v, request_slots(nodes_a, pa), 0.25)) <= 1e-4
        q, k, v = rand_qkv(3, pb[-1], 2, 1, 16, torch.float32, seed)
        o = fasttree_decode(q, k, v, torch.full_like(q, float("nan")), *meta_b, sm_scale=0.25)
        assert rel_err(o, reference_decode(q, k, v, request_slots(nodes_b, pb), 0.25)) <= 1e-4


def test_default_sm_scale_and_positional_logit_cap():
    nodes = example_forest()
    ptrs = kv_ptrs(nodes)
    params = FastTreeParams()
    metadata, _ = fasttree_preparation(nodes, ptrs, 7, 2, 1, 64, params=params)
    q, k, v = rand_qkv(7, ptrs[-1], 2, 1, 64, torch.float32, q_scale=4.0)
    o = fasttree_decode(q, k, v, torch.empty_like(q), *metadata, backend="torch")
    assert rel_err(o, reference_decode(q, k, v, request_slots(nodes, ptrs), 0.125)) <= 1e-4
    o = fasttree_decode(q, k, v, torch.empty_like(q), *metadata, params.TSQs, params.TSKs, 0.125,
                        3.0, backend="torch")
    assert rel_err(o, reference_decode(q, k, v, request_slots(nodes, ptrs), 0.125, 3.0)) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend):
    # q, k, v, o may be views with a contiguous last dimension; o's neighbours in the
    # parent tensor are not written.
    nodes = example_forest()
    ptrs = kv_ptrs(nodes)
    metadata, _ = fasttree_preparation(nodes, ptrs, 7, 4, 2, 16, params=FastTreeParams())
    q_big, k_big, v_big = rand_qkv(7, ptrs[-1], 8, 4, 16, torch.float32)
    q, k, v = q_big[:, 2:6], k_big[:, 1:3], v_big[:, ::2]
    o_big = torch.full((7, 8, 16), float("nan"))
    o = o_big[:, 4:]
    fasttree_decode(q, k, v, o, *metadata, sm_scale=0.25, backend=backend)
    assert torch.isnan(o_big[:, :4]).all() and not torch.isnan(o).any()
    ref = reference_decode(q, k, v, request_slots(nodes, ptrs), 0.25)
    assert rel_err(o, ref) <= TOL[torch.float32]


def test_empty_request_path_gets_zeros():
    # Request 1 ends at a zero-token root: no context, zero output.
    nodes = with_requests(make_tree([-1, 0, -1], [10, 4, 0]), [1, 2])
    ptrs = kv_ptrs(nodes)
    metadata, _ = fasttree_preparation(nodes, ptrs, 2, 2, 1, 16, params=FastTreeParams())
    q, k, v = rand_qkv(2, ptrs[-1], 2, 1, 16, torch.float16)
    for backend in BACKENDS:
        o = fasttree_decode(q, k, v, torch.full_like(q, float("nan")), *metadata, backend=backend)
        assert torch.count_nonzero(o[1]) == 0
        ref = reference_decode(q, k, v, request_slots(nodes, ptrs), 0.25)
        assert rel_err(o[:1], ref[:1]) <= TOL[torch.float16]


# ---------------------------------------------------------------- random forests


@st.composite
def forests(draw, internal_requests: bool):
    """A random forest with requests, every request path holding >= 1 token.

    Parents are drawn in topological order, then node ids are shuffled (so parents may
    have larger ids than their children). Requests: one per leaf (``assign_requests``);
    with ``internal_requests`` some more end at internal nodes, numbered in a random
    order and listed by hand.
    """
    n = draw(st.integers(1, 8))
    topo_parent = [-1] + [draw(st.integers(-1, i - 1)) for i in range(1, n)]
    perm = draw(st.permutations(list(range(n))))  # new id of topological node i
    parents = [0] * n
    for i, p in enumerate(topo_parent):
        parents[perm[i]] = -1 if p == -1 else perm[p]
    seqlens = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    nodes = make_tree(parents, seqlens)
    if not internal_requests:
        nodes = assign_requests(nodes)
    else:
        leaves = [i for i in range(n) if nodes[i].num_children == 0]
        inner = [i for i in range(n) if nodes[i].num_children > 0]
        extra = draw(st.lists(st.sampled_from(inner), max_size=4)) if inner else []
        ends = draw(st.permutations(leaves + extra))
        nodes = with_requests(nodes, ends)
    # At least one token on every request path: give an empty path's end node a token.
    for path in request_paths(nodes):
        if sum(nodes[v].seqlen for v in path) == 0:
            nodes[path[-1]].seqlen = 1
    return nodes


@st.composite
def configs(draw):
    """Attention shape, cost-model params, tiles, chunking and cap."""
    group = draw(st.sampled_from([1, 2, 4, 7, 8, 16]))
    hk = draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([16, 16, 32, 64, 128, 256]))
    params = FastTreeParams(
        alpha=draw(st.sampled_from([0.0, 0.66, 50.0])),
        beta=draw(st.sampled_from([0.0, 0.33, 5.0])),
        gamma=draw(st.sampled_from([0.0, 0.1, 10.0])),
        TSQs=draw(st.sampled_from([[64, 16], [16, 4], [8, 2], [3, 1]])),
        TSKs=draw(st.sampled_from([[32, 128], [16, 16], [64, 32]])),
    )
    splits = draw(st.sampled_from([SEED_SPLITS, [16, 8], [5, 3]]))
    th = draw(st.sampled_from([(SEED_TH1, SEED_TH2), ([0, 0], [0, 0])]))
    cap = draw(st.sampled_from([-1.0, 0.0, 5.0]))
    return dict(hq=group * hk, hk=hk, d=head_dim, params=params, splits=splits, th1=th[0],
                th2=th[1], logit_cap=cap)


# No shrinking: each example runs the kernels (in the interpreter on a CPU), and the
# drawn trees are small already.
RANDOM = settings(max_examples=10, deadline=None,
                  phases=[Phase.explicit, Phase.reuse, Phase.generate],
                  suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@RANDOM
@given(nodes=forests(internal_requests=False), cfg=configs(), seed=st.integers(0, 2**16))
def test_random_forests(dtype, backend, nodes, cfg, seed):
    run_and_check(nodes, cfg.pop("hq"), cfg.pop("hk"), cfg.pop("d"), dtype, backend=backend,
                  seed=seed, **cfg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@RANDOM
@given(nodes=forests(internal_requests=True), cfg=configs(), seed=st.integers(0, 2**16))
def test_random_forests_internal_requests(dtype, backend, nodes, cfg, seed):
    run_and_check(nodes, cfg.pop("hq"), cfg.pop("hk"), cfg.pop("d"), dtype, backend=backend,
                  seed=seed, **cfg)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TREECACHE_SLOW_TESTS") != "1",
                    reason="larger randomized run; set TREECACHE_SLOW_TESTS=1")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes=forests(internal_requests=True), cfg=configs(), seed=st.integers(0, 2**16))
def test_random_forests_slow(dtype, backend, nodes, cfg, seed):
    run_and_check(nodes, cfg.pop("hq"), cfg.pop("hk"), cfg.pop("d"), dtype, backend=backend,
                  seed=seed, **cfg)


# -------------------------------------------------------------- metadata, helpers


def test_metadata_layout():
    nodes = example_forest()
    ptrs = kv_ptrs(nodes)
    params = FastTreeParams()
    metadata, assignments = fasttree_preparation(nodes, ptrs, 7, 8, 2, 32, SEED_SPLITS,
                                                 [0, 0], [0, 0], params)
    assert len(metadata) == 13
    (kv_entries, kv_offs, kv_lens, q_entries, q_offs, q_lens, r_entries, r_offs, r_lens,
     mid_o, mid_lse, phase_nums, phase_offs) = metadata
    plan = metadata.plan
    nv, nm = plan.num_vnodes, plan.num_mid_rows
    for t in (kv_entries, kv_offs, kv_lens, q_entries, q_offs, q_lens, r_entries, r_offs, r_lens):
        assert t.dtype == torch.int32
    assert kv_offs.shape == kv_lens.shape == q_offs.shape == q_lens.shape == (nv,)
    assert r_offs.shape == r_lens.shape == (7,)
    assert q_entries.shape == r_entries.shape == (nm,)
    assert mid_o.dtype == mid_lse.dtype == torch.float32
    assert mid_o.shape == (nm, 8, 32) and mid_lse.shape == (nm, 8)
    assert isinstance(phase_nums, list) and isinstance(phase_offs, list)
    assert len(phase_nums) == len(phase_offs) == 2 and sum(phase_nums) == nv
    assert len(assignments) == len(nodes) and set(assignments) <= {0, 1}
    assert assignments == plan.node_assignments
    assert metadata._asdict()["mid_lse"] is mid_lse
    # Each request merges one mid row per vnode it is in; every request has a row.
    assert int(r_lens.sum()) == nm and (r_lens > 0).all()


@pytest.mark.parametrize("parents, seqlens, ends, nums, offs", [
    # Every group has <= TSQs[1] = 16 queries: phase 1 only.
    ([-1, 0, 0], [30, 10, 7], [1, 2, 0], [0, 3], [0, 0]),
    # One group of 20 queries: phase 0 only.
    ([-1], [30], [0] * 20, [1, 0], [0, 0]),
    # A root shared by 20 requests (phase 0) and their 20 leaves (phase 1).
    ([-1] + [0] * 20, [50] + [5] * 20, list(range(1, 21)), [1, 20], [0, 1]),
])
def test_metadata_phase_layout(parents, seqlens, ends, nums, offs):
    nodes = with_requests(make_tree(parents, seqlens), ends)
    metadata, _ = fasttree_preparation(nodes, kv_ptrs(nodes), len(ends), 2, 1, 16, SEED_SPLITS,
                                       [0, 0], [0, 0], FastTreeParams())
    assert metadata[11] == nums and metadata[12] == offs


def test_preparation_does_not_modify_inputs(capsys):
    nodes = example_forest()
    nodes_before = copy.deepcopy(nodes)
    ptrs = kv_ptrs(nodes)
    ptrs_before = list(ptrs)
    params = FastTreeParams(TSQs=[16, 4], TSKs=[16, 64])
    before = copy.deepcopy(params)
    tsqs = params.TSQs
    splits, th1, th2 = [64, 8], [132, 528], [132, 132]
    lists_before = (list(splits), list(th1), list(th2))
    metadata, _ = fasttree_preparation(nodes, ptrs, 7, 16, 2, 16, splits, th1, th2, params)
    assert metadata.plan.q_tiles != (16, 4)  # the adjustment ran...
    assert params == before and params.TSQs is tsqs and tsqs == [16, 4]  # ...on a copy
    assert nodes == nodes_before and ptrs == ptrs_before
    assert (splits, th1, th2) == lists_before
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("build_cache", [True, False])
def test_qkv_preparation(build_cache):
    nodes = example_forest()
    n_tok = sum(nd.seqlen for nd in nodes)
    g = torch.Generator().manual_seed(3)
    Q, K_cache, V_cache, seqlens, K, V, ptrs = qkv_preparation(
        nodes, 8, 2, 16, "cpu", torch.bfloat16, generator=g, build_cache=build_cache)
    slots = request_slots(nodes, kv_ptrs(nodes))
    b = len(slots)
    assert Q.shape == (b, 8, 16) and Q.dtype == torch.bfloat16
    assert K.shape == V.shape == (n_tok, 2, 16) and K.dtype == torch.bfloat16
    assert ptrs == kv_ptrs(nodes)
    assert seqlens.dtype == torch.int32 and seqlens.tolist() == [len(s) for s in slots]
    if not build_cache:
        assert K_cache is None and V_cache is None
        return
    max_len = max(len(s) for s in slots)
    assert K_cache.shape == V_cache.shape == (b, max_len, 2, 16)
    for r, s in enumerate(slots):
        assert torch.equal(K_cache[r, :len(s)], K[s])
        assert torch.equal(V_cache[r, :len(s)], V[s])
        assert torch.count_nonzero(K_cache[r, len(s):]) == 0
        assert torch.count_nonzero(V_cache[r, len(s):]) == 0


def test_qkv_preparation_default_device():
    nodes = example_forest()
    Q, K_cache, _, seqlens, K, _, _ = qkv_preparation(nodes, 4, 2, 16)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    for t in (Q, K_cache, seqlens, K):
        assert t.device.type == want
    assert Q.dtype == torch.float16


def test_errors_are_treecache_errors():
    for exc in (ShapeMismatchError, PlanMismatchError, UnsupportedConfigError, InvalidTreeError):
        assert issubclass(exc, TreeCacheError)
        assert issubclass(exc, ValueError)
    assert treecache.TreeCacheError is TreeCacheError


# ------------------------------------------------------------------- bad inputs


@pytest.fixture
def prepared():
    """A small prepared problem: 7 requests, 4 query heads on 2 kv heads, dim 16."""
    nodes = example_forest()
    ptrs = kv_ptrs(nodes)
    params = FastTreeParams()
    metadata, _ = fasttree_preparation(nodes, ptrs, 7, 4, 2, 16, SEED_SPLITS, SEED_TH1, SEED_TH2,
                                       params)
    q, k, v = rand_qkv(7, ptrs[-1], 4, 2, 16, torch.float16)
    return dict(nodes=nodes, ptrs=ptrs, params=params, metadata=metadata, q=q, k=k, v=v,
                o=torch.empty_like(q))


def _decode(p, **over):
    a = dict(p, **over)
    return fasttree_decode(a["q"], a["k"], a["v"], a["o"], *a["metadata"], a["params"].TSQs,
                           a["params"].TSKs, 0.25)


@pytest.mark.parametrize("change, exc, pattern", [
    (lambda p: dict(q=p["q"][:5]), ShapeMismatchError,
     r"q has shape \(5, 4, 16\).*\[7, 4, 16\]"),
    (lambda p: dict(q=p["q"].repeat(1, 2, 1)), ShapeMismatchError,
     r"q has shape \(7, 8, 16\).*\[7, 4, 16\]"),
    (lambda p: dict(q=p["q"][..., :8].contiguous()), ShapeMismatchError,
     r"q has shape \(7, 4, 8\).*\[7, 4, 16\]"),
    (lambda p: dict(o=p["o"][:, :2]), ShapeMismatchError,
     r"o has shape \(7, 2, 16\).*\[7, 4, 16\]"),
    (lambda p: dict(k=p["k"][:, :1].contiguous()), ShapeMismatchError,
     r"k(_buffer)? has shape \(\d+, 1, 16\).*\[num_slots, 2, 16\]"),
    (lambda p: dict(v=p["v"].repeat(1, 2, 1)), ShapeMismatchError,
     r"v(_buffer)? has shape \(\d+, 4, 16\).*\[num_slots, 2, 16\]"),
    (lambda p: dict(k=p["k"].float()), ShapeMismatchError,
     r"k(_buffer)? has dtype torch.float32, q has torch.float16"),
    (lambda p: dict(q=p["q"].float(), o=p["o"].float()), ShapeMismatchError,
     r"k(_buffer)? has dtype torch.float16, q has torch.float32"),
    (lambda p: dict(q=p["q"].double(), k=p["k"].double(), v=p["v"].double(), o=p["o"].double()),
     ShapeMismatchError, r"q has dtype torch.float64, expected one of float16, bfloat16, float32"),
    (lambda p: dict(o=p["o"].bfloat16()), ShapeMismatchError,
     r"o has dtype torch.bfloat16, q has torch.float16"),
    (lambda p: dict(k=p["k"][:-3], v=p["v"][:-3]), ShapeMismatchError,
     r"k_buffer has 88 tokens, KV_ptrs\[-1\] was 91"),
    (lambda p: dict(k=torch.cat([p["k"], p["k"][:2]]), v=torch.cat([p["v"], p["v"][:2]])),
     ShapeMismatchError, r"k_buffer has 93 tokens, KV_ptrs\[-1\] was 91"),
], ids=["q-batch", "q-heads", "q-head-dim", "o-shape", "k-kv-heads", "v-kv-heads",
        "k-dtype", "q-dtype", "fp64", "o-dtype", "k-rows-fewer", "k-rows-more"])
def test_bad_decode_inputs(prepared, change, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _decode(prepared, **change(prepared))


def test_bad_tile_sizes(prepared):
    p = prepared
    plan = p["metadata"].plan
    args = (p["q"], p["k"], p["v"], p["o"], *p["metadata"])
    with pytest.raises(PlanMismatchError,
                       match=r"phase_q_tile_sizes = \[32, 8\] does not match the plan.*"
                             r"built with \[\d+, \d+\].*asked for \[64, 16\]"):
        fasttree_decode(*args, [32, 8], p["params"].TSKs, 0.25)
    with pytest.raises(PlanMismatchError,
                       match=r"phase_kv_tile_sizes = \[64, 64\] does not match the plan.*"
                             r"asked for \[32, 128\]"):
        fasttree_decode(*args, list(plan.q_tiles), [64, 64], 0.25)
    # Changing params after preparation does not change what decode runs with.
    p["params"].set_q_tile_sizes([8, 2])
    with pytest.raises(PlanMismatchError, match=r"phase_q_tile_sizes = \[8, 2\]"):
        fasttree_decode(*args, p["params"].TSQs, p["params"].TSKs, 0.25)


def test_metadata_not_from_preparation(prepared):
    p = prepared
    fake = [t.clone() if isinstance(t, torch.Tensor) else list(t) for t in p["metadata"]]
    with pytest.raises(PlanMismatchError, match=r"metadata returned by fasttree_preparation"):
        fasttree_decode(p["q"], p["k"], p["v"], p["o"], *fake, [64, 16], [32, 128], 0.25)
    with pytest.raises(PlanMismatchError, match=r"13 metadata entries after o, got 12"):
        fasttree_decode(p["q"], p["k"], p["v"], p["o"], *p["metadata"][:12])


def test_bad_sm_scale(prepared):
    with pytest.raises(PlanMismatchError,
                       match=r"sm_scale must be a positive finite number, got -1"):
        fasttree_decode(prepared["q"], prepared["k"], prepared["v"], prepared["o"],
                        *prepared["metadata"], sm_scale=-1.0)


def _prepare(nodes, ptrs, b=7, hq=4, hk=2, d=16):
    return fasttree_preparation(nodes, ptrs, b, hq, hk, d, SEED_SPLITS, SEED_TH1, SEED_TH2,
                                FastTreeParams())


def test_unsupported_head_dim():
    nodes = example_forest()
    with pytest.raises(UnsupportedConfigError, match=r"head_dim must be one of .*got 48"):
        _prepare(nodes, kv_ptrs(nodes), d=48)


def test_heads_not_a_multiple():
    nodes = example_forest()
    with pytest.raises(UnsupportedConfigError,
                       match=r"num_qo_heads \(6\) must be a positive multiple of "
                             r"num_kv_heads \(4\)"):
        _prepare(nodes, kv_ptrs(nodes), hq=6, hk=4)


def test_kv_ptrs_wrong_length():
    nodes = example_forest()
    with pytest.raises(PlanMismatchError,
                       match=r"KV_ptrs must have len\(tree_info\) \+ 1 = 8 entries, got 7"):
        _prepare(nodes, kv_ptrs(nodes)[:-1])


def test_kv_ptrs_inconsistent_with_seqlens():
    nodes = example_forest()
    ptrs = kv_ptrs(nodes)
    ptrs[2] -= 1  # node 1 one token short, node 2 one token long
    with pytest.raises(PlanMismatchError,
                       match=r"KV_ptrs\[2\] - KV_ptrs\[1\] = 11 but node 1 has seqlen 12"):
        _prepare(nodes, ptrs)


def test_invalid_tree_cycle():
    nodes = make_tree([2, 0, 1], [5, 5, 5])
    with pytest.raises(InvalidTreeError, match=r"cycle.*0 -> 2 -> 1 -> 0"):
        _prepare(nodes, kv_ptrs(nodes), b=0)


def test_batch_size_disagrees_with_tree():
    nodes = example_forest()
    with pytest.raises(InvalidTreeError, match=r"request 7 is listed in no node"):
        _prepare(nodes, kv_ptrs(nodes), b=8)
    with pytest.raises(InvalidTreeError, match=r"request 6, out of range 0..5"):
        _prepare(nodes, kv_ptrs(nodes), b=6)


def test_unknown_backend(prepared):
    p = prepared
    with pytest.raises(UnsupportedConfigError, match=r"backend must be .*got 'cuda'"):
        fasttree_decode(p["q"], p["k"], p["v"], p["o"], *p["metadata"], backend="cuda")
