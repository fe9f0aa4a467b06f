"""Parameter tuning: sweep the cost model and the tiles on your tree, keep the fastest.

The planner has three kinds of knobs (docs/CONFIGURATION_GUIDE.md):

* cost-model weights ``alpha`` (query-tile padding), ``beta`` (KV-tile padding) and
  ``gamma`` (the extra merge of a split-K edge): they decide which edges split;
* tiles: ``TSQs`` (requests per vnode, phase 0 and phase 1) and ``TSKs`` (KV tokens per
  inner-loop step of each phase);
* ``KV_SPLIT_SIZES``: the KV chunk length of a vnode, and the shorter one used when a
  phase has too few programs (``None``, the library's default: each plan chooses).

The sweep runs in two rounds. Round 1 tries every tile and chunk combination with the
seed's weights (0.66, 0.33, 0.1); round 2 tries a grid of weights with the best tiles
of round 1. Settings that produce the same plan are timed once. Every plan's output is
checked against the dense float32 reference (``kernels.reference_decode``) before it is
timed; a plan that fails the check is reported and never chosen. At the end the best
setting, ``FastTreeParams()`` (the seed's defaults) and ``FastTreeParams.for_heads``
with the chunk length each plan chooses (the project's defaults) are timed again side
by side, so that the winner of many noisy timings is not credited with its lucky draw.

Query tiles are given as *rows*: a stage-1 program holds ``q_tile * group`` (query,
head) rows, so the sweep asks for ``q_tile = rows // group`` and the same rows mean the
same register tile whatever the GQA group.

Timing: on CUDA the ``triton.testing.do_bench`` median (eager launches); on a CPU the
wall-clock median of ``--iters`` calls after one warm-up, with ``--threads`` torch
threads (default 1: with several threads, other processes on the cores make the
timings jump by 10x). On a CPU the torch
implementation of the plan runs (``kernels.torch_tree_decode``): it ignores the KV tile
and its timings say nothing about the GPU kernels; the CPU run only shows the workflow.
Without ``--tree``/``--tree_file`` the tree is ``1,16,64 1024,256,32`` on CUDA and the
smaller ``1,4,16 256,64,32`` on a CPU.

Run:
    python examples/05_parameter_tuning.py
    python examples/05_parameter_tuning.py --tree "1,4,16 256,64,32" --heads 32,8
    python examples/05_parameter_tuning.py --tree_file examples/data/tree_example.txt --quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import pathlib
import statistics
import sys
import time

import torch

try:
    import treecache  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import kernels
from treecache import FastTreeParams, build_plan, generate_tree_from_spec, load_tree, kv_ptrs
from treecache import tree_stats
from treecache.fasttree import tree_plan_input
from treecache.plan import DEFAULT_KV_SPLIT_SIZES, path_token_indices

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Relative error (Frobenius norm) accepted against the float32 reference.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}
SEED_WEIGHTS = (0.66, 0.33, 0.1)

# Round 1: (phase-0 rows, phase-1 rows), KV tiles, KV split sizes.
ROWS = [(32, 16), (64, 16), (64, 32), (128, 16), (128, 32), (128, 64)]
KV_TILES = [(32, 32), (64, 64), (32, 128), (128, 128)]
SPLITS = [(1024, 128), (512, 64), (2048, 256)]
# Round 2: cost-model weights.
ALPHAS = [0.33, 0.66, 1.0, 2.0]
BETAS = [0.1, 0.33, 0.66, 1.0]
GAMMAS = [0.0, 0.1, 0.3, 1.0]

QUICK_ROWS = [(64, 16), (128, 32)]
QUICK_KV_TILES = [(32, 32), (32, 128)]
QUICK_SPLITS = [(1024, 128)]
QUICK_WEIGHTS = [SEED_WEIGHTS, (1.0, 0.33, 0.1), (0.66, 0.33, 0.3)]


def progress(total: int, desc: str):
    """A tqdm bar on stderr, or a stand-in with the same two methods."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        class Plain:
            n = 0

            def update(self, k=1):
                self.n += k
                print(f"{desc}: {self.n}/{total}", file=sys.stderr, flush=True)

            def close(self):
                pass

        return Plain()


def time_us(fn, device: torch.device, iters: int) -> float:
    """Median time of one call of ``fn`` in microseconds."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3
    fn()  # warm-up
    times = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def params_from_rows(weights, rows, kv_tiles, group: int) -> FastTreeParams:
    """FastTreeParams asking for ``rows // group`` queries per tile."""
    a, b, g = weights
    return FastTreeParams(alpha=a, beta=b, gamma=g,
                          TSQs=[max(1, r // group) for r in rows], TSKs=list(kv_tiles))


class Tuner:
    """Builds, checks and times plans for one tree; identical plans are timed once."""

    def __init__(self, inp, q, k, v, ref, device, backend, iters, tol):
        self.inp, self.q, self.k, self.v, self.ref = inp, q, k, v, ref
        self.device, self.backend, self.iters, self.tol = device, backend, iters, tol
        self.hq, self.hk, self.d = q.shape[1], k.shape[1], q.shape[2]
        self.sm_scale = 1.0 / math.sqrt(self.d)
        self.by_plan: dict[tuple, dict] = {}

    def plan(self, params: FastTreeParams, splits):
        return build_plan(self.inp, num_qo_heads=self.hq, num_kv_heads=self.hk,
                          head_dim=self.d, params=params, kv_split_sizes=splits,
                          device=self.device)

    def signature(self, plan) -> tuple:
        """What the backend sees: split decisions, tiles, chunking and phases. The torch
        implementation ignores the KV tile, so for it plans differing only there match."""
        phases = tuple(plan.phases)
        kv_tiles = plan.kv_tiles
        if self.backend is kernels.Backend.TORCH:
            phases = tuple(ph._replace(kv_tile=0) for ph in phases)
            kv_tiles = None
        return (tuple(plan.node_assignments), plan.q_tiles, kv_tiles,
                plan.kv_split_sizes, phases)

    def run(self, plan, out):
        return plan.run(self.q, self.k, self.v, out, sm_scale=self.sm_scale,
                        backend=self.backend, check=False)

    def check(self, plan) -> float:
        out = torch.full_like(self.q, float("nan"))  # poisoned: every row must be written
        self.run(plan, out)
        err = ((out.float() - self.ref).norm() / self.ref.norm()).item()
        return err if math.isfinite(err) else float("inf")

    def time(self, plan) -> float:
        out = torch.empty_like(self.q)
        return time_us(lambda: self.run(plan, out), self.device, self.iters)

    def evaluate(self, params: FastTreeParams, splits) -> dict:
        """Row of results for one setting (reuses the timing of an identical plan)."""
        plan = self.plan(params, splits)
        sig = self.signature(plan)
        row = dict(alpha=params.alpha, beta=params.beta, gamma=params.gamma,
                   TSQs=list(params.TSQs), TSKs=list(params.TSKs),
                   splits=None if splits is None else list(splits),
                   q_tiles=list(plan.q_tiles), kv_tiles=list(plan.kv_tiles),
                   used_splits=list(plan.kv_split_sizes), vnodes=plan.num_vnodes,
                   phases=len(plan.phases), kv_read=plan.kv_tokens_read(),
                   mid_rows=plan.num_mid_rows)
        known = self.by_plan.get(sig)
        if known is None:
            err = self.check(plan)
            us = self.time(plan) if err <= self.tol else float("inf")
            known = self.by_plan[sig] = dict(us=us, rel_err=err, plan_id=len(self.by_plan))
        row.update(known)
        return row


def load_problem(args, device):
    if args.tree_file:
        nodes = load_tree(args.tree_file)
        label = args.tree_file
    else:
        spec = args.tree or ("1,16,64 1024,256,32" if device.type == "cuda"
                             else "1,4,16 256,64,32")
        nodes = generate_tree_from_spec(spec)
        label = spec
    return nodes, label


def fmt_row(r, seed_us) -> str:
    vs = seed_us / r["us"] if math.isfinite(r["us"]) and r["us"] > 0 else float("nan")
    return (f"{r['alpha']:5.2f} {r['beta']:5.2f} {r['gamma']:5.2f} "
            f"{str(r['TSQs']):>9} {str(r['TSKs']):>10} {str(r['splits']):>11} "
            f"{str(r['q_tiles']):>9} {r['vnodes']:>6} {r['phases']:>2} "
            f"{r['us']:>10.1f} {vs:>6.2f}x {r['rel_err']:>8.1e}")


HEADER = (f"{'alpha':>5} {'beta':>5} {'gamma':>5} {'TSQs':>9} {'TSKs':>10} {'splits':>11} "
          f"{'q tiles':>9} {'vnodes':>6} {'ph':>2} {'time us':>10} {'vs seed':>7} {'rel err':>8}")


def main() -> int:
    p = argparse.ArgumentParser(description="Sweep cost-model weights, tiles and KV split "
                                "sizes on a tree; print the fastest correct setting.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tree_file", default=None, help="tree file (docs/TREE_FORMAT.md)")
    src.add_argument("--tree", default=None,
                     help="'<nodes per level> <tokens per level>', e.g. '1,4,16 256,64,32'")
    p.add_argument("--heads", default="32,8", help="num_qo_heads,num_kv_heads (default 32,8)")
    p.add_argument("--head_dim", type=int, default=128, choices=[16, 32, 64, 128, 256])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default float16 on CUDA, float32 on a CPU")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"])
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--iters", type=int, default=5, help="timed calls per setting on a CPU")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steadier timings on a shared machine)")
    p.add_argument("--confirm_rounds", type=int, default=3,
                   help="rounds of the final side-by-side timing")
    p.add_argument("--top", type=int, default=8, help="settings listed in the table")
    p.add_argument("--quick", action="store_true", help="a tiny grid (a few settings)")
    p.add_argument("--out", default=None, help="write every row as JSON to this file")
    args = p.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.float16 if device.type == "cuda" else torch.float32)
    hq, hk = (int(x) for x in args.heads.split(","))
    group = hq // hk
    d = args.head_dim
    backend = kernels.select_backend(device, args.backend)
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))

    nodes, label = load_problem(args, device)
    st = tree_stats(nodes)
    ptrs = kv_ptrs(nodes)
    inp = tree_plan_input(nodes, ptrs)
    b = st["num_requests"]
    rnd = dict(generator=torch.Generator(device=device).manual_seed(0), device=device,
               dtype=dtype)
    q = torch.randn(b, hq, d, **rnd)
    k = torch.randn(ptrs[-1], hk, d, **rnd)
    v = torch.randn(ptrs[-1], hk, d, **rnd)
    slots = path_token_indices(inp.parent, inp.seqlen, inp.tok_ptr, inp.req_end)
    ref = kernels.reference_decode(q, k, v, [torch.from_numpy(s).to(device) for s in slots],
                                   1.0 / math.sqrt(d))

    print(f"tree {label!r}: {st['num_nodes']} nodes, {b} requests, {st['unique_tokens']} "
          f"unique / {st['logical_tokens']} logical tokens; heads {hq}/{hk} (group {group}), "
          f"head_dim {d}, {str(dtype).replace('torch.', '')}, {device} ({backend.value})")
    if backend is kernels.Backend.TORCH:
        print("note: the torch implementation runs here; its timings do not rank GPU tiles")
    elif backend is kernels.Backend.TRITON_INTERPRETER:
        print("note: the Triton interpreter runs here (seconds per call); consider --quick")

    tuner = Tuner(inp, q, k, v, ref, device, backend, args.iters, TOLERANCE[dtype])
    rows_grid = QUICK_ROWS if args.quick else ROWS
    tiles_grid = QUICK_KV_TILES if args.quick else KV_TILES
    splits_grid = QUICK_SPLITS if args.quick else SPLITS
    weights_grid = QUICK_WEIGHTS if args.quick else list(itertools.product(ALPHAS, BETAS, GAMMAS))
    round1 = list(itertools.product(rows_grid, tiles_grid, splits_grid))

    t_start = time.perf_counter()
    bar = progress(2 + len(round1) + len(weights_grid), "settings")
    seed_params = FastTreeParams()
    heads_params = FastTreeParams.for_heads(hq, hk, d)
    seed_row = tuner.evaluate(seed_params, DEFAULT_KV_SPLIT_SIZES)
    bar.update()
    heads_row = tuner.evaluate(heads_params, None)
    bar.update()
    results = []
    for rows, tiles, splits in round1:
        results.append(tuner.evaluate(params_from_rows(SEED_WEIGHTS, rows, tiles, group), splits))
        bar.update()
    best1 = min(results, key=lambda r: r["us"])
    for weights in weights_grid:
        prm = FastTreeParams(alpha=weights[0], beta=weights[1], gamma=weights[2],
                             TSQs=best1["TSQs"], TSKs=best1["TSKs"])
        results.append(tuner.evaluate(prm, best1["splits"]))
        bar.update()
    bar.close()

    failed = [r for r in results + [seed_row, heads_row] if not math.isfinite(r["us"])]
    ranked = sorted((r for r in results if math.isfinite(r["us"])), key=lambda r: r["us"])
    distinct = len(tuner.by_plan)
    print(f"\n{len(results) + 2} settings, {distinct} distinct plans timed, "
          f"{time.perf_counter() - t_start:.1f} s")
    if failed:
        f0 = failed[0]
        print(f"{len(failed)} settings FAILED the check against the reference (tolerance "
              f"{TOLERANCE[dtype]:.0e}), e.g. TSQs {f0['TSQs']}, TSKs {f0['TSKs']}, splits "
              f"{f0['splits']}: relative error {f0['rel_err']:.1e}")
    if not ranked:
        print("no setting passed the check")
        return 1

    seed_us = seed_row["us"]
    print(f"\nfastest plans, one line each with the first setting that produced it (time: "
          f"{'do_bench median' if device.type == 'cuda' else f'median of {args.iters} calls'}; "
          "vs seed = FastTreeParams() time / this time)")
    print(HEADER)
    shown = set()
    for r in ranked:
        if r["plan_id"] in shown:  # the same plan reached by another setting: list it once
            continue
        shown.add(r["plan_id"])
        print(fmt_row(r, seed_us))
        if len(shown) >= args.top:
            break
    print("\nreferences")
    print(HEADER)
    print(fmt_row(seed_row, seed_us), " FastTreeParams() (seed defaults)")
    print(fmt_row(heads_row, seed_us), f" FastTreeParams.for_heads({hq}, {hk}, {d})")

    # Confirm: the best setting and the two references, interleaved, timed again.
    best = ranked[0]
    best_params = FastTreeParams(alpha=best["alpha"], beta=best["beta"], gamma=best["gamma"],
                                 TSQs=best["TSQs"], TSKs=best["TSKs"])
    contenders = {
        "best of the sweep": (best_params, best["splits"]),
        "FastTreeParams()": (seed_params, DEFAULT_KV_SPLIT_SIZES),
        f"for_heads({hq}, {hk}, {d})": (heads_params, None),
    }
    plans = {name: tuner.plan(prm, spl) for name, (prm, spl) in contenders.items()}
    times = {name: [] for name in plans}
    for _ in range(max(1, args.confirm_rounds)):
        for name, plan in plans.items():
            times[name].append(tuner.time(plan))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\nside by side ({max(1, args.confirm_rounds)} interleaved rounds, median):")
    for name, us in med.items():
        print(f"  {name:22s} {us:10.1f} us   {med['FastTreeParams()'] / us:5.2f}x vs seed "
              f"defaults, {med[f'for_heads({hq}, {hk}, {d})'] / us:5.2f}x vs for_heads")
    print("\nbest setting:")
    print(f"  params = FastTreeParams(alpha={best['alpha']}, beta={best['beta']}, "
          f"gamma={best['gamma']}, TSQs={best['TSQs']}, TSKs={best['TSKs']})")
    print(f"  metadata, _ = fasttree_preparation(tree_info, KV_ptrs, {b}, {hq}, {hk}, {d}, "
          f"KV_SPLIT_SIZES={best['splits']}, params=params)")
    print(f"  (plan: effective q tiles {best['q_tiles']}, kv tiles {best['kv_tiles']}, "
          f"kv splits used {best['used_splits']}, {best['vnodes']} vnodes, "
          f"{best['kv_read']} KV tokens read per head for {st['unique_tokens']} unique)")
    if backend is not kernels.Backend.TRITON:
        print(f"  this ranks the {backend.value} backend on a CPU; rerun on the target GPU to "
              "choose tiles")

    if args.out:
        out = dict(tree=label, heads=[hq, hk], head_dim=d, dtype=str(dtype), device=str(device),
                   backend=backend.value, seed_defaults=seed_row, for_heads=heads_row,
                   confirm_us=med, rows=results)
        pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
