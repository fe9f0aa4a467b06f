"""The examples run end to end, each as its own process with small settings.

The examples check their own results against a float32 reference (or the cache's
bookkeeping) and exit non-zero on a mismatch; these tests assert on that exit status
and on the line each prints when its checks passed. The profiling example (06) only
times: its test checks that it runs every stage and prints the whole decode's line. On
a machine without a GPU they run as a user would run them there, on the torch
implementation (Triton's interpreter would take minutes; the kernels' own tests run
it), except the profiling example, which times the Triton stages and so runs them in
the interpreter on a tiny tree. The two
real-model examples (11 and 12) are left to ``tests/test_hf_integration.py``, which
covers the same model paths in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: (script, arguments, text its output must hold when its checks passed).
CASES = [
    ("01_minimal_example.py", [], "OK"),
    ("02_basic_usage.py", ["--iters", "1"], "OK"),
    ("03_custom_tree.py", ["--out", "{tmp}"], "OK"),
    ("04_gqa_example.py", ["--iters", "1"], "OK"),
    ("05_parameter_tuning.py", ["--quick"], "best setting:"),
    ("06_profiling.py", ["--tree", "1,2,4 16,8,4", "--heads", "4,2"], "whole decode"),
    ("06_profiling.py", ["--tree", "1,4 24,6", "--heads", "8,2", "--head_dim", "64",
                         "--dtype", "bfloat16"], "head_dim 64"),
    ("07_batch_processing.py", ["--quick"], "all outputs match the reference"),
    ("08_integration_template.py", ["--steps", "3"], "OK"),
    ("09_beam_search.py", ["--steps", "3", "--beam_width", "2"], "OK"),
    ("10_speculative_decoding.py", ["--rounds", "2"], "OK"),
]


@pytest.mark.parametrize("script, args, marker", CASES, ids=[c[0] for c in CASES])
def test_example_runs(tmp_path, script, args, marker):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    if script != "06_profiling.py":
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "examples" / script)]
    cmd += [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert marker in proc.stdout, out[-3000:]
