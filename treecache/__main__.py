"""Demo: a TreeKVCache serving requests that share a system prompt.

``python -m treecache`` builds a cache, prefills one shared system prompt, forks it into
many requests with their own questions, runs decode steps the way a model loop does
(``reserve`` -> per layer ``write`` + ``attend``), forks a few requests into beams,
prunes some, and checks every attention output against a dense float32 reference.
It prints which kernel path ran (compiled Triton on a GPU, Triton's interpreter on
the CPU when ``TRITON_INTERPRET=1``, otherwise torch) and how much memory sharing saved.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from kernels import reference_decode

from . import TreeKVCache


def _max_rel_err(cache, q, o, layer, reqs):
    slots = [torch.from_numpy(cache.slots(r)).to(cache.device) for r in reqs]
    ref = reference_decode(q, cache.k_pool[layer], cache.v_pool[layer], slots, cache.sm_scale)
    return ((o.float() - ref).norm() / ref.norm()).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m treecache", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16, help="requests sharing the prompt")
    ap.add_argument("--prompt", type=int, default=512, help="system prompt tokens")
    ap.add_argument("--question", type=int, default=48, help="own tokens per request")
    ap.add_argument("--steps", type=int, default=8, help="decode steps per phase")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    hq, hk, d = (32, 8, 128) if on_gpu else (8, 2, 64)
    layers = args.layers
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    capacity = args.prompt + args.requests * (args.question + 4 * args.steps) * 2 + 256
    cache = TreeKVCache(layers, hq, hk, d, capacity_tokens=capacity, dtype=dtype,
                        device=device, backend=args.backend)
    path = cache.backend.value
    why = {"triton": "compiled Triton kernels on the GPU",
           "triton-interpreter": "Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1)",
           "torch": "the torch implementation (no GPU; set TRITON_INTERPRET=1 to run the "
                    "Triton kernels in the interpreter)"}[path]
    print(f"treecache demo on {device} ({dtype}), {layers} layers, {hq}/{hk} heads, head_dim {d}")
    print(f"kernel path: {path} - {why}")

    # Prefill: one system prompt, stored once, shared by every request.
    sys_req = cache.new_request()
    cache.append(sys_req, rand(layers, args.prompt, hk, d), rand(layers, args.prompt, hk, d))
    reqs = []
    for _ in range(args.requests):
        r = cache.fork(sys_req)
        cache.append(r, rand(layers, args.question, hk, d), rand(layers, args.question, hk, d))
        reqs.append(r)
    cache.prune(sys_req)  # the prompt stays: every request still references it

    worst = 0.0

    def decode_steps(n):
        nonlocal worst
        t0 = time.perf_counter()
        for _ in range(n):
            live = cache.requests
            slots = cache.reserve(live)
            for layer in range(layers):
                cache.write(layer, slots, rand(len(live), hk, d), rand(len(live), hk, d))
                q = rand(len(live), hq, d)
                o = cache.attend(q, layer, live)
                if layer == 0:
                    worst = max(worst, _max_rel_err(cache, q, o, layer, live))
        if on_gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / max(n, 1) * 1e3

    rebuilds0 = cache.plan_rebuilds
    ms = decode_steps(args.steps)
    rebuilds_decode = cache.plan_rebuilds - rebuilds0
    print(f"{len(cache.requests)} requests x {args.steps} decode steps: {ms:.1f} ms/step "
          f"(incl. reference checks), plan rebuilds during the steps: {rebuilds_decode}")

    # Beam-style branching: fork a few requests twice, prune others.
    for r in reqs[:4]:
        cache.fork(r)
        cache.fork(r)
    cache.prune(reqs[4:8])
    rebuilds0 = cache.plan_rebuilds
    ms = decode_steps(args.steps)
    print(f"after forking 4 requests into beams and pruning 4: {len(cache.requests)} requests, "
          f"{ms:.1f} ms/step, plan rebuilds: {cache.plan_rebuilds - rebuilds0} "
          "(one after the topology change, then none)")

    cache.check()
    st = cache.stats()
    saved = 1 - st["unique_tokens"] / st["logical_tokens"]
    print(f"tokens stored: {st['unique_tokens']} unique vs {st['logical_tokens']} if each request "
          f"had its own copy (sharing ratio {st['sharing_ratio']:.2f}x, {100 * saved:.0f}% memory saved)")
    print(f"max relative error vs float32 reference: {worst:.2e}")
    ok = worst <= (2e-3 if dtype == torch.float16 else 1e-4)
    cache.prune(cache.requests)
    cache.check()
    print(f"pruned everything: {cache.stats()['pages_free']} of {cache.stats()['pages_total']} pages free")
    print("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
