"""The benchmark cases: the seed suite (PERF.md) plus forest, beam-search and
speculative-decoding shaped trees.

``SEED_US`` holds the seed FastTree kernel's median times measured on one H100
(fp16, head_dim 128, eager launches), as recorded in the project's PERF.md on
2026-11-22; the speed targets are stated against them.
"""

from __future__ import annotations

from treecache.tree import KVTreeNode, assign_requests, generate_tree_from_spec

SEED_TREES = [
    "1,2,64 8,256,32",
    "1,4,256 8,256,32",
    "1,4,8,256 8,256,256,32",
    "1,256 256,32",
    "1,1024 2048,32",
    "1,16,64 1024,256,32",
    "1,4,16,512 1024,256,128,32",
    "1,4,16,64,256,1024 256,8,256,64,32,256",
    "1,10 4000,400",
    "1,2,4,8,16,32,64,128,1024 16,16,16,16,16,16,16,16,16",
    "1,2,4,8,16,32,64,128,1024 256,128,64,16,16,16,16,16,16",
    "1,8,16,32,64,128,1024 256,128,64,16,16,16,16",
    "1,8,16,32,64,256,1024 256,128,64,16,16,16,16",
    "1,16,32,64,128,1024 256,128,64,16,16,16",
    "1,16,32,64,256,1024 256,128,64,16,16,16",
]
HEAD_CONFIGS = [(32, 32), (32, 8), (16, 1)]

# Seed FastTree, microseconds, per (tree, (Hq, Hk)), from PERF.md.
_SEED_ROWS = [
    (64.0, 24.7, 17.1), (96.0, 53.3, 29.9), (109.5, 70.8, 32.5), (93.5, 50.2, 26.4),
    (403.7, 247.0, 126.2), (80.5, 47.4, 20.8), (222.7, 131.0, 67.5), (1669.9, 509.5, 125.0),
    (75.3, 41.2, 22.1), (316.4, 137.7, 46.2), (340.4, 165.0, 62.3), (343.1, 159.8, 63.4),
    (370.0, 164.7, 63.6), (352.5, 164.3, 59.9), (377.0, 168.7, 62.7),
]
SEED_US = {
    (tree, heads): row[i]
    for tree, row in zip(SEED_TREES, _SEED_ROWS)
    for i, heads in enumerate(HEAD_CONFIGS)
}


def _fill_num_children(nodes: list[KVTreeNode]) -> None:
    counts = [0] * len(nodes)
    for nd in nodes:
        if nd.parent >= 0:
            counts[nd.parent] += 1
    for nd, c in zip(nodes, counts):
        nd.num_children = c


def forest_tree(num_roots: int, prompt: int, children: int, suffix: int) -> list[KVTreeNode]:
    """``num_roots`` unrelated prompts, each with ``children`` continuations."""
    nodes = []
    for r in range(num_roots):
        root = len(nodes)
        nodes.append(KVTreeNode(parent=-1, id=root, seqlen=prompt, num_children=children))
        for _ in range(children):
            nodes.append(KVTreeNode(parent=root, id=len(nodes), seqlen=suffix))
    return assign_requests(nodes)


def beam_tree(prompt: int, width: int, steps: int, seg: int) -> list[KVTreeNode]:
    """A beam search snapshot: the prompt, then every ``seg`` tokens each beam's
    ancestry splits in two until ``width`` leaves remain after ``steps`` segments."""
    nodes = [KVTreeNode(parent=-1, id=0, seqlen=prompt)]
    frontier = [0]
    for _ in range(steps):
        nxt = []
        for p in frontier:
            fan = 2 if len(frontier) * 2 <= width else 1
            for _ in range(fan):
                nodes.append(KVTreeNode(parent=p, id=len(nodes), seqlen=seg))
                nxt.append(len(nodes) - 1)
        frontier = nxt
    _fill_num_children(nodes)
    return assign_requests(nodes)


def spec_tree(context: int, batch: int, branching: tuple[int, ...]) -> list[KVTreeNode]:
    """Speculative verification: ``batch`` sequences of ``context`` tokens, each with a
    draft token tree (``branching`` children per level); one request per draft token
    (requests end at internal nodes too)."""
    nodes: list[KVTreeNode] = []
    for _ in range(batch):
        root = len(nodes)
        nodes.append(KVTreeNode(parent=-1, id=root, seqlen=context))
        level = [root]
        for fan in branching:
            nxt = []
            for p in level:
                for _ in range(fan):
                    nodes.append(KVTreeNode(parent=p, id=len(nodes), seqlen=1))
                    nxt.append(len(nodes) - 1)
            level = nxt
    _fill_num_children(nodes)
    # One request per draft token: each draft node is the end of its own request.
    req = 0
    parent = [nd.parent for nd in nodes]
    for i, nd in enumerate(nodes):
        if nd.parent < 0:
            continue
        j = i
        while j >= 0:
            nodes[j].requests.append(req)
            j = parent[j]
        req += 1
    return nodes


def extra_cases() -> list[tuple[str, list[KVTreeNode], tuple[int, int]]]:
    """Project cases beyond the seed suite: (name, tree, (Hq, Hk))."""
    out = []
    for heads in ((32, 8), (32, 32)):
        out.append(("forest 8x(2048 + 16x64)", forest_tree(8, 2048, 16, 64), heads))
        out.append(("beam W=16 (4096 + 8x16)", beam_tree(4096, 16, 8, 16), heads))
        out.append(("spec 16x2048 + 3-2-2 drafts", spec_tree(2048, 16, (3, 2, 2)), heads))
    return out


def suite_cases(extra: bool = True) -> list[tuple[str, list[KVTreeNode], tuple[int, int]]]:
    """The seed suite's 45 cases (every tree at every head layout) and, with ``extra``,
    the project's: (name, tree, (Hq, Hk))."""
    cases = [(spec, generate_tree_from_spec(spec), heads)
             for spec in SEED_TREES for heads in HEAD_CONFIGS]
    return cases + extra_cases() if extra else cases


def quick_cases():
    """Tiny cases for a CPU smoke run."""
    return [
        ("1,2,8 32,16,4", generate_tree_from_spec("1,2,8 32,16,4"), (4, 4)),
        ("1,4 64,8", generate_tree_from_spec("1,4 64,8"), (8, 2)),
        ("forest 2x(32 + 3x4)", forest_tree(2, 32, 3, 4), (4, 1)),
        ("spec 2x16 + 2-2", spec_tree(16, 2, (2, 2)), (4, 2)),
    ]
