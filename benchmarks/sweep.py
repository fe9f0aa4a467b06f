"""Tile / launch sweep of the stage-1 kernel on a few representative trees (GPU).

``python -m benchmarks.sweep --out FILE`` times CUDA-graph replays of each
configuration (KV tile, query tile rows, num_warps, num_stages) and prints the best one
per case next to the defaults. Used to choose the defaults; see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import math

import torch

from treecache import FastTreeParams, fasttree_preparation, qkv_preparation
from treecache import plan as plan_module
from treecache.plan import DEFAULT_KV_SPLIT_SIZES
from treecache.tree import generate_tree_from_spec

from .kernel import _bench, _graph_time, _patched

# The package re-exports a function named tree_decode; fetch the module itself.
td = importlib.import_module("kernels.tree_decode")

CASES = [
    ("1,1024 2048,32", 32, 32), ("1,1024 2048,32", 32, 8), ("1,1024 2048,32", 16, 1),
    ("1,2,4,8,16,32,64,128,1024 16,16,16,16,16,16,16,16,16", 32, 8),
    ("1,4,16,64,256,1024 256,8,256,64,32,256", 32, 8),
    ("1,2,64 8,256,32", 16, 1), ("1,10 4000,400", 32, 8),
]


def phase0(out_path=None):
    """Stage-1 phase 0 alone: query-tile rows x warps x stages on root-heavy trees."""
    dev = torch.device("cuda")
    import triton.testing

    rows_out = []
    for spec, hq, hk in [("1,1024 2048,32", 32, 32), ("1,1024 2048,32", 32, 8),
                         ("1,4,16,512 1024,256,128,32", 32, 8), ("1,1024 2048,32", 16, 1)]:
        nodes = generate_tree_from_spec(spec)
        q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, 128, dev, torch.float16,
                                                 build_cache=False)
        g = hq // hk
        res = []
        for rows0, warps, stages in itertools.product((64, 128, 256), (4, 8), (1, 2, 3)):
            if rows0 // g < 1:
                continue
            p = FastTreeParams(TSQs=[rows0 // g, max(1, 16 // g)], TSKs=[32, 32])
            meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128, params=p,
                                           device=dev)
            plan = meta.plan
            t = plan.tensors()
            ph = plan.phases[0]
            try:
                us = triton.testing.do_bench(lambda: td.tree_decode_stage1(
                    q, k, v, t["mid_o"], t["mid_lse"], t["kv_indices"], t["vnode_kv_start"],
                    t["vnode_kv_len"], t["vnode_q_start"], t["vnode_q_len"], t["mid_q_rows"],
                    ph, 0.088, num_warps=warps, num_stages=stages, kv_mask=t.get("kv_mask")),
                    return_mode="median") * 1e3
            except Exception:  # noqa: BLE001 - out of resources
                us = None
            res.append((us or 1e9, rows0, warps, stages))
            rows_out.append(dict(case=spec, hq=hq, hk=hk, rows0=rows0, warps=warps,
                                 stages=stages, phase0_us=us))
        res.sort()
        print(f"phase 0 {spec[:30]} {hq}/{hk}: " + "; ".join(
            f"rows {r} w{w} s{st}: {u:.1f}" for u, r, w, st in res[:6]), flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows_out, f, indent=1)


def kv_tiles(out_path=None):
    """Whole decode (graph replay) for per-phase KV tiles and KV split sizes."""
    import triton

    knobs = getattr(triton, "knobs", None)
    rt = getattr(knobs, "runtime", None)
    print("launch hooks:", getattr(rt, "launch_enter_hook", "n/a"), getattr(rt, "launch_exit_hook", "n/a"),
          flush=True)
    dev = torch.device("cuda")
    rows_out = []
    for spec, hq, hk in CASES:
        nodes = generate_tree_from_spec(spec)
        q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, 128, dev, torch.float16,
                                                 build_cache=False)
        res = []
        for tsk, split in itertools.product(([32, 32], [64, 32], [128, 32], [64, 64], [128, 64]),
                                            ((1024, 128), (512, 128), (256, 64))):
            p = FastTreeParams.for_heads(hq, hk)
            p.set_kv_tile_sizes(tsk)
            meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128, split,
                                           params=p, device=dev)
            o = torch.empty_like(q)
            try:
                us = _graph_time(lambda: meta.plan.run(q, k, v, o, check=False), dev)
            except Exception:  # noqa: BLE001
                us = None
            res.append((us or 1e9, tsk, split))
            rows_out.append(dict(case=spec, hq=hq, hk=hk, tsk=tsk, split=split, us=us))
        res.sort()
        base = [r for r in res if r[1] == [32, 32] and r[2] == (1024, 128)][0][0]
        print(f"{spec[:34]} {hq}/{hk}: default {base:.1f}; " + "; ".join(
            f"{t} {sp}: {u:.1f}" for u, t, sp in res[:4]), flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows_out, f, indent=1)


def _suite(extra: bool):
    """Every seed case (with ``extra``, also the project's forest, beam and speculative
    cases), one at a time, with its GPU inputs: ``(name, nodes, hq, hk, q, k, v, ptrs)``."""
    from .suite import suite_cases

    dev = torch.device("cuda")
    for name, nodes, (hq, hk) in suite_cases(extra):
        q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, 128, dev, torch.float16,
                                                 build_cache=False)
        yield name, nodes, hq, hk, q, k, v, ptrs


def _print_ratios(label: str, ratios) -> None:
    """One summary line: the geometric mean of time ratios against a default, and the extremes."""
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    print(f"{label}: time / default = {geo:.3f} (geomean of {len(ratios)} cases), "
          f"best {min(ratios):.3f}, worst {max(ratios):.3f}", flush=True)


GAMMAS = (0.0, 0.1, 0.5, 2.0, 8.0, 32.0, 128.0, 512.0)


def gamma(out_path=None):
    """Whole decode (graph replay) against the cost model's split-K weight gamma, on
    every seed case and the project's forest, beam and speculative cases."""
    dev = torch.device("cuda")
    rows_out = []
    for spec, nodes, hq, hk, q, k, v, ptrs in _suite(extra=True):
        res = []
        for gam in GAMMAS:
            p = FastTreeParams.for_heads(hq, hk)
            p.gamma = gam
            meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128, params=p,
                                           device=dev)
            o = torch.empty_like(q)
            us = _graph_time(lambda: meta.plan.run(q, k, v, o, check=False), dev)
            res.append((us, gam, meta.plan.num_mid_rows))
            rows_out.append(dict(case=spec, hq=hq, hk=hk, gamma=gam, us=us,
                                 mid_rows=meta.plan.num_mid_rows, vnodes=meta.plan.num_vnodes))
        print(f"{spec[:34]} {hq}/{hk}: " + "; ".join(
            f"g={g:g} {u:.1f}us ({m} rows)" for u, g, m in res), flush=True)
    # Against the default weight: geometric mean of the time ratios, and the extremes.
    base = FastTreeParams().gamma
    by_case = {}
    for r in rows_out:
        by_case.setdefault((r["case"], r["hq"], r["hk"]), {})[r["gamma"]] = r["us"]
    for gam in GAMMAS:
        _print_ratios(f"gamma {gam:g}", [t[gam] / t[base] for t in by_case.values()])
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows_out, f, indent=1)


def splits(out_path=None):
    """Whole decode (graph replay) of every seed-suite case for several KV split sizes
    (the chunk length, and the shorter one used when a phase has too few programs)."""
    dev = torch.device("cuda")
    options = ((1024, 128), (1024, 64), (1024, 32), (512, 64), (256, 64), (256, 32))
    rows_out = []
    for spec, nodes, hq, hk, q, k, v, ptrs in _suite(extra=False):
        res = []
        for split in options:
            meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128, split,
                                           device=dev)
            o = torch.empty_like(q)
            us = _graph_time(lambda: meta.plan.run(q, k, v, o, check=False), dev)
            res.append((us, split))
            rows_out.append(dict(case=spec, hq=hq, hk=hk, split=split, us=us,
                                 kv_splits=list(meta.plan.kv_split_sizes),
                                 vnodes=meta.plan.num_vnodes))
        print(f"{spec[:34]} {hq}/{hk}: " + "; ".join(f"{sp}: {u:.1f}" for u, sp in res),
              flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows_out, f, indent=1)


def stage2(out_path=None):
    """Stage 2 alone (graph replay) on every seed-suite and extra case: heads per program
    x partials per step x warps, against the v4 shape (one head, 8 partials, 1 warp) and
    the default (:func:`kernels.tree_decode.stage2_blocks`), same run, same partials."""
    dev = torch.device("cuda")
    rows_out = []
    for spec, nodes, hq, hk, q, k, v, ptrs in _suite(extra=True):
        b = q.shape[0]
        meta, _ = fasttree_preparation(nodes, ptrs, b, hq, hk, 128, device=dev)
        plan = meta.plan
        t = plan.kernel_tensors(q.dtype)  # the partials as stage 1 stores them
        o = torch.empty_like(q)
        plan.run(q, k, v, o, check=False)  # fills the partials (and the direct rows)
        counts = t["req_mid_len"].cpu()
        direct = plan.direct

        def launch(bh, bp, w):
            td.tree_decode_stage2(t["mid_o"], t["mid_lse"], o, t["req_mid_start"],
                                  t["req_mid_len"], t["req_mid_rows"], skip_single=direct,
                                  block_h=bh, block_p=bp, num_warps=w)

        launch(1, 8, 1)
        want = o.clone()
        auto = td.stage2_blocks(b, hq, 128)
        configs = {(1, 8, 1), auto}
        for bh in (1, 2, 4, 8, 16, 32):
            if bh > hq:
                continue
            for bp in (2, 4, 8):
                if bh * bp * 128 > 16384:
                    continue
                for per_thread in (16, 32):  # tile elements a thread holds
                    configs.add((bh, bp, max(1, min(8, bh * bp * 128 // (32 * per_thread)))))
        res = []
        for bh, bp, w in sorted(configs):
            launch(bh, bp, w)
            err = (o.float() - want.float()).abs().max().item()
            us = _graph_time(lambda: launch(bh, bp, w), dev)
            res.append((us, (bh, bp, w), err))
            rows_out.append(dict(case=spec, hq=hq, hk=hk, requests=b,
                                 mean_partials=float(counts.float().mean()),
                                 max_partials=int(counts.max()), block_h=bh, block_p=bp,
                                 warps=w, us=us, max_abs_diff=err,
                                 v4=(bh, bp, w) == (1, 8, 1), default=(bh, bp, w) == auto))
        res.sort()
        base = next(u for u, c, _ in res if c == (1, 8, 1))
        dflt = next(u for u, c, _ in res if c == auto)
        worst_err = max(e for _, _, e in res)
        print(f"{spec[:34]:34s} {hq}/{hk} B={b}: v4 {base:6.1f} us, default {auto} "
              f"{dflt:6.1f} us, best {res[0][1]} {res[0][0]:6.1f} us; max diff {worst_err:.1e}",
              flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows_out, f, indent=1)


def small_tile_regs(out_path=None):
    """Launches of tile shapes of at most 16 rows (the leaves' phase): pipeline stages x
    register cap (``maxnreg``) against the defaults, whole decode under graph replay on
    every seed case, the slower of two alternating repeats; also whether the output keeps
    its bits."""
    dev = torch.device("cuda")
    orig_launch, orig_cap = td.default_launch, td._register_cap
    configs = [(None, None), (1, None), (None, 64), (1, 64), (None, 80), (1, 80), (None, 96)]

    @contextlib.contextmanager
    def setting(stages, regs):
        def launch(bm, bn, bd, group=1):
            w, st = orig_launch(bm, bn, bd, group)
            return w, (stages if bm <= 16 and stages is not None else st)

        def cap(shapes, num_warps, device_type, **kw):
            if (regs is not None and device_type == "cuda" and len(set(shapes)) == 1
                    and shapes[0][0] <= 16):
                return regs
            return orig_cap(shapes, num_warps, device_type, **kw)

        with _patched("default_launch", launch), _patched("_register_cap", cap):
            yield

    rows = []
    for spec, nodes, hq, hk, q, k, v, ptrs in _suite(extra=False):
        meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128, device=dev)
        plan = meta.plan
        runs = _launch_runs(plan, q, k, v, [(setting(*c), {}) for c in configs])
        same = [bool(torch.equal(o, runs[0][1])) for _, o in runs]
        times = [[] for _ in configs]
        for _ in range(2):
            for i, (fn, o) in enumerate(runs):
                times[i].append(_graph_time(lambda: fn(q, k, v, o), dev))
        us = [max(x) for x in times]
        rows.append(dict(case=spec, hq=hq, hk=hk, us=us, same_bits=same))
        print(f"{spec[:34]} {hq}/{hk}: " + "; ".join(
            f"{c} {u:.1f}us" for c, u in zip(configs, us)), flush=True)
    for i, c in enumerate(configs):
        _print_ratios(f"(stages, maxnreg) {c}", [r["us"][i] / r["us"][0] for r in rows])
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"configs": configs, "rows": rows}, f, indent=1)


def _time_pair(runs, q, k, v, dev):
    """CUDA-graph replay and eager (``do_bench``, L2 flushed) times in us of each
    ``(launch, output)`` of ``runs``: the slower of two alternating repeats."""
    graph, eager = [[] for _ in runs], [[] for _ in runs]
    for _ in range(2):
        for i, (fn, o) in enumerate(runs):
            graph[i].append(_graph_time(lambda: fn(q, k, v, o), dev))
            eager[i].append(_bench(lambda: fn(q, k, v, o), dev))
    return [max(x) for x in graph], [max(x) for x in eager]


def _report_pair(rows, label: str, out_path) -> None:
    """Summary lines of an A/B sweep (second configuration against the first, graph and
    eager) and its rows as JSON."""
    if rows:
        for kind in ("graph", "eager"):
            _print_ratios(f"{kind}, {label}",
                          [r[f"{kind}_us"][1] / r[f"{kind}_us"][0] for r in rows])
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)


def _report_configs(rows, labels, configs, out_path) -> None:
    """Summary lines of a sweep over several configurations (each against the first,
    graph and eager) and its rows, with the configurations, as JSON."""
    for i, label in enumerate(labels):
        for kind in ("graph", "eager"):
            _print_ratios(f"{kind}, {label}",
                          [r[f"{kind}_us"][i] / r[f"{kind}_us"][0] for r in rows])
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"configs": configs, "rows": rows}, f, indent=1)


def _launch_runs(plan, q, k, v, variants):
    """The plan's launches prepared once per ``(setting, modes)`` of ``variants`` (a
    context manager around the preparation and first call, and launch modes over the
    plan's own), each with its own output, poisoned with NaN and then written by one
    call: ``[(launch, output)]``."""
    t = plan.kernel_tensors(q.dtype)
    runs = []
    for setting, modes in variants:
        with setting:
            o = torch.full_like(q, float("nan"))
            fn = td.tree_decode_launcher(q, k, v, o, phases=plan.phases, sm_scale=0.088,
                                         **dict(plan.launch_modes, **modes), **t)
            fn(q, k, v, o)
        runs.append((fn, o))
    return runs


def finish(out_path=None):
    """Plans that finish in phase 1 (``DecodePlan.finish``: phase 1 merges each request's
    partials, no stage 2) against the same plans with stage 2, whole decode on every case
    where a plan can finish (for any GQA group and phase-1 size, not only those of
    ``FINISH_MIN_GROUP``, ``FINISH_MIN_PROGRAMS`` and ``FINISH_MAX_PROGRAMS``):
    CUDA-graph replay (warm L2) and eager calls timed like the seed (``do_bench``, L2
    flushed), the slower of two alternating repeats; also the largest difference between
    the two outputs."""
    dev = torch.device("cuda")
    rows = []
    for spec, nodes, hq, hk, q, k, v, ptrs in _suite(extra=True):
        with _patched("FINISH_MIN_GROUP", 1, plan_module), \
                _patched("FINISH_MIN_PROGRAMS", 0, plan_module), \
                _patched("FINISH_MAX_PROGRAMS", 0, plan_module):  # every finishable plan
            meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128, device=dev)
        plan = meta.plan
        if not plan.finish:
            continue
        runs = _launch_runs(plan, q, k, v, [(contextlib.nullcontext(), {"finish": fin})
                                            for fin in (False, True)])
        diff = (runs[1][1].float() - runs[0][1].float()).abs().max().item()
        if runs[1][1].isnan().any():
            diff = float("nan")
        g_us, e_us = _time_pair(runs, q, k, v, dev)
        rows.append(dict(case=spec, hq=hq, hk=hk, phases=[list(p) for p in plan.phases],
                         phase1_programs=plan.phases[-1].num_vnodes * hk,
                         graph_us=g_us, eager_us=e_us, max_abs_diff=diff))
        print(f"{spec[:34]} {hq}/{hk} ({rows[-1]['phase1_programs']} phase-1 programs): "
              f"stage 2 {g_us[0]:.1f}/{e_us[0]:.1f} us, finish {g_us[1]:.1f}/{e_us[1]:.1f} us "
              f"(graph/eager), max diff {diff:.2e}", flush=True)
    _report_pair(rows, "finish", out_path)


#: Warps of every finishing launch in :func:`finish_warps`; 0: the default rule
#: (:func:`kernels.tree_decode.default_launch`, with ``FEW_FINISH_WARPS`` on launches of
#: at most ``FEW_FINISH_MAX_PROGRAMS`` programs).
FINISH_WARPS_CONFIGS = (0, 2, 4, 8)


@contextlib.contextmanager
def _finish_warps_setting(warps):
    """Every finishing launch on at least ``warps`` warps (0: the default rule), from
    entering the block to leaving it."""
    if not warps:
        yield
        return
    with _patched("FEW_FINISH_MAX_PROGRAMS", 1 << 30), _patched("FEW_FINISH_WARPS", warps):
        yield


def finish_warps(out_path=None):
    """Warps of the finishing launch (:data:`FINISH_WARPS_CONFIGS`) on every plan that
    finishes, whole decode, replayed and eager, the slower of two alternating repeats;
    the largest output difference. The rule's default is the first; the program count
    of each finishing launch is printed beside its times."""
    dev = torch.device("cuda")
    rows = []
    for spec, nodes, hq, hk, q, k, v, ptrs in _suite(extra=True):
        meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128, device=dev)
        plan = meta.plan
        if not plan.finish:
            continue
        runs = _launch_runs(plan, q, k, v, [(_finish_warps_setting(w), {})
                                            for w in FINISH_WARPS_CONFIGS])
        diff = max((o.float() - runs[0][1].float()).abs().max().item() for _, o in runs)
        if any(bool(o.isnan().any()) for _, o in runs):
            diff = float("nan")
        g_us, e_us = _time_pair(runs, q, k, v, dev)
        programs = plan.phases[-1].num_vnodes * hk
        rows.append(dict(case=spec, hq=hq, hk=hk, finish_programs=programs, graph_us=g_us,
                         eager_us=e_us, max_abs_diff=diff))
        print(f"{spec[:34]} {hq}/{hk} ({programs} finishing programs): " + "; ".join(
            f"warps {w or 'rule'} {gu:.1f}/{eu:.1f}"
            for w, gu, eu in zip(FINISH_WARPS_CONFIGS, g_us, e_us))
            + f" (graph/eager us), max diff {diff:.1e}", flush=True)
    _report_configs(rows, [f"finishing launch on {w} warps" if w
                           else "finishing launch on the rule's warps"
                           for w in FINISH_WARPS_CONFIGS], FINISH_WARPS_CONFIGS, out_path)


#: The wide tiles' register caps of the shared-phase KV-tile sweep (v37).
PHASE0_KV16_CAPS = (128, 96)


def phase0_kv16_params(hq: int, hk: int) -> FastTreeParams:
    """The sweep's tiles: the defaults of ``for_heads`` with 16-token phase-0 KV tiles."""
    p = FastTreeParams.for_heads(hq, hk, 128)
    p.set_kv_tile_sizes([16, p.TSKs[1]])
    return p


def phase0_kv16(out_path=None):
    """16-token KV tiles in the shared phase (``TSKs = [16, 32]``) against the default
    plan, with the wide tiles' register cap (:data:`WIDE_TILE_MAX_REGISTERS`) at each
    of :data:`PHASE0_KV16_CAPS` (96: meant to fit five programs an SM), every case;
    whole decode replayed and eager, the slower of two alternating repeats; the largest
    relative difference to the default plan's output. The default plan runs under the
    library's cap. See the v37 entry of benchmarks/RESULTS.md."""
    dev = torch.device("cuda")
    rows = []
    for spec, nodes, hq, hk, q, k, v, ptrs in _suite(extra=True):
        b = q.shape[0]
        meta, _ = fasttree_preparation(nodes, ptrs, b, hq, hk, 128, device=dev)
        runs = _launch_runs(meta.plan, q, k, v, [(contextlib.nullcontext(), {})])
        meta16, _ = fasttree_preparation(nodes, ptrs, b, hq, hk, 128,
                                         params=phase0_kv16_params(hq, hk), device=dev)
        runs += _launch_runs(meta16.plan, q, k, v,
                             [(_patched("WIDE_TILE_MAX_REGISTERS", cap), {})
                              for cap in PHASE0_KV16_CAPS])
        rows.append(_plans_row(spec, hq, hk, runs, q, k, v, dev))
        rows[-1]["tile16"] = any(ph.kv_tile == 16 for ph in meta16.plan.phases)
        g_us, e_us = rows[-1]["graph_us"], rows[-1]["eager_us"]
        print(f"{spec[:34]} {hq}/{hk}: default {g_us[0]:.1f}/{e_us[0]:.1f}; " + "; ".join(
            f"kv16 cap {c} {gu:.1f}/{eu:.1f}"
            for c, gu, eu in zip(PHASE0_KV16_CAPS, g_us[1:], e_us[1:]))
            + f" (graph/eager us), max rel diff {rows[-1]['max_rel_diff']:.1e}", flush=True)
    _report_configs(rows, ["default plan"] + [f"16-token phase-0 KV tiles, cap {c}"
                                              for c in PHASE0_KV16_CAPS],
                    [None, *PHASE0_KV16_CAPS], out_path)


def chain(out_path=None):
    """Plans whose two stage-1 phases are two launches: the second as a programmatic
    dependent launch of the first (``CHAIN_PHASES``) against the previous launches (one
    stream eagerly, two streams in graphs), whole decode: CUDA-graph replay (warm L2)
    and eager calls timed like the seed (``do_bench``, L2 flushed), the slower of two
    alternating repeats; also whether the output keeps its bits."""
    dev = torch.device("cuda")
    rows = []
    for spec, nodes, hq, hk, q, k, v, ptrs in _suite(extra=True):
        meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128, device=dev)
        plan = meta.plan
        live = [ph for ph in plan.phases if ph.num_vnodes]
        if plan.finish or len(live) != 2 or td.merge_phases(live, hq // hk, hk):
            continue
        runs = _launch_runs(plan, q, k, v, [(_patched("CHAIN_PHASES", chained), {})
                                            for chained in (False, True)])
        same = bool(torch.equal(runs[0][1], runs[1][1])) and not bool(runs[1][1].isnan().any())
        g_us, e_us = _time_pair(runs, q, k, v, dev)
        rows.append(dict(case=spec, hq=hq, hk=hk, phases=[list(p) for p in plan.phases],
                         graph_us=g_us, eager_us=e_us, same_bits=same))
        print(f"{spec[:34]} {hq}/{hk}: before {g_us[0]:.1f}/{e_us[0]:.1f} us, chained "
              f"{g_us[1]:.1f}/{e_us[1]:.1f} us (graph/eager)"
              + ("" if same else " BITS DIFFER"), flush=True)
    _report_pair(rows, "chained", out_path)


KV_TILE_CONFIGS = ([32, 32], [64, 32], [128, 32], [64, 64])


def _plan_run(plan, q, k, v):
    """A plan's decode as a ``(launch, output)`` pair for :func:`_time_pair`: the output
    poisoned with NaN, then written by one call (which also prepares the launches)."""
    o = torch.full_like(q, float("nan"))
    plan.run(q, k, v, o, check=False)
    return (lambda q, k, v, o, plan=plan: plan.run(q, k, v, o, check=False), o)


def _plans_row(spec, hq, hk, runs, q, k, v, dev) -> dict:
    """One case's row of a sweep over plans: the graph and eager times of each ``(launch,
    output)`` of ``runs`` (:func:`_time_pair`) and the largest relative difference of an
    output to the first's."""
    ref = runs[0][1].float()
    err = max(((o.float() - ref).norm() / ref.norm()).item() for _, o in runs)
    g_us, e_us = _time_pair(runs, q, k, v, dev)
    return dict(case=spec, hq=hq, hk=hk, graph_us=g_us, eager_us=e_us, max_rel_diff=err)


def _plans_sweep(configs, labels, make_kwargs, out_path, setting=None) -> None:
    """Whole decode on every case (seed suite and extras) with the plan that
    ``fasttree_preparation(..., **make_kwargs(config, hq, hk))`` builds for each
    configuration, the first being the default;
    ``setting(config)``, if given, is a context manager around the plan's building and
    first call (which prepares its launches). CUDA-graph replay (warm L2) and eager
    calls timed like the seed (``do_bench``, L2 flushed), the slower of two alternating
    repeats; ratios to the first and the rows as JSON."""
    dev = torch.device("cuda")
    rows = []
    for spec, nodes, hq, hk, q, k, v, ptrs in _suite(extra=True):
        runs = []
        for config in configs:
            with setting(config) if setting else contextlib.nullcontext():
                meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128,
                                               device=dev, **make_kwargs(config, hq, hk))
                runs.append(_plan_run(meta.plan, q, k, v))
        rows.append(_plans_row(spec, hq, hk, runs, q, k, v, dev))
        g_us, e_us, err = rows[-1]["graph_us"], rows[-1]["eager_us"], rows[-1]["max_rel_diff"]
        print(f"{spec[:34]} {hq}/{hk}: " + "; ".join(
            f"{c} {gu:.1f}/{eu:.1f}" for c, gu, eu in zip(labels, g_us, e_us))
            + f" (graph/eager us), max rel diff {err:.1e}", flush=True)
    _report_configs(rows, labels, configs, out_path)


def kv_tiles_eager(out_path=None):
    """The phases' KV tiles (``TSKs``) of :data:`KV_TILE_CONFIGS`, every case, replayed
    and eager (:func:`_plans_sweep`). The earlier tile sweeps timed graph replays
    only."""
    def make_kwargs(tsk, hq, hk):
        p = FastTreeParams.for_heads(hq, hk)
        p.set_kv_tile_sizes(tsk)
        return {"params": p}

    _plans_sweep(KV_TILE_CONFIGS, [f"TSKs {t}" for t in KV_TILE_CONFIGS], make_kwargs,
                 out_path)


#: Wide-tile launches (the shared-prefix phase as a launch of its own): (label, phase-0
#: KV tile, pipeline stages or None for the default, register cap or None for the
#: default); the first is the default.
WIDE_TILE_CONFIGS = (("kv 32, 2 stages", 32, None, None), ("kv 64, 3 stages", 64, 3, None),
                     ("kv 64, 3 stages, no cap", 64, 3, 0))


def wide_tile(out_path=None):
    """The wide-tile launches' KV tile, pipeline stages and register cap of
    :data:`WIDE_TILE_CONFIGS`, every case, replayed and eager (:func:`_plans_sweep`).
    A stand-alone kernel over the shared root of ``1,1024 2048,32`` 32/8
    (``python -m benchmarks.wide_tile_probe``) ran 97 us with the default tile and
    89 us with a 64-token KV tile and 3 stages."""
    def make_kwargs(config, hq, hk):
        p = FastTreeParams.for_heads(hq, hk)
        p.set_kv_tile_sizes([config[1], p.TSKs[1]])
        return {"params": p}

    orig_launch = td.default_launch

    @contextlib.contextmanager
    def setting(config):
        _, _, stages, cap = config

        def launch(bm, bn, bd, group=1):
            w, st = orig_launch(bm, bn, bd, group)
            return w, (stages if stages and bm >= 64 else st)

        no_cap = contextlib.nullcontext()
        with _patched("default_launch", launch), (
                no_cap if cap is None else _patched("WIDE_TILE_MAX_REGISTERS", cap)):
            yield

    _plans_sweep(WIDE_TILE_CONFIGS, [c[0] for c in WIDE_TILE_CONFIGS], make_kwargs, out_path,
                 setting)


#: KV chunk lengths of :func:`split_sizes`: None is the default rule (1024-token chunks,
#: 128 in a phase with too few programs); a number is that chunk in both phases.
SPLIT_CONFIGS = (None, 1024, 512, 256, 128, 64)


def split_sizes(out_path=None):
    """KV chunk lengths of :data:`SPLIT_CONFIGS` (the same in both phases, the seed's
    switch to shorter chunks off), every case, replayed and eager (:func:`_plans_sweep`):
    the data for a chunk length chosen per plan."""
    def make_kwargs(chunk, hq, hk):
        if chunk is None:  # the rule itself, not the plan's own choice (the default)
            return {"KV_SPLIT_SIZES": DEFAULT_KV_SPLIT_SIZES}
        return {"KV_SPLIT_SIZES": (chunk, chunk), "para_threshs1": (0, 0)}

    _plans_sweep(SPLIT_CONFIGS, ["rule" if c is None else f"chunk {c}" for c in SPLIT_CONFIGS],
                 make_kwargs, out_path)


#: Rows of the shared-prefix phase's query tile (queries x GQA group); the first is the
#: default (``FastTreeParams.for_heads``).
PHASE0_ROWS_CONFIGS = (64, 32, 16)


def phase0_rows(out_path=None):
    """Query-tile rows of the first phase (:data:`PHASE0_ROWS_CONFIGS`; the plan built
    for each, the leaves' tile unchanged), every case, replayed and eager
    (:func:`_plans_sweep`): fewer rows give more, shorter programs on the shared
    prefixes at the cost of more re-reads of them."""
    def make_kwargs(rows, hq, hk):
        params = FastTreeParams.for_heads(hq, hk)
        params.set_q_tile_sizes([max(1, rows // (hq // hk)), params.TSQs[1]])
        return {"params": params}

    _plans_sweep(PHASE0_ROWS_CONFIGS, [f"{r} rows" for r in PHASE0_ROWS_CONFIGS],
                 make_kwargs, out_path)


#: Weights of the merge chain in the planner's KV-chunk estimate
#: (``treecache.plan.AUTO_MERGE_WEIGHT``); the first is the reference (off).
MERGE_WEIGHT_CONFIGS = (0.0, 4.0, 8.0)


def merge_chain(out_path=None):
    """The planner's KV-chunk choice with the merge chain weighed in
    (:data:`MERGE_WEIGHT_CONFIGS`), every case, replayed and eager (:func:`_plans_sweep`):
    plans whose requests collect many partials choose longer chunks."""
    _plans_sweep(MERGE_WEIGHT_CONFIGS, [f"merge weight {w:g}" for w in MERGE_WEIGHT_CONFIGS],
                 lambda config, hq, hk: {}, out_path,
                 setting=lambda config: _patched("AUTO_MERGE_WEIGHT", config, plan_module))


#: Planner settings of the fusion sweep (treecache.plan attributes): unfused plans,
#: fused ones without packing, and fused and packed ones without program bounds (the
#: settings of ``h100_v20_pack_sweep.json``).
FUSE_CONFIGS = [dict(FUSE_PHASE1=False), dict(FUSE_PACK=False),
                dict(FUSE_MIN_PROGRAMS=0, FUSE_PACK_MIN_PROGRAMS=0, FUSE_PACK_MAX_PROGRAMS=None)]


@contextlib.contextmanager
def _plan_settings(config):
    with contextlib.ExitStack() as stack:
        for name, value in config.items():
            stack.enter_context(_patched(name, value, plan_module))
        yield


def fuse(out_path=None):
    """Phase-1 groups fused into masked vnodes (:data:`treecache.plan.FUSE_PHASE1`)
    without packing, and with single-request groups packed too (``FUSE_PACK``) with no
    program bounds, against unfused plans, every case, replayed and eager
    (:func:`_plans_sweep`). The default plans are one of the last two per case."""
    _plans_sweep(FUSE_CONFIGS, ["unfused", "fused", "fused and packed"],
                 lambda config, hq, hk: {}, out_path, setting=_plan_settings)


#: Planner settings of the inline sweep: no inlining, the defaults, and the defaults
#: with half the program bound (256: the plans of its first form, ``h100_v21_inline_sweep.json``,
#: whose second setting also left GQA group 1 out).
INLINE_CONFIGS = [dict(INLINE=False), dict(), dict(INLINE_MIN_PROGRAMS=256)]


def inline(out_path=None):
    """Whole request paths inlined into masked vnodes (:data:`treecache.plan.INLINE`)
    with the default bounds and with a program bound of 256, against plans without,
    every case, replayed and eager (:func:`_plans_sweep`)."""
    _plans_sweep(INLINE_CONFIGS, ["not inlined", "inlined", "inlined from 256 programs"],
                 lambda config, hq, hk: {}, out_path, setting=_plan_settings)


#: Planner settings of the chunking sweep: the v21 plans (chunks cut at the chunk
#: length, every phase of a masked plan reading masks); unmasked phases launched without
#: masks; that with chunks of equal length; with a last chunk of at most a quarter
#: chunk joining the others, of equal length or not; with a last chunk of at most a
#: tenth joining the one before it.
CHUNK_CONFIGS = [
    dict(BALANCE_CHUNKS=False, CHUNK_TAIL_ABSORB=0.0, UNMASKED_PHASES=False),
    dict(BALANCE_CHUNKS=False, CHUNK_TAIL_ABSORB=0.0),
    dict(BALANCE_CHUNKS=True, CHUNK_TAIL_ABSORB=0.0),
    dict(BALANCE_CHUNKS=True, CHUNK_TAIL_ABSORB=0.25),
    dict(BALANCE_CHUNKS=False, CHUNK_TAIL_ABSORB=0.25),
    dict(BALANCE_CHUNKS=False, CHUNK_TAIL_ABSORB=0.1),
]


def chunks(out_path=None):
    """KV chunks of equal length (:data:`treecache.plan.BALANCE_CHUNKS`), with and
    without a short last chunk absorbed, and unmasked phases of masked plans launched
    without masks (:data:`treecache.plan.UNMASKED_PHASES`), against the v21 plans,
    every case, replayed and eager (:func:`_plans_sweep`)."""
    _plans_sweep(CHUNK_CONFIGS, ["v21", "unmasked phases", "equal chunks", "tail joined, equal",
                  "tail joined", "tail of 1/10 joined"],
                 lambda config, hq, hk: {}, out_path, setting=_plan_settings)


#: Planner settings of the shared-inline sweep: off, then long nodes from 2,048, 1,024
#: and 256 tokens kept shared beside inlined short ones, whatever the plans read (the
#: settings of ``h100_v23_shared_inline_sweep.json``; the default is 256 with a read
#: bound).
SHARED_INLINE_CONFIGS = [dict(SHARED_INLINE=0)] + [
    dict(SHARED_INLINE=n, SHARED_INLINE_MAX_READS=1e9) for n in (2048, 1024, 256)]


def shared_inline(out_path=None):
    """Long nodes shared beside inlined short ones (:data:`treecache.plan.SHARED_INLINE`)
    at three length bounds, without the read bound, against plans without, every case,
    replayed and eager (:func:`_plans_sweep`)."""
    _plans_sweep(SHARED_INLINE_CONFIGS,
                 ["off"] + [f"long from {c['SHARED_INLINE']}" for c in SHARED_INLINE_CONFIGS[1:]],
                 lambda config, hq, hk: {}, out_path, setting=_plan_settings)


#: The planner's choices side by side: (label, treecache.plan settings, build_plan
#: keywords). The first is the default plan; then one KV chunk length for both phases
#: (the seed's switch to shorter chunks off), no inlining, inlining from 128 programs
#: (at 64 and at 32 query rows a vnode), no phase-1 fusion, the flat plan, and a
#: shared-prefix query tile of 32 rows.
PLAN_SPACE = (
    [("default", {}, {})]
    + [(f"chunk {c}", {}, dict(kv_split_sizes=(c, c), para_threshs1=(0, 0)))
       for c in (1024, 512, 256, 128, 64)]
    + [("no inline", dict(INLINE=False), {}),
       ("inline 128", dict(INLINE_MIN_PROGRAMS=128), {}),
       ("inline 128, 32 rows", dict(INLINE_MIN_PROGRAMS=128, INLINE_ROWS=32), {}),
       ("no fusion", dict(FUSE_PHASE1=False), {}),
       ("flat", {}, dict(flat=True)),
       ("phase-0 32 rows", {}, dict(rows0=32))]
)


def plan_space_plans(inp, hq: int, hk: int, head_dim: int, device) -> list:
    """The plan of each choice of :data:`PLAN_SPACE` for ``inp`` (the settings apply
    while it is built; a built plan runs the same under any of them)."""
    from treecache.plan import build_plan

    out = []
    for _, settings, build in PLAN_SPACE:
        build = dict(build)
        rows0 = build.pop("rows0", None)
        if rows0 is not None:
            params = FastTreeParams.for_heads(hq, hk)
            params.set_q_tile_sizes([max(1, rows0 // (hq // hk)), params.TSQs[1]])
            build["params"] = params
        with _plan_settings(settings):
            plan = build_plan(inp, num_qo_heads=hq, num_kv_heads=hk, head_dim=head_dim,
                              device=device, **build)
        out.append(plan)
    return out


def plan_space(out_path=None):
    """Every case's plan under each choice of :data:`PLAN_SPACE`, replayed and eager
    (timed as :func:`_plans_sweep` does): how much a better choice among the plans the
    planner can already build would give, case by case (the best of them per case
    against the default), and which choice wins where."""
    from treecache import tree_stats
    from treecache.fasttree import tree_plan_input

    dev = torch.device("cuda")
    labels = [c[0] for c in PLAN_SPACE]
    rows = []
    for spec, nodes, hq, hk, q, k, v, ptrs in _suite(extra=True):
        inp = tree_plan_input(nodes, ptrs, tree_stats(nodes)["num_requests"])
        runs = [_plan_run(plan, q, k, v)
                for plan in plan_space_plans(inp, hq, hk, q.shape[-1], dev)]
        rows.append(_plans_row(spec, hq, hk, runs, q, k, v, dev))
        g_us, e_us, err = rows[-1]["graph_us"], rows[-1]["eager_us"], rows[-1]["max_rel_diff"]
        best = min(range(len(labels)), key=lambda i: e_us[i])
        print(f"{spec[:34]} {hq}/{hk}: default {g_us[0]:.1f}/{e_us[0]:.1f} us (graph/eager), "
              f"best eager {labels[best]} {e_us[best]:.1f}, max rel diff {err:.1e}", flush=True)
    for kind in ("graph", "eager"):
        _print_ratios(f"{kind}, best of the plan space",
                      [min(r[f"{kind}_us"]) / r[f"{kind}_us"][0] for r in rows])
    _report_configs(rows, labels, [[c[0], c[1], c[2]] for c in PLAN_SPACE], out_path)


def headroom(out_path=None):
    """Every case's plan as the functional API builds it (no growth headroom) against
    the plan a :class:`treecache.TreeKVCache` builds for the same tree in a decode loop
    (every request ending alone at a leaf may grow; 64 entries of headroom each, the
    cache's default ``plan_headroom``), replayed and eager (timed as
    :func:`_plans_sweep` does): what the room for append-only steps costs each call."""
    import attrs
    import numpy as np

    from treecache import tree_stats
    from treecache.fasttree import tree_plan_input
    from treecache.plan import build_plan

    dev = torch.device("cuda")
    rows = []
    for spec, nodes, hq, hk, q, k, v, ptrs in _suite(extra=True):
        inp = tree_plan_input(nodes, ptrs, tree_stats(nodes)["num_requests"])
        grow = attrs.evolve(inp, growable=np.ones(inp.req_end.size, dtype=bool))
        runs = [_plan_run(build_plan(plan_inp, num_qo_heads=hq, num_kv_heads=hk,
                                     head_dim=q.shape[-1], device=dev, headroom=room), q, k, v)
                for plan_inp, room in ((inp, 0), (grow, 64))]
        rows.append(_plans_row(spec, hq, hk, runs, q, k, v, dev))
        g_us, e_us, err = rows[-1]["graph_us"], rows[-1]["eager_us"], rows[-1]["max_rel_diff"]
        print(f"{spec[:34]} {hq}/{hk}: no headroom {g_us[0]:.1f}/{e_us[0]:.1f} us, headroom "
              f"64 {g_us[1]:.1f}/{e_us[1]:.1f} us (graph/eager), max rel diff {err:.1e}",
              flush=True)
    _report_configs(rows, ["no headroom", "headroom 64"],
                    [["no headroom", {}, {}], ["headroom 64", {}, {"headroom": 64}]], out_path)


#: The sweeps besides the default tile sweep: (flag, function, help); the first flag
#: given runs.
SWEEPS = (
    ("headroom", headroom, "functional plans against the cache's plans with growth headroom"),
    ("shared-inline", shared_inline, "long nodes shared beside inlined short ones, every case"),
    ("plan-space", plan_space, "the planner's plan choices side by side, every case"),
    ("finish-warps", finish_warps, "warps of the finishing launch, every plan that finishes"),
    ("phase0-kv16", phase0_kv16,
     "16-token KV tiles in the shared phase, at two register caps, every case"),
    ("kv-tiles-eager", kv_tiles_eager, "the phases' KV tiles, eager and replayed, every case"),
    ("wide-tile", wide_tile, "KV tile and stages of the wide-tile launches, every case"),
    ("split-sizes", split_sizes, "KV chunk lengths in both phases, every case"),
    ("phase0-rows", phase0_rows, "query-tile rows of the shared-prefix phase, every case"),
    ("fuse", fuse, "phase-1 groups fused into masked vnodes against unfused, every case"),
    ("inline", inline, "whole request paths inlined into masked vnodes against not, every case"),
    ("chunks", chunks, "KV chunks of equal length and unmasked phases against v21, every case"),
    ("merge-chain", merge_chain, "the merge chain in the planner's KV-chunk estimate, every case"),
    ("chain", chain, "two phase launches chained (dependent launch) against before"),
    ("finish", finish, "plans that merge in phase 1 against stage 2, every case"),
    ("small-tile-regs", small_tile_regs,
     "register cap and pipeline stages of the leaves' phase, every seed case"),
    ("stage2", stage2, "stage-2 launch shapes, every case"),
    ("splits", splits, "KV split sizes, every seed case"),
    ("gamma", gamma, "cost-model gamma sweep"),
    ("kv-tiles", kv_tiles, "per-phase KV tile / split sweep"),
    ("phase0", phase0, "phase-0 tile sweep only"),
)

def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    for flag, _, what in SWEEPS:
        ap.add_argument(f"--{flag}", action="store_true", help=what)
    args = ap.parse_args(argv)
    for flag, sweep, _ in SWEEPS:
        if getattr(args, flag.replace("-", "_")):
            return sweep(args.out)
    dev = torch.device("cuda")
    orig = td.default_launch
    rows = []
    for spec, hq, hk in CASES:
        nodes = generate_tree_from_spec(spec)
        q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, 128, dev, torch.float16,
                                                 build_cache=False)
        b = q.shape[0]
        g = hq // hk
        best = None
        for tsk, rows0, warps, stages in itertools.product(
                ([32, 32], [64, 64], [32, 128], [128, 128]),
                (64, 128), (4, 8), (2, 3)):
            p = FastTreeParams()
            p.set_kv_tile_sizes(tsk)
            p.set_q_tile_sizes([max(1, rows0 // g), max(1, 16 // g)])
            meta, _ = fasttree_preparation(nodes, ptrs, b, hq, hk, 128, params=p, device=dev)
            plan = meta.plan
            o = torch.empty_like(q)
            td.default_launch = lambda bm, bn, bd, group=1, w=warps, s=stages: (w, s)
            try:
                t = _graph_time(lambda: plan.run(q, k, v, o, check=False), dev)
            except Exception:  # noqa: BLE001 - out of resources etc.
                t = None
            td.default_launch = orig
            row = dict(case=spec, hq=hq, hk=hk, tsk=tsk, rows0=rows0, warps=warps,
                       stages=stages, us=t)
            rows.append(row)
            if t is not None and (best is None or t < best["us"]):
                best = row
        p = FastTreeParams()
        meta, _ = fasttree_preparation(nodes, ptrs, b, hq, hk, 128, params=p, device=dev)
        o = torch.empty_like(q)
        base = _graph_time(lambda: meta.plan.run(q, k, v, o, check=False), dev)
        print(f"{spec[:40]:40s} {hq}/{hk}: default {base:7.1f} us, best {best['us']:7.1f} us "
              f"tsk={best['tsk']} rows0={best['rows0']} warps={best['warps']} stages={best['stages']}",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
