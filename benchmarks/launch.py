"""Host-side cost of one eager decode call (GPU): where do the microseconds go?

``python -m benchmarks.launch`` times ``DecodePlan.run`` on the host (no
synchronisation, many calls) for a few trees, with the prepared launches calling the
compiled kernels directly (``kernels.tree_decode.FAST_LAUNCH``, the default) and with
every launch through Triton's JIT, alternating in the same run; then prints a cProfile
summary of the default path. ``--out FILE`` writes the times as JSON.

``--floor`` instead times calls that do nothing: graphs of 1-3 empty Triton kernels
replayed as the benchmark replays a decode call, the same kernels launched eagerly and
timed like the seed (``do_bench``, L2 flushed), and a 1.3 MB copy (the KV of
``1,2,64 8,256,32`` at 16/1): the fixed cost below every small case of target 3.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
import triton

from treecache import fasttree_preparation, qkv_preparation
from treecache.tree import generate_tree_from_spec

td = importlib.import_module("kernels.tree_decode")

CASES = [("1,2,64 8,256,32", 32, 8), ("1,10 4000,400", 32, 8), ("1,2,64 8,256,32", 16, 1)]


def _host_us(call, n=300):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        call()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


@triton.jit
def _empty_kernel(x):
    pass


def floor(out=None):
    """Graph-replay and eager times of 1-3 empty kernels and of a small copy (see the
    module docstring)."""
    from .kernel import _bench, _graph_time

    dev = torch.device("cuda")
    x = torch.zeros(1, device=dev)
    rows = []
    for n in (1, 2, 3):
        def call(n=n):
            for _ in range(n):
                _empty_kernel[(1,)](x)

        rows.append(dict(what=f"{n} empty kernel(s)", graph_us=_graph_time(call, dev),
                         eager_us=_bench(call, dev)))
    src = torch.empty(2568 * 256, dtype=torch.float16, device=dev)  # K and V, one head
    dst = torch.empty_like(src)
    rows.append(dict(what="1.3 MB device copy", graph_us=_graph_time(lambda: dst.copy_(src), dev),
                     eager_us=_bench(lambda: dst.copy_(src), dev)))
    for r in rows:
        print(f"{r['what']:22s} graph replay {r['graph_us']:6.2f} us, eager {r['eager_us']:6.2f} us")
    if out:
        Path(out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), results=rows),
                                        indent=1))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="host time of eager decode calls")
    ap.add_argument("--out", default=None, help="write a JSON file here")
    ap.add_argument("--floor", action="store_true",
                    help="time calls that do nothing (empty kernels, a small copy) instead")
    args = ap.parse_args(argv)
    if args.floor:
        return floor(args.out)
    dev = torch.device("cuda")
    rows = []
    saved = td.FAST_LAUNCH
    for spec, hq, hk in CASES:
        nodes = generate_tree_from_spec(spec)
        q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, 128, dev, torch.float16,
                                                 build_cache=False)
        calls = {}
        for fast in (True, False):
            td.FAST_LAUNCH = fast  # read by the prepared launches at every call
            meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128, device=dev)
            o = torch.empty_like(q)
            calls[fast] = (lambda plan=meta.plan, o=o: plan.run(q, k, v, o, check=False))
            for _ in range(20):
                calls[fast]()
        times = {True: [], False: []}
        for _ in range(5):
            for fast in (True, False):
                td.FAST_LAUNCH = fast
                times[fast].append(_host_us(calls[fast]))
        td.FAST_LAUNCH = saved
        row = dict(case=spec, hq=hq, hk=hk,
                   direct_us=statistics.median(times[True]),
                   jit_us=statistics.median(times[False]))
        rows.append(row)
        print(f"{spec} {hq}/{hk}: host per call {row['direct_us']:.1f} us with direct "
              f"launches, {row['jit_us']:.1f} us through the JIT")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(300):
            calls[True]()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
        print(s.getvalue()[:3000])
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                  results=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
