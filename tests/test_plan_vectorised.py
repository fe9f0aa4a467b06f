"""The vectorised cost-model pass makes exactly the scalar pass's decisions."""

import numpy as np
import pytest

from treecache.plan import PlanInput, _Topology, _tree_heuristic, _tree_heuristic_vec


def _random_input(rng, n, fan_bias):
    parent = np.full(n, -1, dtype=np.int64)
    roots = max(1, n // 50)
    for i in range(roots, n):
        # fan_bias > 0 concentrates children on few parents (long sibling lists)
        parent[i] = rng.integers(0, max(1, int(i ** (1 - fan_bias))))
    seqlen = rng.integers(0, 300, size=n)
    is_parent = np.zeros(n, bool)
    is_parent[parent[parent >= 0]] = True
    ends = np.concatenate([np.nonzero(~is_parent)[0], rng.integers(0, n, size=n // 10)])
    return PlanInput(parent=parent, seqlen=seqlen, tok_ptr=np.zeros(n, np.int64), req_end=ends)


# (q tiles, kv tiles), GQA group, (alpha, beta, gamma)
SETTINGS = [(([64, 16], [32, 128]), 1, (0.66, 0.33, 0.1)),
            (([16, 4], [32, 32]), 4, (0.1, 0.9, 0.05)),
            (([8, 8], [64, 64]), 16, (0.3, 2.0, 0.0)),
            (([16, 16], [256, 256]), 1, (0.0, 5.0, 1.0))]


def _decisions_agree(topo):
    """Both passes under every setting: the same choices and chain lengths. Returns the
    choices (one array per setting)."""
    out = []
    for tiles, group, (a, b, g) in SETTINGS:
        want_a, want_l = _tree_heuristic(topo, tiles[0], tiles[1], group, a, b, g)
        got_a, got_l = _tree_heuristic_vec(topo, tiles[0], tiles[1], group, a, b, g)
        np.testing.assert_array_equal(got_a, want_a)
        np.testing.assert_array_equal(got_l, want_l)
        out.append(want_a)
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("fan_bias", [0.0, 0.6, 0.95])
def test_vectorised_heuristic_matches_scalar(seed, fan_bias):
    rng = np.random.default_rng(seed)
    inp = _random_input(rng, int(rng.integers(2, 400)), fan_bias)
    split_q = sum(int(a.sum()) for a in _decisions_agree(_Topology(inp)))
    assert split_q > 0  # the comparison covered split-Q decisions, not only split-K


@pytest.mark.parametrize("seed", range(8))
def test_vectorised_heuristic_on_long_split_q_chains(seed):
    # Mostly chain-shaped trees of short nodes under costs that favour split-Q: chains
    # of many split-Q nodes, which the vectorised pass settles a level at a time. It
    # must still decide exactly as the scalar pass, also when parents follow children
    # (odd seeds name the nodes in a random order).
    rng = np.random.default_rng(seed)
    n = 300
    chain = np.maximum(np.arange(n) - 1 - (rng.random(n) < 0.3) * rng.integers(0, 4, n), 0)
    chain[0] = -1
    name = rng.permutation(n) if seed % 2 else np.arange(n)
    parent = np.full(n, -1, dtype=np.int64)
    parent[name[1:]] = name[chain[1:]]  # node i of the chain is called name[i]
    seqlen = rng.integers(1, 40, size=n)
    is_parent = np.zeros(n, bool)
    is_parent[parent[parent >= 0]] = True
    req_end = np.concatenate([np.flatnonzero(~is_parent), rng.integers(0, n, size=30)])
    inp = PlanInput(parent=parent, seqlen=seqlen, tok_ptr=np.zeros(n, np.int64),
                    req_end=req_end)
    topo = _Topology(inp)
    deepest = 0
    for assign in _decisions_agree(topo):
        run = np.zeros(n, np.int64)  # split-Q nodes in a row above each node
        for v in topo.bfs_order.tolist():
            if assign[v]:
                run[v] = run[parent[v]] + 1
        deepest = max(deepest, int(run.max()))
    assert deepest >= 50


@pytest.mark.parametrize("seed", range(6))
def test_expand_ranges_device_matches_host(seed):
    """The runs-only expansion (used for GPU plans) equals the host expansion: random
    runs, empty runs, all runs empty, int32 and int64 outputs."""
    import torch

    from treecache.plan import _expand_ranges, _expand_ranges_device

    rng = np.random.default_rng(seed)
    for trial in range(20):
        n = int(rng.integers(0, 60))
        starts = rng.integers(0, 1 << 20, size=n)
        lens = rng.integers(0, 70, size=n)
        if trial % 7 == 0:
            lens[:] = 0
        ref = _expand_ranges(starts, lens)
        for dtype in (torch.int32, torch.int64):
            out = torch.full((ref.size,), -7, dtype=dtype)
            _expand_ranges_device(starts, lens, out)
            assert np.array_equal(out.numpy(), ref)


@pytest.mark.parametrize("seed", range(6))
def test_plans_do_not_depend_on_which_heuristic_pass_ran(seed, monkeypatch):
    # build_plan runs the scalar pass on small trees and the vectorised one on large
    # ones (SCALAR_HEURISTIC_MAX_NODES): the plans must be the same either way.
    import treecache.plan as plan_mod
    from benchmarks.replan_ab import plan_summary

    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(3, 120))
    inp = _random_input(rng, n, 0.6)
    # Short nodes (1-40 tokens) under a longer root: many split-Q decisions.
    seqlen = rng.integers(1, 41, size=n)
    seqlen[inp.parent < 0] = 500
    inp = PlanInput(parent=inp.parent, seqlen=seqlen,
                    tok_ptr=np.concatenate([[0], np.cumsum(seqlen)[:-1]]),
                    req_end=np.unique(inp.req_end))
    calls = {"scalar": 0, "vec": 0}

    def count(name, fn):
        def wrapped(*a):
            calls[name] += 1
            return fn(*a)
        return wrapped

    monkeypatch.setattr(plan_mod, "_tree_heuristic", count("scalar", _tree_heuristic))
    monkeypatch.setattr(plan_mod, "_tree_heuristic_vec", count("vec", _tree_heuristic_vec))
    built = []
    for limit in (0, n, 10**9):
        monkeypatch.setattr(plan_mod, "SCALAR_HEURISTIC_MAX_NODES", limit)
        for hq, hk in ((32, 32), (32, 8), (16, 1)):
            built.append(plan_summary(plan_mod.build_plan(
                inp, num_qo_heads=hq, num_kv_heads=hk, head_dim=128, device="cpu")))
    assert calls["scalar"] >= 6 and calls["vec"] >= 3  # both passes ran
    assert sum(sum(meta[4]) > 0 for _, meta in built) >= 2  # some split-Q choices
    for i in range(3, len(built)):
        arrays, meta = built[i]
        ref_arrays, ref_meta = built[i % 3]
        assert meta == ref_meta
        assert arrays.keys() == ref_arrays.keys()
        for k in arrays:
            np.testing.assert_array_equal(arrays[k], ref_arrays[k], err_msg=k)
