r"""Minimal example: one shared prefix, two requests, one decode step.

The tree (token counts in brackets):

            node 0: root [128]          <- read by both requests
             /              \
    node 1 [64]          node 2 [64]
    request 0            request 1

The K/V of all 256 tokens live once in a flat buffer, node by node. Request 0 attends
nodes 0 and 1 (192 tokens), request 1 attends nodes 0 and 2. The calls below are the
seed artifact's quick start, unchanged; the output is then checked against a dense
float32 reference that knows nothing about trees.

Run:
    python examples/01_minimal_example.py            # GPU if there is one, else CPU
    TRITON_INTERPRET=1 python examples/01_minimal_example.py   # CPU: the Triton kernels,
                                                               # run by Triton's interpreter
"""

from __future__ import annotations

import pathlib
import sys
import time

import torch

try:
    import treecache  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import kernels
from treecache import FastTreeParams, KVTreeNode, fasttree_decode, fasttree_preparation


def build_tree() -> list[KVTreeNode]:
    """The quick start's tree, filled in field by field as the seed does it."""
    tree_info = []
    root = KVTreeNode()
    root.parent, root.id, root.seqlen = -1, 0, 128
    root.num_children, root.requests = 2, [0, 1]
    tree_info.append(root)

    child1 = KVTreeNode()
    child1.parent, child1.id, child1.seqlen = 0, 1, 64
    child1.num_children, child1.requests = 0, [0]
    tree_info.append(child1)

    child2 = KVTreeNode()
    child2.parent, child2.id, child2.seqlen = 0, 2, 64
    child2.num_children, child2.requests = 0, [1]
    tree_info.append(child2)
    return tree_info


def request_slots(tree_info, KV_ptrs, batch_size):
    """KV rows each request attends: the tokens of every node that lists it."""
    slots = [[] for _ in range(batch_size)]
    for node in tree_info:
        for r in node.requests:
            slots[r].extend(range(KV_ptrs[node.id], KV_ptrs[node.id + 1]))
    return [torch.tensor(s, dtype=torch.long) for s in slots]


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_qo_heads, num_kv_heads, head_dim = 32, 32, 128
    dtype = torch.float16
    torch.manual_seed(0)

    tree_info = build_tree()

    # K/V of all nodes, node by node: node i owns rows KV_ptrs[i] .. KV_ptrs[i+1]-1.
    K = torch.randn(256, num_kv_heads, head_dim, device=device, dtype=dtype)
    V = torch.randn(256, num_kv_heads, head_dim, device=device, dtype=dtype)
    KV_ptrs = [0, 128, 192, 256]

    # One query per request (the token being decoded), and the output.
    Q = torch.randn(2, num_qo_heads, head_dim, device=device, dtype=dtype)
    O = torch.empty(2, num_qo_heads, head_dim, device=device, dtype=dtype)

    params = FastTreeParams()

    # Plan once per tree: split decisions, vnodes, index tensors.
    t0 = time.perf_counter()
    metadata, node_assignments = fasttree_preparation(
        tree_info, KV_ptrs, 2, num_qo_heads, num_kv_heads, head_dim,
        [1024, 128], [132, 528], [132, 132], params,
    )
    plan_ms = (time.perf_counter() - t0) * 1e3

    # Decode: stage 1 over the vnodes, stage 2 merges each request's partial results.
    sm_scale = 1.0 / (head_dim ** 0.5)
    backend = kernels.select_backend(device)
    t0 = time.perf_counter()
    fasttree_decode(Q, K, V, O, *metadata, params.TSQs, params.TSKs, sm_scale)
    if device == "cuda":
        torch.cuda.synchronize()
    decode_ms = (time.perf_counter() - t0) * 1e3

    ref = kernels.reference_decode(Q, K, V, request_slots(tree_info, KV_ptrs, 2), sm_scale)
    rel_err = ((O.float() - ref).norm() / ref.norm()).item()

    plan = metadata.plan
    print(f"device          : {device} ({dtype}), heads {num_qo_heads}/{num_kv_heads}, "
          f"head_dim {head_dim}")
    print(f"backend         : {backend.value}")
    if backend is kernels.Backend.TORCH:
        print("                  (TRITON_INTERPRET=1 runs the Triton kernels on CPU instead)")
    print(f"node assignments: {node_assignments}  (0 = split-K, 1 = split-Q)")
    print(f"vnodes          : {plan.num_vnodes} in {len(plan.phases)} phase(s), "
          f"q tiles {list(plan.q_tiles)}, kv tiles {list(plan.kv_tiles)}")
    print(f"params          : TSQs {params.TSQs}, TSKs {params.TSKs} (as given: planning "
          f"never changes them)")
    print(f"plan            : {plan_ms:.2f} ms (host)")
    print(f"first decode    : {decode_ms:.2f} ms (on a GPU this includes compiling the kernels)")
    print(f"output shape    : {tuple(O.shape)}")
    print(f"relative error  : {rel_err:.2e} vs float32 reference")
    ok = rel_err < 1e-2
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
