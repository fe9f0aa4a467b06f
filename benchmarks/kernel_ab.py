"""The kernels of the working tree against another version of ``kernels/tree_decode.py``,
on the benchmark's cases, in one process.

``git show REV:kernels/tree_decode.py > old.py`` and then ``python -m
benchmarks.kernel_ab --old old.py --out results.json`` builds the default plan of every
case (float16 on a GPU, float32 on the CPU; ``--dtype bfloat16`` on a GPU) and launches
it through both modules' ``tree_decode_launcher`` with the same plan tensors: ``old``
(the given file, loaded as a module of its own) and ``new`` (the working tree). Both
decode into a poisoned output and are checked against the float32 reference; then
each is timed in turn, ``--rounds`` times: CUDA-graph replay and ``do_bench`` (eager,
L2 flushed) on a GPU, wall time on the CPU. ``--stage2-only`` keeps the cases whose
plan launches stage 2 (neither a finishing phase nor every request direct). Reported
per case: the plan's modes, both errors and median times and the ratio new / old; at
the end the geometric means of the ratios. ``--out`` is rewritten after every case
(``complete`` is false until the last), so a run cut short keeps what it timed. This
is the A/B behind the v36 merge entry of benchmarks/RESULTS.md (``--quick``: the tiny
cases, a CPU smoke run).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math

import torch

from kernels import reference_decode
from treecache import fasttree_preparation, qkv_preparation, tree_stats
from treecache.fasttree import tree_plan_input
from treecache.plan import path_token_indices

from .kernel import (HEAD_DIM, _progress, ab_report, ab_row_line, ab_summary, ab_times,
                     ab_write, rel_err)
from .suite import quick_cases, suite_cases

# The package re-exports a function named tree_decode; fetch the module itself.
td_new = importlib.import_module("kernels.tree_decode")


def load_kernels(path: str):
    """The module in ``path`` (a copy of ``kernels/tree_decode.py``), under a name of
    its own so that its Triton kernels are compiled apart from the working tree's."""
    spec = importlib.util.spec_from_file_location("_kernel_ab_old", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--old {path!r} is not a Python file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "tree_decode_launcher"):
        raise SystemExit(f"--old {path!r} has no tree_decode_launcher")
    return mod


def run_case(name, nodes, hq, hk, device, dtype, old, rounds, stage2_only=False,
             head_dim=HEAD_DIM):
    """One case's row (see the module), or None where ``stage2_only`` drops it."""
    b = tree_stats(nodes)["num_requests"]
    gen = torch.Generator(device="cpu").manual_seed(3)
    q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, head_dim, device, dtype,
                                             generator=gen, build_cache=False)
    meta, _ = fasttree_preparation(nodes, ptrs, b, hq, hk, head_dim, device=device)
    plan = meta.plan
    stage2 = td_new.runs_stage2(**plan.launch_modes)
    if stage2_only and not stage2:
        return None
    sm = 1.0 / math.sqrt(head_dim)
    inp = tree_plan_input(nodes, ptrs, b)
    slots = path_token_indices(inp.parent, inp.seqlen, inp.tok_ptr, inp.req_end)
    ref = reference_decode(q, k, v, [torch.from_numpy(s).to(device) for s in slots], sm)
    row = dict(case=name, hq=hq, hk=hk, finish=plan.finish, direct=plan.direct,
               stage2=stage2, err={})
    calls = {}
    for which, mod in (("old", old), ("new", td_new)):
        o = torch.full_like(q, float("nan"))
        launch = mod.tree_decode_launcher(q, k, v, o, phases=plan.phases, sm_scale=sm,
                                          **plan.launch_modes, **plan.kernel_tensors(q.dtype))
        launch(q, k, v, o)
        row["err"][which] = rel_err(o, ref)
        calls[which] = (lambda launch=launch, o=o: launch(q, k, v, o))
    row["graph_us"], row["eager_us"] = ab_times(calls, device, rounds)
    return row


def summary(rows) -> list[str]:
    """Geometric means of new / old per timing, over all rows and by plan kind."""
    return ab_summary(rows, (("all", lambda r: True), ("finishing plans", lambda r: r["finish"]),
                             ("plans with stage 2", lambda r: r["stage2"])))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="a copy of kernels/tree_decode.py")
    ap.add_argument("--out", default=None,
                    help="write a JSON file here (after every case; complete: true at the end)")
    ap.add_argument("--only", action="append", default=None,
                    help="substring filter on case names (repeatable: any of them)")
    ap.add_argument("--stage2-only", action="store_true",
                    help="only the cases whose plan launches stage 2")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"),
                    help="input dtype on a GPU (the CPU runs float32)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (default 3)")
    ap.add_argument("--head-dim", type=int, default=HEAD_DIM,
                    help=f"head dim of the cases (default {HEAD_DIM})")
    ap.add_argument("--quick", action="store_true", help="tiny cases (CPU smoke test)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    old = load_kernels(args.old)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    cases = quick_cases() if args.quick else suite_cases(extra=True)
    if args.only:
        cases = [c for c in cases if any(s in c[0] for s in args.only)]
    rows = []
    meta = dict(dtype=str(dtype).replace("torch.", ""), old=args.old, head_dim=args.head_dim)
    for name, nodes, (hq, hk) in _progress(cases, len(cases), "cases"):
        r = run_case(name, nodes, hq, hk, device, dtype, old, args.rounds, args.stage2_only,
                     args.head_dim)
        if r is None:
            continue
        rows.append(r)
        kind = "finish" if r["finish"] else "stage2" if r["stage2"] else "direct"
        print(ab_row_line(r, kind), flush=True)
        ab_write(rows, summary(rows), args.out, device, False, **meta)
    ab_report(rows, summary(rows), args.out, device, **meta)
    return rows


if __name__ == "__main__":
    main()
