"""Beam steps under CUDA graphs kept by launch key (``pad_phases``), against eager calls.

``python -m benchmarks.graph_beam --out results.json`` (CUDA only) runs beam steps on three
caches in lockstep (the same forks, prunes, K/V and queries): plain plans called eagerly,
padded plans (``pad_phases=True``) called eagerly, and padded plans whose attends of every
layer run as the replay of a CUDA graph kept per :attr:`DecodePlan.launch_key` (captured
when a step's key is new). Every step re-plans. Reported per head layout and beam width
(medians over the measured steps): the host time of a step's ``prepare`` and attends of
every layer, synchronised (plain, padded), that of ``prepare`` + replay (steps without a
capture), the captures and their time, the distinct launch keys, the GPU time of a step's
attention replayed (plain: a graph captured for the step; padded: the kept one) and the
largest difference between the replayed and the plain eager outputs.
"""
import argparse
import json
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

def main(W, L=32, hq=32, hk=8, P=4096, warm=10, steps=50):
    dev = "cuda"
    caches = [TreeKVCache(L, hq, hk, 128, capacity_tokens=P + W * (warm + steps + 4), dtype=torch.float16,
                          device=dev, plan_headroom=8, pad_phases=pad) for pad in (False, True, True)]
    gen = torch.Generator(device=dev).manual_seed(W)
    for c in caches:
        r = c.new_request(); c.reserve(r, P)
    kp = torch.randn(P, hk, 128, generator=gen, device=dev, dtype=torch.float16)
    for c in caches:
        for l in range(L):
            c.write(l, torch.arange(P, device=dev), kp, kp)
    bs = [[0] + [c.fork(0) for _ in range(W - 1)] for c in caches]
    rng = random.Random(W)
    q = [torch.randn(W, hq, 128, generator=gen, device=dev, dtype=torch.float16) for _ in range(L)]
    o_ref = [torch.empty_like(x) for x in q]
    o_buf = [torch.empty_like(x) for x in q]
    graphs = {}
    rec = {"plain_us": [], "padded_us": [], "graph_us": [], "capture_ms": [], "gpu_plain_us": [],
           "gpu_padded_us": [], "err": [], "captures": 0, "steps": 0, "keys_plain": set(), "keys_pad": set()}

    def timed(fn):
        torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e6

    def gpu_time(g):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(3):
            s.record(); g.replay(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e) * 1e3)
        return min(ts)

    def capture(c, b, outs):
        for l in range(L):  # warm (compiles, builds the launch sets)
            c.attend(q[l], l, b, out=outs[l])
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for l in range(L):
                c.attend(q[l], l, b, out=outs[l])
        return g

    for step in range(warm + steps):
        parents = [rng.randrange(max(1, W // 2)) for _ in range(W)]
        kv = torch.randn(W, hk, 128, generator=gen, device=dev, dtype=torch.float16)
        for x in q:
            x.normal_(generator=gen)
        for c, b in zip(caches, bs):
            new = [c.fork(b[p]) for p in parents]
            for x in b: c.prune(x)
            b[:] = new
            slots = c.reserve(b)
            for l in range(L):
                c.write(l, slots, kv, kv)
        A, B, C = caches
        bA, bB, bC = bs
        t_plain = timed(lambda: [A.attend(q[l], l, bA, out=o_ref[l]) for l in range(L)])
        t_pad = timed(lambda: [B.attend(q[l], l, bB) for l in range(L)])
        # C: prepare, then replay the graph of this launch key (capture a new one if none).
        for x in o_buf:
            x.fill_(float("nan"))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        key = C.prepare(bC).launch_key
        g = graphs.get(key)
        cap = 0.0
        if g is None:
            t1 = time.perf_counter()
            g = graphs[key] = capture(C, bC, o_buf)
            cap = (time.perf_counter() - t1) * 1e3
            rec["captures"] += 1
            for x in o_buf:
                x.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        t_graph = (time.perf_counter() - t0) * 1e6
        err = max(((a.float() - b.float()).abs().max().item() if torch.isfinite(b).all() else float("inf"))
                  for a, b in zip(o_ref, o_buf))
        if step >= warm:
            rec["steps"] += 1
            rec["plain_us"].append(t_plain); rec["padded_us"].append(t_pad)
            rec["err"].append(err)
            rec["keys_plain"].add(A.prepare(bA).launch_key); rec["keys_pad"].add(key)
            if cap:
                rec["capture_ms"].append(cap)
            else:
                rec["graph_us"].append(t_graph)
            if step % 5 == 0:  # GPU time of the step's attention, replayed
                gA = capture(A, bA, o_ref)
                rec["gpu_plain_us"].append(gpu_time(gA))
                rec["gpu_padded_us"].append(gpu_time(g))
                del gA
    med = lambda x: round(statistics.median(x), 1) if x else None
    res = {"W": W, "layers": L, "heads": f"{hq}/{hk}", "prompt": P, "steps": rec["steps"],
           "attend_all_layers_plain_us": med(rec["plain_us"]), "attend_all_layers_padded_us": med(rec["padded_us"]),
           "graph_step_us (no capture)": med(rec["graph_us"]), "captures": rec["captures"],
           "capture_ms": med(rec["capture_ms"]), "launch_keys_plain": len(rec["keys_plain"]),
           "launch_keys_padded": len(rec["keys_pad"]), "gpu_plain_us": med(rec["gpu_plain_us"]),
           "gpu_padded_us": med(rec["gpu_padded_us"]), "max_err": max(rec["err"]),
           "gpu_ratio_padded_over_plain": round(statistics.median(
               [b / a for a, b in zip(rec["gpu_plain_us"], rec["gpu_padded_us"])]), 3)}
    print(json.dumps(res), flush=True)
    return res

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    path = parser.parse_args().out
    if not torch.cuda.is_available():
        sys.exit("benchmarks.graph_beam needs a CUDA GPU (it captures CUDA graphs)")
    out = []
    for hq, hk in ((32, 8), (32, 32), (16, 1)):
        for W in (4, 16, 64):
            out.append(main(W, hq=hq, hk=hk))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "results": out}, f, indent=1)
