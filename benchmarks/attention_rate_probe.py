"""What dense attention kernels reach on the shared-root shapes of the worst cases (CUDA).

``python -m benchmarks.attention_rate_probe [--out FILE]`` times torch's scaled-dot-product
attention with each backend it offers here (FlashAttention-2, cuDNN, memory-efficient) on
the attention of a shared root as a dense problem: every query row of the requests under
the root (requests x GQA group, per KV head) against the root's tokens. No tree, no
gathering, no partial outputs: a rate above what the tree kernel could reach on that
work. The shapes:

* ``1,1024 2048,32`` 32/8 (target 2's worst case): 8 KV heads, 4,096 query rows each
  against 2,048 tokens, 34.4 GFLOP. Target 2 allows 66 us for the whole case.
* ``1,4,16,512 1024,256,128,32`` 16/1 (target 3's worst case): its root, one KV head,
  8,192 query rows against 1,024 tokens (4.3 of the case's 6.0 GFLOP). Target 3 allows
  10 us for the whole case.

Each backend is checked against float32 math on the same inputs. Times are
``do_bench`` medians (L2 flushed); a backend that is not available for a shape is
reported as such.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from .kernel import _bench
from .probe_common import probe_main, write_rows

#: (case, KV heads, query rows per KV head, root tokens, target in us for the whole case)
SHAPES = (
    ("1,1024 2048,32 32/8", 8, 4096, 2048, 66.0),
    ("1,4,16,512 1024,256,128,32 16/1 (root)", 1, 8192, 1024, 10.0),
)


def _backends():
    from torch.nn.attention import SDPBackend

    return [("flash (FA2)", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("mem-efficient", SDPBackend.EFFICIENT_ATTENTION)]


def run(out_path=None) -> list[dict]:
    from torch.nn.attention import sdpa_kernel

    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for name, heads, m, n, target in SHAPES:
        q = torch.randn(1, heads, m, 128, generator=g).to(dev, torch.float16)
        k = torch.randn(1, heads, n, 128, generator=g).to(dev, torch.float16)
        v = torch.randn(1, heads, n, 128, generator=g).to(dev, torch.float16)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        gflop = 4 * heads * m * n * 128 / 1e9
        for label, backend in _backends():
            try:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v)
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    us = _bench(lambda: F.scaled_dot_product_attention(q, k, v), dev)
            except RuntimeError as exc:  # the backend does not take this shape here
                rows.append(dict(shape=name, backend=label, error=str(exc).splitlines()[0]))
                print(f"{name}: {label} not available ({str(exc).splitlines()[0][:80]})",
                      flush=True)
                continue
            tflops = gflop / us * 1e3
            rows.append(dict(shape=name, backend=label, gflop=gflop, us=us, tflops=tflops,
                             rel_err=err, target_us=target))
            print(f"{name}: {label} {us:.1f} us, {tflops:.0f} TFLOP/s, rel err {err:.1e} "
                  f"(whole case allowed {target:.0f} us)", flush=True)
    write_rows(out_path, rows, torch=torch.__version__)
    return rows


def main(argv=None):
    probe_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
