"""What the stand-alone probes share: the library's plan of a tree with random inputs, a
launch of one of its stage-1 phases alone, their command line and their JSON file."""

from __future__ import annotations

import argparse
import json

import torch


def library_plan(spec: str, hq: int, hk: int, head_dim: int, dev: torch.device):
    """The library on the tree ``spec`` (nodes per level, tokens per node per level) at
    ``hq``/``hk`` heads: random float16 inputs in the tree layout and the default plan,
    ``(q, k, v, ptrs, plan)`` (``ptrs``: each node's first KV row)."""
    from treecache import fasttree_preparation, qkv_preparation
    from treecache.tree import generate_tree_from_spec

    nodes = generate_tree_from_spec(spec)
    q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, head_dim, dev, torch.float16,
                                             build_cache=False)
    meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, head_dim, device=dev)
    return q, k, v, ptrs, meta.plan


def last_phase_call(plan, q, k, v, sm_scale: float):
    """``(call, phase)``: ``call()`` launches the plan's last stage-1 phase alone, its
    partials into the plan's mid buffers (no merge)."""
    last = [ph for ph in plan.phases if ph.num_vnodes][-1]

    def call():
        plan.run_stage1(q, k, v, last, sm_scale)

    return call, last


def probe_main(run, doc: str, argv=None, flags=None) -> None:
    """``python -m benchmarks.<probe> [--out FILE] [--FLAG ...]``: run
    ``run(out_path, **{flag: bool})`` for each of ``flags`` (``{name: help}``, boolean
    switches); the first line of ``doc`` (the probe's module docstring) is the
    command's description."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    for name, what in (flags or {}).items():
        ap.add_argument(f"--{name}", action="store_true", help=what)
    args = ap.parse_args(argv)
    run(args.out, **{name: getattr(args, name) for name in (flags or {})})


def write_rows(out_path, rows: list[dict], **fields) -> None:
    """Write ``{"device": ..., **fields, "rows": rows}`` to ``out_path`` (nothing when
    it is None)."""
    if not out_path:
        return
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), **fields, "rows": rows}, f,
                  indent=1)
