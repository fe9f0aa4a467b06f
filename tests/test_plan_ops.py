"""The device-side plan kernels (kernels.plan_ops): the run expansion of a contiguous
plan and the every-request tail step, checked against the host paths they replace.

Without a GPU they run in Triton's interpreter (conftest sets it), on a separate CPU
tensor that stands in for a device buffer.
"""

import numpy as np
import pytest
import torch

from kernels.backend import interpreter_enabled
from plan_helpers import NO_ADJUST, plan_input, stand_in_buffers
from kernels.plan_ops import (
    RUN_FIELDS,
    expand_runs,
    expand_runs_launcher,
    grow_tails_launcher,
    grow_tails_stack_launcher,
)
from kernels.kv_write import kv_write, kv_write_launcher, kv_write_ok
from treecache.plan import FastTreeParams, _expand_ranges, build_plan

needs_triton = pytest.mark.skipif(
    not (interpreter_enabled() or torch.cuda.is_available()),
    reason="needs a GPU or TRITON_INTERPRET=1")


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _run_table(buf, runs_off, starts, lens, dst=None, bits=None):
    dst = np.cumsum(lens) - lens if dst is None else dst
    bits = np.zeros_like(lens) if bits is None else bits
    table = np.stack([starts, dst, lens, bits], 1).reshape(-1).astype(np.int32)
    buf[runs_off] = starts.size
    buf[runs_off + 1:runs_off + 1 + table.size] = torch.from_numpy(table).to(buf.device)


@needs_triton
@pytest.mark.parametrize("source", ["buf", "src"])
@pytest.mark.parametrize("gather", [False, True], ids=["slots", "table"])
@pytest.mark.parametrize("seed", range(4))
def test_expand_runs_matches_host_expansion(seed, gather, source):
    # Random runs (some empty, some longer than a block), poisoned buffer: the kv region
    # gets the host expansion, nothing outside it changes; the prepared launcher and
    # the JIT call agree. With a slot table ("table") the runs are ranges of it, placed
    # with gaps between them, each with its row mask (bit 31 set on some). With
    # source "src" the tables are read from a separate (pinned host, on a GPU) buffer
    # laid out like ``buf``, whose first ``runs_off`` entries the launch copies to
    # ``buf``; nothing else of it reaches ``buf``.
    rng = np.random.default_rng(seed)
    dev = _device()
    n = int(rng.integers(1, 50))
    lens = rng.integers(0, 600, size=n)
    lens[rng.integers(0, n)] = 0
    if gather:
        table = rng.integers(-(1 << 30), 1 << 30, size=int(lens.sum()) + 50)
        starts = rng.integers(0, table.size - lens + 1)
        gaps = rng.integers(0, 9, size=n)
        dst = np.cumsum(lens + gaps) - lens
        bits = rng.integers(-(1 << 31), 1 << 31, size=n)
        size = int(dst[-1] + lens[-1])
        want = np.full(size, -3)
        want_mask = np.full(size, -3)
        for s, d, ln, m in zip(starts, dst, lens, bits):
            want[d:d + ln] = table[s:s + ln]
            want_mask[d:d + ln] = m
    else:
        starts = rng.integers(0, 1 << 24, size=n)
        dst = bits = None
        want = _expand_ranges(starts, lens)
        size = want.size
    copied = source == "src"
    runs_off = 1300 if copied else 7  # copied: five blocks and more before the table
    kv_off = runs_off + 1 + RUN_FIELDS * n
    mask_off = kv_off + size + 9 if gather else -1
    src_off = mask_off + size + 4 if gather else -1
    end = src_off + table.size + 3 if gather else kv_off + size + 9
    buf = torch.full((end,), -3, dtype=torch.int32, device=dev)
    tables = buf
    if copied:
        tables = torch.full((end,), -5, dtype=torch.int32,
                            pin_memory=dev.type == "cuda")
        tables[:runs_off] = torch.from_numpy(
            rng.integers(-(1 << 31), 1 << 31, size=runs_off).astype(np.int32))
    _run_table(tables, runs_off, starts, lens, dst, bits)
    if gather:
        tables[src_off:src_off + table.size] = torch.from_numpy(table.astype(np.int32))
    before = buf.clone()
    expect = before.cpu().numpy().copy()
    if copied:
        expect[:runs_off] = tables[:runs_off].numpy()
    launcher = expand_runs_launcher(buf, runs_off, kv_off, src_off, mask_off,
                                    src=tables if copied else None, n_copy=runs_off)
    for call in ("jit", "launcher", "launcher"):  # the launcher's first and later calls
        if call == "jit" and copied:
            continue  # the JIT form reads buf itself
        buf.copy_(before)
        if call == "jit":
            expand_runs(buf, runs_off, kv_off, n, src_off, mask_off)
        else:
            launcher(buf)
        got = buf.cpu().numpy()
        assert np.array_equal(got[kv_off:kv_off + size], want)
        assert np.array_equal(got[:kv_off], expect[:kv_off])
        rest = np.ones(got.size, dtype=bool)
        rest[:kv_off + size] = False
        if gather:
            assert np.array_equal(got[mask_off:mask_off + size], want_mask)
            rest[mask_off:mask_off + size] = False
        assert np.array_equal(got[rest], expect[rest])


@needs_triton
def test_grow_tails_kernel_writes_slots_lengths_and_positions():
    rng = np.random.default_rng(5)
    dev = _device()
    b = 300  # more than one block of 128
    pos = np.arange(b) * 5 + 3
    vnode = rng.permutation(b)
    start = pos - rng.integers(0, 3, size=b)
    tails = torch.from_numpy(np.concatenate([pos, vnode, start - 1, np.ones(b, np.int64)])
                             .astype(np.int32)).to(dev)
    buf = torch.full((5000,), -1, dtype=torch.int32, device=dev)
    step = grow_tails_launcher(buf, tails, 1000, 100, block=128)
    for k in range(3):
        slots = torch.from_numpy(rng.integers(0, 1 << 30, size=b)).to(dev)
        step(slots)
        got = buf.cpu().numpy()
        assert np.array_equal(got[1000 + pos + k], slots.cpu().numpy())
        assert np.array_equal(got[100 + vnode], pos + k + 1 - start)
        assert np.array_equal(tails[:b].cpu().numpy(), pos + k + 1)
    assert (buf[:100] == -1).all() and (buf[100 + b:1000] == -1).all()


@needs_triton
@pytest.mark.parametrize("masks", [False, True])
def test_grow_tails_kernel_interleaves_requests_sharing_a_range(masks):
    # Three requests share vnode 7's range (ranks 0-2 after its 10 entries at 50), one is
    # alone in vnode 2's (at 90, 4 entries): each step writes the shared range's slots
    # at 60 + 3 s + rank and one length (13, 16, ...) from all three, and the single
    # request's as before; with masks, each entry's row mask (region at 200) too.
    dev = _device()
    pos = np.array([60, 61, 62, 94])
    vnode = np.array([7, 7, 7, 2])
    base = np.array([50 - 3 + 0, 50 - 3 + 1, 50 - 3 + 2, 90 - 1])
    stride = np.array([3, 3, 3, 1])
    bits = np.array([1, 4, -(1 << 31), -1])
    rows = [pos, vnode, base, stride] + ([bits] if masks else [])
    tails = torch.from_numpy(np.concatenate(rows).astype(np.int32)).to(dev)
    buf = torch.full((400,), -1, dtype=torch.int32, device=dev)
    buf[200:].fill_(0)
    step = grow_tails_launcher(buf, tails, 100, 10, 200 if masks else -1, block=128)
    for k in range(4):
        slots = np.arange(4) + 1000 * (k + 1)
        step(torch.from_numpy(slots).to(dev))
        got = buf.cpu().numpy()
        assert np.array_equal(got[100 + pos + stride * k], slots)
        assert got[10 + 7] == 10 + 3 * (k + 1) and got[10 + 2] == 4 + k + 1
        assert np.array_equal(got[200 + pos + stride * k], bits if masks else [0] * 4)
    assert np.array_equal(tails[:4].cpu().numpy(), pos + 4 * stride)
    filled = (pos[:, None] + stride[:, None] * np.arange(4)).ravel()
    rest = np.ones(400, dtype=bool)
    rest[100 + filled] = False
    rest[[17, 12]] = False
    rest[200:] = False
    assert (buf.cpu().numpy()[rest] == -1).all()
    if masks:
        untouched = np.ones(200, dtype=bool)
        untouched[filled] = False
        assert (buf.cpu().numpy()[200:][untouched] == 0).all()


@needs_triton
@pytest.mark.parametrize("page_size", [1, 4])
def test_grow_tails_from_the_free_stack_matches_copied_slots(page_size):
    # The step that reads its slots from a free-stack mirror writes the same buffer and
    # positions as the step given those slots, and returns them; entries of the mirror
    # at and above ``top`` are never read (poisoned).
    rng = np.random.default_rng(7)
    dev = _device()
    b = 300
    pos = np.arange(b) * 5 + 3
    vnode = rng.permutation(b)
    start = pos - rng.integers(0, 3, size=b)
    tails0 = np.concatenate([pos, vnode, start - 1, np.ones(b, np.int64)]).astype(np.int32)
    bufs, tails = [], []
    for _ in range(2):
        bufs.append(torch.full((5000,), -1, dtype=torch.int32, device=dev))
        tails.append(torch.from_numpy(tails0.copy()).to(dev))
    copied = grow_tails_launcher(bufs[0], tails[0], 1000, 100, block=128)
    derived = grow_tails_stack_launcher(bufs[1], tails[1], 1000, 100, page_size, block=128)
    free = rng.permutation(4 * b).astype(np.int64)
    free_dev = torch.from_numpy(free).to(dev)
    top = free.size - 50
    free_dev[top:] = -9
    for k in range(3):
        want = free[top - 1 - np.arange(b)] * page_size
        out = torch.full((b,), -1, dtype=torch.int64, device=dev)
        derived(out, free_dev, top)
        copied(torch.from_numpy(want).to(dev))
        assert np.array_equal(out.cpu().numpy(), want)
        assert torch.equal(bufs[0], bufs[1]) and torch.equal(tails[0], tails[1])
        assert np.array_equal(bufs[1].cpu().numpy()[1000 + pos + k], want.astype(np.int32))
        top -= b


def _contiguous_input():
    return plan_input([-1, 0, 0, 1, 1, -1], [300, 17, 9, 40, 1, 260], [3, 4, 2, 5, 1])


def test_contiguous_plan_expanded_on_the_device_copy():
    # A contiguous plan's kv entries reach the device copy through the run table in the
    # same copy as the small regions (expanded by the kernel, or by torch where Triton
    # does not run), equal to the CPU plan's; the staging kv region stays untouched.
    inp = _contiguous_input()
    kw = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, params=FastTreeParams(), **NO_ADJUST)
    cpu = build_plan(inp, **kw)
    sb = stand_in_buffers(4, 16, kv_entries=4 * cpu.num_kv_entries, runs=64)
    sb.host.fill_(-7)
    plan = build_plan(inp, buffers=sb, **kw)
    assert plan.buffers.dev is not plan.buffers.host  # no reallocation
    n = plan.num_kv_entries
    assert plan.buffers.dev_view("kv_indices", n).tolist() == cpu.tensors()["kv_indices"][:n].tolist()
    assert set(plan.buffers.host_view("kv_indices", n).tolist()) == {-7}
    for name, m in (("vnode_kv_start", plan.num_vnodes), ("vnode_kv_len", plan.num_vnodes),
                    ("vnode_slot0", plan.num_vnodes), ("req_mid_rows", plan.num_mid_rows)):
        assert torch.equal(plan.tensors()[name][:m], cpu.tensors()[name][:m]), name
    # A run table larger than the capacity grows the buffers (a new generation).
    small = stand_in_buffers(4, 16, runs=1)
    grown = build_plan(inp, buffers=small, **kw)
    assert small.cap_runs >= 2 and grown.generation == small.generation
    assert grown.buffers.dev_view("kv_indices", n).tolist() == cpu.tensors()["kv_indices"][:n].tolist()


@pytest.mark.parametrize("leaves", [3, 9])
def test_every_request_step_on_the_device_copy_matches_the_cpu_plan(leaves):
    # The every-request append step with a separate device copy (one kernel from
    # device-resident tail positions under the interpreter) against the same steps on a
    # CPU plan: the device copy's kv entries and vnode lengths, the host mirrors and
    # the refusal at the headroom limit agree, also after single and subset appends
    # (which rebuild the device tail positions). A root with 3 or 9 leaves.
    seqlen = [40, 10, 10, 5, 7, 3, 8, 9, 4, 6][:leaves + 1]
    inp = plan_input([-1] + [0] * leaves, seqlen, list(range(1, leaves + 1)),
                     growable=[True] * leaves)
    kw = dict(num_qo_heads=2, num_kv_heads=1, head_dim=16, params=FastTreeParams(),
              headroom=6, **NO_ADJUST)
    cpu = build_plan(inp, **kw)
    dev = build_plan(inp, buffers=stand_in_buffers(2, 16), **kw)
    nxt = [sum(seqlen)]

    def new(n):
        out = np.arange(nxt[0], nxt[0] + n, dtype=np.int64)
        nxt[0] += n
        return out

    def same():
        for name, m in (("kv_indices", cpu.num_kv_entries), ("vnode_kv_len", cpu.num_vnodes)):
            want = cpu.tensors()[name][:m]
            got = dev.buffers.dev_view(name, m)
            if name == "kv_indices":  # entries past a vnode's length are never read
                lens = cpu.vnode_kv_len_host
                live = np.zeros(m, dtype=bool)
                for s, ln in zip(cpu.vnode_kv_start_host, lens):
                    live[s:s + ln] = True
                want, got = want[torch.from_numpy(live)], got[torch.from_numpy(live)]
            assert torch.equal(got, want), name
        assert np.array_equal(dev.vnode_kv_len_host, cpu.vnode_kv_len_host)

    for st in [None, None, ("one", 1, 2), None, ([0, 2],), None]:
        if st is None:
            sl = new(leaves)
            assert cpu.extend_tails(None, sl) and dev.extend_tails(None, sl)
            if interpreter_enabled():
                assert dev._tails.launch is not None  # the device step ran
        elif st[0] == "one":
            sl = new(st[2])
            assert cpu.extend_tail(st[1], sl) and dev.extend_tail(st[1], sl)
        else:
            sl = new(len(st[0]))
            assert cpu.extend_tails(np.array(st[0]), sl) and dev.extend_tails(np.array(st[0]), sl)
        same()
    # Request 1 has used its 6 entries: both refuse the every-request step, unchanged.
    before = dev.buffers.dev.clone()
    lens = dev.vnode_kv_len_host.copy()
    assert not cpu.extend_tails(None, np.arange(leaves))
    assert not dev.extend_tails(None, np.arange(leaves))
    assert torch.equal(dev.buffers.dev, before)
    assert np.array_equal(dev.vnode_kv_len_host, lens)
    sl = new(2)
    assert cpu.extend_tails(np.array([0, 2]), sl) and dev.extend_tails(np.array([0, 2]), sl)
    same()


@pytest.mark.skipif(not interpreter_enabled(), reason="a CPU stand-in for a device buffer "
                    "runs kernels in the interpreter only (the GPU cache tests cover CUDA)")
def test_every_request_step_from_the_free_stack_on_a_device_copy():
    # DecodePlan.send_tails_from_stack against extend_tails(None, slots) on twin plans
    # whose device copy is a separate (CPU) tensor: the same device buffer after each
    # step, the slots returned; an update that is not a device step is refused (None).
    inp = plan_input([-1, 0, 0, 0], [40, 10, 10, 5], [1, 2, 3], growable=[True] * 3)
    kw = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, params=FastTreeParams(),
              headroom=8, **NO_ADJUST)
    plans = [build_plan(inp, buffers=stand_in_buffers(4, 16, kv_entries=256), **kw) for _ in range(2)]
    assert all(p.buffers.dev is not p.buffers.host for p in plans)
    free = torch.arange(200, 100, -1, dtype=torch.int64)  # stack: next page is free[top - 1]
    top = 100
    for step in range(5):
        want = free[top - 1 - np.arange(3)].numpy() * 2
        assert plans[0].extend_tails(None, want)
        upd = plans[1].prepare_tails(None, want)
        got = plans[1].send_tails_from_stack(upd, free, top, 2)
        assert got.tolist() == want.tolist()
        assert torch.equal(plans[0].buffers.dev, plans[1].buffers.dev), step
        top -= 3
    upd = plans[1].prepare_tails(np.array([0]), np.array([5]))
    assert plans[1].send_tails_from_stack(upd, free, top, 2) is None



@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads, dim", [(1, 16), (3, 16), (16, 128)])
@pytest.mark.parametrize("call", ["jit", "launcher"])
def test_kv_write_matches_index_copy(call, heads, dim, dtype):
    # Rows of 16, 48 (not a power of two) and 2,048 elements (two steps of the block);
    # k is a view of a [n, 2, heads, dim] tensor (row stride 2 * heads * dim, as when cut
    # from a fused projection), v a tensor of its own; every other slot keeps its value.
    dev = _device()
    gen = torch.Generator().manual_seed(heads * dim)
    slots_total = 64
    k_pool = torch.randn(slots_total, heads, dim, generator=gen).to(dev, dtype)
    v_pool = torch.randn(slots_total, heads, dim, generator=gen).to(dev, dtype)
    want_k, want_v = k_pool.clone(), v_pool.clone()
    launch = None
    for n in (7, 3):  # the launcher is resized for the second size
        k = torch.randn(n, 2, heads, dim, generator=gen).to(dev, dtype)[:, 1]
        v = torch.randn(n, heads, dim, generator=gen).to(dev, dtype)
        assert kv_write_ok(k, v)
        slots = torch.randperm(slots_total, generator=gen)[:n].to(dev)
        want_k.index_copy_(0, slots, k)
        want_v.index_copy_(0, slots, v)
        if call == "jit":
            kv_write(k_pool, v_pool, slots, k, v)
        else:
            launch = (kv_write_launcher(n, heads * dim, k.stride(0), v.stride(0))
                      if launch is None else launch.resized(n, (), ()))
            assert launch.grid[0] == n
            launch(k_pool, v_pool, slots, k, v)
        assert torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)


def test_kv_write_ok_needs_contiguous_rows():
    t = torch.zeros(5, 4, 16)
    assert kv_write_ok(t, t)
    assert kv_write_ok(t[:, :, :8].contiguous(), t[:, :, :8].contiguous())
    assert not kv_write_ok(t[:, :, ::2], t[:, :, ::2])  # strided elements
    swapped = torch.zeros(5, 16, 4).transpose(1, 2)  # heads not major
    assert not kv_write_ok(t, swapped)
    one_head = torch.zeros(5, 3, 16)[:, 1:2]  # one head: its stride does not matter
    assert kv_write_ok(one_head, one_head)
    with pytest.raises(ValueError, match="n must be >= 1"):
        kv_write_launcher(0, 64, 64, 64)


def test_staged_slot_table_only_for_buffers_off_the_cpu():
    # CPU buffers read a plan's slot table in place: there is no staging region to
    # hand out, and the buffers do not grow one.
    from treecache.plan import PlanBuffers

    bufs = PlanBuffers(4, 64, "cpu")
    assert bufs.staged_slot_table(100) is None
    assert bufs.cap_slots == 0
