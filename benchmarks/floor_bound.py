"""How fast each case could be at best on the measured machine, and what that leaves of
the speed targets (no GPU needed: it reads result files).

``python -m benchmarks.floor_bound [--kernel FILE] [--read-floor FILE] [--launch FILE]
[--rate TFLOPS]`` takes, per case of a kernel-benchmark result (``python -m
benchmarks.kernel``), the larger of two lower bounds on a decode call's time:

* reading the case's roofline bytes: the time a plain streaming read of that many bytes
  took under the same timing, from ``python -m benchmarks.read_floor_probe`` (interpolated
  between its sizes on a log scale; below its smallest size, linear down to an empty
  kernel's launch from ``python -m benchmarks.launch``; above its largest, at its
  largest size's bandwidth);
* the attention arithmetic at ``--rate`` TFLOP/s: by default 553, the rate of the
  fastest dense attention kernel measured on the same H100 (cuDNN through torch's
  scaled-dot-product attention on the root of ``1,1024 2048,32`` 32/8, v15 probe).

A case's eager bound is ``seed / floor``: no kernel that reads every unique byte once and
computes at most that fast can beat it. Their geometric mean bounds target 1; a case of
target 2 whose floor is above 1.25x its roofline, or of target 3 whose graph floor is
above 10 us, cannot meet that target. The bounds are generous (they overlap the reads
with the arithmetic completely and charge nothing for partials, merges or launches after
the first), so a target they leave open is not shown out of reach.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .kernel import (TARGET1_SPEEDUP, TARGET2_MIN_ROOFLINE_US, TARGET2_RATIO,
                     TARGET3_MAX_ROOFLINE_US, TARGET3_US, _geomean, case_gflop)

RESULTS = Path(__file__).resolve().parent / "results"
KERNEL_JSON = RESULTS / "h100_kernel_v23.json"
READ_FLOOR_JSON = RESULTS / "h100_v17_read_floor_probe.json"
LAUNCH_JSON = RESULTS / "h100_v14_launch_floor.json"
#: TFLOP/s of the fastest dense attention measured on the H100 (cuDNN, v15 probe).
BEST_ATTENTION_TFLOPS = 553.0


def read_floor_us(nbytes: float, ladder: list[tuple[float, float]], empty_us: float) -> float:
    """Microseconds to read ``nbytes`` from the measured ``ladder`` of ``(bytes, us)``
    (sorted by bytes): log-log interpolation between its sizes; below the smallest,
    linear from ``empty_us`` at 0 bytes; above the largest, at its bandwidth."""
    if nbytes <= 0:
        return empty_us
    b0, t0 = ladder[0]
    if nbytes <= b0:
        return empty_us + (t0 - empty_us) * nbytes / b0
    for (b1, t1), (b2, t2) in zip(ladder, ladder[1:]):
        if nbytes <= b2:
            f = (math.log(nbytes) - math.log(b1)) / (math.log(b2) - math.log(b1))
            return math.exp(math.log(t1) + f * (math.log(t2) - math.log(t1)))
    bn, tn = ladder[-1]
    return tn * nbytes / bn


def _ladder(probe: dict, column: str) -> list[tuple[float, float]]:
    return sorted((r["bytes"], r[column]) for r in probe["rows"] if r["kind"] == "ladder")


def _empty_kernel(launch: dict) -> dict:
    for r in launch["results"]:
        if r["what"].startswith("1 empty kernel"):
            return r
    raise ValueError("the launch result has no '1 empty kernel' row")


def case_bounds(kernel: dict, probe: dict, launch: dict,
                rate_tflops: float = BEST_ATTENTION_TFLOPS) -> list[dict]:
    """Per case of ``kernel['results']``: the eager and graph floors (us), which bound
    sets each, and the seed's and our times over the eager floor."""
    eager_ladder, graph_ladder = _ladder(probe, "do_bench_us"), _ladder(probe, "graph_us")
    empty = _empty_kernel(launch)
    bw = probe["copy_bw"]
    out = []
    for r in kernel["results"]:
        nbytes = r["roofline_us"] * 1e-6 * bw
        compute = case_gflop(r) * 1e9 / (rate_tflops * 1e12) * 1e6
        read_e = read_floor_us(nbytes, eager_ladder, empty["eager_us"])
        read_g = read_floor_us(nbytes, graph_ladder, empty["graph_us"])
        eager, graph = max(read_e, compute), max(read_g, compute)
        seed = r.get("seed_us")
        out.append(dict(
            case=r["case"], hq=r["hq"], hk=r["hk"], roofline_us=r["roofline_us"],
            read_eager_us=read_e, read_graph_us=read_g, compute_us=compute,
            eager_floor_us=eager, graph_floor_us=graph,
            eager_bound="compute" if compute > read_e else "read",
            graph_bound="compute" if compute > read_g else "read",
            seed_us=seed, ours_us=r["ours_us"], ours_graph_us=r["ours_graph_us"],
            seed_over_floor=seed / eager if seed else None,
            ours_over_floor=r["ours_us"] / eager))
    return out


def summary(bounds: list[dict]) -> list[str]:
    """One line per target: what the floors allow."""
    seeded = [b for b in bounds if b["seed_us"]]
    t1 = _geomean([b["seed_over_floor"] for b in seeded])
    ours = _geomean([b["seed_us"] / b["ours_us"] for b in seeded])
    t2 = [b for b in seeded if b["roofline_us"] >= TARGET2_MIN_ROOFLINE_US]
    t2_out = [b for b in t2 if b["eager_floor_us"] > TARGET2_RATIO * b["roofline_us"]]
    t3 = [b for b in seeded if b["roofline_us"] < TARGET3_MAX_ROOFLINE_US]
    t3_out = [b for b in t3 if b["graph_floor_us"] > TARGET3_US]
    worst2 = max((b["eager_floor_us"] / b["roofline_us"] for b in t2), default=float("nan"))
    return [
        f"target 1 bound: geomean seed / floor = {t1:.2f}x over {len(seeded)} cases "
        f"(target {TARGET1_SPEEDUP}x; measured {ours:.2f}x)",
        f"target 2 bound: worst floor / roofline = {worst2:.2f} on {len(t2)} cases "
        f"(target {TARGET2_RATIO}); floor over the target on {len(t2_out)}",
        f"target 3 bound: graph floor over {TARGET3_US:g} us on {len(t3_out)} of {len(t3)} "
        "cases" + "".join(f"; {b['case']} {b['hq']}/{b['hk']}: {b['graph_floor_us']:.1f} us "
                          f"({b['graph_bound']})" for b in t3_out),
    ]


def markdown(bounds: list[dict]) -> str:
    lines = ["| case | Hq/Hk | roofline us | read floor us | compute floor us | eager floor us "
             "| seed us | ours us | seed / floor | ours / floor |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in bounds:
        seed = f"{b['seed_us']:.1f}" if b["seed_us"] else "-"
        ratio = f"{b['seed_over_floor']:.2f}x" if b["seed_us"] else "-"
        lines.append(
            f"| `{b['case']}` | {b['hq']}/{b['hk']} | {b['roofline_us']:.1f} | "
            f"{b['read_eager_us']:.1f} | {b['compute_us']:.1f} | {b['eager_floor_us']:.1f} | "
            f"{seed} | {b['ours_us']:.1f} | {ratio} | {b['ours_over_floor']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", default=str(KERNEL_JSON), help="kernel benchmark JSON")
    ap.add_argument("--read-floor", default=str(READ_FLOOR_JSON), help="read-floor probe JSON")
    ap.add_argument("--launch", default=str(LAUNCH_JSON), help="launch-floor JSON")
    ap.add_argument("--rate", type=float, default=BEST_ATTENTION_TFLOPS,
                    help="attention TFLOP/s of the compute floor")
    ap.add_argument("--table", action="store_true", help="print the per-case table too")
    args = ap.parse_args(argv)
    loaded = []
    for flag, path in (("--kernel", args.kernel), ("--read-floor", args.read_floor),
                       ("--launch", args.launch)):
        try:
            loaded.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            ap.error(f"{flag}: cannot read a JSON result from {path!r} ({e})")
    bounds = case_bounds(*loaded, rate_tflops=args.rate)
    if args.table:
        print(markdown(bounds))
    lines = summary(bounds)
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    main()
