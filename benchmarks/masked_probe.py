"""Masked vnodes: several requests' whole contexts in one program, against the library.

A *masked* vnode holds the queries of up to 32 requests that are neighbours in the
tree and the union of their contexts: every KV entry carries a bit per query saying
who attends it (``tree_decode_stage1(kv_mask=...)``). Entries a group of requests
shares are read once per group, entries of one request once; a request whose whole
context is in its group's vnode gets its output written by stage 1 (no partials, no
stage 2). Nodes shared by many groups would be re-read by each of them; those whose
re-reads would cost more than their requests' partials (``weight`` x re-read bytes
against partial bytes) stay shared vnodes as in the library's plans (a wide tile of
requests over KV chunks), merged by stage 2.

``python -m benchmarks.masked_probe [--out FILE]`` times, on the benchmark's cases,
the library's plan and masked plans of several group sizes and weights (eager and
CUDA-graph replay), with each output checked against the float32 reference. A
prototype of the plan: numpy over nodes and requests, not the library's planner.
"""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import torch

#: Shared vnodes: requests per q tile (x GQA group rows, at most 128) and KV chunk.
SHARED_Q_ROWS = 64
SHARED_CHUNK = 1024


def masked_plan(inp, hq: int, hk: int, reqs_per_vnode: int, weight: float,
                kv_tile: int = 32, head_dim: int = 128):
    """Index arrays of a masked plan (numpy), its phases and counts.

    Requests are taken in depth-first order of their end nodes, ``reqs_per_vnode`` at a
    time; a node becomes a shared vnode when ``weight`` x the bytes its re-reads by
    further groups would cost exceed its requests' partial bytes (write and read)."""
    from kernels.tree_decode import Phase
    from treecache.plan import _preorder_positions, _Topology

    group = hq // hk
    topo = _Topology(inp)
    seqlen, req_end, n = topo.seqlen, topo.req_end, topo.n
    tok_ptr = np.asarray(inp.tok_ptr, dtype=np.int64)
    b = req_end.size
    pos = _preorder_positions(topo)
    order = np.argsort(pos[req_end], kind="stable")
    gsize = int(reqs_per_vnode)
    groups = [order[i:i + gsize] for i in range(0, b, gsize)]
    # (request, node) for every node of every request's path; each request's group.
    path_req, path_node = topo.path_req, topo.path_node
    group_of = np.empty(b, dtype=np.int64)
    group_of[order] = np.arange(b) // gsize
    # Requests through each node and groups that hold it.
    nq = topo.nq
    ng = np.bincount(np.unique(group_of[path_req] * n + path_node) % n, minlength=n)
    # Each request's path nodes, root first.
    paths = [[] for _ in range(b)]
    for r, x in zip(path_req.tolist(), path_node.tolist()):
        paths[r].append(x)
    paths = [p[::-1] for p in paths]
    reread = (ng - 1) * seqlen * 2 * head_dim * 2 * hk
    partial = nq * hq * (head_dim * 2 + 4) * 2
    shared = (ng > 1) & (weight * reread > partial) & (seqlen > 0)

    v_kv_start, v_kv_len, v_q_start, v_q_len = [], [], [], []
    kv_idx, kv_mask, mid_q_rows = [], [], []
    # Shared vnodes first (phase 0).
    q_tile0 = max(1, min(SHARED_Q_ROWS, 128) // group) if group <= 64 else 1
    for x in np.nonzero(shared)[0][np.argsort(pos[np.nonzero(shared)[0]])].tolist():
        rs = [r for r in order.tolist() if x in paths[r]]
        for c0 in range(0, int(seqlen[x]), SHARED_CHUNK):
            clen = min(SHARED_CHUNK, int(seqlen[x]) - c0)
            start = len(kv_idx)
            kv_idx.extend(range(int(tok_ptr[x]) + c0, int(tok_ptr[x]) + c0 + clen))
            kv_mask.extend([-1] * clen)
            for t0 in range(0, len(rs), q_tile0):
                tile = rs[t0:t0 + q_tile0]
                v_kv_start.append(start)
                v_kv_len.append(clen)
                v_q_start.append(len(mid_q_rows))
                v_q_len.append(len(tile))
                mid_q_rows.extend(tile)
    n0 = len(v_kv_start)
    for g in groups:
        g = g.tolist()
        nodes = {}
        for i, r in enumerate(g):
            for x in paths[r]:
                if not shared[x]:
                    nodes[x] = nodes.get(x, 0) | (1 << i)
        start = len(kv_idx)
        for x in sorted(nodes, key=lambda y: pos[y]):
            ln = int(seqlen[x])
            kv_idx.extend(range(int(tok_ptr[x]), int(tok_ptr[x]) + ln))
            m = nodes[x]
            kv_mask.extend([m - (1 << 32) if m >= 1 << 31 else m] * ln)
        v_kv_start.append(start)
        v_kv_len.append(len(kv_idx) - start)
        v_q_start.append(len(mid_q_rows))
        v_q_len.append(len(g))
        mid_q_rows.extend(g)
    n1 = len(v_kv_start) - n0
    mid_q_rows = np.asarray(mid_q_rows, dtype=np.int64)
    req_cnt = np.bincount(mid_q_rows, minlength=b)
    req_rows = np.argsort(mid_q_rows, kind="stable")
    req_start = np.cumsum(req_cnt) - req_cnt
    phases = []
    if n0:
        phases.append(Phase(0, n0, q_tile0, 32))
    phases.append(Phase(n0, n1, gsize, kv_tile))
    arrays = dict(kv_indices=kv_idx, kv_mask=kv_mask, vnode_kv_start=v_kv_start,
                  vnode_kv_len=v_kv_len, vnode_q_start=v_q_start, vnode_q_len=v_q_len,
                  mid_q_rows=mid_q_rows, req_mid_start=req_start, req_mid_len=req_cnt,
                  req_mid_rows=req_rows)
    arrays = {k: np.asarray(a, dtype=np.int64) for k, a in arrays.items()}
    info = dict(shared_nodes=int(shared.sum()), shared_vnodes=n0, masked_vnodes=n1,
                kv_entries=len(kv_idx), mid_rows=int(mid_q_rows.size),
                max_masked_len=int(max(v_kv_len[n0:], default=0)),
                max_partials=int(req_cnt.max()))
    return arrays, phases, info


def masked_call(arrays, phases, q, k, v, o, sm_scale: float, half: bool = True):
    """``call()``: the masked plan's launches (the shared phase without masks, the
    masked phase writing single-partial requests directly, stage 2 if any has more)."""
    td = importlib.import_module("kernels.tree_decode")

    dev = q.device
    t = {k_: torch.as_tensor(a, dtype=torch.int32).to(dev) for k_, a in arrays.items()}
    nmid = int(arrays["mid_q_rows"].size)
    mid_o = torch.empty(max(nmid, 1), q.shape[1], q.shape[2], device=dev,
                        dtype=q.dtype if half else torch.float32)
    mid_lse = torch.empty(max(nmid, 1), q.shape[1], device=dev, dtype=torch.float32)
    needs_stage2 = bool((arrays["req_mid_len"] > 1).any())
    shared = [ph for ph in phases[:-1]]
    masked = phases[-1]
    idx = (t["kv_indices"], t["vnode_kv_start"], t["vnode_kv_len"], t["vnode_q_start"],
           t["vnode_q_len"], t["mid_q_rows"])

    def call():
        for ph in shared:
            td.tree_decode_stage1(q, k, v, mid_o, mid_lse, *idx, ph, sm_scale)
        td.tree_decode_stage1(q, k, v, mid_o, mid_lse, *idx, masked, sm_scale, o=o,
                              req_mid_len=t["req_mid_len"], kv_mask=t["kv_mask"])
        if needs_stage2:
            td.tree_decode_stage2(mid_o, mid_lse, o, t["req_mid_start"], t["req_mid_len"],
                                  t["req_mid_rows"], skip_single=True)

    return call


def run(out_path=None, cases=None, configs=None, max_len=None, inline=False):
    """Time the library and the masked plans of ``configs`` (``[(requests, weight)]``,
    or a function of the GQA group giving them; default :func:`_default_configs`) on
    every case (of ``cases`` if given), skipping plans with a masked vnode over
    ``max_len`` entries. ``inline``: the configurations of :func:`_inline_configs`
    with ``max_len`` 1,024."""
    if inline:
        configs, max_len = _inline_configs, 1024
    from benchmarks import kernel as bk
    from benchmarks.probe_common import write_rows
    from benchmarks.suite import quick_cases, suite_cases
    from kernels.reference import reference_decode
    from treecache import fasttree_preparation, qkv_preparation
    from treecache.fasttree import tree_plan_input
    from treecache.plan import path_token_indices

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    every = suite_cases() if dev.type == "cuda" else quick_cases()
    todo = [c for c in every if cases is None or (c[0],) + tuple(c[2]) in cases]
    for name, nodes, (hq, hk) in todo:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, 128, dev, torch.float16,
                                                 generator=gen, build_cache=False)
        b = q.shape[0]
        meta, _ = fasttree_preparation(nodes, ptrs, b, hq, hk, 128, device=dev)
        inp = tree_plan_input(nodes, ptrs, b)
        sm = 1.0 / math.sqrt(128)
        slots = path_token_indices(inp.parent, inp.seqlen, inp.tok_ptr, inp.req_end)
        ref = reference_decode(q, k, v, [torch.from_numpy(s).to(dev) for s in slots], sm)
        o = torch.full_like(q, float("nan"))
        backend = bk.select_backend(dev)

        def lib():
            meta.plan.run(q, k, v, o, sm_scale=sm, backend=backend, check=False)

        lib()
        row = dict(case=name, hq=hq, hk=hk, requests=b, lib_err=bk.rel_err(o, ref),
                   lib_us=bk._bench(lib, dev), lib_graph_us=bk._graph_time(lib, dev))
        group = hq // hk
        for reqs, weight in (configs(group) if callable(configs)
                             else configs or _default_configs(group)):
            if reqs * group > 128 or reqs > 32:
                continue
            arrays, phases, info = masked_plan(inp, hq, hk, reqs, weight)
            if max_len is not None and info["max_masked_len"] > max_len:
                continue
            call = masked_call(arrays, phases, q, k, v, o, sm)
            o.fill_(float("nan"))
            call()
            key = f"masked_r{reqs}_w{weight:g}"
            row[key] = dict(info, err=bk.rel_err(o, ref), us=bk._bench(call, dev),
                            graph_us=bk._graph_time(call, dev))
        rows.append(row)
        best = min((v_ for k_, v_ in row.items() if k_.startswith("masked_")),
                   key=lambda x: x["graph_us"] or x["us"], default=None)
        print(f"{name[:40]} {hq}/{hk}: library {row['lib_us']:.1f} / {row['lib_graph_us'] or 0:.1f} us"
              + (f"; best masked {best['us']:.1f} / {best['graph_us'] or 0:.1f} us "
                 f"(err {best['err']:.1e}, {best['masked_vnodes']} masked vnodes, "
                 f"{best['shared_nodes']} shared nodes)" if best else ""),
              file=sys.stderr, flush=True)
    write_rows(out_path, rows)
    return rows


def _default_configs(group: int):
    """(requests per masked vnode, weight) pairs tried at GQA group ``group``."""
    if group == 1:
        return [(16, 0.25), (16, 1.0), (16, 4.0), (32, 1.0)]
    if group <= 4:
        return [(16 // group, 1.0), (32 // group, 1.0), (32 // group, 4.0), (64 // group, 1.0)]
    return [(1, 1.0), (2, 1.0), (4, 1.0)]


def _inline_configs(group: int):
    """Every node inlined (weight 0: no shared vnodes), a masked vnode of 16, 32 or 64
    query rows (at most 32 requests)."""
    return sorted({(min(32, max(1, rows // group)), 0.0) for rows in (16, 32, 64)})


def main(argv=None):
    from benchmarks.probe_common import probe_main

    probe_main(run, __doc__, argv, flags=dict(
        inline="only plans with every node inlined (no shared vnodes), of 16, 32 and 64 "
               "query rows a vnode, where no masked vnode holds more than 1,024 KV entries"))


if __name__ == "__main__":
    main()
