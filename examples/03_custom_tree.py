"""Custom trees: build topologies in code, check them, run them, draw them.

Five shapes, each validated, planned, decoded and compared with the dense float32
reference, and saved as a PNG picture (``treecache.draw_tree``):

* ``chain``      one request over four nodes in a line (nothing is shared);
* ``star``       one long prefix shared by 16 requests (fan-out);
* ``binary``     a complete binary tree, 6 levels, 32 requests;
* ``forest``     three unrelated prompts (three roots) in one batch;
* ``internal``   requests that end at internal nodes while others continue below.

Two ways to say which request reads which node:

* ``assign_requests(nodes)``: one request per leaf, in leaf id order (what loading a
  tree file does);
* explicit ``requests`` lists: every node lists the requests whose root-to-node path
  contains it. This is the only way to have a request end at an internal node.

Finally one tree goes through the file format (``save_tree`` / ``load_tree``).

Run:
    python examples/03_custom_tree.py [--out examples/out]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

try:
    import treecache  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import networkx as nx

import kernels
from treecache import (
    FastTreeParams,
    KVTreeNode,
    assign_requests,
    draw_tree,
    fasttree_decode,
    fasttree_preparation,
    generate_tree,
    load_tree,
    qkv_preparation,
    save_tree,
    to_networkx,
    tree_stats,
    validate_tree,
)

HERE = pathlib.Path(__file__).resolve().parent
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}


# ---------------------------------------------------------------------- building trees


def tree_from_parents(parents: list[int], seqlens: list[int]) -> list[KVTreeNode]:
    """Nodes ``0..n-1`` with the given parents (-1 for a root) and token counts.

    ``num_children`` is counted here; ``requests`` are left empty.
    """
    nodes = [KVTreeNode(parent=p, id=i, seqlen=s)
             for i, (p, s) in enumerate(zip(parents, seqlens))]
    for nd in nodes:
        if nd.parent >= 0:
            nodes[nd.parent].num_children += 1
    return nodes


def chain_tree() -> list[KVTreeNode]:
    # 0 -> 1 -> 2 -> 3: a single request reads all four nodes.
    return assign_requests(tree_from_parents([-1, 0, 1, 2], [64, 32, 32, 32]))


def star_tree() -> list[KVTreeNode]:
    # A 512-token prefix and 16 continuations of 8..23 tokens.
    fan_out = 16
    return assign_requests(
        tree_from_parents([-1] + [0] * fan_out, [512] + [8 + i for i in range(fan_out)]))


def binary_tree() -> list[KVTreeNode]:
    # Levels of 1, 2, 4, ..., 32 nodes; node j of a level has parent j // 2 of the one above.
    return generate_tree([1, 2, 4, 8, 16, 32], [128, 32, 32, 16, 16, 16])


def forest_tree() -> list[KVTreeNode]:
    # Root 0 (2 children), root 3 (3 children), root 7 (alone): 6 requests, 3 roots.
    parents = [-1, 0, 0, -1, 3, 3, 3, -1]
    seqlens = [128, 40, 24, 64, 16, 16, 16, 200]
    return assign_requests(tree_from_parents(parents, seqlens))


def internal_end_tree() -> list[KVTreeNode]:
    """Requests listed by hand; two of them stop at internal nodes.

    ::

                  0 [96]              request 0 ends here (reads node 0 only)
                 /      \\
            1 [48]      4 [32]        request 1 ends at 1; request 4 at 4
            /    \\
        2 [16]  3 [24]                requests 2 and 3
    """
    nodes = tree_from_parents([-1, 0, 1, 1, 0], [96, 48, 16, 24, 32])
    # Every node lists each request whose root-to-node path contains it.
    nodes[0].requests = [0, 1, 2, 3, 4]
    nodes[1].requests = [1, 2, 3]
    nodes[2].requests = [2]
    nodes[3].requests = [3]
    nodes[4].requests = [4]
    return nodes


# ------------------------------------------------------------------ running one tree


def request_slots(tree_info, KV_ptrs, batch_size):
    """KV rows each request attends: the tokens of every node that lists it."""
    slots = [[] for _ in range(batch_size)]
    for node in tree_info:
        for r in node.requests:
            slots[r].extend(range(KV_ptrs[node.id], KV_ptrs[node.id + 1]))
    return [torch.tensor(s, dtype=torch.long) for s in slots]


def run_tree(name: str, nodes: list[KVTreeNode], args, device: str) -> bool:
    """Validate, plan, decode and check one tree; draw it. Returns True if it matched."""
    stats = tree_stats(nodes)
    batch_size = stats["num_requests"]
    validate_tree(nodes, num_requests=batch_size)  # raises InvalidTreeError if malformed
    graph = to_networkx(nodes)
    assert nx.is_branching(graph)  # a forest of out-trees, edges parent -> child

    dtype = DTYPES[args.dtype]
    hq, hk, d = args.num_qo_heads, args.num_kv_heads, args.head_dim
    gen = torch.Generator(device=device).manual_seed(0)
    Q, _, _, _, K, V, KV_ptrs = qkv_preparation(
        nodes, hq, hk, d, device=device, dtype=dtype, generator=gen, build_cache=False)
    O = torch.empty_like(Q)

    params = FastTreeParams()
    metadata, node_assignments = fasttree_preparation(
        nodes, KV_ptrs, batch_size, hq, hk, d,
        [1024, 128], [132, 528], [132, 132], params, device=device)
    sm_scale = 1.0 / d ** 0.5

    def decode():
        fasttree_decode(Q, K, V, O, *metadata, params.TSQs, params.TSKs, sm_scale)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        decode()  # the first call compiles the Triton kernels
    t0 = time.perf_counter()
    decode()
    ms = (time.perf_counter() - t0) * 1e3  # one call, wall clock: a rough figure

    ref = kernels.reference_decode(Q, K, V, request_slots(nodes, KV_ptrs, batch_size), sm_scale)
    rel_err = ((O.float() - ref).norm() / ref.norm()).item()
    ok = rel_err < TOLERANCE[dtype]

    png = args.out / f"{name}.png"
    draw_tree(nodes, png, title=f"{name}: {stats['num_nodes']} nodes, {batch_size} requests")

    print(f"{name:<9} nodes {stats['num_nodes']:>3}  roots {stats['num_roots']}  "
          f"depth {stats['depth']}  requests {batch_size:>2}  "
          f"tokens {stats['unique_tokens']:>5}/{stats['logical_tokens']:<5}  "
          f"split-Q {sum(node_assignments):>2}  vnodes {metadata.plan.num_vnodes:>3}  "
          f"{ms:8.2f} ms  err {rel_err:.1e}  {'OK' if ok else 'MISMATCH'}  -> {png.name}")
    return ok


def round_trip(nodes: list[KVTreeNode], path: pathlib.Path) -> bool:
    """save_tree then load_tree: topology and token counts survive; requests are reassigned."""
    save_tree(nodes, path)
    loaded = load_tree(path)
    same = loaded == nodes
    print(f"file round trip: {path.name} ({len(loaded)} nodes) -> "
          f"{'identical' if same else 'DIFFERENT'} after load_tree")
    return same


def main() -> int:
    p = argparse.ArgumentParser(description="Build trees in code, run and draw them.")
    p.add_argument("--out", type=pathlib.Path, default=HERE / "out",
                   help="folder for the PNG pictures and the tree file (default: out/ "
                        "next to this script)")
    p.add_argument("--num_qo_heads", type=int, default=32)
    p.add_argument("--num_kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="default: cuda if available, else cpu")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)

    print(f"device {device}, backend {kernels.select_backend(device).value}, "
          f"heads {args.num_qo_heads}/{args.num_kv_heads}, head_dim {args.head_dim}, "
          f"{args.dtype}; tokens = unique/logical\n")
    trees = {
        "chain": chain_tree(),
        "star": star_tree(),
        "binary": binary_tree(),
        "forest": forest_tree(),
        "internal": internal_end_tree(),
    }
    ok = all([run_tree(name, nodes, args, device) for name, nodes in trees.items()])

    print()
    ok &= round_trip(trees["forest"], args.out / "forest.txt")
    # The file format stores topology only; loading gives one request per leaf, so the
    # requests that ended at internal nodes are gone after a round trip.
    save_tree(trees["internal"], args.out / "internal.txt")
    reloaded = load_tree(args.out / "internal.txt")
    print(f"internal tree: {tree_stats(trees['internal'])['num_requests']} requests in memory, "
          f"{tree_stats(reloaded)['num_requests']} after save_tree/load_tree (one per leaf)")
    print(f"\npictures and tree files in {args.out}")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
