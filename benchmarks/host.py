"""Host-side cost of planning and of TreeKVCache steps.

``python -m benchmarks.host`` (``--quick`` on CPU) measures, on the largest seed tree
(1365 nodes, 1024 requests, 278,816 tokens):

* ``build_plan`` from flat arrays (a full plan), and ``fasttree_preparation`` (which
  also validates the KVTreeNode list);
* a TreeKVCache append-only step for every request (``reserve`` of one slot each,
  which also grows the plan's tail vnodes in place) - no re-plan; on CUDA also the same
  step with its slots copied from the host instead of derived on the device
  (``treecache.cache.DEVICE_STEP_SLOTS``), alternating three times;
* a TreeKVCache re-plan after a topology change (``prepare`` after a fork and a prune);
  on CUDA also with its kv entries written on the host instead of expanded on the
  device (``treecache.plan.DEVICE_EXPAND``), alternating three times; and with the
  planner's pass over the slot table and the slot table's copy into the staging buffer
  (``treecache.cache.NODE_RUNS`` and ``SLOT_TABLE_IN_PLACE`` off, as before v33) against
  the nodes' run flags and the table joined in place, alternating (three times on
  CUDA, once on the CPU); with ``--replan-modes ROUNDS`` each of the four settings of
  those two flags, the device synchronised before every call.

Times are host wall-clock medians (``time.perf_counter``), in microseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import treecache.cache as cache_mod
import treecache.plan as plan_mod
from treecache import FastTreeParams, TreeKVCache, fasttree_preparation, kv_ptrs
from treecache.fasttree import tree_plan_input
from treecache.plan import build_plan
from treecache.tree import generate_tree_from_spec

from .kernel import _patched

LARGEST = "1,4,16,64,256,1024 256,8,256,64,32,256"


def cache_from_tree(cache: TreeKVCache, nodes) -> list[int]:
    """Fill ``cache`` with ``nodes`` (random K/V); returns one request per leaf."""
    reqs: dict[int, int] = {}
    gen = torch.Generator().manual_seed(0)
    for nd in nodes:  # parents come before children in generated trees
        r = cache.new_request() if nd.parent < 0 else cache.fork(reqs[nd.parent])
        shape = (cache.num_layers, nd.seqlen, cache.num_kv_heads, cache.head_dim)
        k = torch.randn(shape, generator=gen).to(cache.device, cache.dtype)
        cache.append(r, k, k)
        reqs[nd.id] = r
    leaves = []
    for nd in nodes:
        if nd.num_children:
            cache.prune(reqs[nd.id])
        else:
            leaves.append(reqs[nd.id])
    return leaves


def _median_us(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def _alternate(module, names, fn, reps, rounds):
    """``(off, on)``: medians of ``fn`` (``reps`` calls each) with ``module.<name>`` off,
    then on (for each of ``names``, one name or a list), alternating ``rounds`` times in
    one run."""
    names = [names] if isinstance(names, str) else list(names)
    times = {False: [], True: []}
    for _ in range(rounds):
        for on in (False, True):
            with contextlib.ExitStack() as stack:
                for name in names:
                    stack.enter_context(_patched(name, on, module))
                times[on].append(_median_us(fn, reps))
    return times[False], times[True]


def _replan_modes(fn, rounds: int, device: torch.device) -> dict:
    """Median host time of ``fn`` (a re-plan) per setting of the two v33 re-plan flags,
    the settings alternating ``rounds`` times, 4 calls each, the device synchronised
    before every call (so that no call waits for the previous one's upload)."""
    modes = [(True, True), (True, False), (False, True), (False, False)]
    times = {m: [] for m in modes}
    for _ in range(rounds):
        for m in modes:
            with _patched("NODE_RUNS", m[0], cache_mod), \
                    _patched("SLOT_TABLE_IN_PLACE", m[1], cache_mod):
                fn()  # the first call after a change of setting is not timed
                for _ in range(4):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    fn()
                    times[m].append((time.perf_counter() - t) * 1e6)
    return {f"node_runs={m[0]},in_place={m[1]}": statistics.median(v) for m, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description="host-side planning and cache step costs")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="write a JSON file here")
    ap.add_argument("--profile", action="store_true",
                    help="print a cProfile summary of the append-only step")
    ap.add_argument("--replan-modes", type=int, default=0, metavar="ROUNDS",
                    help="also time the re-plan under each setting of NODE_RUNS and "
                         "SLOT_TABLE_IN_PLACE, alternating for ROUNDS rounds of 4 calls, "
                         "the device synchronised before each call")
    args = ap.parse_args(argv)
    spec = "1,4,16 64,8,32" if args.quick else LARGEST
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hq, hk, d = 32, 8, 128
    nodes = generate_tree_from_spec(spec)
    ptrs = kv_ptrs(nodes)
    b = sum(1 for n in nodes if n.num_children == 0)
    params = FastTreeParams()
    res = {"tree": spec, "device": str(device)}
    # Host speed calibration: the same small Python and numpy work on every machine, so
    # that host times from different machines can be compared.
    small = np.arange(1024)
    res["calib_python_loop_us"] = _median_us(lambda: sum(i * i for i in range(10000)), 20)
    res["calib_numpy_ops_us"] = _median_us(
        lambda: [np.cumsum(small[small > j]) for j in range(100)], 20)

    if device.type == "cuda":
        # Host time of the small host-to-device copy an append step makes (24 KiB):
        # staged through pinned memory (what the cache does) or from pageable memory.
        arr = np.arange(3 * 1024, dtype=np.int64)
        res["h2d_pinned_us"] = _median_us(
            lambda: torch.from_numpy(arr).pin_memory().to(device, non_blocking=True), 200)
        res["h2d_pageable_us"] = _median_us(
            lambda: torch.from_numpy(arr).to(device, non_blocking=True), 200)
        torch.cuda.synchronize()

    res["fasttree_preparation_us"] = _median_us(
        lambda: fasttree_preparation(nodes, ptrs, b, hq, hk, d, params=params, device=device), 10)
    inp = tree_plan_input(nodes, ptrs, b)
    meta, _ = fasttree_preparation(nodes, ptrs, b, hq, hk, d, params=params, device=device)
    bufs = meta.plan.buffers
    res["build_plan_us"] = _median_us(
        lambda: build_plan(inp, num_qo_heads=hq, num_kv_heads=hk, head_dim=d, params=params,
                           device=device, buffers=bufs), 20)

    steps = 50
    ab_rounds = 3 if device.type == "cuda" else 0
    room = steps * (3 + 2 * ab_rounds) + 10  # the steps below, with the profile's
    cache = TreeKVCache(1, hq, hk, d, capacity_tokens=sum(n.seqlen for n in nodes) + room * b,
                        dtype=torch.float16 if device.type == "cuda" else torch.float32,
                        device=device, plan_headroom=room)
    leaves = cache_from_tree(cache, nodes)
    q = torch.randn(len(leaves), hq, d, device=device, dtype=cache.dtype)
    cache.attend(q, 0)
    cache.reserve()  # first step moves nothing (leaves are exclusive)
    cache.attend(q, 0)
    rebuilds = cache.plan_rebuilds
    res["append_step_us"] = _median_us(lambda: cache.reserve(), steps)
    res["append_step_rebuilds"] = cache.plan_rebuilds - rebuilds
    if args.profile:
        import cProfile
        import io
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(steps):
            cache.reserve()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(15)
        print(s.getvalue())
    cache.attend(q, 0)
    res["append_step_rebuilds"] = cache.plan_rebuilds - rebuilds

    def topo_change():
        r = cache.fork(leaves[0])
        cache.prune(r)
        cache.prepare()

    res["replan_us"] = _median_us(topo_change, 5)
    if ab_rounds:
        # The re-plan's kv entries written on the host (before v25) against expanded on
        # the device from its run table.
        res["replan_host_expanded_us"], res["replan_device_expanded_us"] = _alternate(
            plan_mod, "DEVICE_EXPAND", topo_change, 5, ab_rounds)
    # The planner's pass over the slot table, and the table copied into the staging
    # buffer (before v33), against the nodes' run flags and the table joined in place.
    res["replan_table_pass_us"], res["replan_node_runs_us"] = _alternate(
        cache_mod, ["NODE_RUNS", "SLOT_TABLE_IN_PLACE"], topo_change, 5, ab_rounds or 1)
    if args.replan_modes:
        res["replan_us_by_mode"] = _replan_modes(topo_change, args.replan_modes, device)
        print("re-plan by (NODE_RUNS, SLOT_TABLE_IN_PLACE), medians: " + ", ".join(
            f"{k} {v:.1f} us" for k, v in res["replan_us_by_mode"].items()))
    if ab_rounds:
        # Slots copied from the host (before v14) against derived on the device. After
        # the re-plan, whose time grows with the tokens that steps add.
        res["append_step_copied_us"], res["append_step_derived_us"] = _alternate(
            cache_mod, "DEVICE_STEP_SLOTS", lambda: cache.reserve(), steps, ab_rounds)
    res["cache_stats"] = cache.stats()
    for k, v in res.items():
        if k.endswith("_us"):
            vals = v if isinstance(v, list) else [v]
            print(f"{k:28s} " + " ".join(f"{x:10.1f}" for x in vals) + " us")
    print(f"append-only steps rebuilt the plan {res['append_step_rebuilds']} times")
    print(f"target 4: full plan {res['build_plan_us'] / 1e3:.2f} ms (<= 2 ms); append-only step "
          f"{res['append_step_us']:.1f} us for {len(leaves)} requests (<= 100 us)")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
