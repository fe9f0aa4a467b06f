"""treecache: a tree-structured paged KV cache and a tree-decode attention kernel.

Requests that share prefixes form a forest of KV tokens; decode attention over it reads
every shared prefix once (the FastTree algorithm). Two layers of API:

* :class:`TreeKVCache` - a stateful paged cache: ``append`` / ``fork`` / ``prune`` /
  ``attend``, with incremental planning.
* The seed-compatible functional API: :class:`FastTreeParams`,
  :func:`fasttree_preparation`, :func:`fasttree_decode`, :class:`KVTreeNode` and the
  tree file format.
"""

from .errors import (
    InvalidTreeError,
    OutOfPagesError,
    PlanMismatchError,
    ShapeMismatchError,
    TreeCacheError,
    UnknownRequestError,
    UnsupportedConfigError,
)
from .fasttree import (
    FastTreeMetadata,
    fasttree_decode,
    fasttree_preparation,
    qkv_preparation,
)
from .plan import DecodePlan, FastTreeParams, PlanBuffers, PlanInput, build_plan
from .tree import (
    KVTreeNode,
    assign_requests,
    copy_tree,
    draw_tree,
    generate_tree,
    generate_tree_from_spec,
    kv_ptrs,
    load_tree,
    parse_level_spec,
    request_end_nodes,
    retrive_from_file,
    save_tree,
    to_networkx,
    tree_stats,
    validate_tree,
)

__version__ = "0.1.0"

__all__ = [
    "DecodePlan",
    "FastTreeMetadata",
    "FastTreeParams",
    "InvalidTreeError",
    "KVTreeNode",
    "OutOfPagesError",
    "PlanBuffers",
    "PlanInput",
    "PlanMismatchError",
    "ShapeMismatchError",
    "TreeCacheError",
    "UnknownRequestError",
    "UnsupportedConfigError",
    "assign_requests",
    "build_plan",
    "copy_tree",
    "draw_tree",
    "fasttree_decode",
    "fasttree_preparation",
    "generate_tree",
    "generate_tree_from_spec",
    "kv_ptrs",
    "load_tree",
    "parse_level_spec",
    "qkv_preparation",
    "request_end_nodes",
    "retrive_from_file",
    "save_tree",
    "to_networkx",
    "tree_stats",
    "validate_tree",
]

from .cache import TreeKVCache  # noqa: E402
from .pages import KVPool, PageAllocator  # noqa: E402

__all__ += ["TreeKVCache", "KVPool", "PageAllocator"]
