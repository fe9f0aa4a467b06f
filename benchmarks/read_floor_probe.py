"""What a plain read of a case's bytes costs, timed as the benchmark times a decode call
(CUDA only).

``python -m benchmarks.read_floor_probe [--out FILE]`` reads a float16 buffer of N bytes
with a streaming kernel (each program loads one block and stores its sum; the fastest of
four block and warp shapes at each size) for N on a ladder from 4 MiB to 1 GiB and for the
roofline bytes of every case of target 2 (roofline >= 50 us). Each size is timed four ways,
and the first of them once more with evict-first loads (``do_bench_evict_first``):

* ``do_bench``: ``triton.testing.do_bench``'s median, as the benchmark times eager calls
  and as PERF.md timed the seed. Before each call it zeroes a 256 MB buffer, which leaves
  the L2 cache full of dirty lines that the next kernel's misses must write back.
* ``zero flush``: the same loop written out here (a check of the one above);
* ``read flush``: the same loop with the 256 MB buffer read instead of zeroed, so that
  the L2 cache holds clean lines of other data: cold, but nothing to write back;
* ``graph``: CUDA-graph replay, back to back (the L2 cache holds what the last call left).

The difference between the zero and read flushes is the write-back the benchmark's timing
adds to every call; a case whose plain read takes longer than 1.25x its roofline under
``do_bench`` cannot meet target 2 under that timing.
"""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl

from treecache import tree_stats

from .kernel import COPY_BW, TARGET2_MIN_ROOFLINE_US, TARGET2_RATIO, _graph_time, roofline_bytes
from .probe_common import probe_main, write_rows
from .suite import suite_cases

MB = 1 << 20
LADDER_MB = (4, 16, 32, 64, 128, 192, 256, 384, 512, 1024)
#: (elements a program reads, warps): the read kernel's shapes; each size keeps its fastest.
SHAPES = ((8192, 4), (8192, 8), (32768, 8), (65536, 16))
FLUSH_BYTES = 256 * MB  # the buffer triton.testing.do_bench clears before each call


@triton.jit
def _read_kernel(X, Out, n, BLOCK: tl.constexpr, EVICT: tl.constexpr = ""):
    i = tl.program_id(0)
    offs = i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0, eviction_policy=EVICT)
    tl.store(Out + i, tl.sum(x.to(tl.float32), axis=0))


def target2_cases() -> list[dict]:
    """Every benchmark case whose roofline is at least 50 us, with its bytes."""
    out = []
    for name, nodes, (hq, hk) in suite_cases():
        st = tree_stats(nodes)
        nbytes = roofline_bytes(st["unique_tokens"], st["num_requests"], hq, hk)
        roofline = nbytes / COPY_BW * 1e6
        if roofline >= TARGET2_MIN_ROOFLINE_US:
            out.append(dict(case=name, hq=hq, hk=hk, bytes=nbytes, roofline_us=roofline))
    return out


def _event_loop(fn, flush, reps: int = 100, spin_cycles: int = 0) -> float:
    """Median microseconds of ``fn`` over ``reps`` calls, ``flush()`` before each, timed
    with events around the call alone (``do_bench``'s loop). ``spin_cycles`` > 0: after
    each flush the GPU also spins that many clock cycles, touching no memory, so that
    the host has issued the timed launches before they are due."""
    fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush()
        if spin_cycles:
            torch.cuda._sleep(spin_cycles)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def _readers(buf: torch.Tensor, evict: str = ""):
    """One call per read shape, each reading all of ``buf`` (loads with the L2 eviction
    policy ``evict``)."""
    n = buf.numel()
    calls = []
    for block, warps in SHAPES:
        grid = triton.cdiv(n, block)
        sums = torch.empty(grid, device=buf.device)

        def call(block=block, warps=warps, grid=grid, sums=sums):
            _read_kernel[(grid,)](buf, sums, n, BLOCK=block, EVICT=evict, num_warps=warps)

        calls.append(call)
    return calls


def time_read(nbytes: int, dev, flush_buf: torch.Tensor, flush_read) -> dict:
    """The four times of a plain read of ``nbytes`` (the best read shape in each), and
    ``do_bench``'s with evict-first loads; ``flush_read()`` reads all of ``flush_buf``."""
    buf = torch.randn(nbytes // 2, device=dev, dtype=torch.float16)
    calls = _readers(buf)
    times = {"do_bench": [], "zero_flush": [], "read_flush": [], "graph": [],
             "do_bench_evict_first": []}
    for call, call_ef in zip(calls, _readers(buf, "evict_first")):
        times["do_bench_evict_first"].append(
            triton.testing.do_bench(call_ef, warmup=25, rep=100, return_mode="median") * 1e3)
        times["do_bench"].append(triton.testing.do_bench(call, warmup=25, rep=100,
                                                         return_mode="median") * 1e3)
        times["zero_flush"].append(_event_loop(call, flush_buf.zero_))
        times["read_flush"].append(_event_loop(call, flush_read))
        times["graph"].append(_graph_time(call, dev))
    row = {f"{k}_us": min(v) for k, v in times.items()}
    row["shape_do_bench"] = list(SHAPES[times["do_bench"].index(min(times["do_bench"]))])
    row["write_back_us"] = row["zero_flush_us"] - row["read_flush_us"]
    row.update({f"{k}_tb_s": nbytes / row[f"{k}_us"] / 1e6 for k in times})
    return row


def run(out_path=None) -> list[dict]:
    dev = torch.device("cuda")
    flush_buf = torch.empty(FLUSH_BYTES // 2, device=dev, dtype=torch.float16)
    flush_read = _readers(flush_buf)[2]  # made once: the same read before every call
    rows = []
    for mb in LADDER_MB:
        row = dict(kind="ladder", bytes=mb * MB,
                   **time_read(mb * MB, dev, flush_buf, flush_read))
        rows.append(row)
        print(f"read {mb} MiB: do_bench {row['do_bench_us']:.1f} us "
              f"({row['do_bench_tb_s']:.2f} TB/s), zero flush {row['zero_flush_us']:.1f}, "
              f"read flush {row['read_flush_us']:.1f} ({row['read_flush_tb_s']:.2f} TB/s), "
              f"graph {row['graph_us']:.1f} ({row['graph_tb_s']:.2f} TB/s), do_bench with "
              f"evict-first loads {row['do_bench_evict_first_us']:.1f}", flush=True)
    for case in target2_cases():
        row = dict(kind="target2", **case,
                   **time_read(case["bytes"], dev, flush_buf, flush_read))
        allowed = TARGET2_RATIO * case["roofline_us"]
        row["allowed_us"] = allowed
        row["do_bench_over_roofline"] = row["do_bench_us"] / case["roofline_us"]
        row["graph_over_roofline"] = row["graph_us"] / case["roofline_us"]
        rows.append(row)
        print(f"{case['case'][:40]} {case['hq']}/{case['hk']}: {case['bytes'] / 1e6:.0f} MB, "
              f"roofline {case['roofline_us']:.1f} us (1.25x {allowed:.1f}); plain read: "
              f"do_bench {row['do_bench_us']:.1f} us = {row['do_bench_over_roofline']:.2f}x, "
              f"read flush {row['read_flush_us']:.1f}, graph {row['graph_us']:.1f} us = "
              f"{row['graph_over_roofline']:.2f}x", flush=True)
    write_rows(out_path, rows, copy_bw=COPY_BW, flush_bytes=FLUSH_BYTES)
    return rows


def main(argv=None):
    probe_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
