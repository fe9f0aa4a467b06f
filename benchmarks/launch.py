"""Host-side cost of one eager decode call (GPU): where do the microseconds go?

``python -m benchmarks.launch`` times ``DecodePlan.run`` on the host (no
synchronisation, many calls) for a few trees, with the prepared launches calling the
compiled kernels directly (``kernels.tree_decode.FAST_LAUNCH``, the default) and with
every launch through Triton's JIT, alternating in the same run; then prints a cProfile
summary of the default path. ``--out FILE`` writes the times as JSON.
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


def main(argv=None):
    ap = argparse.ArgumentParser(description="host time of eager decode calls")
    ap.add_argument("--out", default=None, help="write a JSON file here")
    args = ap.parse_args(argv)
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
