"""Tests of the tree-decode kernels alone (no trees, no planner).

Each case hand-builds the vnode index arrays of ``kernels.tree_decode`` (a vnode is a
set of query rows and a list of KV slots), runs the Triton kernels (the Triton
interpreter on a CPU-only machine) and the torch implementation of the same plan, and
compares both with ``kernels.reference_decode``, the dense float32 oracle, over each
request's KV slots (the union of the slots of the vnodes it belongs to).

Outputs and mid buffers are poisoned with NaN before every call: a row the kernels
forget to write shows up as NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import Phase, reference_decode, torch_tree_decode, tree_decode
from kernels.backend import interpreter_enabled
from kernels.tree_decode import (scaled_partials, stage1_block_sizes, tree_decode_stage1,
                                 tree_decode_stage2)

# The Triton kernels run in the interpreter on CPU tensors, or compiled on a GPU when the
# interpreter is off (a GPU machine): then every tensor of these tests lives on the GPU.
DEV = torch.device("cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu")


@pytest.fixture(autouse=True)
def _tensors_on_test_device():
    with torch.device(DEV):
        yield

LOG2E = 1.4426950408889634
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}
IMPLS = {"triton": tree_decode, "torch": torch_tree_decode}
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# ------------------------------------------------------------------------- helpers


def i32(values) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.int32)


class Case:
    """Index arrays for a list of vnodes, plus each request's slots for the oracle.

    ``vnodes`` is a list of ``(query_rows, kv_slots)`` or ``(query_rows, kv_slots,
    masks)``, ``masks`` one row mask per slot (bit ``min(i, 31)``: query ``i`` of the
    vnode attends the slot); with any masks the case passes ``kv_mask`` (-1 for
    unmasked vnodes). Vnode ``v`` owns consecutive mid rows. ``phases`` is a list of ``(first_vnode, num_vnodes, kv_tile)``; each phase's
    ``q_tile`` is its largest vnode query count. ``spare_mid_rows`` extra rows are
    allocated past the used ones (they must stay untouched).
    """

    def __init__(self, vnodes, num_requests, phases=None, kv_tile=16,
                 shuffle_req_rows=False, spare_mid_rows=2, generator=None):
        self.num_requests = num_requests
        kv_indices, kv_start, kv_len = [], [], []
        q_start, q_len, mid_q_rows = [], [], []
        kv_mask = []
        for rows, slots, *masks in vnodes:
            kv_start.append(len(kv_indices))
            kv_len.append(len(slots))
            kv_indices.extend(slots)
            kv_mask.extend(masks[0] if masks else [-1] * len(slots))
            q_start.append(len(mid_q_rows))
            q_len.append(len(rows))
            mid_q_rows.extend(rows)
        self.num_mid_rows = len(mid_q_rows)
        req_rows = [[j for j, r in enumerate(mid_q_rows) if r == b] for b in range(num_requests)]
        if shuffle_req_rows:
            g = generator or torch.Generator().manual_seed(0)
            req_rows = [[rr[i] for i in torch.randperm(len(rr), generator=g, device="cpu").tolist()]
                        for rr in req_rows]
        req_start, req_len, req_mid_rows = [], [], []
        for rr in req_rows:
            req_start.append(len(req_mid_rows))
            req_len.append(len(rr))
            req_mid_rows.extend(rr)
        self.index = dict(
            kv_indices=i32(kv_indices or [0]),
            vnode_kv_start=i32(kv_start), vnode_kv_len=i32(kv_len),
            vnode_q_start=i32(q_start), vnode_q_len=i32(q_len),
            mid_q_rows=i32(mid_q_rows or [0]),
            req_mid_start=i32(req_start), req_mid_len=i32(req_len),
            req_mid_rows=i32(req_mid_rows or [0]),
        )
        if any(len(vn) == 3 for vn in vnodes):
            # int32 bit patterns: bit 31 set reads as a negative number.
            self.index["kv_mask"] = i32(m - (1 << 32) if m >= 1 << 31 else m
                                        for m in (kv_mask or [0]))
        if phases is None:
            phases = [(0, len(vnodes), kv_tile)]
        self.phases = [
            Phase(first, count, max([1] + [len(vnodes[v][0]) for v in range(first, first + count)]),
                  tile)
            for first, count, tile in phases
        ]
        # What the oracle sees: each request attends the slots of all its vnodes.
        self.request_slots = [[] for _ in range(num_requests)]
        for rows, slots, *masks in vnodes:
            for i, r in enumerate(rows):
                bit = 1 << min(i, 31)
                self.request_slots[r].extend(
                    s for j, s in enumerate(slots) if not masks or masks[0][j] & bit)
        self.spare = spare_mid_rows

    def run(self, impl, q, k, v, sm_scale, logit_cap=0.0, mid_dtype=torch.float32,
            vnode_slot0=None, **kw):
        """Run ``impl`` on poisoned buffers; return (o, mid_o, mid_lse)."""
        b, hq, d = q.shape
        rows = self.num_mid_rows + self.spare
        o = torch.full_like(q, float("nan"))
        mid_o = torch.full((rows, hq, d), float("nan"), dtype=mid_dtype)
        # Scaled partials (float16 for bfloat16 inputs) keep their shifts after the lses.
        lse_cols = 2 * hq if scaled_partials(mid_o, q.dtype) else hq
        mid_lse = torch.full((rows, lse_cols), float("nan"), dtype=torch.float32)
        extra = dict(kw) if vnode_slot0 is None else dict(kw, vnode_slot0=vnode_slot0)
        out = IMPLS[impl](q, k, v, o, mid_o=mid_o, mid_lse=mid_lse, phases=self.phases,
                          sm_scale=sm_scale, logit_cap=logit_cap, **self.index, **extra)
        assert out is o
        return o, mid_o, mid_lse


def make_qkv(num_requests, num_slots, hq, hk, d, dtype, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(num_requests, hq, d, generator=g, device="cpu") * q_scale).to(DEV, dtype)
    k = torch.randn(num_slots, hk, d, generator=g, device="cpu").to(DEV, dtype)
    v = torch.randn(num_slots, hk, d, generator=g, device="cpu").to(DEV, dtype)
    return q, k, v


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def check_output(case, o, mid_o, mid_lse, ref, dtype):
    n = case.num_mid_rows
    assert not torch.isnan(o).any(), "output has NaN (a row was not written)"
    assert not torch.isnan(mid_o[:n]).any(), "mid_o has NaN in a used row"
    assert not torch.isnan(mid_lse[:n]).any(), "mid_lse has NaN in a used row"
    # Rows past the used ones are not written.
    assert torch.isnan(mid_o[n:]).all() and torch.isnan(mid_lse[n:]).all()
    err = rel_err(o, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:g}"


def shared_prefix_case(prefix_len=37, own_lens=(5, 20, 11), kv_tile=16):
    """One vnode of every request over a shared prefix, then one vnode per request."""
    b = len(own_lens)
    vnodes = [(list(range(b)), list(range(prefix_len)))]
    start = prefix_len
    for r, n in enumerate(own_lens):
        vnodes.append(([r], list(range(start, start + n))))
        start += n
    return Case(vnodes, b, kv_tile=kv_tile), start


# --------------------------------------------------------- shapes, dtypes, GQA, cap


def _shape_cases():
    """A covering set: (dtype, head_dim, group, num_kv_heads, logit_cap)."""
    cases = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for d in (16, 128):
            cases.append((dtype, d, 2, 1, 0.0))
    for d in (16, 32, 64, 128, 256):
        cases.append((torch.float16, d, 1, 2, 0.0))
    for i, group in enumerate((1, 2, 4, 7, 8, 16)):
        cases.append((torch.float16, 32, group, 1 + i % 2, 0.0))
    cases += [
        (torch.float16, 64, 4, 1, 5.0),
        (torch.bfloat16, 32, 1, 2, 5.0),
        (torch.float32, 128, 8, 2, 5.0),
        (torch.float16, 256, 16, 1, 5.0),
    ]
    return cases


def _case_id(c):
    dtype, d, group, hk, cap = c
    return f"{DTYPE_IDS[dtype]}-d{d}-g{group}-hk{hk}" + (f"-cap{cap:g}" if cap else "")


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("shape", _shape_cases(), ids=_case_id)
def test_shared_prefix_matches_reference(shape, impl):
    dtype, d, group, hk, cap = shape
    hq = group * hk
    case, num_slots = shared_prefix_case()
    # With the cap on, scale q up so that logits reach the cap.
    q, k, v = make_qkv(case.num_requests, num_slots, hq, hk, d, dtype,
                       seed=d + group, q_scale=4.0 if cap else 1.0)
    sm_scale = 1.0 / math.sqrt(d)
    o, mid_o, mid_lse = case.run(impl, q, k, v, sm_scale, cap)
    ref = reference_decode(q, k, v, case.request_slots, sm_scale, cap)
    check_output(case, o, mid_o, mid_lse, ref, dtype)
    if cap:
        uncapped = reference_decode(q, k, v, case.request_slots, sm_scale, 0.0)
        assert rel_err(uncapped, ref) > 0.05, "test set-up: the cap does not change the result"
        assert rel_err(o, uncapped) > 0.05


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("cap", [0.0, -1.0, None], ids=["zero", "negative", "none"])
def test_non_positive_cap_is_off(impl, cap):
    case, num_slots = shared_prefix_case()
    q, k, v = make_qkv(case.num_requests, num_slots, 2, 1, 32, torch.float32, q_scale=4.0)
    o, mid_o, mid_lse = case.run(impl, q, k, v, 0.2, cap)
    ref = reference_decode(q, k, v, case.request_slots, 0.2, 0.0)
    check_output(case, o, mid_o, mid_lse, ref, torch.float32)


# ---------------------------------------------------------------- plan layouts


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_request_with_several_mid_rows(impl):
    # Request 0: a prefix cut into two chunks, a middle node and its own tokens (4 mid
    # rows, not adjacent); request 1: the two prefix chunks and its own tokens;
    # request 2: its own tokens only. Stage 2 reads each request's rows in shuffled order.
    vnodes = [
        ([0, 1], list(range(0, 20))),
        ([0, 1], list(range(20, 45))),
        ([2], list(range(45, 52))),
        ([0], list(range(52, 61))),
        ([0], list(range(61, 64))),
        ([1], list(range(64, 90))),
    ]
    case = Case(vnodes, 3, shuffle_req_rows=True)
    assert case.index["req_mid_len"].tolist() == [4, 3, 1]
    q, k, v = make_qkv(3, 90, 4, 2, 32, torch.float16, seed=1)
    o, mid_o, mid_lse = case.run(impl, q, k, v, 1 / math.sqrt(32))
    ref = reference_decode(q, k, v, case.request_slots, 1 / math.sqrt(32))
    check_output(case, o, mid_o, mid_lse, ref, torch.float16)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_request_with_zero_mid_rows_gets_zeros(impl):
    # Request 1 is in no vnode (an empty context): its output is exactly zero.
    vnodes = [([0, 2], list(range(0, 30))), ([2], list(range(30, 40)))]
    case = Case(vnodes, 3)
    assert case.index["req_mid_len"].tolist() == [1, 0, 2]
    q, k, v = make_qkv(3, 40, 2, 1, 16, torch.float16, seed=2)
    o, mid_o, mid_lse = case.run(impl, q, k, v, 0.25)
    assert not torch.isnan(o).any()
    assert torch.count_nonzero(o[1]) == 0
    ref = reference_decode(q, k, v, case.request_slots, 0.25)
    assert torch.count_nonzero(ref[1]) == 0
    check_output(case, o, mid_o, mid_lse, ref, torch.float16)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_no_vnodes_at_all(impl):
    # Nothing to attend for anyone (every context empty): stage 1 launches nothing and
    # stage 2 writes zeros.
    case = Case([], 2)
    q, k, v = make_qkv(2, 1, 2, 1, 16, torch.float16)
    o, _, _ = case.run(impl, q, k, v, 0.25)
    assert torch.count_nonzero(o) == 0 and not torch.isnan(o).any()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_empty_vnode(impl):
    # Vnode 1 has no KV slots: its partial result has lse = -inf and weight 0 in the
    # merge. Request 1 attends only that empty vnode and gets zeros.
    vnodes = [([0], list(range(0, 25))), ([0, 1], []), ([0], list(range(25, 30)))]
    case = Case(vnodes, 2)
    q, k, v = make_qkv(2, 30, 2, 2, 32, torch.float32, seed=3)
    o, mid_o, mid_lse = case.run(impl, q, k, v, 0.2)
    assert not torch.isnan(o).any()
    assert torch.count_nonzero(o[1]) == 0
    assert torch.isneginf(mid_lse[1:3]).all()
    ref = reference_decode(q, k, v, case.request_slots, 0.2)
    assert rel_err(o[:1], ref[:1]) <= TOL[torch.float32]


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_two_phases_permuted_slots(impl):
    # Phase 0: one vnode of 5 queries over 70 shared slots, KV tile 32; phase 1: one
    # vnode per request, KV tile 16 (non-zero vnode offset). KV slots are a random
    # permutation of the storage rows, so no vnode reads contiguous rows.
    g = torch.Generator().manual_seed(4)
    perm = torch.randperm(130, generator=g, device="cpu").tolist()
    vnodes = [(list(range(5)), perm[:70])]
    start = 70
    for r, n in enumerate((17, 1, 9, 16, 17)):
        vnodes.append(([r], perm[start:start + n]))
        start += n
    case = Case(vnodes, 5, phases=[(0, 1, 32), (1, 5, 16)])
    assert [(p.vnode_offset, p.num_vnodes, p.q_tile, p.kv_tile) for p in case.phases] == [
        (0, 1, 5, 32), (1, 5, 1, 16)]
    q, k, v = make_qkv(5, 130, 8, 2, 64, torch.float16, seed=4)
    o, mid_o, mid_lse = case.run(impl, q, k, v, 0.125)
    ref = reference_decode(q, k, v, case.request_slots, 0.125)
    check_output(case, o, mid_o, mid_lse, ref, torch.float16)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_row_masks(impl, dtype):
    # A masked vnode holds four requests over the union of their contexts: a prefix all
    # attend, runs of one, two or three of them, and a run nobody attends. Request 3
    # attends none of it (an empty partial there) and has a vnode of its own; a vnode of
    # 40 queries without masks (rows past 31 read bit 31 of -1) shares the launch.
    def bits(*rows):
        return sum(1 << r for r in rows)

    runs = [(list(range(0, 20)), bits(0, 1, 2)), (list(range(20, 30)), bits(0)),
            (list(range(30, 45)), bits(1, 2)), (list(range(45, 47)), 0),
            (list(range(47, 52)), bits(2))]
    slots = [s_ for run, _ in runs for s_ in run]
    masks = [m for run, m in runs for _ in run]
    vnodes = [([0, 1, 2, 3], slots, masks), ([3], list(range(52, 60))),
              (list(range(4, 44)), list(range(60, 75)))]
    case = Case(vnodes, 44, kv_tile=16)
    assert case.request_slots[0] == list(range(0, 30))
    assert case.request_slots[2] == list(range(0, 20)) + list(range(30, 45)) + list(range(47, 52))
    assert case.request_slots[3] == list(range(52, 60))
    q, k, v = make_qkv(44, 75, 4, 2, 32, dtype, seed=12)
    o, mid_o, mid_lse = case.run(impl, q, k, v, 0.2)
    ref = reference_decode(q, k, v, case.request_slots, 0.2)
    check_output(case, o, mid_o, mid_lse, ref, dtype)
    # Request 3's partial in the masked vnode is empty: lse -inf.
    assert torch.isneginf(mid_lse[3]).all()
    # Without masks the same vnodes give other outputs (the masks are applied).
    unmasked = dict(case.index)
    del unmasked["kv_mask"]
    o2 = torch.full_like(q, float("nan"))
    IMPLS[impl](q, k, v, o2, mid_o=mid_o.clone(), mid_lse=mid_lse.clone(),
                phases=case.phases, sm_scale=0.2, **unmasked)
    assert rel_err(o2[:3], ref[:3]) > 10 * TOL[dtype]


def test_unmasked_phase_skips_masks():
    # Phase 0 is marked unmasked: its vnode's entries carry masks (the planner never
    # gives such a phase any; here they would hide runs from requests 1 and 2), and they
    # are not applied: a Triton launch of that phase alone compiles without the mask
    # test, and the torch implementation skips them there. Phase 1's masked vnode
    # applies its masks.
    shared = list(range(0, 40))
    vnodes = [([0, 1, 2], shared, [0b001] * 20 + [0b011] * 20),
              ([0, 1], list(range(40, 60)), [0b01] * 10 + [0b10] * 10),
              ([2], list(range(60, 70)))]
    case = Case(vnodes, 3, phases=[(0, 1, 32), (1, 2, 16)])
    want = [shared + list(range(40, 50)), shared + list(range(50, 60)),
            shared + list(range(60, 70))]
    q, k, v = make_qkv(3, 70, 4, 2, 32, torch.float32, seed=13)
    ref = reference_decode(q, k, v, want, 0.2)
    ix = case.index

    def triton_by_phase(phases):
        mid_o = torch.full((case.num_mid_rows, 4, 32), float("nan"))
        mid_lse = torch.full((case.num_mid_rows, 4), float("nan"))
        for ph in phases:
            tree_decode_stage1(q, k, v, mid_o, mid_lse, ix["kv_indices"], ix["vnode_kv_start"],
                               ix["vnode_kv_len"], ix["vnode_q_start"], ix["vnode_q_len"],
                               ix["mid_q_rows"], ph, 0.2, kv_mask=ix["kv_mask"])
        o = torch.full_like(q, float("nan"))
        tree_decode_stage2(mid_o, mid_lse, o, ix["req_mid_start"], ix["req_mid_len"],
                           ix["req_mid_rows"])
        return o

    unmasked = [case.phases[0]._replace(masked=False), case.phases[1]]
    case.phases = unmasked
    o_torch, _, _ = case.run("torch", q, k, v, 0.2)
    for o in (o_torch, triton_by_phase(unmasked)):
        assert not torch.isnan(o).any()
        assert rel_err(o, ref) <= TOL[torch.float32]
    # With phase 0 masked the same entries hide runs from requests 1 and 2: other outputs.
    case.phases = [unmasked[0]._replace(masked=True), unmasked[1]]
    o_torch, _, _ = case.run("torch", q, k, v, 0.2)
    for o in (o_torch, triton_by_phase(case.phases)):
        assert rel_err(o[:1], ref[:1]) <= TOL[torch.float32]
        for r in (1, 2):
            assert rel_err(o[r:r + 1], ref[r:r + 1]) > 10 * TOL[torch.float32]


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_query_rows_out_of_order(impl):
    # A vnode's query rows need not be sorted or adjacent; a vnode may hold a single
    # query of a large batch.
    vnodes = [([3, 0, 2], list(range(0, 33))), ([1], list(range(33, 40))),
              ([2, 1], list(range(40, 41))), ([3], list(range(41, 60)))]
    case = Case(vnodes, 4, kv_tile=64)
    q, k, v = make_qkv(4, 60, 4, 1, 16, torch.float32, seed=5)
    o, mid_o, mid_lse = case.run(impl, q, k, v, 0.25)
    ref = reference_decode(q, k, v, case.request_slots, 0.25)
    check_output(case, o, mid_o, mid_lse, ref, torch.float32)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_base2_lse_convention(impl):
    # One vnode, one request: mid_o is the softmax-weighted value sum and mid_lse is the
    # base-2 log-sum-exp of the scaled logits, log2(e) * logsumexp(sm_scale * q.k).
    case = Case([([0], list(range(21)))], 1)
    q, k, v = make_qkv(1, 21, 4, 2, 32, torch.float32, seed=6)
    sm_scale = 0.3
    _, mid_o, mid_lse = case.run(impl, q, k, v, sm_scale)
    s = torch.einsum("hd,thd->ht", q[0], k.repeat_interleave(2, dim=1)) * sm_scale
    torch.testing.assert_close(mid_lse[0], LOG2E * torch.logsumexp(s, dim=-1),
                               rtol=1e-5, atol=1e-5)
    ref = reference_decode(q, k, v, case.request_slots, sm_scale)
    torch.testing.assert_close(mid_o[0], ref[0], rtol=1e-4, atol=1e-5)


def test_stages_launch_separately():
    # The two launchers compose: stage 1 per phase then stage 2 equals tree_decode.
    case, num_slots = shared_prefix_case()
    q, k, v = make_qkv(3, num_slots, 4, 2, 16, torch.float16, seed=7)
    o_ref, _, _ = case.run("triton", q, k, v, 0.25)
    rows = case.num_mid_rows
    mid_o = torch.full((rows, 4, 16), float("nan"))
    mid_lse = torch.full((rows, 4), float("nan"))
    ix = case.index
    for ph in case.phases:
        tree_decode_stage1(q, k, v, mid_o, mid_lse, ix["kv_indices"], ix["vnode_kv_start"],
                           ix["vnode_kv_len"], ix["vnode_q_start"], ix["vnode_q_len"],
                           ix["mid_q_rows"], ph, 0.25)
    o = torch.full_like(q, float("nan"))
    tree_decode_stage2(mid_o, mid_lse, o, ix["req_mid_start"], ix["req_mid_len"],
                       ix["req_mid_rows"])
    assert torch.equal(o, o_ref)


def _merge_oracle(mid_o, mid_lse, counts, rows_of):
    """float32 merge of each request's partials (base-2 log-sum-exp weights)."""
    out = []
    for r, n in enumerate(counts):
        if n == 0:
            out.append(torch.zeros(mid_o.shape[1:], dtype=torch.float64, device="cpu"))
            continue
        rows = torch.tensor(rows_of[r], device="cpu")
        lse = mid_lse[rows].double()  # [P, H]
        w = torch.exp2(lse - lse.max(dim=0).values)
        w = w / w.sum(dim=0)
        out.append((mid_o[rows].double() * w[:, :, None]).sum(dim=0))
    return torch.stack(out)


def test_stage2_blocks_rule():
    from kernels.tree_decode import stage2_blocks

    assert stage2_blocks(10, 32, 128) == (1, 8, 1)  # few programs: one head each
    assert stage2_blocks(1024, 16, 128) == (4, 2, 1)  # many requests, few heads
    assert stage2_blocks(1024, 32, 128) == (2, 4, 1)
    assert stage2_blocks(64, 32, 128) == (2, 4, 1)
    assert stage2_blocks(4096, 1, 128) == (1, 2, 1)  # never more heads than there are


@pytest.mark.parametrize("block_h,block_p,warps", [(1, 8, 1), (2, 2, 1), (4, 4, 2), (8, 2, 4),
                                                   (None, None, None)])
@pytest.mark.parametrize("hq", [6, 16])
def test_stage2_launch_shapes(block_h, block_p, warps, hq):
    # Every head block and partial block of stage 2 merges like the oracle: head counts
    # that are not a multiple of the head block (6), requests with more partials than
    # one step (up to 11), one partial, and none (zeros); skip_single leaves the rows of
    # single-partial requests alone.
    g = torch.Generator().manual_seed(hq)
    counts = [3, 0, 1, 11, 5, 2]
    total = sum(counts)
    perm = torch.randperm(total, generator=g, device="cpu").tolist()
    rows_of, starts, pos = [], [], 0
    for n in counts:
        starts.append(pos)
        rows_of.append(perm[pos:pos + n])
        pos += n
    mid_o = torch.randn(total + 1, hq, 32, generator=g, device="cpu").to(DEV)
    mid_lse = (torch.randn(total + 1, hq, generator=g, device="cpu") * 3).to(DEV)
    # Some partials of request 0 are empty for every head (lse = -inf, output 0).
    mid_lse[rows_of[0][0]] = float("-inf")
    mid_o[rows_of[0][0]] = 0.0
    ref = _merge_oracle(mid_o.cpu(), mid_lse.cpu(), counts, rows_of)
    assert not torch.isnan(ref).any()
    for skip in (False, True):
        o = torch.full((len(counts), hq, 32), float("nan"), dtype=torch.float32)
        tree_decode_stage2(mid_o, mid_lse, o, i32(starts), i32(counts), i32(perm),
                           skip_single=skip, block_h=block_h, block_p=block_p, num_warps=warps)
        for r, n in enumerate(counts):
            if skip and n == 1:
                assert torch.isnan(o[r]).all()
            else:
                torch.testing.assert_close(o[r].cpu().double(), ref[r], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_contiguous_slot_hint(impl, dtype):
    # Two phases with different tile shapes; some vnodes read contiguous slot runs and
    # carry the hint (their first slot), others are gathered (-1), one contiguous run is
    # left unhinted. The result must match the reference and the unhinted run.
    g = torch.Generator().manual_seed(11)
    perm = torch.randperm(60, generator=g, device="cpu").tolist()
    vnodes = [
        (list(range(6)), list(range(100, 171))),          # contiguous, hinted
        (list(range(6)), [p + 300 for p in perm[:37]]),   # gathered
        ([0], list(range(5, 23))), ([1], list(range(23, 24))),   # contiguous, hinted
        ([2], [p + 400 for p in perm[37:60]]),            # gathered
        ([3], list(range(40, 73))),                       # contiguous, not hinted
        ([4], list(range(80, 97))), ([5], list(range(200, 203))),  # contiguous, hinted
    ]
    hint = [100, -1, 5, 23, -1, -1, 80, 200]
    case = Case(vnodes, 6, phases=[(0, 2, 32), (2, 6, 16)])
    q, k, v = make_qkv(6, 460, 8, 2, 32, dtype, seed=12)
    slot0 = i32(hint)
    o, mid_o, mid_lse = case.run(impl, q, k, v, 0.2, vnode_slot0=slot0)
    ref = reference_decode(q, k, v, case.request_slots, 0.2)
    check_output(case, o, mid_o, mid_lse, ref, dtype)
    o_plain, _, _ = case.run(impl, q, k, v, 0.2)
    assert rel_err(o, o_plain.float()) <= 1e-6


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_half_precision_partials(impl):
    # fp16 inputs may keep partial outputs in fp16: same result within the fp16 bound,
    # and the partials differ from float32 ones only by fp16 rounding.
    case, num_slots = shared_prefix_case(prefix_len=90, own_lens=(31, 2, 47, 16))
    q, k, v = make_qkv(case.num_requests, num_slots, 8, 2, 64, torch.float16, seed=13)
    o, mid_o, mid_lse = case.run(impl, q, k, v, 0.125, mid_dtype=torch.float16)
    assert mid_o.dtype == torch.float16
    ref = reference_decode(q, k, v, case.request_slots, 0.125)
    check_output(case, o, mid_o, mid_lse, ref, torch.float16)
    _, mid32, lse32 = case.run(impl, q, k, v, 0.125)
    n = case.num_mid_rows
    torch.testing.assert_close(mid_o[:n].float(), mid32[:n], rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(mid_lse[:n], lse32[:n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("mode", ["stage2", "direct", "finish"])
@pytest.mark.parametrize("v_scale", [1e-6, 1.0, 1e6])
def test_scaled_half_partials_of_bfloat16(impl, mode, v_scale):
    # bfloat16 inputs keep float16 partials scaled by a power of two per row: values
    # far outside float16's range (1e6 overflows it, 1e-6 is below its normal range)
    # give the result of float32 partials, in every mode that reads partials.
    vnodes = [([0, 1, 3, 4], list(range(0, 45))), ([1, 3], list(range(110, 118))),
              ([1], list(range(45, 52))), ([3], list(range(52, 90))), ([2], list(range(90, 97))),
              ([4], []), ([0], [97, 99, 101])]
    case = Case(vnodes, 5, phases=[(0, 2, 32), (2, 5, 16)], shuffle_req_rows=True,
                generator=torch.Generator().manual_seed(5))
    q, k, v = make_qkv(5, 120, 8, 2, 64, torch.float32, seed=23)
    q, k, v = q.bfloat16(), k.bfloat16(), (v * v_scale).bfloat16()
    kw = {"stage2": {}, "direct": {"direct": True}, "finish": {"finish": True}}[mode]
    o, mid_o, mid_lse = case.run(impl, q, k, v, 0.2, mid_dtype=torch.float16, **kw)
    assert mid_o.dtype == torch.float16 and mid_lse.shape[1] == 16
    ref = reference_decode(q, k, v, case.request_slots, 0.2)
    assert not torch.isnan(o).any() and torch.isfinite(o).all()
    assert rel_err(o, ref) <= TOL[torch.bfloat16]
    o32, _, _ = case.run(impl, q, k, v, 0.2, **kw)
    # Both round to bfloat16 at the end: at most about one bfloat16 step apart.
    assert rel_err(o, o32.float()) <= 4e-3
    if mode == "stage2":
        # Each stored row's largest magnitude is in [2**13, 2**14) after its shift (an
        # integer, stored after the row's lses; request 4's empty vnode keeps 0).
        n = case.num_mid_rows
        shift, part = mid_lse[:n, 8:], mid_o[:n].float()
        assert torch.equal(shift, shift.round())
        amax = part.abs().amax(dim=-1)
        live = amax > 0
        assert live.sum() >= n * 8 - 8
        assert ((amax[live] >= 2 ** 13) & (amax[live] < 2 ** 14)).all()
        assert (shift[~live] == 0).all()
        # Undo the shifts: the float32 partials, to float16 rounding.
        _, mid32, _ = case.run(impl, q, k, v, 0.2)
        torch.testing.assert_close(part * torch.exp2(shift)[..., None], mid32[:n],
                                   rtol=2e-3, atol=1e-30)


def test_two_phases_in_one_launch_equal_separate_launches():
    # One stage-1 launch over both phases writes the same partials as one launch each
    # (bit for bit with the same warp count; with each launch's own default warps -
    # the small tiles alone run on fewer - to rounding).
    g = torch.Generator().manual_seed(14)
    perm = torch.randperm(120, generator=g, device="cpu").tolist()
    vnodes = [(list(range(4)), perm[:50]), (list(range(4)), perm[50:75])]
    start = 75
    for r, n in enumerate((12, 3, 20, 10)):
        vnodes.append(([r], perm[start:start + n]))
        start += n
    case = Case(vnodes, 4, phases=[(0, 2, 32), (2, 4, 16)])
    q, k, v = make_qkv(4, 120, 8, 1, 32, torch.float16, seed=15)
    ix = case.index
    rows = case.num_mid_rows
    outs = []
    for grouped, warps in ((True, 4), (False, 4), (False, None)):
        mid_o = torch.full((rows, 8, 32), float("nan"))
        mid_lse = torch.full((rows, 8), float("nan"))
        launches = [case.phases] if grouped else [[ph] for ph in case.phases]
        for phs in launches:
            tree_decode_stage1(q, k, v, mid_o, mid_lse, ix["kv_indices"], ix["vnode_kv_start"],
                               ix["vnode_kv_len"], ix["vnode_q_start"], ix["vnode_q_len"],
                               ix["mid_q_rows"], phs, 0.25, num_warps=warps)
        assert not torch.isnan(mid_o).any() and not torch.isnan(mid_lse).any()
        outs.append((mid_o, mid_lse))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[2][0], outs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[2][1], outs[0][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_direct_mode_single_partial_requests(impl):
    # Requests 0 and 3 have one partial each (written by stage 1 directly), request 1
    # has two, request 2 none (zeros, from stage 2). Two phases in one launch.
    vnodes = [([1, 3], list(range(0, 40))), ([1], list(range(40, 47))), ([0], list(range(50, 90)))]
    case = Case(vnodes, 4, phases=[(0, 1, 32), (1, 2, 16)])
    assert case.index["req_mid_len"].tolist() == [1, 2, 0, 1]
    q, k, v = make_qkv(4, 90, 8, 2, 32, torch.float16, seed=16)
    o, mid_o, mid_lse = case.run(impl, q, k, v, 0.2, direct=True)
    ref = reference_decode(q, k, v, case.request_slots, 0.2)
    assert not torch.isnan(o).any()
    assert torch.count_nonzero(o[2]) == 0
    assert rel_err(o, ref) <= TOL[torch.float16]
    plain, _, _ = case.run(impl, q, k, v, 0.2)
    assert rel_err(o, plain.float()) <= 1e-3
    if impl == "triton":
        # The single-partial rows never went through the mid buffers.
        rows = [j for j, r in enumerate([1, 3, 1, 0]) if r in (0, 3)]
        assert torch.isnan(mid_o[rows]).all() and torch.isnan(mid_lse[rows]).all()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_direct_mode_without_stage2(impl):
    # Every request has exactly one partial: stage 1 alone writes every output.
    vnodes = [([0, 2], list(range(0, 25))), ([1], list(range(25, 60))), ([3], [61, 65, 70])]
    case = Case(vnodes, 4)
    assert case.index["req_mid_len"].tolist() == [1, 1, 1, 1]
    q, k, v = make_qkv(4, 80, 4, 4, 64, torch.float32, seed=17)
    o, _, _ = case.run(impl, q, k, v, 0.125, direct=True, needs_stage2=False)
    ref = reference_decode(q, k, v, case.request_slots, 0.125)
    assert not torch.isnan(o).any()
    assert rel_err(o, ref) <= TOL[torch.float32]



@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=lambda d: DTYPE_IDS[d])
def test_finish_merges_in_the_last_phase(impl, dtype):
    # Phase 0: two shared vnodes (one empty). Phase 1: one vnode per request, request 2
    # alone there (its only partial), request 4 with an empty last vnode, and request 0's
    # row listed last in its mid rows (its merge order differs from stage 2's). No
    # stage 2: the last phase's programs merge and write every output.
    vnodes = [([0, 1, 3, 4], list(range(0, 45))), ([1, 3], []),
              ([1], list(range(45, 52))), ([3], list(range(52, 90))), ([2], list(range(90, 97))),
              ([4], []), ([0], [97, 99, 101])]
    case = Case(vnodes, 5, phases=[(0, 2, 32), (2, 5, 16)], shuffle_req_rows=True,
                generator=torch.Generator().manual_seed(3))
    assert case.index["req_mid_len"].tolist() == [2, 3, 1, 3, 2]
    q, k, v = make_qkv(5, 110, 8, 2, 64, dtype, seed=21)
    mid_dtype = torch.float32 if dtype != torch.float16 else torch.float16
    o, mid_o, mid_lse = case.run(impl, q, k, v, 0.2, mid_dtype=mid_dtype, finish=True)
    ref = reference_decode(q, k, v, case.request_slots, 0.2)
    assert not torch.isnan(o).any()
    assert rel_err(o, ref) <= TOL[dtype]
    plain, _, _ = case.run(impl, q, k, v, 0.2, mid_dtype=mid_dtype)
    assert rel_err(o, plain.float()) <= TOL[dtype]
    if impl == "triton":
        # The last phase's partials never went through the mid buffers; phase 0's did.
        assert case.num_mid_rows == 6 + 5
        assert torch.isnan(mid_lse[6:]).all()
        assert not torch.isnan(mid_lse[:6]).any()


def test_finish_needs_two_phases():
    vnodes = [([0, 1], list(range(0, 20))), ([0], [20, 21]), ([1], [22])]
    one = Case(vnodes, 2)
    q, k, v = make_qkv(2, 30, 4, 4, 32, torch.float32, seed=22)
    with pytest.raises(ValueError, match="finish needs two phases, got 1"):
        one.run("triton", q, k, v, 0.2, finish=True)
    # Finishing runs the two phases as two launches even where they would be merged.
    two = Case(vnodes, 2, phases=[(0, 1, 32), (1, 2, 16)])
    o, _, _ = two.run("triton", q, k, v, 0.2, finish=True)
    ref = reference_decode(q, k, v, two.request_slots, 0.2)
    assert rel_err(o, ref) <= TOL[torch.float32]

def test_merge_phases_rule():
    from kernels.tree_decode import MERGE_MAX_PROGRAMS, merge_phases

    small = [Phase(0, 10, 16, 32), Phase(10, 100, 4, 32)]
    assert merge_phases(small, group=4, num_kv_heads=8)  # 800 second-phase programs
    limit = MERGE_MAX_PROGRAMS // 8
    assert merge_phases([Phase(0, 3, 16, 32), Phase(3, limit, 4, 32)], 4, 8)
    assert not merge_phases([Phase(0, 3, 16, 32), Phase(3, limit + 1, 4, 32)], 4, 8)
    assert not merge_phases([Phase(0, 10, 16, 32)], 4, 8)  # one phase: nothing to merge
    assert not merge_phases([Phase(0, 10, 16, 32), Phase(11, 5, 4, 32)], 4, 8)  # gap
    # An empty phase does not count.
    assert not merge_phases([Phase(0, 10, 16, 32), Phase(10, 0, 4, 32)], 4, 8)


def test_one_launch_rejects_non_adjacent_phases():
    case, num_slots = shared_prefix_case()
    q, k, v = make_qkv(3, num_slots, 4, 2, 16, torch.float16)
    ix = case.index
    mid_o = torch.empty(case.num_mid_rows, 4, 16)
    mid_lse = torch.empty(case.num_mid_rows, 4)
    with pytest.raises(ValueError, match=r"phases of one launch must be adjacent"):
        tree_decode_stage1(q, k, v, mid_o, mid_lse, ix["kv_indices"], ix["vnode_kv_start"],
                           ix["vnode_kv_len"], ix["vnode_q_start"], ix["vnode_q_len"],
                           ix["mid_q_rows"], [Phase(0, 1, 3, 16), Phase(2, 2, 1, 16)], 0.25)


# ------------------------------------------------------------------ launch checks


def test_block_sizes():
    assert stage1_block_sizes(1, 16, 1, 16) == (16, 16, 16)
    assert stage1_block_sizes(8, 16, 16, 128) == (128, 16, 128)
    assert stage1_block_sizes(3, 100, 7, 48) == (32, 128, 64)
    # Wide heads: a K and a V tile of fp16 stay within 64 KiB.
    assert stage1_block_sizes(1, 256, 1, 256) == (16, 64, 256)


def _small_args():
    case, num_slots = shared_prefix_case()
    q, k, v = make_qkv(3, num_slots, 2, 1, 16, torch.float16)
    o = torch.empty_like(q)
    mid_o = torch.empty(case.num_mid_rows, 2, 16)
    mid_lse = torch.empty(case.num_mid_rows, 2)
    return case, q, k, v, o, mid_o, mid_lse


def test_rejects_wide_q_tile():
    # q_tile 16 x group 16 = 256 rows > 128.
    case, q, k, v, o, mid_o, mid_lse = _small_args()
    q = q.repeat_interleave(8, dim=1)  # 16 heads on 1 kv head
    o = torch.empty_like(q)
    mid_o = torch.empty(case.num_mid_rows, 16, 16)
    mid_lse = torch.empty(case.num_mid_rows, 16)
    with pytest.raises(ValueError, match=r"q_tile 16 x group 16 = 256 rows exceeds 128"):
        tree_decode(q, k, v, o, mid_o=mid_o, mid_lse=mid_lse, phases=[Phase(0, 4, 16, 16)],
                    sm_scale=0.25, **case.index)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(kv_indices=a["kv_indices"].long()), r"kv_indices must be int32"),
        (lambda a: a.update(k=a["k"].float()), r"k has dtype torch.float32, q has torch.float16"),
        (lambda a: a.update(o=a["o"][:2]), r"o has shape \(2, 2, 16\), expected q's \(3, 2, 16\)"),
        (lambda a: a.update(v=a["v"][:10]), r"k has shape .* but v has"),
        (lambda a: a.update(mid_o=a["mid_o"].bfloat16()),
         r"mid_o must be float32 or q's dtype torch.float16 \(or float16 for bfloat16 q; "
         r"got torch.bfloat16\)"),
        (lambda a: a.update(k=a["k"][..., :8].contiguous(), v=a["v"][..., :8].contiguous()),
         r"k has head_dim 8, q has 16"),
        # bfloat16 inputs with float16 partials need the shifts' columns too.
        (lambda a: a.update(**{n: a[n].bfloat16() for n in "qkvo"}, mid_o=a["mid_o"].half()),
         r"mid_lse has shape \(6, 2\), expected \[rows, 4\] for torch.float16 partials of "
         r"torch.bfloat16 inputs \(log-sum-exps then shifts"),
        (lambda a: a.update(mid_lse=a["mid_lse"][:, :1]),
         r"mid_lse has shape \(6, 1\), expected \[rows, 2\] for torch.float32 partials"),
    ],
    ids=["index-dtype", "kv-dtype", "o-shape", "v-rows", "mid-dtype", "head-dim",
         "scaled-stats", "stats-shape"],
)
def test_argument_checks(mutate, message):
    case, q, k, v, o, mid_o, mid_lse = _small_args()
    args = dict(q=q, k=k, v=v, o=o, mid_o=mid_o, mid_lse=mid_lse, **case.index)
    mutate(args)
    with pytest.raises(ValueError, match=message):
        tree_decode(phases=case.phases, sm_scale=0.25, **args)


def test_stage_launches_check_the_stats_columns():
    # The stage functions alone refuse lse buffers without the shifts' columns where
    # the partials are scaled, before any launch.
    case, q, k, v, o, mid_o, mid_lse = _small_args()
    q, k, v, o = (t.bfloat16() for t in (q, k, v, o))
    ix = case.index
    with pytest.raises(ValueError, match=r"expected \[rows, 4\]"):
        tree_decode_stage1(q, k, v, mid_o.half(), mid_lse, ix["kv_indices"],
                           ix["vnode_kv_start"], ix["vnode_kv_len"], ix["vnode_q_start"],
                           ix["vnode_q_len"], ix["mid_q_rows"], case.phases, 0.25)
    with pytest.raises(ValueError, match=r"expected \[rows, 4\]"):
        tree_decode_stage2(mid_o.half(), mid_lse, o, ix["req_mid_start"], ix["req_mid_len"],
                           ix["req_mid_rows"])


@pytest.mark.parametrize("d", [40, 96])
def test_head_dim_not_a_power_of_two(d):
    # The padded head dimension (BLOCK_D > head_dim) takes the masked loads and stores.
    case, num_slots = shared_prefix_case()
    q, k, v = make_qkv(case.num_requests, num_slots, 4, 2, d, torch.float16, seed=d)
    o, mid_o, mid_lse = case.run("triton", q, k, v, 1 / math.sqrt(d))
    ref = reference_decode(q, k, v, case.request_slots, 1 / math.sqrt(d))
    check_output(case, o, mid_o, mid_lse, ref, torch.float16)


def test_64_bit_offsets_give_the_same_bits(monkeypatch):
    # K/V of more than 2**31 elements need 64-bit address arithmetic; force that path
    # (OFF32_LIMIT = 1) on a small case: same bits as the 32-bit path, with and
    # without the contiguity hint.
    import importlib

    td = importlib.import_module("kernels.tree_decode")
    case, num_slots = shared_prefix_case()
    q, k, v = make_qkv(case.num_requests, num_slots, 8, 2, 64, torch.float16, seed=3)
    slot0 = i32([0] + [-1] * (len(case.index["vnode_kv_len"]) - 1))
    assert td._offsets_fit_int32(k)
    outs = []
    for limit in (td.OFF32_LIMIT, 1):
        monkeypatch.setattr(td, "OFF32_LIMIT", limit)
        assert td._offsets_fit_int32(k) == (limit > 1)
        for hint in (None, slot0):
            outs.append(case.run("triton", q, k, v, 0.125, vnode_slot0=hint))
    ref = reference_decode(q, k, v, case.request_slots, 0.125)
    check_output(case, *outs[0], ref, torch.float16)
    for got in outs[1:]:
        for a, b in zip(got, outs[0]):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_register_cap_rule(monkeypatch):
    # Only a CUDA launch of one wide tile shape (>= 64 rows) on 4 warps is capped.
    import importlib

    td = importlib.import_module("kernels.tree_decode")
    wide, small = (64, 32, 128), (16, 32, 128)
    assert td._register_cap([wide], 4, "cuda") == td.WIDE_TILE_MAX_REGISTERS == 128
    assert td._register_cap([(128, 32, 128)], 4, "cuda") == 128
    assert td._register_cap([wide], 4, "cpu") is None
    assert td._register_cap([wide], 8, "cuda") is None
    assert td._register_cap([small], 4, "cuda") is None
    assert td._register_cap([(64, 32, 256)], 4, "cuda") is None
    assert td._register_cap([wide, small], 4, "cuda") is None
    monkeypatch.setattr(td, "WIDE_TILE_MAX_REGISTERS", None)
    assert td._register_cap([wide], 4, "cuda") is None


def test_default_launch_rule():
    # Small tiles (<= 16 rows): 2 warps without GQA, 1 with; wider tiles 4, 8 from 128.
    from kernels.tree_decode import default_launch

    assert default_launch(16, 32, 128) == (2, 2)
    assert default_launch(16, 32, 128, group=4) == (1, 2)
    assert default_launch(16, 32, 128, group=16) == (1, 2)
    assert default_launch(64, 32, 128, group=4) == (4, 2)
    assert default_launch(128, 32, 128) == (8, 2)
    # From head_dim 256, small GQA tiles run on 4 warps (SMALL_TILE_WIDE_HEAD_DIM); small
    # tiles without GQA and wider tiles keep their warps.
    assert default_launch(16, 32, 256, group=4) == (4, 2)
    assert default_launch(16, 32, 256, group=16) == (4, 2)
    assert default_launch(16, 32, 256) == (2, 2)
    assert default_launch(64, 32, 256, group=4) == (4, 2)
    assert default_launch(16, 32, 64, group=4) == (1, 2)


def _direct_launch_consts(td, hq, hk, num_vnodes, q_tile, finish):
    """The compile-time constants of a direct-mode stage-1 launch of one phase of
    ``num_vnodes`` vnodes (``q_tile`` queries, 32-token KV tiles, head dim 128), finishing
    or not, prepared from CPU tensors."""
    q, k, v = make_qkv(2, 8, hq, hk, 128, torch.float16)
    idx = torch.zeros(1024, dtype=torch.int32)
    ph = Phase(0, num_vnodes, q_tile, 32)
    launch = td._stage1_launcher(
        q, k, v, torch.zeros(4, hq, 128), torch.zeros(4, hq), idx, idx, idx, idx, idx, idx,
        ph, 0.1, o=torch.empty_like(q), req_mid_len=idx,
        finish=(idx, idx) if finish else None)
    return launch.kernels[0].consts


@pytest.mark.parametrize("hq,hk", [(16, 1), (32, 8), (8, 8)])
def test_few_program_finish_launch_warps(monkeypatch, hq, hk):
    # A finishing launch of at most FEW_FINISH_MAX_PROGRAMS programs (vnodes x KV heads)
    # runs on FEW_FINISH_WARPS warps; larger ones, launches that do not finish, and
    # launches with the rule off keep default_launch's warps (1 with GQA, 2 without).
    import importlib

    td = importlib.import_module("kernels.tree_decode")
    assert td.FEW_FINISH_MAX_PROGRAMS == 256 and td.FEW_FINISH_WARPS == 4
    small = 1 if hq // hk > 1 else 2

    def warps(num_vnodes, finish=True):
        return _direct_launch_consts(td, hq, hk, num_vnodes, 1, finish)["num_warps"]

    limit = td.FEW_FINISH_MAX_PROGRAMS // hk
    assert warps(limit) == 4
    assert warps(limit + 1) == small
    assert warps(limit, finish=False) == small
    monkeypatch.setattr(td, "FEW_FINISH_MAX_PROGRAMS", 0)
    assert warps(1) == small


def test_few_program_finish_launch_runs_without_the_register_cap(monkeypatch):
    # Wide tiles (64 rows: 16 queries x a GQA group of 4) on 4 warps get the register
    # cap on CUDA, except a finishing launch of at most FEW_FINISH_MAX_PROGRAMS programs
    # (the plan's last, at most two programs an SM), unless FEW_FINISH_REGISTER_CAP.
    import importlib

    td = importlib.import_module("kernels.tree_decode")
    assert td.FEW_FINISH_REGISTER_CAP is False and td.WIDE_TILE_MAX_REGISTERS == 128
    cap = td._register_cap
    monkeypatch.setattr(td, "_register_cap",  # as prepared for CUDA tensors
                        lambda shapes, warps, device_type, **kw: cap(shapes, warps, "cuda", **kw))
    hq, hk = 32, 8

    def consts(num_vnodes, finish=True):
        return _direct_launch_consts(td, hq, hk, num_vnodes, 16, finish)

    limit = td.FEW_FINISH_MAX_PROGRAMS // hk
    few = consts(limit)
    assert few["num_warps"] == 4 and few["BLOCK_M0"] == 64 and "maxnreg" not in few
    assert consts(limit + 1)["maxnreg"] == 128
    assert consts(limit, finish=False)["maxnreg"] == 128
    monkeypatch.setattr(td, "FEW_FINISH_REGISTER_CAP", True)
    assert consts(limit)["maxnreg"] == 128


def test_two_shape_launch_keeps_two_stages_at_head_dim_256():
    # The two tile shapes of a merged launch run in exclusive branches, so their buffers
    # share memory: the estimate is the larger shape's bytes, and at head_dim 256 the
    # merged launch of 64- and 16-row tiles keeps two pipeline stages (the sum, 168 KiB,
    # was over SMEM_BUDGET and cut it to one).
    import importlib

    td = importlib.import_module("kernels.tree_decode")
    big, small = (64, 32, 256), (16, 32, 256)
    assert td.stage1_shared_bytes({big, small}, 2, 2) == (64 * 256 + 2 * 2 * 32 * 256) * 2
    assert td.stage1_shared_bytes({small}, 2, 2) == (16 * 256 + 2 * 2 * 32 * 256) * 2
    assert td.stage1_shared_bytes({big, small}, 2, 2) <= td.SMEM_BUDGET
    hq = hk = 32
    q, k, v = make_qkv(2, 8, hq, hk, 256, torch.float16)
    idx = torch.zeros(1024, dtype=torch.int32)
    phases = (Phase(0, 2, 64, 32), Phase(2, 2, 16, 32))
    launch = td._stage1_launcher(q, k, v, torch.zeros(4, hq, 256), torch.zeros(4, hq), idx,
                                 idx, idx, idx, idx, idx, phases, 0.1)
    (kernel,) = launch.kernels
    c = kernel.consts
    assert c["TWO_SHAPES"] and (c["BLOCK_M0"], c["BLOCK_M1"]) == (64, 16)
    assert c["num_stages"] == 2


def _launch_set_layout(launch):
    """Every launch of a prepared set as plain values (tensors by identity)."""
    def one(kernel):
        args = [("tensor", id(a)) if isinstance(a, torch.Tensor) else a for a in kernel.args]
        return (kernel.fn, kernel.grid, args, kernel.consts, kernel.slots)

    stage1 = [(part.direct, part.parts, [one(kern) for kern in part.kernels])
              for part in launch.stage1]
    stage2 = None if launch.stage2 is None else one(launch.stage2)
    return launch.form, launch.shape, launch.overlap_device, stage1, stage2


@pytest.mark.parametrize("mode", ["plain", "direct", "finish", "split"])
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2)])
def test_resized_launch_set_equals_a_new_one(monkeypatch, mode, hq, hk):
    """A launch set resized for phases of the same form is, launch for launch, the set
    built for them (grids, vnode offsets and counts, every other argument and
    constant); phases of another form (other tiles, merged or not, another number of
    live phases, a finishing launch crossing the warps threshold) get None."""
    import importlib

    td = importlib.import_module("kernels.tree_decode")
    if mode == "split":  # two tile shapes that do not fit one kernel: one launch each
        monkeypatch.setattr(td, "SMEM_BUDGET", 1)
    q, k, v = make_qkv(3, 8, hq, hk, 64, torch.float16)
    idx = [torch.zeros(64, dtype=torch.int32) for _ in range(9)]
    mid_o, mid_lse = torch.zeros(64, hq, 64), torch.zeros(64, hq)
    modes = dict(direct=mode == "direct", finish=mode == "finish",
                 needs_stage2=mode != "direct")

    def build(phases):
        names = ("kv_indices", "vnode_kv_start", "vnode_kv_len", "vnode_q_start",
                 "vnode_q_len", "mid_q_rows", "req_mid_start", "req_mid_len", "req_mid_rows")
        return td.tree_decode_launcher(q, k, v, torch.empty_like(q), phases=phases,
                                       sm_scale=0.1, mid_o=mid_o, mid_lse=mid_lse,
                                       **dict(zip(names, idx)), **modes)

    def phases(n0, n1, tiles=((4, 32), (1, 16))):
        return [Phase(0, n0, *tiles[0]), Phase(n0, n1, *tiles[1])]

    limit = td.MERGE_MAX_PROGRAMS // hk
    few = td.FEW_FINISH_MAX_PROGRAMS // hk
    base = build(phases(3, 5))
    for ph in (phases(1, 16), phases(16, 1), phases(17, 33), phases(2, few)):
        resized = base.resized(ph)
        assert resized is not None
        assert _launch_set_layout(resized) == _launch_set_layout(build(ph)), ph
    # Resizing a resized set works the same.
    twice = base.resized(phases(9, 2)).resized(phases(5, 4))
    assert _launch_set_layout(twice) == _launch_set_layout(build(phases(5, 4)))
    assert base.resized(phases(3, 5, tiles=((4, 32), (2, 16)))) is None
    assert base.resized(phases(0, 7)) is None  # one live phase
    if mode == "finish":
        assert base.resized(phases(2, few + 1)) is None  # fewer warps past the threshold
    else:
        assert base.resized(phases(2, limit + 1)) is None  # no longer one launch
        big = build(phases(2, limit + 1))
        assert len(big.stage1) == 2
        resized = big.resized(phases(5, limit + 7))
        assert _launch_set_layout(resized) == _launch_set_layout(build(phases(5, limit + 7)))


def test_resized_kernel_launch_keeps_its_kernel_only_where_the_jit_would_not_tell():
    """A resized launch gets the new grid and values (the original is untouched) and
    keeps the compiled kernel and its direct path only where every replaced argument is
    a ``do_not_specialize`` integer and the old and new values are both 32-bit; the
    stage-1 kernel's size arguments are such parameters."""
    import importlib

    td = importlib.import_module("kernels.tree_decode")
    assert [td._stage1_kernel.arg_names[i] for i in td._STAGE1_SIZE_POS] == list(
        td.STAGE1_SIZE_ARGS)
    kernel = td._stage1_kernel
    if hasattr(kernel, "params"):  # the JIT (the interpreter's function has none)
        assert all(kernel.params[i].do_not_specialize for i in td._STAGE1_SIZE_POS)
        assert not kernel.params[kernel.arg_names.index("stride_qb")].do_not_specialize
    else:
        assert tuple(kernel.kwargs["do_not_specialize"]) == td.STAGE1_SIZE_ARGS

    class Param:
        def __init__(self, dns):
            self.do_not_specialize = dns

    class FakeJit:
        arg_names = ["A", "n", "m", "BLOCK"]
        params = [Param(False), Param(True), Param(False), Param(False)]

    compiled = object()
    launch = td._KernelLaunch(FakeJit(), (3, 2), (torch.zeros(2), 5, 7), dict(BLOCK=8),
                              slots=(0,))
    launch.compiled, launch.fast_args = compiled, [None, 5, 7, 8]
    launch.aligned, launch.all_aligned, launch.fast_calls = [True], True, 4
    launch.device, launch.driver = 0, ("device", "stream")
    kept = launch.resized(9, (1,), (16,))
    assert kept.grid == (9, 2, 1) and kept.args == [None, 16, 7]
    assert kept.fast_args == [None, 16, 7, 8] and kept.compiled is compiled
    assert kept.aligned == [True] and kept.all_aligned and kept.driver == ("device", "stream")
    assert kept.fast_calls == 0 and kept.consts == {"BLOCK": 8} and kept.slots == (0,)
    # Every field is set, and those not named above are the original's.
    for name in td._KernelLaunch.__slots__:
        if name not in ("grid", "args", "fast_args", "fast_calls"):
            assert getattr(kept, name) is getattr(launch, name), name
    assert launch.grid == (3, 2, 1) and launch.args == [None, 5, 7]
    assert launch.fast_args == [None, 5, 7, 8] and launch.fast_calls == 4
    for positions, values in (((1,), (2 ** 31,)), ((1,), (-2 ** 31 - 1,)), ((2,), (16,)),
                              ((1, 2), (16, 16)), ((1,), (True,))):
        dropped = launch.resized(9, positions, values)
        assert dropped.compiled is None and dropped.fast_args is None
        assert not dropped.all_aligned and dropped.aligned is None and dropped.driver is None
        assert [dropped.args[i] for i in positions] == list(values)
    # From a launch that has 64-bit values, a 32-bit one needs the JIT again.
    wide = launch.resized(9, (1,), (2 ** 40,))
    wide.compiled, wide.fast_args = compiled, [None, 2 ** 40, 7, 8]
    assert wide.resized(9, (1,), (16,)).compiled is None
    # Not yet compiled: nothing to keep.
    fresh = td._KernelLaunch(FakeJit(), (3,), (torch.zeros(2), 5, 7), dict(BLOCK=8), slots=(0,))
    assert fresh.resized(4, (1,), (6,)).compiled is None


def test_kernel_launch_binds_arguments_and_keeps_no_tensors():
    """A prepared launch puts the per-call tensors into their slots, passes the other
    arguments, constants and options through to the JIT, keeps none of the caller's
    tensors between calls, and (off CUDA) never takes the direct path."""
    import importlib

    td = importlib.import_module("kernels.tree_decode")
    calls = []

    class FakeJit:
        arg_names = ["A", "B", "n", "BLOCK"]

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append((grid, args, kwargs))
                return object()  # not a compiled kernel: no direct path
            return run

    b = torch.ones(2)
    launch = td._KernelLaunch(FakeJit(), (3,), (torch.zeros(2), b, 5),
                              dict(BLOCK=8, num_warps=2), slots=(0,))
    assert launch.args == [None, b, 5] and launch.tail == (8,)
    for value in (7.0, 9.0):
        x = torch.full((2,), value)
        launch(x)
        grid, args, kwargs = calls[-1]
        assert grid == (3, 1, 1) and args[0] is x and args[1] is b and args[2] == 5
        assert kwargs == dict(BLOCK=8, num_warps=2)
        assert launch.args[0] is None and launch.compiled is None
    assert launch.fast_calls == 0 and len(calls) == 2


def test_specialisation_key_is_at_least_as_fine_as_the_jit():
    """Prepared launches share a compiled kernel only under equal keys: the key tells
    apart what Triton's JIT specialises on (integers equal to 1, divisibility by 16,
    integer range, tensor dtype and 16-byte alignment, constants) and more."""
    import importlib

    td = importlib.import_module("kernels.tree_decode")
    fn, consts = object(), dict(BLOCK=16, num_warps=4)
    buf = torch.zeros(64)

    def key(*args, c=consts, f=fn):
        return td._specialisation(f, args, c, 0)

    base = key(buf, 1000, 2.0, None, True)
    assert base == key(torch.ones(8), 1000 + 16 * 7, -3.5, None, True)
    for other in (key(buf.double(), 1000, 2.0, None, True),   # dtype
                  key(buf[1:], 1000, 2.0, None, True),        # alignment
                  key(buf, 1, 2.0, None, True),               # equal to 1
                  key(buf, 1000 + 2 ** 31, 2.0, None, True),  # beyond int32
                  key(buf, 1024, 2.0, None, True),            # divisible by 16
                  key(buf, 1004, 2.0, None, True),            # divisible by 4 only
                  key(buf, 1000 + 2 ** 40, 2.0, None, True),  # int64
                  key(buf, 1000, 2.0, None, False),           # another flag
                  key(buf, 1000, 2.0, None, True, c=dict(consts, num_warps=8)),
                  key(buf, 1000, 2.0, None, True, f=object())):
        assert other != base
    assert key(buf, 16) != key(buf, 0)  # zero and one apart from others like them
    assert key(buf, 17) != key(buf, 1) and key(buf, 17) == key(buf, 33)
    assert key(buf, 2 ** 40) != key(buf, 2 ** 63)  # int64 apart from uint64
    assert key(buf, "text") is None  # an argument of another kind: no reuse


def test_launch_hooks_detected():
    """Direct launches step aside while Triton has a launch hook (a profiler)."""
    import importlib

    td = importlib.import_module("kernels.tree_decode")
    if td._knobs is None:
        pytest.skip("this Triton has no knobs module (every launch uses the JIT)")
    assert not td._hooks_active()
    chain = td._knobs.runtime.launch_enter_hook

    def hook(metadata):
        return None

    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            assert td._hooks_active()
        finally:
            chain.remove(hook)
    else:  # older Triton: a plain attribute
        td._knobs.runtime.launch_enter_hook = hook
        try:
            assert td._hooks_active()
        finally:
            td._knobs.runtime.launch_enter_hook = chain
    assert not td._hooks_active()


@pytest.mark.parametrize("direct, needs_stage2, finish, expected", [
    (False, True, False, True), (True, True, False, True), (True, False, False, False),
    (False, True, True, False), (True, False, True, False)])
def test_launch_set_has_a_stage2_launch_exactly_where_runs_stage2_says(
        direct, needs_stage2, finish, expected):
    # A plan's modes decide stage 2 in one place (runs_stage2, which the A/B module's
    # --stage2-only filter also reads): the prepared launches follow it.
    import importlib

    td = importlib.import_module("kernels.tree_decode")
    q, k, v = make_qkv(3, 8, 4, 2, 64, torch.float16)
    idx = [torch.zeros(64, dtype=torch.int32) for _ in range(9)]
    names = ("kv_indices", "vnode_kv_start", "vnode_kv_len", "vnode_q_start",
             "vnode_q_len", "mid_q_rows", "req_mid_start", "req_mid_len", "req_mid_rows")
    modes = dict(direct=direct, needs_stage2=needs_stage2, finish=finish)
    assert td.runs_stage2(**modes) is expected
    launch = td.tree_decode_launcher(
        q, k, v, torch.empty_like(q), phases=[Phase(0, 3, 4, 32), Phase(3, 5, 1, 16)],
        sm_scale=0.1, mid_o=torch.zeros(64, 4, 64), mid_lse=torch.zeros(64, 4),
        **dict(zip(names, idx)), **modes)
    assert (launch.stage2 is not None) is expected
