"""What one CUDA call costs the host, alone and after other host work (CUDA only).

``python -m benchmarks.driver_call_probe [--out FILE]`` times, on the host
(``time.perf_counter``, the device synchronised before each call), the calls a plan's
upload makes: a non-blocking copy of 48 KB from pinned memory to the device, a prepared
launch of the run expansion (``kernels.plan_ops.expand_runs_launcher``), the same launch
reading the pinned buffer in place and copying 12,000 entries of it (one launch instead
of the copy and the launch, ``treecache.plan.ZERO_COPY_UPLOAD``), and an event record;
each one after nothing else (``hot``) and after touching a 64 MB host array
(``cold``), as a re-plan's numpy work comes before its upload. Medians of 200 calls.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from kernels.plan_ops import expand_runs_launcher

from .probe_common import probe_main, write_rows

ENTRIES = 12_000  # int32 entries copied: about a beam step's plan upload
RUNS = 50  # runs of 100 slots in the expansion's table
TOUCH_MB = 64
CALLS = 200


def _median_us(fn, touch: np.ndarray | None) -> float:
    times = []
    for _ in range(CALLS):
        torch.cuda.synchronize()
        if touch is not None:
            touch[::7] += 1.0
            touch.sum()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def run(out_path=None) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.driver_call_probe needs a CUDA GPU")
    dev = torch.device("cuda")
    n = 1 << 18
    host = torch.zeros(n, dtype=torch.int32, pin_memory=True)
    buf = torch.zeros(n, dtype=torch.int32, device=dev)
    runs_off, kv_off = ENTRIES, 2 * ENTRIES
    table = np.array([(i * 100, i * 100, 100, 0) for i in range(RUNS)], dtype=np.int32)
    host[runs_off] = RUNS
    host[runs_off + 1:runs_off + 1 + table.size] = torch.from_numpy(table.reshape(-1))
    buf.copy_(host)
    expand = expand_runs_launcher(buf, runs_off, kv_off)
    in_place = expand_runs_launcher(buf, runs_off, kv_off, src=host, n_copy=ENTRIES)
    for launch in (expand, in_place):  # compile; later calls take the direct path
        launch(buf)
        launch(buf)
    torch.cuda.synchronize()
    want = np.arange(RUNS * 100)
    assert np.array_equal(buf[kv_off:kv_off + want.size].cpu().numpy(), want)
    event = torch.cuda.Event()
    stream = torch.cuda.current_stream()
    src, dst = host[:ENTRIES], buf[:ENTRIES]
    calls = {
        "copy 48 KB pinned -> device": lambda: dst.copy_(src, non_blocking=True),
        "expansion launch": lambda: expand(buf),
        "copy, then expansion launch": lambda: (dst.copy_(src, non_blocking=True),
                                                expand(buf)),
        "expansion reading the pinned buffer in place": lambda: in_place(buf),
        "event record": lambda: event.record(stream),
    }
    touch = np.ones(TOUCH_MB * (1 << 20) // 8)
    rows = []
    for name, fn in calls.items():
        row = {"call": name, "hot_us": _median_us(fn, None), "cold_us": _median_us(fn, touch)}
        rows.append(row)
        print(f"{name:46s} hot {row['hot_us']:6.1f} us   after touching {TOUCH_MB} MB "
              f"{row['cold_us']:6.1f} us", flush=True)
    write_rows(out_path, rows, entries=ENTRIES, touch_mb=TOUCH_MB, calls=CALLS)
    return rows


def main(argv=None) -> None:
    probe_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
