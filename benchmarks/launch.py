"""Host-side cost of one eager decode call (GPU): where do the microseconds go?

``python -m benchmarks.launch`` times ``DecodePlan.run`` on the host (no
synchronisation, many calls) for a few trees, and prints a cProfile summary.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch

from treecache import fasttree_preparation, qkv_preparation
from treecache.tree import generate_tree_from_spec

CASES = [("1,2,64 8,256,32", 32, 8), ("1,10 4000,400", 32, 8), ("1,2,64 8,256,32", 16, 1)]


def main():
    dev = torch.device("cuda")
    for spec, hq, hk in CASES:
        nodes = generate_tree_from_spec(spec)
        q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, 128, dev, torch.float16,
                                                 build_cache=False)
        meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, 128, device=dev)
        o = torch.empty_like(q)
        plan = meta.plan

        def call():
            plan.run(q, k, v, o, check=False)

        for _ in range(20):
            call()
        torch.cuda.synchronize()
        n = 300
        t = time.perf_counter()
        for _ in range(n):
            call()
        host = (time.perf_counter() - t) / n * 1e6
        torch.cuda.synchronize()
        print(f"{spec} {hq}/{hk}: {len(plan.phases) + 1} launches, host {host:.1f} us per call")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(n):
            call()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
        print(s.getvalue()[:3000])


if __name__ == "__main__":
    main()
