"""Host time of the cache's calls in a beam-search step, call by call.

``python -m benchmarks.cache_ops --out results.json`` (GPU; ``--quick`` runs tiny sizes
on the CPU) runs beam steps on a ``TreeKVCache`` alone, without a model: one request
holds a prompt of ``--prompt-len`` tokens and is forked into W beams; each step then
forks every new beam from a parent drawn among the first half of the beams (a fixed
random sequence, so that runs compare), prunes the old beams (one ``prune`` of the list,
since v30), reserves one slot per new beam, re-plans (``prepare``), writes K/V to every
layer and attends every layer. Every step changes the topology, so every step re-plans,
as a beam search does at these widths.

Reported per W: the median host time (``time.perf_counter``; the device is synchronised
before and after each group of calls) of the step's forks, its prunes, its ``reserve``,
its ``prepare``, the ``write`` of all layers and the ``attend`` of all layers, and the
cache's node count at the end; also the host time of the first layer's ``attend`` alone
(``attend_first_us``: where the step's plan has phases not met before, it builds the
plan's launch set and makes its first launches).

``--stages`` also times, per measured step, each stage of the re-plan and of the
``reserve`` (:data:`STAGES`: the cache's flush, node walk and slot table, the planner's
stages, the upload, and the reserve's copy of the new slots to the device), each
inclusive of the stages it calls, by wrapping those functions for the run
(``stages_us``, the median over the measured steps of each stage's host time in a step;
the wrappers add well under a microsecond a call).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import treecache  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from treecache import TreeKVCache

from benchmarks.beam_memory import _sync, add_beam_args, device_and_dtype

CALLS = ("fork", "prune", "reserve", "prepare", "write", "attend")

#: What ``--stages`` times: (module or class, function name) in ``treecache.cache`` and
#: ``treecache.plan``, reported as ``"module.name"``.
STAGES = (
    ("cache", "TreeKVCache._reserve_step"), ("cache", "TreeKVCache._to_device"),
    ("cache", "to_device_async"), ("cache", "TreeKVCache._rebuild"),
    ("cache", "TreeKVCache._flush"), ("cache", "TreeKVCache._topo_order"),
    ("cache", "TreeKVCache._slot_table"), ("cache", "build_plan"),
    ("plan", "_Topology"), ("plan", "_heuristic"), ("plan", "_Groups"), ("plan", "_Tiling"),
    ("plan", "_split_costs"), ("plan", "_retiled_cost_floor"), ("plan", "_materialise"),
    ("plan", "_shared_layout"), ("plan", "_cost_model_layout"), ("plan", "_fused_layout"),
    ("plan", "_tails"), ("plan", "_contiguous_slot0"), ("plan", "_chain_segments"),
    ("plan", "PlanBuffers.upload"),
)


@contextlib.contextmanager
def timed_stages(totals: dict):
    """Within the block every function of :data:`STAGES` adds its host time (seconds,
    inclusive) to ``totals[name]``; the functions are restored afterwards."""
    import treecache.cache as cache_mod
    import treecache.plan as plan_mod

    modules = {"cache": cache_mod, "plan": plan_mod}
    saved = []

    def timed(fn, name):
        def run(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t
        return run

    try:
        for mod, path in STAGES:
            owner = modules[mod]
            *outer, attr = path.split(".")
            for part in outer:
                owner = getattr(owner, part)
            fn = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            saved.append((owner, attr, fn))
            setattr(owner, attr, timed(fn, f"{mod}.{path}"))
        yield totals
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)


def measure(args, width: int, device: torch.device, dtype: torch.dtype) -> dict:
    """``warmup + steps`` beam steps at ``width``; medians of the measured ones (us)."""
    cache = TreeKVCache(args.layers, args.heads, args.kv_heads, args.head_dim,
                        capacity_tokens=args.prompt_len + width * (args.warmup + args.steps + 2),
                        dtype=dtype, device=device, plan_headroom=8)
    root = cache.new_request()
    cache.reserve(root, args.prompt_len)
    beams = [root] + [cache.fork(root) for _ in range(width - 1)]
    cache.prepare()
    gen = torch.Generator().manual_seed(width)
    q = torch.randn(width, args.heads, args.head_dim, generator=gen).to(device, dtype)
    kv = torch.randn(width, args.kv_heads, args.head_dim, generator=gen).to(device, dtype)
    rng = random.Random(width)
    times = {c: [] for c in CALLS}
    first = []
    stages: dict = {}
    per_step: list[dict] = []
    with timed_stages(stages) if args.stages else contextlib.nullcontext():
        _steps(args, cache, beams, width, q, kv, rng, device, times, first, stages, per_step)
    cache.check()
    row = {"num_beams": width, "prompt_len": args.prompt_len, "layers": args.layers,
           "steps": args.steps}
    row.update({f"{c}_us": statistics.median(v) for c, v in times.items()})
    row["attend_first_us"] = statistics.median(first)
    row.update(nodes=cache.stats()["nodes"], plan_rebuilds=cache.plan_rebuilds)
    if args.stages:
        names = sorted({k for d in per_step for k in d})
        row["stages_us"] = {k: statistics.median(d.get(k, 0.0) for d in per_step) * 1e6
                            for k in names}
    return row


def _steps(args, cache, beams, width, q, kv, rng, device, times, first, stages,
           per_step) -> None:
    for step in range(args.warmup + args.steps):
        stages.clear()  # this step's stage times, kept below for the measured steps
        parents = [rng.choice(beams[:max(1, width // 2)]) for _ in range(width)]
        _sync(device)
        t = [time.perf_counter()]
        new = [cache.fork(p) for p in parents]
        t.append(time.perf_counter())
        cache.prune(beams)
        t.append(time.perf_counter())
        beams = new
        slots = cache.reserve(beams)
        _sync(device)
        t.append(time.perf_counter())
        cache.prepare(beams)
        _sync(device)
        t.append(time.perf_counter())
        for layer in range(args.layers):
            cache.write(layer, slots, kv, kv)
        _sync(device)
        t.append(time.perf_counter())
        for layer in range(args.layers):
            cache.attend(q, layer, beams)
            if layer == 0:
                t_first = time.perf_counter()
        _sync(device)
        t.append(time.perf_counter())
        if step >= args.warmup:
            for i, c in enumerate(CALLS):
                times[c].append((t[i + 1] - t[i]) * 1e6)
            first.append((t_first - t[-2]) * 1e6)
            per_step.append(dict(stages))


def markdown(rows) -> str:
    head = ("| W | fork us | prune us | reserve us | prepare us | write us (all layers) "
            "| attend us (all layers) | first attend us (host) | nodes |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['num_beams']} | " + " | ".join(f"{r[c + '_us']:.1f}" for c in CALLS)
                     + f" | {r['attend_first_us']:.1f} | {r['nodes']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_beam_args(p, steps=60, warmup=30,
                  warmup_help="unmeasured steps first (kernel compilation, new plan shapes)")
    p.add_argument("--stages", action="store_true",
                   help="also time each stage of the re-plan and the reserve (STAGES)")
    args = p.parse_args(argv)
    if args.quick:
        args.num_beams = [2, 4]
        args.prompt_len, args.layers, args.heads, args.kv_heads, args.head_dim = 64, 2, 4, 2, 64
        args.steps, args.warmup = 4, 2
    for name in ("prompt_len", "layers", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if min(args.num_beams) < 1:
        p.error(f"--num-beams must be >= 1, got {args.num_beams}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device, dtype = device_and_dtype(args)
    print(f"cache: {args.layers} layers, {args.heads} q / {args.kv_heads} kv heads x "
          f"{args.head_dim}, {dtype}, on {device}; prompt {args.prompt_len} tokens")
    rows = []
    for width in args.num_beams:
        rows.append(measure(args, width, device, dtype))
        r = rows[-1]
        print(f"W={width}: prune {r['prune_us']:.1f} us, reserve {r['reserve_us']:.1f} us, "
              f"prepare {r['prepare_us']:.1f} us, first attend {r['attend_first_us']:.1f} us "
              f"(medians of {args.steps} steps)")
        if args.stages:
            for name, us in sorted(r["stages_us"].items(), key=lambda kv: -kv[1]):
                print(f"    {name:34s} {us:9.1f} us per step (median)")
    print()
    print(markdown(rows))
    if args.out is not None:
        result = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k != "out"},
            "dtype": str(dtype),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
