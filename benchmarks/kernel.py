"""Kernel benchmark: the seed suite plus forest / beam / speculative trees.

Run ``python -m benchmarks.kernel`` on a GPU (``--quick`` for a CPU smoke run). For each
case it reports the project's decode time (eager and CUDA-graph replay), the roofline,
tree-unaware FlashAttention-2 (``torch.ops.aten._flash_attention_forward`` over each
request's full context), the project's kernel with a tree-unaware plan (each request
alone) as an ablation, the seed's time from PERF.md, host planning time, and the
relative error against a float32 reference. Writes ``results.json``, ``results.md`` and
``results.png`` into ``--out`` and prints the summary lines of the performance targets.
``--dtype bfloat16`` and ``--head-dim 64`` (or 16, 32, 256) run the suite at other
settings; the seed's times, and so targets 1-3, are for float16 at head_dim 128 only.
A long run can be split: ``--shard 1/2`` and ``--shard 2/2`` (into two output folders)
run every other case each, and ``--merge DIR1 DIR2 --out DIR`` writes the whole run's
files and summary from their results (no GPU needed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import attrs
import numpy as np
import torch

from kernels import reference_decode, select_backend
from treecache import fasttree_preparation, qkv_preparation, tree_stats
from treecache.fasttree import tree_plan_input
from treecache.plan import (
    DEFAULT_KV_SPLIT_SIZES,
    SUPPORTED_HEAD_DIMS,
    PlanInput,
    build_plan,
    path_token_indices,
)

from .suite import SEED_US, quick_cases, suite_cases

# The package re-exports a function named tree_decode; fetch the module itself.
td = importlib.import_module("kernels.tree_decode")

COPY_BW = 3.0e12  # bytes/s, device-to-device copy measured on the H100 (PERF.md)
# H100 SXM dense fp16/bf16 tensor-core peak (NVIDIA's datasheet figure), FLOP/s.
TENSOR_PEAK = 989e12
HEAD_DIM = 128
#: Target 1: geomean speedup over the seed >= TARGET1_SPEEDUP, no case slower.
TARGET1_SPEEDUP = 2.0
#: Target 2: time <= TARGET2_RATIO x roofline on the cases of roofline >= TARGET2_MIN_ROOFLINE_US.
TARGET2_MIN_ROOFLINE_US = 50.0
TARGET2_RATIO = 1.25
#: Target 3: graph time <= TARGET3_US on the cases of roofline < TARGET3_MAX_ROOFLINE_US.
TARGET3_MAX_ROOFLINE_US = 5.0
TARGET3_US = 10.0


def _progress(it, total, desc):
    try:
        from tqdm import tqdm

        return tqdm(it, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # plain progress lines
        def gen():
            for i, x in enumerate(it):
                print(f"{desc}: {i + 1}/{total}", file=sys.stderr, flush=True)
                yield x
        return gen()


def _bench(fn, device):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    times = []
    fn()
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


#: Calls captured in one graph for the "calls per graph" time (a model's decode step
#: captures one attention call per layer in one graph).
CALLS_PER_GRAPH = 32


def _graph_time(fn, device, calls=1):
    """Microseconds per call of ``fn`` under CUDA-graph replay: a graph of ``calls``
    calls, replayed back to back (50 calls in all per repeat), the median of 5 repeats.
    With one call per graph every call pays a graph launch, and a slow host can hold
    the GPU back on calls of a few microseconds; with many, the calls run back to back
    on the GPU as a model's captured decode step runs its layers."""
    if device.type != "cuda":
        return None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    replays = max(1, 50 // calls)
    # Time many replays with events; report per-call median over repeats.
    reps = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        reps.append(start.elapsed_time(end) * 1e3 / (replays * calls))
    return statistics.median(reps)


def ab_times(calls: dict, device, rounds: int) -> tuple[dict, dict]:
    """An A/B's timings: each of ``calls`` (name -> function) timed in turn,
    ``rounds`` times, under CUDA-graph replay and eagerly (:func:`_bench`). Returns the
    median graph and eager microseconds by name (graph None off CUDA)."""
    graph, eager = {w: [] for w in calls}, {w: [] for w in calls}
    for _ in range(rounds):
        for which, call in calls.items():
            graph[which].append(_graph_time(call, device))
            eager[which].append(_bench(call, device))
    medians = {}
    for which in calls:
        g = [t for t in graph[which] if t is not None]
        medians[which] = statistics.median(g) if g else None
    return medians, {w: statistics.median(eager[w]) for w in calls}


def ab_summary(rows, groups) -> list[str]:
    """Geometric means of ``new`` / ``old`` of an A/B's rows (each with ``graph_us``
    and ``eager_us`` dicts) for each ``(label, keep)`` of ``groups``, per timing."""
    lines = []
    for label, keep in groups:
        sel = [r for r in rows if keep(r)]
        for key in ("graph_us", "eager_us"):
            ratios = [r[key]["new"] / r[key]["old"] for r in sel
                      if r[key]["new"] and r[key]["old"]]
            if ratios:
                lines.append(f"{label}, {key[:-3]}: new / old = {_geomean(ratios):.3f} "
                             f"(geomean of {len(ratios)} cases, {min(ratios):.3f}-"
                             f"{max(ratios):.3f}; slower by > 2%: "
                             f"{sum(x > 1.02 for x in ratios)})")
    return lines


def ab_row_line(r: dict, label: str) -> str:
    """One A/B row (``case``, ``hq``, ``hk``, ``graph_us``, ``eager_us``, ``err``) as a
    line of progress output: old -> new times, their ratio, and the new error."""
    g, e = r["graph_us"], r["eager_us"]
    graph = (f"graph {g['old']:8.1f} -> {g['new']:8.1f} us ({g['new'] / g['old']:.3f}) "
             if g["old"] else "")
    return (f"{r['case'][:34]:34s} {r['hq']}/{r['hk']} {label}: {graph}eager "
            f"{e['old']:8.1f} -> {e['new']:8.1f} us ({e['new'] / e['old']:.3f}), "
            f"error {r['err']['new']:.1e}")


def ab_write(rows, lines, out, device, complete: bool, **meta) -> None:
    """With ``out``, write an A/B's ``rows``, summary ``lines``, the device's name,
    ``meta`` and ``complete`` (False while cases remain) to that JSON file. The A/B
    modules write it after every case, so that a run cut short keeps the cases it
    timed."""
    if out:
        Path(out).write_text(json.dumps(dict(
            device=torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
            **meta, complete=complete, rows=rows, summary=lines), indent=1))


def ab_report(rows, lines, out, device, **meta) -> None:
    """Print an A/B's summary ``lines``; with ``out``, write them, the ``rows``, the
    device's name and ``meta`` to that JSON file, marked complete."""
    for line in lines:
        print(line)
    ab_write(rows, lines, out, device, True, **meta)


def _flash_varlen(q, k_tree, v_tree, slots, device):
    """Tree-unaware FA2: every request's whole context laid out contiguously."""
    if device.type != "cuda":
        return None, None
    idx = torch.from_numpy(np.concatenate(slots)).to(device)
    k = k_tree[idx].contiguous()
    v = v_tree[idx].contiguous()
    lens = torch.tensor([s.size for s in slots], dtype=torch.int32)
    cu_k = torch.zeros(len(slots) + 1, dtype=torch.int32)
    cu_k[1:] = torch.cumsum(lens, 0)
    cu_k = cu_k.to(device)
    cu_q = torch.arange(len(slots) + 1, dtype=torch.int32, device=device)
    max_k = int(lens.max())
    scale = 1.0 / math.sqrt(q.shape[-1])

    def run():
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, 1, max_k, 0.0, False, False, scale=scale)[0]

    try:
        out = run()
        t = _bench(run, device)
    except Exception as exc:  # noqa: BLE001 - report and continue
        print(f"flash attention baseline failed: {exc}", file=sys.stderr)
        return None, None
    return t, out


@contextlib.contextmanager
def _patched(name, value, module=td):
    """Set ``module.<name>`` (default: ``kernels.tree_decode``) to ``value`` for the block."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _ablations(plan, q, k, v, sm, device):
    """Graph times of the same plan without one optimisation each (same run, same data):
    no contiguity hint (every vnode gathers its slot indices), the other partial dtype
    (float32 where the plan stores float16, else the input dtype), the v4 stage-2 launch
    shape, the other launch grouping of the two stage-1 phases (one launch each when
    the plan merges them, one launch when it does not), without the wide-tile register
    cap, with 64-bit address arithmetic in stage 1, with stage 2 as a plain launch
    (not a programmatic dependent one), where the two phases are two launches, those
    launches on one stream (no overlap) and on two streams instead of chained (also
    eager), where the plan merges in phase 1 (``DecodePlan.finish``), with stage 2
    instead; and the eager time with every launch through Triton's JIT (no direct
    launches); where the plan lowered phase 1's KV tile
    (``SHORT_KV_TILE``), the graph time with the requested tile."""
    t = plan.kernel_tensors(q.dtype)
    mode = plan.launch_modes
    no_hint = {kk: vv for kk, vv in t.items() if kk != "vnode_slot0"}
    # The other partial dtype: float32 where the plan stores the input dtype, else that.
    half_now = t["mid_o"].dtype != torch.float32
    other = dict(t, mid_o=(plan.tensors()["mid_o"] if half_now else torch.empty(
        t["mid_o"].shape, dtype=q.dtype, device=q.device)))
    o = torch.empty_like(q)
    res = {}
    res["graph_no_hint_us"] = _graph_time(lambda: td.tree_decode(
        q, k, v, o, phases=plan.phases, sm_scale=sm, check=False, **mode, **no_hint), device)
    res["graph_other_partials_us"] = _graph_time(lambda: td.tree_decode(
        q, k, v, o, phases=plan.phases, sm_scale=sm, check=False, **mode, **other), device)
    res["partials_dtype"] = str(t["mid_o"].dtype).replace("torch.", "")
    # Stage 2 with the v4 launch shape (one head, 8 partials a step, one warp).
    # (A copy of the plan: its prepared launches are made under the patched rule.)
    with _patched("stage2_blocks", lambda b, h, d: (1, 8, 1)):
        v4_shape = attrs.evolve(plan)
        res["graph_stage2_v4_us"] = _graph_time(
            lambda: v4_shape.run(q, k, v, o, sm_scale=sm, check=False), device)
    merged = td.merge_phases(plan.phases, q.shape[1] // k.shape[1], k.shape[1])
    groups = ([[ph] for ph in plan.phases] if merged else [list(plan.phases)])

    def other_grouping():
        for grp in groups:
            plan.run_stage1(q, k, v, grp, sm, o=o if plan.direct else None)
        if plan.needs_stage2 or not plan.direct:
            td.tree_decode_stage2(t["mid_o"], t["mid_lse"], o, t["req_mid_start"],
                                  t["req_mid_len"], t["req_mid_rows"], skip_single=plan.direct)

    res["graph_other_grouping_us"] = _graph_time(other_grouping, device)
    res["phases_merged"] = merged
    # Without the register cap of the wide-tile launch; with 64-bit address arithmetic.
    for key, attr, value in (("graph_no_regcap_us", "WIDE_TILE_MAX_REGISTERS", None),
                             ("graph_offsets64_us", "OFF32_LIMIT", 1),
                             ("graph_no_pdl_us", "DEPENDENT_LAUNCH", False)):
        with _patched(attr, value):
            fn = td.tree_decode_launcher(q, k, v, o, phases=plan.phases, sm_scale=sm, **mode, **t)
            res[key] = _graph_time(lambda: fn(q, k, v, o), device)
    # Phase 1 with the requested KV tile where the plan lowered it (SHORT_KV_TILE).
    if plan.kv_tiles != plan.requested_kv_tiles:
        # The rule only lowers phase 1's tile, and phase 1 (when present) is the last.
        last = plan.phases[-1]._replace(kv_tile=plan.requested_kv_tiles[1])
        long_tile = tuple(plan.phases[:-1]) + (last,)
        fn = td.tree_decode_launcher(q, k, v, o, phases=long_tile, sm_scale=sm, **mode, **t)
        res["graph_no_short_kv_us"] = _graph_time(lambda: fn(q, k, v, o), device)
    # Stage 2 instead of the merge in phase 1, where the plan finishes there.
    if plan.finish:
        fn = td.tree_decode_launcher(q, k, v, o, phases=plan.phases, sm_scale=sm,
                                     **dict(mode, finish=False), **t)
        res["graph_no_finish_us"] = _graph_time(lambda: fn(q, k, v, o), device)
    # Two stage-1 launches one after the other instead of chained (or on two streams),
    # and on two streams instead of chained.
    if not merged and not plan.finish and len([ph for ph in plan.phases if ph.num_vnodes]) == 2:
        with _patched("CHAIN_PHASES", False):
            seq = td.tree_decode_launcher(q, k, v, o, phases=plan.phases, sm_scale=sm,
                                          overlap=False, **mode, **t)
            two = td.tree_decode_launcher(q, k, v, o, phases=plan.phases, sm_scale=sm,
                                          overlap=True, **mode, **t)
        res["graph_no_overlap_us"] = _graph_time(lambda: seq(q, k, v, o), device)
        res["graph_no_chain_us"] = _graph_time(lambda: two(q, k, v, o), device)
        res["eager_no_chain_us"] = _bench(lambda: two(q, k, v, o), device)
    # Eager calls with every launch through Triton's JIT (a copy of the plan: its
    # prepared launches are made and called with direct launches off).
    with _patched("FAST_LAUNCH", False):
        jit_plan = attrs.evolve(plan)
        res["eager_jit_launch_us"] = _bench(
            lambda: jit_plan.run(q, k, v, o, sm_scale=sm, check=False), device)
    return res


def _rule_split_ablation(plan, inp, hq, hk, q, k, v, sm, device):
    """Where the plan chose its KV chunk length (``kv_split_sizes=None``) other than the
    seed's rule would have: graph and eager times of the rule's plan."""
    rule = build_plan(inp, num_qo_heads=hq, num_kv_heads=hk, head_dim=q.shape[-1],
                      device=device, kv_split_sizes=DEFAULT_KV_SPLIT_SIZES)
    if rule.kv_split_sizes == plan.kv_split_sizes and rule.phases == plan.phases:
        return {}
    o = torch.empty_like(q)

    def run():
        rule.run(q, k, v, o, sm_scale=sm, check=False)

    return {"graph_rule_split_us": _graph_time(run, device),
            "eager_rule_split_us": _bench(run, device)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error of ``out`` against the float32 reference ``ref`` (NaN when ``out``
    holds a NaN: a row no kernel wrote)."""
    if torch.isnan(out).any():
        return float("nan")
    return ((out.float() - ref).norm() / ref.norm()).item()


def _flat_ablation(inp, hq, hk, q, k, v, sm, ref, device):
    """Graph time and error of the flat plan (one group per request end node, whole
    paths, stage 1 writing single-partial outputs directly)."""
    plan = build_plan(inp, num_qo_heads=hq, num_kv_heads=hk, head_dim=q.shape[-1],
                      device=device, flat=True)
    o = torch.full_like(q, float("nan"))
    plan.run(q, k, v, o, sm_scale=sm, check=False)
    err = rel_err(o, ref)
    t = _graph_time(lambda: plan.run(q, k, v, o, sm_scale=sm, check=False), device)
    return {"graph_flat_us": t, "flat_rel_err": err, "flat_needs_stage2": plan.needs_stage2}


def seed_comparable(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a run's times compare with the seed's column of PERF.md (float16 at head_dim
    128; a CPU smoke run's float32 stands in for float16)."""
    return head_dim == HEAD_DIM and dtype in (torch.float16, torch.float32)


def error_bound(dtype: torch.dtype) -> float:
    """Target 5's bound on the relative error for inputs of ``dtype``: 1e-2 for bfloat16,
    2e-3 otherwise (the foundation issue's bounds)."""
    return 1e-2 if dtype == torch.bfloat16 else 2e-3


def run_case(name, nodes, hq, hk, device, dtype, with_baselines=True, ablations=False,
             head_dim=HEAD_DIM):
    """One case's times, roofline, baselines and error (see the module's docstring).
    The seed's time is attached only where :func:`seed_comparable` holds."""
    st = tree_stats(nodes)
    b = st["num_requests"]
    gen = torch.Generator(device="cpu").manual_seed(1234)
    q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, head_dim, device, dtype,
                                             generator=gen, build_cache=False)
    params = None  # the project's default: FastTreeParams.for_heads (tuned tiles)
    t0 = time.perf_counter()
    meta, _ = fasttree_preparation(nodes, ptrs, b, hq, hk, head_dim, params=params, device=device)
    prep_ms = (time.perf_counter() - t0) * 1e3
    inp = tree_plan_input(nodes, ptrs, b)
    plan_times = []
    for _ in range(5):
        t0 = time.perf_counter()
        build_plan(inp, num_qo_heads=hq, num_kv_heads=hk, head_dim=head_dim, params=params,
                   device=device, buffers=meta.plan.buffers)
        plan_times.append((time.perf_counter() - t0) * 1e3)
    # Rebuild the metadata (the timing loop rewrote its buffers).
    meta, _ = fasttree_preparation(nodes, ptrs, b, hq, hk, head_dim, params=params, device=device)
    plan = meta.plan
    o = torch.full_like(q, float("nan"))
    sm = 1.0 / math.sqrt(head_dim)
    backend = select_backend(device)

    def ours():
        plan.run(q, k, v, o, sm_scale=sm, backend=backend, check=False)

    ours()
    slots = path_token_indices(inp.parent, inp.seqlen, inp.tok_ptr, inp.req_end)
    ref = reference_decode(q, k, v, [torch.from_numpy(s).to(device) for s in slots], sm)
    err = rel_err(o, ref)
    t_ours = _bench(ours, device)
    t_graph = _graph_time(ours, device)
    t_graph_many = _graph_time(ours, device, calls=CALLS_PER_GRAPH)
    t_cached = None
    if device.type == "cuda":
        # The graph-cached call (DecodePlan.run(graph=True)): capture, then check a replay.
        def cached():
            plan.run(q, k, v, o, sm_scale=sm, backend=backend, check=False, graph=True)

        cached()
        o.fill_(float("nan"))
        cached()
        cached_err = rel_err(o, ref)
        err = cached_err if math.isnan(cached_err) else max(err, cached_err)
        t_cached = _bench(cached, device)

    res = dict(case=name, hq=hq, hk=hk, requests=b, nodes=st["num_nodes"],
               dtype=str(dtype).replace("torch.", ""), head_dim=head_dim,
               err_bound=error_bound(dtype),
               unique_tokens=st["unique_tokens"], logical_tokens=st["logical_tokens"],
               vnodes=plan.num_vnodes, phases=[list(p) for p in plan.phases],
               kv_split_sizes=list(plan.kv_split_sizes),
               ours_us=t_ours, ours_graph_us=t_graph, ours_cached_us=t_cached,
               ours_graph_many_us=t_graph_many, rel_err=err,
               prep_ms=prep_ms,
               plan_ms=statistics.median(plan_times))
    if ablations and device.type == "cuda":
        res.update(_ablations(plan, q, k, v, sm, device))
        res.update(_flat_ablation(inp, hq, hk, q, k, v, sm, ref, device))
        res.update(_rule_split_ablation(plan, inp, hq, hk, q, k, v, sm, device))
    res["roofline_us"] = roofline_bytes(st["unique_tokens"], b, hq, hk, head_dim) / COPY_BW * 1e6
    flops = attention_flops(hq, st["logical_tokens"], head_dim)
    res["gflop"] = flops / 1e9
    res["compute_floor_us"] = flops / TENSOR_PEAK * 1e6
    res["seed_us"] = (SEED_US.get((name, (hq, hk))) if seed_comparable(dtype, head_dim)
                      else None)
    if with_baselines:
        # Ablation: the same kernel with a tree-unaware plan (each request alone).
        lens = np.array([s.size for s in slots], dtype=np.int64)
        alone = PlanInput(parent=np.full(b, -1, np.int64), seqlen=lens,
                          tok_ptr=np.concatenate([[0], np.cumsum(lens)[:-1]]),
                          req_end=np.arange(b, dtype=np.int64),
                          node_tokens=np.concatenate(slots))
        plan_alone = build_plan(alone, num_qo_heads=hq, num_kv_heads=hk, head_dim=head_dim,
                                params=params, device=device)
        o2 = torch.empty_like(q)
        res["flat_plan_us"] = _bench(
            lambda: plan_alone.run(q, k, v, o2, sm_scale=sm, backend=backend, check=False), device)
        t_fa, out_fa = _flash_varlen(q, k, v, slots, device)
        res["fa2_us"] = t_fa
        if out_fa is not None:
            res["fa2_rel_err"] = ((out_fa.float() - ref).norm() / ref.norm()).item()
    return res


def roofline_bytes(unique_tokens: int, requests: int, hq: int, hk: int,
                   head_dim: int = HEAD_DIM) -> int:
    """Bytes of the roofline (PERF.md): every unique token's K and V once, each
    request's query and output once, float16."""
    return 2 * unique_tokens * hk * head_dim * 2 + 2 * requests * hq * head_dim * 2


def attention_flops(hq: int, logical_tokens: int, head_dim: int = HEAD_DIM) -> int:
    """Attention FLOPs of a decode call: q.k and p.v over every request's whole path
    (``logical_tokens`` in all), 2 FLOPs a multiply-add."""
    return 4 * hq * head_dim * logical_tokens


def case_gflop(r: dict) -> float:
    """A result row's attention GFLOP: its ``gflop``, else from its logical tokens (rows
    written before the field)."""
    return r.get("gflop") or attention_flops(r["hq"], r["logical_tokens"]) / 1e9


def _geomean(xs):
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summarize(results):
    seed = [r for r in results if r.get("seed_us")]
    lines = []
    if seed:
        for key, label in (("ours_us", "target 1"),
                           ("ours_cached_us", "target 1 (graph-cached call, timed like the seed)"),
                           ("ours_graph_us", "target 1 (CUDA-graph replay)")):
            rs = [r for r in seed if r.get(key)]
            if not rs:
                continue
            speed = _geomean([r["seed_us"] / r[key] for r in rs])
            slower = sum(r[key] > r["seed_us"] for r in rs)
            # Three decimals: a geomean just under the target must not print as it.
            lines.append(f"{label}: geomean speedup over seed = {speed:.3f}x over {len(rs)} "
                         f"cases (>= {TARGET1_SPEEDUP:.1f}); cases slower than seed: {slower}")
        big = [r for r in seed if r["roofline_us"] >= TARGET2_MIN_ROOFLINE_US]
        if big:
            worst = max(r["ours_us"] / r["roofline_us"] for r in big)
            over = [r for r in big if r["ours_us"] > TARGET2_RATIO * r["roofline_us"]]
            lines.append(f"target 2: worst time/roofline on {len(big)} cases with roofline >= "
                         f"{TARGET2_MIN_ROOFLINE_US:g} us = {worst:.2f}x (<= {TARGET2_RATIO:g}); "
                         f"cases over: {len(over)}")
            for r in big:
                gflop = case_gflop(r)
                need = gflop * 1e3 / (TARGET2_RATIO * r["roofline_us"])
                got = gflop * 1e3 / r["ours_us"]
                lines.append(f"  {r['case'][:34]} {r['hq']}/{r['hk']}: {r['ours_us']:.1f} us = "
                             f"{r['ours_us'] / r['roofline_us']:.2f}x roofline; {gflop:.1f} "
                             f"GFLOP: {got:.0f} TFLOP/s achieved, {need:.0f} TFLOP/s needed "
                             f"for {TARGET2_RATIO:g}x ({need / (TENSOR_PEAK / 1e12):.0%} of the "
                             "tensor peak)")
        small = [r for r in seed
                 if r["roofline_us"] < TARGET3_MAX_ROOFLINE_US and r.get("ours_graph_us")]
        if small:
            worst = max(r["ours_graph_us"] for r in small)
            lines.append(f"target 3: worst CUDA-graph time on {len(small)} cases with roofline "
                         f"< {TARGET3_MAX_ROOFLINE_US:g} us = {worst:.1f} us (<= {TARGET3_US:g})")
            many = [r["ours_graph_many_us"] for r in small if r.get("ours_graph_many_us")]
            if many:
                lines.append(f"  (not the target's measure) {CALLS_PER_GRAPH} calls per graph, as "
                             f"in a model's captured decode step: {min(many):.1f}-"
                             f"{max(many):.1f} us per call; within {TARGET3_US:g} us: "
                             f"{sum(x <= TARGET3_US for x in many)} of {len(many)}")
    abl = [r for r in results if r.get("graph_no_hint_us")]
    if abl:
        for key, what in (("graph_no_hint_us", "without the contiguity hint"),
                          ("graph_other_partials_us",
                           "with the other partial dtype (float32 if the plan stores fp16)"),
                          ("graph_other_grouping_us", "with the other phase grouping"),
                          ("graph_flat_us", "with the flat plan"),
                          ("graph_stage2_v4_us", "with the v4 stage-2 launch shape"),
                          ("graph_no_overlap_us", "with both phase launches on one stream"),
                          ("graph_no_chain_us", "with the phase launches on two streams"),
                          ("graph_no_finish_us", "with stage 2 instead of the merge in phase 1"),
                          ("graph_no_regcap_us", "without the wide-tile register cap"),
                          ("graph_offsets64_us", "with 64-bit address arithmetic"),
                          ("graph_no_pdl_us", "with stage 2 as a plain launch"),
                          ("graph_no_short_kv_us",
                           "with the requested phase-1 KV tile (no SHORT_KV_TILE)"),
                          ("graph_rule_split_us",
                           "with the seed's KV chunk rule instead of the plan's choice")):
            rs = [r for r in abl if r.get(key)]
            if not rs:
                continue
            ratio = _geomean([r[key] / r["ours_graph_us"] for r in rs])
            lines.append(f"ablation: graph time {what} / with = {ratio:.3f} (geomean of "
                         f"{len(rs)} cases)")
        for key, what in (("eager_jit_launch_us", "with every launch through the JIT"),
                          ("eager_no_chain_us", "with the phase launches not chained"),
                          ("eager_rule_split_us",
                           "with the seed's KV chunk rule instead of the plan's choice")):
            rs = [r for r in abl if r.get(key)]
            if rs:
                ratio = _geomean([r[key] / r["ours_us"] for r in rs])
                lines.append(f"ablation: eager time {what} / with = {ratio:.3f} (geomean of "
                             f"{len(rs)} cases)")
    if not seed and results:
        lines.append(f"targets 1-3 are stated for float16 at head_dim {HEAD_DIM} (the seed's "
                     f"column): not checked on this run's {_settings(results)}")
    errs = [r["rel_err"] for r in results]
    bad = [r for r in results if not (r["rel_err"] <= r.get("err_bound", 2e-3))]
    bounds = sorted({(r.get("err_bound", 2e-3), r.get("dtype") == "bfloat16") for r in results})
    bound = ", ".join(f"{b:.0e}".replace("e-0", "e-") + (" bf16" if bf else " fp16")
                      for b, bf in bounds)
    lines.append(f"target 5: max relative error = {max(errs):.2e} over {len(results)} cases "
                 f"(<= {bound}); failing: {len(bad)}")
    return lines


def _settings(results) -> str:
    """The input dtype(s) and head dim(s) of result rows, e.g. ``bfloat16, head_dim 128``
    (rows written before the fields: float16 at head_dim 128)."""
    dtypes = sorted({r.get("dtype", "float16") for r in results})
    dims = sorted({r.get("head_dim", HEAD_DIM) for r in results})
    return f"{'/'.join(dtypes)}, head_dim {'/'.join(map(str, dims))}"


def markdown(results, device_name):
    head = ("| case | Hq/Hk | B | tokens | roofline us | ours us | cached us | graph us | "
            f"graph x{CALLS_PER_GRAPH} us | "
            "seed us | vs seed | /roofline | flat plan us | FA2 us | plan ms | rel err |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")

    def f(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    rows = []
    for r in results:
        vs = r["seed_us"] / r["ours_us"] if r.get("seed_us") else None
        rows.append(
            f"| `{r['case']}` | {r['hq']}/{r['hk']} | {r['requests']} | {r['unique_tokens']} | "
            f"{r['roofline_us']:.1f} | {r['ours_us']:.1f} | {f(r.get('ours_cached_us'))} | "
            f"{f(r.get('ours_graph_us'))} | {f(r.get('ours_graph_many_us'))} | "
            f"{f(r.get('seed_us'))} | {f(vs, '{:.2f}x')} | {r['ours_us'] / r['roofline_us']:.2f} | "
            f"{f(r.get('flat_plan_us'))} | {f(r.get('fa2_us'))} | {r['plan_ms']:.2f} | "
            f"{r['rel_err']:.1e} |")
    return (f"Device: {device_name} ({_settings(results)})\n\n" + head + "\n".join(rows)
            + "\n")


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r['case'][:28]} {r['hq']}/{r['hk']}" for r in results]
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(10, len(results) * 0.35), 5))
    series = [("ours", "ours_us"), ("ours (graph-cached call)", "ours_cached_us"),
              ("ours (graph replay)", "ours_graph_us"), ("seed", "seed_us"),
              ("flat plan", "flat_plan_us"), ("FA2 varlen", "fa2_us")]
    w = 0.8 / len(series)
    for i, (lab, key) in enumerate(series):
        ys = [(r["roofline_us"] / r[key]) if r.get(key) else 0 for r in results]
        ax.bar(x + i * w, ys, w, label=lab)
    ax.set_ylabel("roofline / time (1.0 = memory bound)")
    ax.set_xticks(x + 0.4)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny cases (CPU smoke test)")
    ap.add_argument("--out", default="benchmarks/out", help="folder for json/md/png")
    ap.add_argument("--only", default=None, help="substring filter on case names")
    ap.add_argument("--no-baselines", action="store_true", help="skip FA2 and the flat plan")
    ap.add_argument("--no-extra", action="store_true", help="seed suite only")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"),
                    help="input dtype on a GPU (default float16, the seed's; a CPU run "
                         "uses float32)")
    ap.add_argument("--head-dim", type=int, default=HEAD_DIM, choices=SUPPORTED_HEAD_DIMS,
                    help=f"head dim (default {HEAD_DIM}, the seed's); targets 1-3 compare "
                         f"with the seed only at float16 and head_dim {HEAD_DIM}")
    ap.add_argument("--shard", default=None, metavar="K/N",
                    help="run only the K-th of N interleaved parts of the cases (1 <= K <= "
                         "N), so a long run can be split over several commands; --merge "
                         "puts the parts together")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="run nothing: merge the results.json of these output folders "
                         "(parts of one run, --shard) into --out, in suite order")
    ap.add_argument("--ablations", action="store_true",
                    help="also time the plan without the contiguity hint, with the other "
                         "partial dtype, with the v4 stage-2 shape, with the other stage-1 "
                         "launch grouping, without the register cap, with 64-bit addresses, "
                         "without overlapped phases, with stage 2 as a plain launch, with "
                         "the requested phase-1 KV tile (graph replay) and with every launch "
                         "through the JIT (eager)")
    args = ap.parse_args(argv)
    if args.merge:
        name, results = merge_results([Path(d) / "results.json" for d in args.merge])
        return _write_outputs(Path(args.out), name, results)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    if args.quick:
        cases = quick_cases()
    else:
        cases = suite_cases(extra=not args.no_extra)
    indexed = list(enumerate(cases))
    if args.only:
        indexed = [(i, c) for i, c in indexed if args.only in c[0]]
    if args.shard:
        try:
            part, parts = parse_shard(args.shard)
        except ValueError as e:
            ap.error(str(e))
        indexed = indexed[part - 1::parts]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    results = []
    for index, (case, nodes, (hq, hk)) in _progress(indexed, len(indexed), "cases"):
        res = run_case(case, nodes, hq, hk, device, dtype,
                       with_baselines=not args.no_baselines, ablations=args.ablations,
                       head_dim=args.head_dim)
        results.append(dict(res, suite_index=index))
        _write_json(Path(args.out), name, results, complete=False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _write_outputs(Path(args.out), name, results)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 1 <= K <= N, else ValueError naming the argument."""
    try:
        part, parts = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be K/N with integers, got {text!r}") from None
    if not 1 <= part <= parts:
        raise ValueError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return part, parts


def merge_results(paths) -> tuple[str, list[dict]]:
    """The device name and the results of several ``results.json`` files (parts of one
    run), in suite order (``suite_index``); ValueError if they name different devices,
    hold a case twice, were run with other dtypes or head dims, or one stopped before its
    last case."""
    names, results = set(), []
    for p in paths:
        data = json.loads(Path(p).read_text())
        if not data.get("complete", True):
            raise ValueError(f"{p} holds a run that stopped before its last case "
                             f"({len(data['results'])} cases): run that part again")
        names.add(data["device"])
        results += data["results"]
    if len(names) != 1:
        raise ValueError(f"the parts were measured on different devices: {sorted(names)}")
    if len({_settings([r]) for r in results}) > 1:
        raise ValueError(f"the parts were run with other settings: {_settings(results)}")
    keys = [(r["case"], r["hq"], r["hk"]) for r in results]
    if len(set(keys)) != len(keys):
        raise ValueError("a case appears in more than one part")
    results.sort(key=lambda r: r.get("suite_index", 0))
    return names.pop(), results


def _write_json(out: Path, name: str, results: list[dict], complete: bool) -> None:
    """``out``/results.json: the device's name, the results and whether the run reached
    its last case (the run rewrites it after every case, so that a run stopped early
    keeps the cases it measured; :func:`merge_results` refuses such a part)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        dict(device=name, complete=complete, results=results), indent=1))


def _write_outputs(out: Path, name: str, results: list[dict]) -> list[dict]:
    """results.json (complete), results.md (table and summary lines) and results.png
    under ``out``; prints the table and the summary."""
    _write_json(out, name, results, complete=True)
    md = markdown(results, name)
    summary = summarize(results)
    (out / "results.md").write_text(md + "\n" + "\n".join(summary) + "\n")
    plot(results, out / "results.png")
    print(md)
    for line in summary:
        print(line)
    return results


if __name__ == "__main__":
    main()
