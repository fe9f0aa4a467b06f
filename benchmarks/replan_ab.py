"""Host time of a beam step (re-plan, bookkeeping, write, attend): this checkout against
another version, in one process.

``python -m benchmarks.replan_ab --base DIR --out results.json`` loads the ``treecache``
package of ``DIR`` (another version's checkout, e.g. from ``git worktree add DIR REV``
or ``git archive REV treecache | tar -x -C DIR``) beside this checkout's, under the name
``treecache_base``. Both versions share this checkout's ``kernels`` package. It then runs
the same beam steps on one cache of each version, the two caches' steps interleaved
(which goes first alternates), as ``benchmarks.cache_ops`` does: one request holds a
prompt (its K/V not written), each step forks every new beam from a parent drawn among
the first half of the beams, prunes the old beams, reserves one slot per beam, re-plans
(``prepare``), writes the new slots' K/V and attends, in every layer. Separate processes
on a busy host differ by up to 1.5x in such times; interleaved steps of one process see
the same state of the machine.

Reported per head layout and width W: the median ``prepare`` time of each version
(``time.perf_counter``, the device synchronised around each call), the median of the
per-step ratios (this checkout / base), the same for the step's bookkeeping before it
(its forks, its ``prune`` of the old beams' list and its ``reserve``: ``book``) and for
the calls after it, the ``write`` of one token per beam into each of ``--layers`` layers
(``write``) and an ``attend`` of each layer (``attend``, the first of which runs the new
plan's first launches), and whether every step's two plans were the same (see
:func:`plan_summary`). The base must be v30 or newer (a list ``prune``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import treecache
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import treecache


def load_base(directory: Path):
    """The ``treecache`` package of ``directory``, imported as ``treecache_base``."""
    init = Path(directory) / "treecache" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--base: expected a directory holding treecache/__init__.py, got "
                         f"{str(directory)!r}")
    for name in [m for m in sys.modules if m.split(".")[0] == "treecache_base"]:
        del sys.modules[name]  # a version loaded before
    spec = importlib.util.spec_from_file_location(
        "treecache_base", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["treecache_base"] = module
    spec.loader.exec_module(module)
    return module


def plan_summary(plan) -> tuple[dict, tuple]:
    """What a plan's launches read, comparable across versions: ``(arrays, meta)``, the
    index tensors' used parts and the tail vnodes as numpy arrays by name, and the
    phases, tiles, chunk lengths, node assignments, modes and request count."""
    t = plan.tensors()
    used = dict(kv_indices=plan.num_kv_entries, kv_mask=plan.num_kv_entries,
                mid_q_rows=plan.num_mid_rows, req_mid_rows=plan.num_mid_rows,
                req_mid_start=plan.num_requests, req_mid_len=plan.num_requests)
    arrays = {k: t[k][:used.get(k, plan.num_vnodes)].cpu().numpy().copy()
              for k in sorted(t) if k not in ("mid_o", "mid_lse")}
    arrays["tail_vnode"] = np.asarray(plan.tail_vnode).copy()
    meta = (tuple(tuple(p) for p in plan.phases), tuple(plan.q_tiles), tuple(plan.kv_tiles),
            tuple(plan.kv_split_sizes), list(plan.node_assignments), plan.direct,
            plan.needs_stage2, plan.finish, plan.masked, plan.half_partials,
            plan.num_requests)
    return arrays, meta


def same_plans(a: tuple[dict, tuple], b: tuple[dict, tuple]) -> bool:
    """Whether two :func:`plan_summary` results are equal."""
    return (a[1] == b[1] and a[0].keys() == b[0].keys()
            and all(np.array_equal(a[0][k], b[0][k]) for k in a[0]))


def measure(modules, width: int, heads: tuple[int, int], args, device) -> dict:
    hq, hk = heads
    caches, beams = [], []
    for mod in modules:
        c = mod.TreeKVCache(args.layers, hq, hk, args.head_dim,
                            capacity_tokens=args.prompt_len + width * (args.warmup + args.steps + 4),
                            dtype=torch.float16, device=device, plan_headroom=8)
        root = c.new_request()
        c.reserve(root, args.prompt_len)
        beams.append([root] + [c.fork(root) for _ in range(width - 1)])
        c.prepare()
        caches.append(c)
    rng = random.Random(width)
    gen = torch.Generator().manual_seed(width)
    q = torch.randn(width, hq, args.head_dim, generator=gen).to(device, torch.float16)
    kv = torch.randn(width, hk, args.head_dim, generator=gen).to(device, torch.float16)
    out = torch.empty_like(q)
    times = [[], []]
    book = [[], []]
    layer_times = {"write": [[], []], "attend": [[], []]}
    same = True
    for step in range(args.warmup + args.steps):
        parents = [rng.randrange(max(1, width // 2)) for _ in range(width)]
        plans = [None, None]
        for i in ((0, 1) if step % 2 else (1, 0)):
            c, b = caches[i], beams[i]
            _sync(device)
            t = time.perf_counter()
            new = [c.fork(b[p]) for p in parents]
            c.prune(b)
            b[:] = new
            slots = c.reserve(b)
            _sync(device)
            t1 = time.perf_counter()
            plans[i] = c.prepare(b)
            _sync(device)
            t2 = time.perf_counter()
            for layer in range(args.layers):
                c.write(layer, slots, kv, kv)
            _sync(device)
            t3 = time.perf_counter()
            for layer in range(args.layers):
                c.attend(q, layer, b, out=out)
            _sync(device)
            t4 = time.perf_counter()
            if step >= args.warmup:
                times[i].append((t2 - t1) * 1e6)
                book[i].append((t1 - t) * 1e6)
                layer_times["write"][i].append((t3 - t2) * 1e6)
                layer_times["attend"][i].append((t4 - t3) * 1e6)
        same = same and same_plans(plan_summary(plans[0]), plan_summary(plans[1]))
    return {"heads": f"{hq}/{hk}", "W": width, "prepare_base_us": statistics.median(times[0]),
            "prepare_us": statistics.median(times[1]),
            "ratio": statistics.median(n / b for b, n in zip(*times)),
            "book_base_us": statistics.median(book[0]), "book_us": statistics.median(book[1]),
            "book_ratio": statistics.median(n / b for b, n in zip(*book)),
            **{f"{name}{suffix}": value for name, (tb, tn) in layer_times.items()
               for suffix, value in (("_base_us", statistics.median(tb)),
                                     ("_us", statistics.median(tn)),
                                     ("_ratio", statistics.median(n / b for b, n in zip(tb, tn))))},
            "same_plans": same}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True,
                   help="a directory holding the other version's treecache package")
    p.add_argument("--num-beams", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4, help="layers written and attended per step")
    p.add_argument("--steps", type=int, default=50, help="measured steps per width")
    p.add_argument("--warmup", type=int, default=10, help="unmeasured steps first")
    p.add_argument("--device", default=None, help="default: CUDA if available, else CPU")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    head_layouts = [(32, 8), (32, 32), (16, 1)]
    if args.quick:
        args.num_beams, args.prompt_len, args.head_dim, args.layers = [2, 5], 40, 64, 2
        args.steps, args.warmup = 4, 1
        head_layouts = [(4, 2)]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modules = (load_base(args.base), treecache)
    rows = []
    for heads in head_layouts:
        for width in args.num_beams:
            r = measure(modules, width, heads, args, device)
            rows.append(r)
            print(f"{r['heads']} W={width}: prepare {r['prepare_base_us']:.1f} -> "
                  f"{r['prepare_us']:.1f} us (step ratio {r['ratio']:.3f}); forks, prune, reserve "
                  f"{r['book_base_us']:.1f} -> {r['book_us']:.1f} us ({r['book_ratio']:.3f}); "
                  f"write {r['write_base_us']:.1f} -> {r['write_us']:.1f} us "
                  f"({r['write_ratio']:.3f}); attend {r['attend_base_us']:.1f} -> "
                  f"{r['attend_us']:.1f} us ({r['attend_ratio']:.3f}); "
                  f"same plans: {r['same_plans']}", flush=True)
    if args.out is not None:
        device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else "cpu")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device_name,
                                        "torch": torch.__version__, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
