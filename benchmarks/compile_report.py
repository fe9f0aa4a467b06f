"""Registers, spills and shared memory of the library's launches on an H100, without a GPU.

``python -m benchmarks.compile_report [--case SUBSTR] [--heads 32/8] [--head-dim 128]
[--quick] [--out FILE]``
builds each benchmark case's default plan on the CPU, prepares its launches as they are
prepared on an H100 (the wide tiles' register cap and the programmatic dependent
launches of compute capability 9 included) and compiles each launch for sm_90 with
Triton's bundled ``ptxas``, specialised as Triton's JIT would specialise it at launch.
Per launch it prints the kernel, the tile shapes and modes, the warps, pipeline stages
and register cap, then the registers a thread, the spill stack (bytes a thread), the
shared memory and, for stage 1, the launcher's own shared-memory estimate; spill
instructions are counted inside the kernel's loops and elsewhere (a spill outside the
loops costs little). With the
GPU machine's Triton (3.6) the registers and spills match what the H100 reports for
the same launches (``n_regs`` / ``n_spills``, v37 and v38 in ``RESULTS.md``); other
Triton versions compile other code. ``--quick``: the benchmark's tiny CPU cases.
Needs no GPU; not under Triton's interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import tempfile

import torch
import triton

from treecache import fasttree_preparation, qkv_preparation

td = importlib.import_module("kernels.tree_decode")

_STAGE1_MODES = ("BLOCK_M0", "BLOCK_N0", "BLOCK_M1", "BLOCK_N1", "TWO_SHAPES", "DIRECT",
                 "FINISH", "HAS_MASK", "HAS_SLOT0", "PDL_TRIGGER", "PDL_WAIT")
_STAGE2_MODES = ("BLOCK_H", "BLOCK_P", "SKIP_SINGLE", "PDL_WAIT")


@contextlib.contextmanager
def as_on_h100():
    """Launches prepared from CPU tensors as they are prepared for an H100: the register
    cap that :func:`kernels.tree_decode._register_cap` gives CUDA launches, and the
    programmatic dependent launches of compute capability 9."""
    cap, dep = td._register_cap, td._dependent_launch_ok
    td._register_cap = lambda shapes, warps, device_type, **kw: cap(shapes, warps, "cuda", **kw)
    td._dependent_launch_ok = lambda device: True
    try:
        yield
    finally:
        td._register_cap, td._dependent_launch_ok = cap, dep


def jit_signature(fn, args, consts: dict):
    """The signature, constants and divisibility attributes Triton's JIT would compile
    the kernel ``fn`` (``tl`` or Gluon) under for the positional ``args`` (a value for
    each parameter not in ``consts``, in order; CPU tensors will do) and the
    compile-time ``consts`` (entries that are not parameters, such as launch options,
    are left out)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    names = fn.arg_names
    consts = {n: v for n, v in consts.items() if n in names}
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        arg = args[i]
        specialize = not fn.params[i].do_not_specialize
        ty, key = native_specialize_impl(BaseBackend, arg, False, specialize, True)
        if ty == "constexpr":  # an integer 1, which the JIT makes a constant
            sig[name] = "constexpr"
            consts[name] = key
            continue
        sig[name] = ty
        if key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA\s+(?:`?\(?)0x([0-9a-f]+)")


def spill_sites(sass: str) -> dict:
    """Local-memory stores and loads (``STL`` / ``LDL``: spills) of a kernel's SASS,
    counted inside its loops (the address ranges of backward branches) and outside."""
    code = [(int(m.group(1), 16), m.group(2)) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for addr, ins in code:
        b = _BRANCH.search(ins)
        if b and int(b.group(1), 16) <= addr:
            loops.append((int(b.group(1), 16), addr))
    inside = outside = 0
    for addr, ins in code:
        if re.search(r"\b(STL|LDL)(\.[A-Z0-9.]+)?\b", ins):
            if any(lo <= addr <= hi for lo, hi in loops):
                inside += 1
            else:
                outside += 1
    return dict(spill_ops_in_loops=inside, spill_ops_elsewhere=outside)


def cubin_usage(cubin: bytes) -> dict:
    """Registers and spill stack a thread of a compiled kernel (``cuobjdump``), and
    where its spill instructions are (:func:`spill_sites`)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        words = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout.split()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(w.split(":", 1) for w in words if w.startswith(("REG:", "STACK:")))
    return dict(registers=int(fields["REG"]), spill_stack=int(fields["STACK"]),
                **spill_sites(sass))


def compile_launch(launch, per_call: dict) -> dict:
    """Compile one prepared launch for sm_90 and describe it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    args = [per_call[i] if i in launch.slots else a for i, a in enumerate(launch.args)]
    sig, consts, attrs = jit_signature(launch.fn, args, launch.consts)
    options = {k: launch.consts[k] for k in ("num_warps", "num_stages", "maxnreg", "launch_pdl")
               if k in launch.consts}
    compiled = triton.compile(ASTSource(launch.fn, sig, consts, attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    stage1 = launch.fn is td._stage1_kernel
    rec = dict(kernel="stage 1" if stage1 else "stage 2", grid=list(launch.grid),
               warps=options.get("num_warps"), stages=options.get("num_stages"),
               register_cap=options.get("maxnreg"),
               modes={k: launch.consts[k] for k in (_STAGE1_MODES if stage1 else _STAGE2_MODES)
                      if k in launch.consts},
               **cubin_usage(compiled.asm["cubin"]), shared=compiled.metadata.shared)
    if stage1:
        c = launch.consts
        shapes = {(c["BLOCK_M0"], c["BLOCK_N0"], c["BLOCK_D"])}
        if c["TWO_SHAPES"]:
            shapes.add((c["BLOCK_M1"], c["BLOCK_N1"], c["BLOCK_D"]))
        rec["shared_estimate"] = td.stage1_shared_bytes(shapes, rec["stages"],
                                                        per_call[0].element_size())
    return rec


def case_launches(nodes, hq: int, hk: int, head_dim: int = 128, dtype=torch.float16):
    """The default plan's launches for one case, prepared as on an H100, with the
    tensors of their per-call positions: ``(plan, [(launch, per_call)])``."""
    cpu = torch.device("cpu")
    q, _, _, _, k, v, ptrs = qkv_preparation(nodes, hq, hk, head_dim, cpu, dtype,
                                             build_cache=False)
    meta, _ = fasttree_preparation(nodes, ptrs, q.shape[0], hq, hk, head_dim, device=cpu)
    plan = meta.plan
    o = torch.empty_like(q)
    with as_on_h100():
        launch_set = td.tree_decode_launcher(q, k, v, o, phases=plan.phases, sm_scale=0.088,
                                             **plan.launch_modes,
                                             **plan.kernel_tensors(q.dtype))
    out = []
    for part in launch_set.stage1:
        for launch in part.kernels:
            out.append((launch, {0: q, 1: k, 2: v, 5: o if part.direct else q}))
    if isinstance(launch_set.stage2, td._KernelLaunch):
        out.append((launch_set.stage2, {2: o}))
    return plan, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", default=None,
                    help="only cases whose name contains this (repeatable)")
    ap.add_argument("--heads", action="append", default=None,
                    help="only these head layouts, e.g. 32/8 (repeatable)")
    ap.add_argument("--quick", action="store_true", help="the benchmark's tiny CPU cases")
    ap.add_argument("--head-dim", type=int, default=128, help="head dim of the cases (128)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    from .suite import quick_cases, suite_cases

    cases = quick_cases() if args.quick else suite_cases(extra=True)
    rows = []
    for name, nodes, (hq, hk) in cases:
        if args.case and not any(s in name for s in args.case):
            continue
        if args.heads and f"{hq}/{hk}" not in args.heads:
            continue
        plan, launches = case_launches(nodes, hq, hk, head_dim=args.head_dim)
        for i, (launch, per_call) in enumerate(launches):
            rec = dict(case=name, heads=f"{hq}/{hk}", head_dim=args.head_dim, launch=i,
                       phases=[list(p) for p in plan.phases], **compile_launch(launch, per_call))
            rows.append(rec)
            print(f"{name[:40]} {hq}/{hk} #{i} {rec['kernel']}: {rec['warps']} warps, "
                  f"{rec['stages']} stages, cap {rec['register_cap']}: {rec['registers']} "
                  f"registers, {rec['spill_stack']} B spill stack "
                  f"({rec['spill_ops_in_loops']} spill instructions in loops, "
                  f"{rec['spill_ops_elsewhere']} elsewhere), {rec['shared']} B shared "
                  f"{rec['modes']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"compiled": f"offline for sm_90, Triton {triton.__version__}",
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
