"""Float32 torch versions of the tree-decode math.

Two functions with different jobs:

* :func:`reference_decode` is the **oracle**: each request attends its own list of KV
  slots, densely, in float32, knowing nothing about vnodes. Tests compare against it.
* :func:`torch_tree_decode` runs the *same plan* as the Triton kernels (vnodes, mid rows,
  base-2 log-sum-exp merge) with torch operations. It is the fallback on machines
  without a GPU when the Triton interpreter is not enabled.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .tree_decode import Phase, scaled_partials

__all__ = ["reference_decode", "torch_tree_decode", "softcap_logits"]

LOG2E = 1.4426950408889634


def softcap_logits(s: torch.Tensor, logit_cap: float) -> torch.Tensor:
    """``logit_cap * tanh(s / logit_cap)`` when ``logit_cap > 0``, else ``s``."""
    if logit_cap is not None and logit_cap > 0:
        return logit_cap * torch.tanh(s / logit_cap)
    return s


def reference_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    request_slots: Sequence[torch.Tensor],
    sm_scale: float,
    logit_cap: float = 0.0,
) -> torch.Tensor:
    """Dense float32 decode attention, one request at a time.

    Parameters
    ----------
    q : Tensor ``[B, Hq, D]``
    k, v : Tensor ``[S, Hk, D]``; ``Hq`` must be a multiple of ``Hk``.
    request_slots : sequence of ``B`` int tensors; entry ``b`` lists the KV rows that
        request ``b`` attends.
    sm_scale, logit_cap : as in the kernels.

    Returns
    -------
    Tensor ``[B, Hq, D]`` float32. A request with no KV slots gets zeros.
    """
    b, hq, d = q.shape
    hk = k.shape[1]
    group = hq // hk
    out = torch.zeros(b, hq, d, dtype=torch.float32, device=q.device)
    for i in range(b):
        idx = torch.as_tensor(request_slots[i], dtype=torch.long, device=k.device)
        if idx.numel() == 0:
            continue
        kk = k[idx].float().repeat_interleave(group, dim=1)  # [T, Hq, D]
        vv = v[idx].float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,thd->ht", q[i].float(), kk) * sm_scale
        s = softcap_logits(s, logit_cap)
        p = torch.softmax(s, dim=-1)
        out[i] = torch.einsum("ht,thd->hd", p, vv)
    return out


def torch_tree_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    *,
    kv_indices: torch.Tensor,
    vnode_kv_start: torch.Tensor,
    vnode_kv_len: torch.Tensor,
    vnode_q_start: torch.Tensor,
    vnode_q_len: torch.Tensor,
    mid_q_rows: torch.Tensor,
    req_mid_start: torch.Tensor,
    req_mid_len: torch.Tensor,
    req_mid_rows: torch.Tensor,
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    phases: Sequence[Phase],
    sm_scale: float,
    logit_cap: float = 0.0,
    check: bool = True,
    vnode_slot0: torch.Tensor | None = None,
    direct: bool = False,
    needs_stage2: bool = True,
    finish: bool = False,
    kv_mask: torch.Tensor | None = None,
    max_chunk_elems: int = 1 << 24,
) -> torch.Tensor:
    """Torch implementation of :func:`kernels.tree_decode.tree_decode` (same arguments).

    ``vnode_slot0`` (a contiguity hint), ``direct``, ``needs_stage2`` and ``finish``
    (where the Triton kernels write outputs and merge partials) are accepted and change
    nothing here: every partial goes through the mid buffers and the merge, with the
    same result. ``kv_mask`` (row masks of the kv entries) is applied as the kernel
    applies it: not in phases marked unmasked (``Phase.masked`` False).

    Vnodes are processed in batches whose padded ``[rows, tokens, heads, dim]`` working
    set stays under ``max_chunk_elems`` elements, so memory stays bounded on large plans.
    """
    b, hq, d = q.shape
    hk = k.shape[1]
    group = hq // hk
    num_vnodes = sum(ph.num_vnodes for ph in phases)
    if num_vnodes:
        first = min(ph.vnode_offset for ph in phases)
        sl = slice(first, first + num_vnodes)
        # Vnodes whose masks apply (those of phases not marked unmasked).
        v_masked = torch.ones(num_vnodes, dtype=torch.bool, device="cpu")
        for ph in phases:
            if not ph.masked:
                v_masked[ph.vnode_offset - first:ph.vnode_offset - first + ph.num_vnodes] = False
        kv_start = vnode_kv_start[sl].long().cpu()
        kv_len = vnode_kv_len[sl].long().cpu()
        q_start = vnode_q_start[sl].long().cpu()
        q_len = vnode_q_len[sl].long().cpu()
        # Batch vnodes of similar shape together so that padding stays small.
        order = torch.argsort(kv_len * (q_len.max() + 1) + q_len)
        kv_start, kv_len = kv_start[order], kv_len[order]
        q_start, q_len = q_start[order], q_len[order]
        v_masked = v_masked[order]
        kv_idx_cpu = kv_indices.cpu().long()
        mask_cpu = None if kv_mask is None else kv_mask.cpu().long()
        q_rows_cpu = mid_q_rows.cpu().long()
        kl, ql = kv_len.tolist(), q_len.tolist()
        v0 = 0
        while v0 < num_vnodes:
            # Grow the batch while the padded working set fits.
            v1 = v0 + 1
            max_t, max_q = kl[v0], ql[v0]
            while v1 < num_vnodes:
                mt = max(max_t, kl[v1])
                mq = max(max_q, ql[v1])
                if (v1 + 1 - v0) * mq * max(mt, 1) * hq * d > max_chunk_elems:
                    break
                max_t, max_q, v1 = mt, mq, v1 + 1
            _torch_stage1_batch(
                q, k, v, mid_o, mid_lse, kv_idx_cpu, q_rows_cpu,
                kv_start[v0:v1], kv_len[v0:v1], q_start[v0:v1], q_len[v0:v1],
                max(max_t, 1), max(max_q, 1), group, sm_scale, logit_cap, mask_cpu,
                v_masked[v0:v1],
            )
            v0 = v1
    _torch_stage2(mid_o, mid_lse, o, req_mid_start, req_mid_len, req_mid_rows)
    return o


def _torch_stage1_batch(q, k, v, mid_o, mid_lse, kv_indices, mid_q_rows,
                        kv_start, kv_len, q_start, q_len, max_t, max_q, group,
                        sm_scale, logit_cap, kv_mask=None, v_masked=None):
    """Stage 1 for a batch of vnodes (index arrays on the CPU), padded to the batch max;
    ``kv_mask``: the kv entries' row masks (int64 on the CPU), or None; ``v_masked``:
    which vnodes they apply to (bool on the CPU; None: all)."""
    dev = q.device
    hk, d = k.shape[1], k.shape[2]
    t_ar = torch.arange(max_t, device="cpu")
    tok_ok = t_ar[None, :] < kv_len[:, None]  # [nv, T]
    pos = (kv_start[:, None] + t_ar[None, :]).clamp(max=max(kv_indices.numel() - 1, 0))
    slots = torch.where(tok_ok, kv_indices[pos], torch.zeros((), dtype=torch.long, device="cpu")).to(dev)
    kk = k[slots].float()  # [nv, T, Hk, D]
    vv = v[slots].float()
    q_ar = torch.arange(max_q, device="cpu")
    q_ok = q_ar[None, :] < q_len[:, None]  # [nv, Qm]
    mid_rows = (q_start[:, None] + q_ar[None, :]).clamp(max=max(mid_q_rows.numel() - 1, 0))
    q_rows = torch.where(q_ok, mid_q_rows[mid_rows], torch.zeros((), dtype=torch.long, device="cpu")).to(dev)
    nv, qm = q_rows.shape
    # Query heads grouped by KV head: [nv, Hk, Qm * G, D] against [nv, Hk, T, D].
    qq = q[q_rows].float().view(nv, qm, hk, group, d).permute(0, 2, 1, 3, 4)
    qq = qq.reshape(nv, hk, qm * group, d)
    kk = kk.permute(0, 2, 1, 3)
    vv = vv.permute(0, 2, 1, 3)
    s = torch.matmul(qq, kk.transpose(-1, -2)) * sm_scale  # [nv, Hk, Qm*G, T]
    s = softcap_logits(s, logit_cap) * LOG2E
    if kv_mask is None:
        s = s.masked_fill(~tok_ok.to(dev)[:, None, None, :], float("-inf"))
    else:
        # Row r of a vnode attends entry j where bit min(r, 31) of its mask is set.
        bits = kv_mask[pos]  # [nv, T]
        if v_masked is not None:
            bits = torch.where(v_masked[:, None], bits, torch.full_like(bits, -1))
        row_bit = q_ar.clamp(max=31)
        seen = ((bits[:, None, :] >> row_bit[None, :, None]) & 1).bool() & tok_ok[:, None, :]
        seen = seen[:, :, None, :].expand(nv, qm, group, max_t).reshape(nv, 1, qm * group, max_t)
        s = s.masked_fill(~seen.to(dev), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp2(s - m)
    l = p.sum(dim=-1)  # [nv, Hk, Qm*G]
    out = torch.matmul(p, vv) / l.clamp_min(1e-30)[..., None]
    lse = torch.where(l > 0, m.squeeze(-1) + torch.log2(l.clamp_min(1e-30)),
                      torch.full_like(l, float("-inf")))
    out = out.view(nv, hk, qm, group, d).permute(0, 2, 1, 3, 4).reshape(nv, qm, hk * group, d)
    lse = lse.view(nv, hk, qm, group).permute(0, 2, 1, 3).reshape(nv, qm, hk * group)
    sel = q_ok.to(dev)
    rows = mid_rows.to(dev)[sel]
    out, lse = out[sel], lse[sel]
    hq = lse.shape[-1]
    if scaled_partials(mid_o, q.dtype):
        # As the kernel stores them: times 2**-shift, the shifts after the lse columns.
        amax = out.abs().amax(dim=-1)
        shift = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 13.0,
                            torch.zeros_like(amax)).clamp(-120.0, 120.0)
        out = out * torch.exp2(-shift)[..., None]
        mid_lse[rows, hq:] = shift
    mid_o[rows] = out.to(mid_o.dtype)
    mid_lse[rows, :hq] = lse


def _torch_stage2(mid_o, mid_lse, o, req_mid_start, req_mid_len, req_mid_rows):
    b = o.shape[0]
    if b == 0:
        return
    dev = o.device
    lens = req_mid_len.long().to(dev)
    max_n = int(lens.max()) if b else 0
    if max_n == 0:
        o.zero_()
        return
    ar = torch.arange(max_n, device=dev)
    ok = ar[None, :] < lens[:, None]  # [B, N]
    pos = (req_mid_start.long().to(dev)[:, None] + ar[None, :]).clamp(max=max(req_mid_rows.numel() - 1, 0))
    rows = req_mid_rows.long().to(dev)[pos]
    rows = torch.where(ok, rows, torch.zeros_like(rows))
    hq = o.shape[1]
    lse = mid_lse[rows, :hq].masked_fill(~ok[..., None], float("-inf"))  # [B, N, Hq]
    m = lse.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp2(lse - m)  # [B, N, Hq]
    wo = w
    if scaled_partials(mid_o, o.dtype):
        wo = torch.exp2(lse + mid_lse[rows, hq:] - m)
    parts = mid_o[rows].float().masked_fill(~ok[..., None, None], 0.0)  # [B, N, Hq, D]
    num = (parts * wo[..., None]).sum(dim=1)
    den = w.sum(dim=1)
    o.copy_((num / torch.where(den > 0, den, torch.ones_like(den))[..., None]).to(o.dtype))
