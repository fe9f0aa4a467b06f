"""The benchmark's summary lines and its CPU smoke run."""

import json
import math
import re

import pytest
import torch

from benchmarks.kernel import CALLS_PER_GRAPH, main, summarize


def _case(name, seed, ours, cached, graph, roofline, hq=32, hk=8, logical=1000, err=1e-4,
          many=None):
    return dict(case=name, hq=hq, hk=hk, seed_us=seed, ours_us=ours, ours_cached_us=cached,
                ours_graph_us=graph, ours_graph_many_us=many, roofline_us=roofline,
                logical_tokens=logical, rel_err=err)


def test_summary_lines_report_each_target():
    results = [
        _case("a", seed=100.0, ours=50.0, cached=40.0, graph=25.0, roofline=60.0),
        _case("b", seed=10.0, ours=20.0, cached=10.0, graph=5.0, roofline=2.0),
        _case("extra", seed=None, ours=30.0, cached=30.0, graph=30.0, roofline=20.0, err=3e-3),
    ]
    lines = summarize(results)
    text = "\n".join(lines)
    # Eager: speedups 2.0 and 0.5 -> geomean 1.0, one case slower than the seed.
    assert "target 1: geomean speedup over seed = 1.000x over 2 cases (>= 2.0); cases slower than seed: 1" in text
    # Graph-cached: 2.5 and 1.0 -> sqrt(2.5); replay: 4 and 2 -> sqrt(8).
    assert f"graph-cached call, timed like the seed): geomean speedup over seed = {math.sqrt(2.5):.3f}x" in text
    assert f"(CUDA-graph replay): geomean speedup over seed = {math.sqrt(8):.3f}x" in text
    # Target 2 only on case a (roofline >= 50): 50 / 60.
    assert "target 2: worst time/roofline on 1 cases with roofline >= 50 us = 0.83x" in text
    # Target 3 only on case b (roofline < 5): its graph time.
    assert "target 3: worst CUDA-graph time on 1 cases with roofline < 5 us = 5.0 us" in text
    # Target 5 over every case, the extra one included (it fails the bound).
    assert "target 5: max relative error = 3.00e-03 over 3 cases (<= 2e-3 fp16); failing: 1" in text
    # No calls-per-graph times: no such line.
    assert "calls per graph" not in text


def test_summary_reports_calls_per_graph_beside_target_3():
    results = [
        _case("b", seed=10.0, ours=20.0, cached=10.0, graph=11.0, roofline=2.0, many=3.5),
        _case("c", seed=10.0, ours=20.0, cached=10.0, graph=14.0, roofline=3.0, many=12.5),
        _case("big", seed=100.0, ours=50.0, cached=40.0, graph=25.0, roofline=60.0, many=1.0),
    ]
    text = "\n".join(summarize(results))
    # The target's line is still the one-call-per-graph time; the other line is beside it
    # and counts only the small cases.
    assert "target 3: worst CUDA-graph time on 2 cases with roofline < 5 us = 14.0 us" in text
    assert (f"  (not the target's measure) {CALLS_PER_GRAPH} calls per graph, as in a model's "
            "captured decode step: 3.5-12.5 us per call; within 10 us: 1 of 2") in text


def test_quick_run_writes_results(tmp_path):
    results = main(["--quick", "--out", str(tmp_path)])
    assert len(results) == 4
    for r in results:
        assert r["rel_err"] <= 2e-3 and math.isfinite(r["rel_err"])
        assert r["ours_us"] > 0 and r["roofline_us"] > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["case"] for r in data["results"]] == [r["case"] for r in results]
    assert "target 5: max relative error" in (tmp_path / "results.md").read_text()


def test_sharded_quick_runs_merge_into_one(tmp_path):
    # Two parts of a quick run hold every other case; merged, they are the whole run in
    # suite order, with its summary.
    whole = main(["--quick", "--out", str(tmp_path / "all")])
    parts = [main(["--quick", "--shard", f"{k}/2", "--out", str(tmp_path / f"p{k}")])
             for k in (1, 2)]
    keys = [(r["case"], r["hq"], r["hk"]) for r in whole]
    assert [(r["case"], r["hq"], r["hk"]) for r in parts[0]] == keys[0::2]
    assert [(r["case"], r["hq"], r["hk"]) for r in parts[1]] == keys[1::2]
    merged = main(["--merge", str(tmp_path / "p2"), str(tmp_path / "p1"),
                   "--out", str(tmp_path / "m")])
    assert [(r["case"], r["hq"], r["hk"]) for r in merged] == keys
    assert "target 5: max relative error" in (tmp_path / "m" / "results.md").read_text()
    # A part given twice, or parts of different devices, are refused.
    with pytest.raises(ValueError, match="more than one part"):
        main(["--merge", str(tmp_path / "p1"), str(tmp_path / "p1"), "--out",
              str(tmp_path / "x")])
    data = json.loads((tmp_path / "p2" / "results.json").read_text())
    (tmp_path / "p2" / "results.json").write_text(json.dumps(dict(data, device="other")))
    with pytest.raises(ValueError, match="different devices"):
        main(["--merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out",
              str(tmp_path / "x")])


def _stop_in_third_case(monkeypatch, module) -> None:
    """Make ``module.run_case`` raise KeyboardInterrupt on its third call (a run stopped
    by hand or by a time limit)."""
    real, calls = module.run_case, []

    def cut(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(module, "run_case", cut)


def test_a_run_stopped_early_keeps_its_cases_and_is_not_merged(tmp_path, monkeypatch):
    # results.json is written after every case: a run stopped in its third case holds the
    # first two, marked incomplete, and a merge refuses it; a whole run is complete.
    import benchmarks.kernel as bk

    main(["--quick", "--shard", "2/2", "--out", str(tmp_path / "p2")])
    assert json.loads((tmp_path / "p2" / "results.json").read_text())["complete"] is True
    _stop_in_third_case(monkeypatch, bk)
    with pytest.raises(KeyboardInterrupt):
        main(["--quick", "--out", str(tmp_path / "p1")])
    data = json.loads((tmp_path / "p1" / "results.json").read_text())
    assert data["complete"] is False and len(data["results"]) == 2
    assert [r["suite_index"] for r in data["results"]] == [0, 1]
    with pytest.raises(ValueError, match="stopped before its last case .2 cases."):
        main(["--merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out",
              str(tmp_path / "x")])


def test_other_head_dim_runs_without_the_seed_and_with_its_own_roofline(tmp_path):
    from benchmarks.kernel import roofline_bytes

    # A quick run at head_dim 32 (float16 on a GPU, float32 on the CPU): every row records
    # the setting, its roofline is that of 32-wide heads, and its error is against the
    # reference.
    dtype = "float16" if torch.cuda.is_available() else "float32"
    results = main(["--quick", "--head-dim", "32", "--out", str(tmp_path)])
    for r in results:
        assert r["head_dim"] == 32 and r["dtype"] == dtype and r["seed_us"] is None
        assert r["rel_err"] <= 2e-3 and math.isfinite(r["rel_err"])
        assert r["roofline_us"] == pytest.approx(
            roofline_bytes(r["unique_tokens"], r["requests"], r["hq"], r["hk"], 32) / 3.0e6)
    md = (tmp_path / "results.md").read_text()
    assert md.splitlines()[0].endswith(f" ({dtype}, head_dim 32)")
    assert "targets 1-3 are stated for float16 at head_dim 128" in md
    # Parts run at other head dims are not merged into one run.
    main(["--quick", "--shard", "1/2", "--out", str(tmp_path / "p1")])
    main(["--quick", "--shard", "2/2", "--head-dim", "64", "--out", str(tmp_path / "p2")])
    with pytest.raises(ValueError, match=f"other settings: {dtype}, head_dim 64/128"):
        main(["--merge", str(tmp_path / "p1"), str(tmp_path / "p2"), "--out",
              str(tmp_path / "x")])


def test_head_dim_ab_compares_the_defaults_with_the_head_dim_128_ones(tmp_path):
    from benchmarks.head_dim_ab import main as ab_main

    # At head_dim 64 the GQA cases' defaults ask for 64-token phase-0 KV tiles, the
    # head_dim-128 rules for 32; without GQA both ask for 32. Both plans decode like the
    # reference, and every row is timed both ways.
    rows = ab_main(["--quick", "--head-dim", "64", "--rounds", "1",
                    "--out", str(tmp_path / "ab.json")])
    assert len(rows) == 4
    for r in rows:
        gqa = r["hq"] > r["hk"]
        assert r["requested_kv_tiles"]["old"] == [32, 32]
        assert r["requested_kv_tiles"]["new"] == ([64, 32] if gqa else [32, 32])
        for which in ("old", "new"):
            assert r["err"][which] <= 2e-3 and math.isfinite(r["err"][which])
            assert r["eager_us"][which] > 0
    data = json.loads((tmp_path / "ab.json").read_text())
    assert data["head_dim"] == 64 and len(data["rows"]) == 4
    assert any(line.startswith("with GQA, eager: new / old =") for line in data["summary"])
    with pytest.raises(SystemExit):
        ab_main(["--quick", "--rounds", "0"])


def test_kernel_ab_runs_two_versions_of_the_kernels_on_one_plan(tmp_path):
    import importlib.util
    from pathlib import Path

    from benchmarks.kernel_ab import main as ab_main

    # The working tree's kernels against a copy of themselves: both decode like the
    # reference on every quick case; with --stage2-only only the plans that launch
    # stage 2 stay. A file without the launcher is refused.
    src = importlib.util.find_spec("kernels.tree_decode").origin
    old = tmp_path / "old_tree_decode.py"
    old.write_text(Path(src).read_text())
    rows = ab_main(["--quick", "--old", str(old), "--rounds", "1",
                    "--out", str(tmp_path / "ab.json")])
    assert len(rows) == 4
    bound = 2e-3 if torch.cuda.is_available() else 1e-4  # float16 on a GPU, else float32
    for r in rows:
        for which in ("old", "new"):
            assert r["err"][which] <= bound and math.isfinite(r["err"][which])
            assert r["eager_us"][which] > 0
        assert not (r["finish"] and r["stage2"])  # a finishing plan merges in phase 1
    data = json.loads((tmp_path / "ab.json").read_text())
    assert data["old"] == str(old) and len(data["rows"]) == 4
    # (On a GPU a graph line comes first.)
    assert any(line.startswith("all, eager: new / old =") for line in data["summary"])
    assert data["complete"] is True
    staged = ab_main(["--quick", "--old", str(old), "--rounds", "1", "--stage2-only"])
    assert [r["case"] for r in staged] == [r["case"] for r in rows if r["stage2"]]
    bad = tmp_path / "empty.py"
    bad.write_text("x = 1\n")
    with pytest.raises(SystemExit, match="has no tree_decode_launcher"):
        ab_main(["--quick", "--old", str(bad)])


def test_summary_takes_the_seed_only_at_its_settings_and_bf16_bounds():
    from benchmarks.kernel import error_bound, seed_comparable

    assert error_bound(torch.bfloat16) == 1e-2
    assert error_bound(torch.float16) == error_bound(torch.float32) == 2e-3
    assert seed_comparable(torch.float16, 128) and seed_comparable(torch.float32, 128)
    assert not seed_comparable(torch.bfloat16, 128) and not seed_comparable(torch.float16, 64)
    # bf16 rows are held to 1e-2: 5e-3 passes there, and fails on a float16 row.
    rows = [dict(_case("a", seed=None, ours=5.0, cached=5.0, graph=4.0, roofline=2.0, err=5e-3),
                 dtype="bfloat16", head_dim=128, err_bound=1e-2)]
    text = "\n".join(summarize(rows))
    assert "target 5: max relative error = 5.00e-03 over 1 cases (<= 1e-2 bf16); failing: 0" in text
    assert "not checked on this run's bfloat16, head_dim 128" in text
    rows.append(dict(rows[0], dtype="float16", err_bound=2e-3))
    text = "\n".join(summarize(rows))
    assert "(<= 2e-3 fp16, 1e-2 bf16); failing: 1" in text


@pytest.mark.parametrize("shard", ["0/2", "3/2", "a/b", "1"])
def test_shard_argument_is_checked(shard, capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--shard", shard, "--out", "unused"])
    assert "--shard" in capsys.readouterr().err


def test_masked_probe_inline_configs():
    from benchmarks.masked_probe import _inline_configs

    # 16, 32 and 64 query rows a vnode, at most 32 requests.
    assert _inline_configs(1) == [(16, 0.0), (32, 0.0)]
    assert _inline_configs(4) == [(4, 0.0), (8, 0.0), (16, 0.0)]
    assert _inline_configs(16) == [(1, 0.0), (2, 0.0), (4, 0.0)]


@pytest.mark.parametrize("module", ["benchmarks.host", "benchmarks.sweep", "benchmarks.launch",
                                    "benchmarks.beam_memory", "benchmarks.wide_tile_probe",
                                    "benchmarks.attention_rate_probe",
                                    "benchmarks.leaf_read_probe",
                                    "benchmarks.cascade_probe",
                                    "benchmarks.read_floor_probe",
                                    "benchmarks.warm_probe",
                                    "benchmarks.masked_probe",
                                    "benchmarks.floor_bound",
                                    "benchmarks.cache_ops",
                                    "benchmarks.replan_ab",
                                    "benchmarks.driver_call_probe",
                                    "benchmarks.head_dim_ab",
                                    "benchmarks.kernel_ab",
                                    "benchmarks.ws_attention_probe",
                                    "benchmarks.compile_report"])
def test_benchmark_modules_import(module):
    import importlib

    assert hasattr(importlib.import_module(module), "main")


def test_host_quick_run_times_each_stage_and_the_replan_both_ways(tmp_path):
    import json

    from benchmarks.host import main as host_main

    out = tmp_path / "host.json"
    res = host_main(["--quick", "--out", str(out), "--replan-modes", "1"])
    assert json.loads(out.read_text())["tree"] == res["tree"]
    for key in ("build_plan_us", "append_step_us", "replan_us", "fasttree_preparation_us"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert res["append_step_rebuilds"] == 0  # append-only steps keep the plan
    for key in ("replan_table_pass_us", "replan_node_runs_us"):
        assert len(res[key]) >= 1 and all(math.isfinite(x) and x > 0 for x in res[key]), key
    modes = res["replan_us_by_mode"]
    assert len(modes) == 4 and all(math.isfinite(x) and x > 0 for x in modes.values())


def test_cache_ops_quick_run_times_every_call_and_replans_every_step(tmp_path):
    from benchmarks.cache_ops import CALLS
    from benchmarks.cache_ops import main as cache_ops_main

    out = tmp_path / "ops.json"
    rows = cache_ops_main(["--quick", "--out", str(out)])
    assert [r["num_beams"] for r in rows] == [2, 4]
    for r in rows:
        for c in CALLS:
            assert math.isfinite(r[c + "_us"]) and r[c + "_us"] > 0
        # The first layer's attend (host time) is part of all layers' attends.
        assert 0 < r["attend_first_us"] <= r["attend_us"]
        # Every beam step forks and prunes: one re-plan per step after the first plan.
        assert r["plan_rebuilds"] == 1 + 2 + 4
        assert r["nodes"] >= r["num_beams"]
    assert json.loads(out.read_text())["rows"] == rows


def test_cache_ops_stages_time_the_replan_by_stage_and_restore_the_functions():
    import treecache.cache as cache_mod
    import treecache.plan as plan_mod
    from benchmarks.cache_ops import main as cache_ops_main

    before = (plan_mod._split_costs, cache_mod.build_plan, cache_mod.TreeKVCache._rebuild,
              plan_mod.PlanBuffers.upload)
    rows = cache_ops_main(["--quick", "--stages"])
    assert (plan_mod._split_costs, cache_mod.build_plan, cache_mod.TreeKVCache._rebuild,
            plan_mod.PlanBuffers.upload) == before
    for r in rows:
        st = r["stages_us"]
        # Inclusive times: the re-plan holds the planner, which holds its stages; the
        # re-plan is part of prepare's host time.
        assert 0 < st["plan._materialise"] <= st["cache.build_plan"] <= st["cache.TreeKVCache._rebuild"]
        assert st["cache.TreeKVCache._rebuild"] <= r["prepare_us"] * 1.5
        assert st["plan.PlanBuffers.upload"] <= st["plan._materialise"]
        assert st["cache.TreeKVCache._reserve_step"] > 0


def test_replan_ab_compares_the_plans_of_two_versions(tmp_path):
    # Against this checkout itself every step's plans are the same; against a copy whose
    # planner cuts KV chunks of 16 entries they are not.
    import shutil
    from pathlib import Path

    from benchmarks.replan_ab import main as replan_main

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "ab.json"
    rows = replan_main(["--base", str(root), "--quick", "--out", str(out)])
    assert [r["W"] for r in rows] == [2, 5]
    assert all(r["same_plans"] for r in rows)
    assert all(r["prepare_us"] > 0 and r["prepare_base_us"] > 0 for r in rows)
    for name in ("book", "write", "attend"):
        assert all(r[f"{name}_us"] > 0 and r[f"{name}_base_us"] > 0 and r[f"{name}_ratio"] > 0
                   for r in rows), name
    assert json.loads(out.read_text())["rows"] == rows
    other = tmp_path / "other"
    shutil.copytree(root / "treecache", other / "treecache")
    plan_py = other / "treecache" / "plan.py"
    text = plan_py.read_text()
    for old, new in (("\nAUTO_KV_CHUNKS = (1024, 512, 256, 128, 64)\n", "\nAUTO_KV_CHUNKS = ()\n"),
                     ("\nDEFAULT_KV_SPLIT_SIZES = (1024, 128)\n", "\nDEFAULT_KV_SPLIT_SIZES = (16, 16)\n")):
        assert old in text
        text = text.replace(old, new)
    plan_py.write_text(text)
    rows = replan_main(["--base", str(other), "--quick"])
    assert not any(r["same_plans"] for r in rows)


def test_finish_warps_setting_patches_only_inside_its_block():
    # The finish-warps sweep makes all its settings before it enters them one at a time:
    # making one must not patch anything, entering it must, leaving it must restore.
    import importlib

    from benchmarks.sweep import _finish_warps_setting

    td = importlib.import_module("kernels.tree_decode")
    before = (td.FEW_FINISH_MAX_PROGRAMS, td.FEW_FINISH_WARPS)
    settings = [_finish_warps_setting(w) for w in (0, 2, 8)]
    assert (td.FEW_FINISH_MAX_PROGRAMS, td.FEW_FINISH_WARPS) == before
    with settings[0]:
        assert (td.FEW_FINISH_MAX_PROGRAMS, td.FEW_FINISH_WARPS) == before
    with settings[2]:
        assert td.FEW_FINISH_WARPS == 8 and td.FEW_FINISH_MAX_PROGRAMS >= 1 << 20
    assert (td.FEW_FINISH_MAX_PROGRAMS, td.FEW_FINISH_WARPS) == before


def test_read_floor_probe_lists_the_target2_cases():
    # Target 2 covers the cases whose roofline is at least 50 us: 14 seed cases (PERF.md)
    # and two of the project's; each case's bytes give its roofline at 3.00 TB/s.
    from benchmarks.kernel import roofline_bytes
    from benchmarks.read_floor_probe import target2_cases

    cases = target2_cases()
    assert len(cases) == 16
    assert all(c["roofline_us"] >= 50.0 for c in cases)
    worst = [c for c in cases if c["case"] == "1,1024 2048,32" and (c["hq"], c["hk"]) == (32, 8)]
    assert len(worst) == 1
    # 34,816 unique tokens x 8 KV heads, 1,024 queries x 32 heads, head_dim 128, fp16.
    assert worst[0]["bytes"] == roofline_bytes(34816, 1024, 32, 8) == 2 * 34816 * 8 * 128 * 2 + 2 * 1024 * 32 * 128 * 2
    assert abs(worst[0]["roofline_us"] - 53.1) < 0.05


def test_read_floor_interpolates_the_measured_ladder():
    from benchmarks.floor_bound import read_floor_us

    ladder = [(4e6, 6.0), (16e6, 12.0), (64e6, 30.0)]
    # At the measured sizes: the measured times.
    for b, t in ladder:
        assert read_floor_us(b, ladder, empty_us=4.0) == pytest.approx(t)
    # Between two sizes: on the straight line in log-log (8e6 is halfway from 4e6 to 16e6).
    assert read_floor_us(8e6, ladder, 4.0) == pytest.approx(math.sqrt(6.0 * 12.0))
    # Below the smallest: linear from the empty kernel; above the largest: its bandwidth.
    assert read_floor_us(0, ladder, 4.0) == 4.0
    assert read_floor_us(2e6, ladder, 4.0) == pytest.approx(5.0)
    assert read_floor_us(128e6, ladder, 4.0) == pytest.approx(60.0)
    sizes = [1e6 * x for x in (0.5, 1, 3, 4, 5, 10, 16, 40, 64, 100, 1000)]
    times = [read_floor_us(b, ladder, 4.0) for b in sizes]
    assert times == sorted(times)


def test_case_bounds_take_the_larger_floor():
    from benchmarks.floor_bound import case_bounds, summary

    probe = {"copy_bw": 3e12, "rows": [
        {"kind": "ladder", "bytes": 4e6, "do_bench_us": 6.0, "graph_us": 4.0},
        {"kind": "ladder", "bytes": 400e6, "do_bench_us": 140.0, "graph_us": 130.0},
        {"kind": "target2", "bytes": 1.0, "do_bench_us": 1.0, "graph_us": 1.0}]}
    launch = {"results": [{"what": "1 empty kernel(s)", "graph_us": 3.0, "eager_us": 4.0}]}
    kernel = {"results": [
        # 400 MB (roofline 133.3 us at 3 TB/s) and little arithmetic: bound by the read.
        dict(case="mem", hq=32, hk=32, roofline_us=400e6 / 3e12 * 1e6, gflop=1.0,
             seed_us=280.0, ours_us=175.0, ours_graph_us=170.0),
        # 2 MB and 11 GFLOP: at 550 TFLOP/s the arithmetic takes 20 us, the read 5 us.
        dict(case="flops", hq=16, hk=1, roofline_us=2e6 / 3e12 * 1e6, gflop=11.0,
             seed_us=60.0, ours_us=30.0, ours_graph_us=25.0),
    ]}
    mem, flops = case_bounds(kernel, probe, launch, rate_tflops=550.0)
    assert mem["eager_floor_us"] == pytest.approx(140.0) and mem["eager_bound"] == "read"
    assert mem["graph_floor_us"] == pytest.approx(130.0)
    assert flops["read_eager_us"] == pytest.approx(5.0)
    assert flops["eager_floor_us"] == pytest.approx(20.0) and flops["graph_bound"] == "compute"
    assert mem["seed_over_floor"] == pytest.approx(2.0)
    assert flops["ours_over_floor"] == pytest.approx(1.5)
    lines = summary([mem, flops])
    assert lines[0].startswith("target 1 bound: geomean seed / floor = 2.45x over 2 cases")
    # The memory case's floor is 1.05x its roofline: within target 2's 1.25x.
    assert "worst floor / roofline = 1.05 on 1 cases (target 1.25); floor over the target on 0" in lines[1]
    # The arithmetic case's graph floor (20 us) is over target 3's 10 us.
    assert "graph floor over 10 us on 1 of 1 cases; flops 16/1: 20.0 us (compute)" in lines[2]


def test_stored_results_are_never_faster_than_their_floor():
    # Every measured time in the stored H100 results (the seed's and ours) is at least
    # the floor computed for its case: the bound is a lower bound of what was measured.
    from benchmarks.floor_bound import (KERNEL_JSON, LAUNCH_JSON, READ_FLOOR_JSON,
                                        case_bounds)

    loaded = [json.loads(p.read_text()) for p in (KERNEL_JSON, READ_FLOOR_JSON, LAUNCH_JSON)]
    bounds = case_bounds(*loaded)
    assert len(bounds) == len(loaded[0]["results"]) >= 45
    for b in bounds:
        assert b["ours_us"] >= b["eager_floor_us"]
        assert b["ours_graph_us"] >= b["graph_floor_us"]
        if b["seed_us"]:
            assert b["seed_us"] >= b["eager_floor_us"]


@pytest.mark.parametrize("reqs, weight", [(2, 1.0), (4, 0.25), (4, 100.0), (4, 0.0)])
def test_masked_probe_plans_match_the_reference(reqs, weight):
    # The probe's masked plans (groups of requests over the union of their contexts,
    # shared nodes by the weight rule) give every request its path, through the torch
    # implementation of the kernels with the plan's masks.
    import math

    import torch

    from benchmarks.masked_probe import masked_plan
    from kernels import Phase, reference_decode, torch_tree_decode
    from treecache.fasttree import tree_plan_input
    from treecache.plan import path_token_indices
    from treecache.tree import generate_tree_from_spec, kv_ptrs

    nodes = generate_tree_from_spec("1,2,8 32,16,4")
    inp = tree_plan_input(nodes, kv_ptrs(nodes))
    arrays, phases, info = masked_plan(inp, 4, 2, reqs, weight, head_dim=16)
    assert info["masked_vnodes"] == -(-8 // reqs)
    assert isinstance(phases[-1], Phase)
    if weight == 0:  # every node inlined: one masked phase, one partial a request
        assert info["shared_nodes"] == 0 and info["max_partials"] == 1
        assert len(phases) == 1
        # The union of 4 neighbouring leaves' paths: root, one child, 4 leaves.
        assert info["max_masked_len"] == 32 + 16 + 4 * 4
    g = torch.Generator().manual_seed(5)
    q = torch.randn(8, 4, 16, generator=g)
    k = torch.randn(int(inp.seqlen.sum()), 2, 16, generator=g)
    v = torch.randn_like(k)
    t = {name: torch.as_tensor(a, dtype=torch.int32) for name, a in arrays.items()}
    o = torch.full_like(q, float("nan"))
    rows = int(arrays["mid_q_rows"].size)
    torch_tree_decode(q, k, v, o, mid_o=torch.empty(rows, 4, 16),
                      mid_lse=torch.empty(rows, 4), phases=phases, sm_scale=0.25, **t)
    slots = path_token_indices(inp.parent, inp.seqlen, inp.tok_ptr, inp.req_end)
    ref = reference_decode(q, k, v, [torch.from_numpy(s) for s in slots], 0.25)
    assert ((o - ref).norm() / ref.norm()).item() < 1e-5
    assert not math.isnan(o.sum().item())


def test_plan_space_plans_decode_like_the_reference():
    # Every choice of the plan-space sweep builds a plan that decodes correctly (torch
    # implementation, NaN-poisoned output), and the choices do build other plans.
    from benchmarks.suite import spec_tree
    from benchmarks.sweep import PLAN_SPACE, plan_space_plans
    from kernels import reference_decode
    from treecache import qkv_preparation, tree_stats
    from treecache.fasttree import tree_plan_input
    from treecache.plan import path_token_indices

    nodes = spec_tree(40, 3, (2, 2))
    hq, hk, d = 8, 2, 32
    gen = torch.Generator().manual_seed(5)
    q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, d, "cpu", torch.float16,
                                             generator=gen, build_cache=False)
    inp = tree_plan_input(nodes, ptrs, tree_stats(nodes)["num_requests"])
    paths = path_token_indices(inp.parent, inp.seqlen, inp.tok_ptr, inp.req_end)
    ref = reference_decode(q, k, v, [torch.as_tensor(p) for p in paths], 1 / math.sqrt(d))
    plans = plan_space_plans(inp, hq, hk, d, "cpu")
    assert len(plans) == len(PLAN_SPACE)
    for plan in plans:
        o = torch.full_like(q, float("nan"))
        plan.run(q, k, v, o, backend="torch")
        assert not torch.isnan(o).any()
        assert ((o.float() - ref).norm() / ref.norm()).item() <= 2e-3
    layouts = {(p.phases, p.num_vnodes, p.kv_split_sizes) for p in plans}
    assert len(layouts) >= 4


def test_phase0_kv16_sweep_builds_16_token_shared_tiles():
    # The sweep's second plan takes 16-token KV tiles in its shared phase where the
    # default plan takes 32 (else the sweep would time the same launches twice), and its
    # first cap is the library's.
    import importlib

    from benchmarks.sweep import PHASE0_KV16_CAPS, phase0_kv16_params
    from treecache import fasttree_preparation, generate_tree_from_spec, qkv_preparation

    td = importlib.import_module("kernels.tree_decode")
    assert PHASE0_KV16_CAPS[0] == td.WIDE_TILE_MAX_REGISTERS
    nodes = generate_tree_from_spec("1,4,64 256,64,8")
    q, _, _, _, _, _, ptrs = qkv_preparation(nodes, 32, 8, 128, "cpu", torch.float16,
                                             build_cache=False)
    p = phase0_kv16_params(32, 8)
    default = fasttree_preparation(nodes, ptrs, q.shape[0], 32, 8, 128, device="cpu")[0].plan
    tiled = fasttree_preparation(nodes, ptrs, q.shape[0], 32, 8, 128, params=p,
                                 device="cpu")[0].plan
    assert default.phases[0].kv_tile == 32
    assert tiled.phases[0].kv_tile == 16 and tiled.phases[0].q_tile == default.phases[0].q_tile


def test_ab_runs_cut_short_keep_the_cases_they_timed(tmp_path, monkeypatch):
    # Both A/B modules write their JSON after every case: a run that stops in its third
    # case leaves the first two rows, marked incomplete.
    import benchmarks.head_dim_ab as hd_ab
    import benchmarks.kernel_ab as k_ab

    for mod, args in ((hd_ab, ["--head-dim", "64"]), (k_ab, ["--old", k_ab.td_new.__file__])):
        _stop_in_third_case(monkeypatch, mod)
        out = tmp_path / f"{mod.__name__}.json"
        with pytest.raises(KeyboardInterrupt):
            mod.main(["--quick", "--rounds", "1", "--out", str(out), *args])
        data = json.loads(out.read_text())
        assert data["complete"] is False and len(data["rows"]) == 2
        # The summary of the rows so far (groups of at most the two cases).
        assert data["summary"] and all(re.search(r"\(geomean of [12] cases", line)
                                       for line in data["summary"])


def _compiled_offline(tmp_path, module, *args, key="results"):
    """Run ``python -m module *args --out FILE`` in a process of its own (the tests'
    interpreter mode replaces the compiler's path) and return the JSON's ``key``."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "compiled.json"
    subprocess.run([sys.executable, "-m", module, *args, "--out", str(out)], check=True,
                   env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   capture_output=True)
    return json.loads(out.read_text())[key]


def test_wide_tile_probe_compiles_offline_and_sees_warp_specialisation(tmp_path):
    # No GPU: Triton compiles for the H100 and for Blackwell with its bundled ptxas.
    rows = _compiled_offline(tmp_path, "benchmarks.wide_tile_probe", "--warp-specialize-check")
    h100 = [r for r in rows if r["capability"] == 90]
    assert len(h100) == 4 and all(r["wgmma"] for r in h100)
    pointers = [r for r in h100 if not r["descriptors"]]
    assert all(r["async_copies"] > 0 and not r["tma"] for r in pointers)
    assert all(r["tma"] and r["async_copies"] == 0 for r in h100 if r["descriptors"])
    # Each load path compiles to its own binary; the flag's rows say whether it changed it.
    assert pointers[0]["cubin_sha"] != h100[2]["cubin_sha"]
    for off, on in (h100[0:2], h100[2:4]):
        assert on["warp_specialize"] and not off["warp_specialize"]
        assert not off["ws_region"]  # no flag, no warp-specialised region
    (control,) = [r for r in rows if r["capability"] == 100]
    assert control["ws_region"] and not control["wgmma"]


def test_warp_specialised_probe_compiles_offline_for_the_h100(tmp_path):
    # The Gluon kernel's first four configurations: 64-row tiles, 64-token KV tiles, two
    # or three ring buffers, with and without the overlapped order.
    rows = _compiled_offline(tmp_path, "benchmarks.ws_attention_probe", "--compile-only",
                             "--first", "4")
    assert [(r["buffers"], r["overlap"]) for r in rows] == [(2, False), (3, False), (2, True),
                                                           (3, True)]
    assert all(r["ok"] and r["ws_region"] and "STACK:0" in r["usage"] for r in rows)
    # A third buffer adds one 64 x 128 float16 tile of K and one of V (and two barriers).
    for two, three in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert 2 * 64 * 128 * 2 <= three["shared"] - two["shared"] <= 2 * 64 * 128 * 2 + 64
    # The overlapped order peels a first scores product and a last product with V: each
    # product of the loop appears twice in the PTX.
    assert rows[2]["wgmma"] == 2 * rows[0]["wgmma"] > 0


def test_compile_report_compiles_the_library_launches_as_on_an_h100(tmp_path):
    rows = _compiled_offline(tmp_path, "benchmarks.compile_report", "--case",
                             "1,2,64 8,256,32", "--heads", "32/8", "--heads", "32/32",
                             key="rows")
    by_heads = {h: [r for r in rows if r["heads"] == h] for h in ("32/8", "32/32")}
    assert all(by_heads.values()) and len(rows) == sum(map(len, by_heads.values()))
    for launches in by_heads.values():
        assert [r["launch"] for r in launches] == list(range(len(launches)))
        first = launches[0]
        # The shared-prefix phase first, 64-row tiles of 32 tokens, triggering the
        # dependent launch after it as on compute capability 9.
        assert first["kernel"] == "stage 1" and first["modes"]["BLOCK_M0"] == 64
        assert first["modes"]["BLOCK_N0"] == 32 and first["modes"]["PDL_TRIGGER"]
        for r in launches:
            assert 0 < r["registers"] <= (r["register_cap"] or 255)
            assert r["spill_stack"] >= 0 and r["shared"] >= 0
            spill_ops = r["spill_ops_in_loops"] + r["spill_ops_elsewhere"]
            assert (spill_ops > 0) == (r["spill_stack"] > 0)
            if r["kernel"] == "stage 1":
                # The launcher's shared-memory model keeps the buffers under its budget:
                # it must not undercount what the compiler allocates (by more than
                # small scratch).
                assert r["shared"] <= r["shared_estimate"] + 1024
    # At 32/8 the wide tiles are capped at 128 registers (four programs an SM) and take
    # the model's 64x128 query tile plus two stages of 32x128 K and V tiles.
    wide = by_heads["32/8"][0]
    assert wide["register_cap"] == 128 and wide["registers"] <= 128
    assert wide["shared"] == wide["shared_estimate"] == (64 * 128 + 2 * 2 * 32 * 128) * 2


def test_spill_sites_counts_local_memory_instructions_inside_and_outside_loops():
    from benchmarks.compile_report import spill_sites

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;          /* 0x00000a0000017a02 */
        /*0010*/                   STL [R1], R2 ;                  /* 0x0000000201007387 */
        /*0020*/                   LDL.LU R3, [R1] ;               /* 0x0000000001037983 */
        /*0030*/               @P0 BRA 0x10 ;                      /* 0xfffffffc00000947 */
        /*0040*/                   STL [R1+0x4], R5 ;              /* 0x0000040501007387 */
        /*0050*/                   EXIT ;                          /* 0x000000000000794d */
        /*0060*/                   BRA 0x60;                       /* 0xfffffffc00fc7947 */
    """
    # The backward branch at 0x30 closes the loop 0x10-0x30 (a store and a load); the
    # store at 0x40 comes after it; the trailing self-branch holds no spill.
    assert spill_sites(sass) == dict(spill_ops_in_loops=2, spill_ops_elsewhere=1)
    assert spill_sites("") == dict(spill_ops_in_loops=0, spill_ops_elsewhere=0)
