"""Where an eager call's time over its replayed time goes (CUDA only).

``python -m benchmarks.warm_probe [--out FILE]`` builds the library's plan of each case
twice (A and B: the same tree, the same compiled kernels, separate inputs, index arrays
and partial buffers) and times, with the benchmark's flush before every timed region (a
256 MB buffer zeroed, as ``do_bench`` does):

* ``cold``: A alone (the benchmark's eager time: kernels, inputs and indices all out of
  the L2 cache, the cache full of the flush's dirty lines);
* ``kernels_warm``: B right after A, in the same timed region, less A alone: the same
  kernels have just run, B's data is as cold as A's was;
* ``data_warm``: A right after A, less A alone: kernels and data have just run;
* ``after_other``: B right after the same tree's plan at another head layout (other
  kernels, other data), less that plan alone: a control for ``kernels_warm`` (whether
  it takes the same kernels, or any call before);
* ``graph``: CUDA-graph replay, back to back (the benchmark's replayed time).

``cold - kernels_warm`` is what running kernels that have not run since the flush costs
(their code and whatever else a launch brings in); ``kernels_warm - data_warm`` what
fetching the call's data from memory (and writing back the dirty lines it displaces)
costs over finding it in L2. Each time is the median of five repeats (alternating between
the kinds of region) of a median over 100 timed regions. Before each region the GPU also
spins for ~50 us (touching no memory), so that the host has issued the region's launches
before it starts (a region of two calls takes the host longer than the flush alone).
"""

from __future__ import annotations

import statistics

import torch

from .kernel import _graph_time
from .probe_common import library_plan, probe_main, write_rows
from .read_floor_probe import FLUSH_BYTES, _event_loop as _flush_loop

#: GPU clock cycles the spin before each timed region lasts.
SPIN_CYCLES = 100_000
#: Repeats of each measurement (their median is kept).
REPEATS = 5


def _event_loop(fn, flush) -> float:
    """The read-floor probe's timing loop with a spin of :data:`SPIN_CYCLES` after
    each flush."""
    return _flush_loop(fn, flush, spin_cycles=SPIN_CYCLES)


#: (tree, query heads, KV heads): the target-3 cases but the one out of reach, and
#: larger trees of each head layout.
CASES = (
    ("1,2,64 8,256,32", 32, 8), ("1,2,64 8,256,32", 16, 1), ("1,4,256 8,256,32", 16, 1),
    ("1,4,8,256 8,256,256,32", 16, 1), ("1,256 256,32", 16, 1),
    ("1,16,64 1024,256,32", 16, 1), ("1,10 4000,400", 16, 1),
    ("1,4,256 8,256,32", 32, 8), ("1,4,256 8,256,32", 32, 32),
    ("1,8,16,32,64,128,1024 256,128,64,16,16,16,16", 32, 8),
    ("1,8,16,32,64,128,1024 256,128,64,16,16,16,16", 16, 1),
)


def time_case(spec: str, hq: int, hk: int, dev, flush: torch.Tensor) -> dict:
    """The times of one case (see the module docstring), in microseconds."""
    other = (16, 1) if (hq, hk) == (32, 8) else (32, 8)
    calls = []
    for heads in ((hq, hk), (hq, hk), other):
        q, k, v, _, plan = library_plan(spec, *heads, 128, dev)
        o = torch.full_like(q, float("nan"))
        calls.append(lambda plan=plan, q=q, k=k, v=v, o=o: plan.run(q, k, v, o, check=False))
        calls[-1]()
        assert not torch.isnan(o).any()
    a, b, x = calls
    times = {}
    for _ in range(REPEATS):
        t = dict(cold=_event_loop(a, flush.zero_),
                 a_then_b=_event_loop(lambda: (a(), b()), flush.zero_),
                 a_then_a=_event_loop(lambda: (a(), a()), flush.zero_),
                 x=_event_loop(x, flush.zero_),
                 x_then_b=_event_loop(lambda: (x(), b()), flush.zero_),
                 graph=_graph_time(a, dev))
        for key, val in t.items():
            times.setdefault(key, []).append(val)
    med = {key: statistics.median(vals) for key, vals in times.items()}
    row = dict(case=spec, hq=hq, hk=hk, cold_us=med["cold"], graph_us=med["graph"],
               kernels_warm_us=med["a_then_b"] - med["cold"],
               data_warm_us=med["a_then_a"] - med["cold"],
               after_other_us=med["x_then_b"] - med["x"], other_heads=list(other))
    row["kernels_part_us"] = row["cold_us"] - row["kernels_warm_us"]
    row["data_part_us"] = row["kernels_warm_us"] - row["data_warm_us"]
    return row


def run(out_path=None) -> list[dict]:
    dev = torch.device("cuda")
    flush = torch.empty(FLUSH_BYTES // 2, device=dev, dtype=torch.float16)
    rows = []
    for spec, hq, hk in CASES:
        row = time_case(spec, hq, hk, dev, flush)
        rows.append(row)
        print(f"{spec[:40]} {hq}/{hk}: cold {row['cold_us']:.1f} us, kernels warm "
              f"{row['kernels_warm_us']:.1f}, data warm too {row['data_warm_us']:.1f}, graph "
              f"{row['graph_us']:.1f}, after another layout's call {row['after_other_us']:.1f}; "
              f"kernels {row['kernels_part_us']:.1f} us, data {row['data_part_us']:.1f} us",
              flush=True)
    write_rows(out_path, rows, flush_bytes=FLUSH_BYTES)
    return rows


def main(argv=None):
    probe_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
