"""A shared root through cuDNN's dense attention, beside the library's leaves (CUDA only).

``python -m benchmarks.cascade_probe [--out FILE]`` measures, on the two-level seed trees
whose root is shared by every request, what a cascade would give: the root's attention
as one dense problem through cuDNN (torch's ``_scaled_dot_product_cudnn_attention``,
with its log-sum-exp), the leaves through the library's leaves' phase, and a merge of
the two partials per request and head. Times, each a CUDA-graph replay and an eager
``do_bench`` median (L2 flushed):

* ``root``: the queries gathered into ``[1, Hk, B x group, D]`` and cuDNN on the root's
  K and V (``root, KV copied``: with the root's K and V also copied into that layout
  first, as the library's ``[slots, heads, D]`` cache would need);
* ``leaves``: the library's last stage-1 phase alone (the leaves' partials);
* ``both``: root and leaves on two streams of one graph (replay only);
* ``cascade``: root, leaves and the merge (two streams, one graph; eager: one stream);
* ``library``: the library's whole decode of the same tree.

The cascade's output is checked against the library's. No part of the library uses
this path; it bounds what one would gain.
"""

from __future__ import annotations


import torch

from .kernel import _bench, _graph_time
from .probe_common import last_phase_call, library_plan, probe_main, write_rows

LOG2E = 1.4426950408889634
#: (tree, Hq, Hk): two-level trees whose root every request shares.
CASES = (("1,1024 2048,32", 32, 32), ("1,1024 2048,32", 32, 8), ("1,1024 2048,32", 16, 1),
         ("1,256 256,32", 32, 8), ("1,256 256,32", 16, 1))


def _cudnn(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=scale)
    return out[0], out[1]


def _case(spec, hq, hk, dev):
    q, k, v, ptrs, plan = library_plan(spec, hq, hk, 128, dev)
    b, d, g = q.shape[0], q.shape[2], hq // hk
    scale = d ** -0.5
    o_lib = torch.empty_like(q)

    def library():
        plan.run(q, k, v, o_lib, check=False, sm_scale=scale)

    library()
    t = plan.kernel_tensors(q.dtype)
    leaves, last = last_phase_call(plan, q, k, v, scale)
    # Each request's one mid row in the leaves' phase (one query per leaf vnode).
    qs = t["vnode_q_start"][last.vnode_offset:last.vnode_offset + last.num_vnodes].long()
    reqs = t["mid_q_rows"][qs].long()
    leaf_row = torch.empty(b, dtype=torch.long, device=dev)
    leaf_row[reqs] = qs

    r0, r1 = ptrs[0], ptrs[1]
    k_root = k[r0:r1].permute(1, 0, 2).unsqueeze(0).contiguous()  # [1, Hk, N, D]
    v_root = v[r0:r1].permute(1, 0, 2).unsqueeze(0).contiguous()
    bufs = {}

    def root(copy_kv=False):
        qr = q.view(b, hk, g, d).permute(1, 0, 2, 3).reshape(1, hk, b * g, d)
        kr, vr = k_root, v_root
        if copy_kv:
            kr = k[r0:r1].permute(1, 0, 2).unsqueeze(0).contiguous()
            vr = v[r0:r1].permute(1, 0, 2).unsqueeze(0).contiguous()
        bufs["root"] = _cudnn(qr, kr, vr, scale)

    o_cas = torch.empty_like(q)

    def merge():
        out_r, lse_r = bufs["root"]
        out_r = out_r.view(hk, b, g, d).permute(1, 0, 2, 3).reshape(b, hq, d).float()
        lse_r = lse_r.reshape(hk, b, g).permute(1, 0, 2).reshape(b, hq) * LOG2E
        out_l = t["mid_o"][leaf_row].float()
        lse_l = t["mid_lse"][leaf_row]
        m = torch.maximum(lse_r, lse_l)
        w_r, w_l = torch.exp2(lse_r - m), torch.exp2(lse_l - m)
        o_cas.copy_((out_r * w_r[..., None] + out_l * w_l[..., None])
                    / (w_r + w_l)[..., None])

    side = torch.cuda.Stream() if dev.type == "cuda" else None

    def two_streams(with_merge):
        def fn():
            if side is None:  # no second stream off CUDA
                root()
                leaves()
                if with_merge:
                    merge()
                return
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                root()
            leaves()
            torch.cuda.current_stream().wait_stream(side)
            if with_merge:
                merge()
        return fn

    def sequential():
        root()
        leaves()
        merge()

    sequential()
    err = ((o_cas.float() - o_lib.float()).norm() / o_lib.float().norm()).item()
    row = dict(case=spec, hq=hq, hk=hk, root_tokens=r1 - r0, requests=b,
               root_gflop=4 * b * hq * (r1 - r0) * d / 1e9, rel_diff_vs_library=err)
    for name, fn, eager in (("root", root, True),
                            ("root, KV copied", lambda: root(True), True),
                            ("leaves", leaves, True),
                            ("both", two_streams(False), False),
                            ("cascade", two_streams(True), False),
                            ("cascade, one stream", sequential, True),
                            ("library", library, True)):
        row[f"{name} graph_us"] = _graph_time(fn, dev)
        row[f"{name} eager_us"] = _bench(fn, dev) if eager else None
    return row


def run(out_path=None) -> list[dict]:
    dev = torch.device("cuda")
    rows = []
    for spec, hq, hk in CASES:
        try:
            row = _case(spec, hq, hk, dev)
        except RuntimeError as exc:  # cuDNN's attention not available for this shape here
            row = dict(case=spec, hq=hq, hk=hk, error=str(exc).splitlines()[0])
            print(f"{spec} {hq}/{hk}: {row['error'][:100]}", flush=True)
            rows.append(row)
            continue
        rows.append(row)
        parts = "; ".join(
            f"{key[:-9]} {val:.1f}" + (f"/{row[key[:-9] + ' eager_us']:.1f}"
                                       if row.get(key[:-9] + " eager_us") else "")
            for key, val in row.items() if key.endswith(" graph_us"))
        print(f"{spec} {hq}/{hk} (root {row['root_tokens']} tokens, {row['root_gflop']:.1f} "
              f"GFLOP): {parts} (graph/eager us); cascade vs library rel diff "
              f"{row['rel_diff_vs_library']:.1e}", flush=True)
    write_rows(out_path, rows, torch=torch.__version__)
    return rows


def main(argv=None):
    probe_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
