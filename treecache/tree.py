"""Tree (forest) topology of a shared-prefix KV cache.

The model
---------
A KV tree is a **forest** of nodes. Each node holds a run of ``seqlen`` consecutive tokens
whose keys and values are stored once, however many requests read them. A node's parent
holds the tokens that come right before it; a root (``parent == -1``) starts a context.
A **request** is a path from a root down to some node: it attends every token of every
node on that path, in root-to-node order. Several requests share the nodes their paths
have in common; a request may end at an internal node while others continue below it.

The list form
-------------
A tree is passed around as a ``list[KVTreeNode]`` indexed by node id: the node at list
position ``i`` has ``id == i`` and ids are exactly ``0..n-1``. Each node repeats its
parent's id and its number of children, and lists (``requests``) the ids of the requests
whose path contains it. For request ``r``, the nodes listing ``r`` are exactly the path
from a root to ``r``'s last node, its *end node*. This is the form the seed artifact's
``fasttree_preparation`` consumes; :func:`validate_tree` checks every one of these rules.

The usual way to get requests is :func:`assign_requests`: each leaf (``num_children ==
0``) gets one request, in increasing leaf id order, and every node on the path from the
leaf's root to the leaf lists it. :func:`load_tree` and :func:`generate_tree` do this.

Functions here never modify the nodes they are given and never print; diagnostics go to
the module's logger.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import networkx as nx
import numpy as np

from treecache.errors import InvalidTreeError

__all__ = [
    "KVTreeNode",
    "load_tree",
    "retrive_from_file",
    "save_tree",
    "validate_tree",
    "request_end_nodes",
    "assign_requests",
    "generate_tree",
    "parse_level_spec",
    "generate_tree_from_spec",
    "to_networkx",
    "tree_stats",
    "copy_tree",
    "kv_ptrs",
    "draw_tree",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


@attrs.define
class KVTreeNode:
    """One node of a KV tree: a run of ``seqlen`` tokens shared by ``requests``.

    All fields have defaults, so both the seed's attribute-by-attribute style
    (``n = KVTreeNode(); n.parent, n.id, n.seqlen = -1, 0, 128``) and keyword
    construction work. Nodes compare equal when all their fields are equal; being
    mutable, they are not hashable.

    Attributes
    ----------
    parent : int
        Id of the parent node, or -1 for a root.
    id : int
        Node id; in a tree list the node at position ``i`` has id ``i``.
    seqlen : int
        Number of tokens in the node (>= 0).
    num_children : int
        Number of nodes whose ``parent`` is this node.
    requests : list[int]
        Ids of the requests whose path contains this node (increasing order when
        built by :func:`assign_requests`). Each node gets its own list.
    """

    parent: int = -1
    id: int = -1
    seqlen: int = 0
    num_children: int = 0
    requests: list[int] = attrs.Factory(list)


# --------------------------------------------------------------------------- errors


def _fail(message: str, node: int | None = None) -> InvalidTreeError:
    """An InvalidTreeError; ``node_id`` lets a file reader add the node's line number."""
    err = InvalidTreeError(message)
    err.node_id = node  # type: ignore[attr-defined]
    return err


def _is_int(value: Any) -> bool:
    if type(value) is int:
        return True
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


# ------------------------------------------------------------------ structure checks


@attrs.frozen
class _Topology:
    """What the structural check learns about a valid forest (all arrays indexed by id)."""

    parent: list[int]
    children: list[list[int]]  # children of each node, increasing id
    roots: list[int]  # increasing id
    depth: np.ndarray  # [n] int64, 0 at roots


def _check_ids(nodes: Sequence[Any]) -> int:
    n = len(nodes)
    try:
        ids = [nd.id for nd in nodes]
    except AttributeError:
        for pos, nd in enumerate(nodes):
            if not hasattr(nd, "id"):
                raise _fail(
                    f"item at list position {pos} is not a tree node "
                    f"(got {type(nd).__name__}, which has no 'id')"
                ) from None
        raise
    if ids == list(range(n)):
        return n
    first_pos: dict[Any, int] = {}
    for pos, node_id in enumerate(ids):
        if not _is_int(node_id):
            raise _fail(f"node at list position {pos} has id {node_id!r}; expected the int {pos}")
        if node_id in first_pos:
            raise _fail(
                f"node id {node_id} appears at list positions {first_pos[node_id]} and {pos} "
                f"(several definitions of one node)",
                node_id,
            )
        first_pos[node_id] = pos
    for pos, node_id in enumerate(ids):
        if node_id != pos:
            raise _fail(
                f"node at list position {pos} has id {node_id}; expected id {pos} "
                f"(nodes must be listed in id order, ids exactly 0..{n - 1})",
                node_id if 0 <= node_id < n else None,
            )
    raise AssertionError("unreachable")  # pragma: no cover


def _find_cycle(parent: list[int], reached: list[bool]) -> list[int]:
    """A cycle of parent pointers among the nodes not reached from any root."""
    start = reached.index(False)
    seen: dict[int, int] = {}
    walk: list[int] = []
    v = start
    # Unreached nodes never lead to a root, so this walk ends on a cycle.
    while v not in seen:
        seen[v] = len(walk)
        walk.append(v)
        v = parent[v]
    return walk[seen[v] :]


def _check_structure(nodes: Sequence[Any]) -> _Topology:
    """Check ids, parents, acyclicity, child counts and seqlens; return the topology."""
    n = _check_ids(nodes)
    parent: list[int] = [-1] * n
    children: list[list[int]] = [[] for _ in range(n)]
    roots: list[int] = []
    for i, nd in enumerate(nodes):
        p = nd.parent
        if not _is_int(p):
            raise _fail(f"node {i} has parent {p!r}; expected an int (-1 for a root)", i)
        if p == i:
            raise _fail(f"node {i} is its own parent", i)
        if p == -1:
            roots.append(i)
        elif 0 <= p < n:
            children[p].append(i)
        else:
            raise _fail(
                f"node {i} has parent {p}, which is not a node id "
                f"(expected -1 for a root or an id in 0..{n - 1})",
                i,
            )
        parent[i] = int(p)
        s = nd.seqlen
        if not _is_int(s):
            raise _fail(f"node {i} has seqlen {s!r}; expected an int >= 0", i)
        if s < 0:
            raise _fail(f"node {i} has seqlen {s}; expected >= 0", i)

    depth = [-1] * n
    for r in roots:
        depth[r] = 0
    stack = list(roots)
    while stack:
        v = stack.pop()
        d = depth[v] + 1
        for c in children[v]:
            depth[c] = d
        stack.extend(children[v])
    if n and min(depth) < 0:
        cycle = _find_cycle(parent, [d >= 0 for d in depth])
        k = cycle.index(min(cycle))
        cycle = cycle[k:] + cycle[:k]
        path = " -> ".join(str(v) for v in [*cycle, cycle[0]])
        raise _fail(
            f"node {cycle[0]} is on a cycle of parent pointers ({path}, each arrow "
            f"from a node to its parent); no node on it reaches a root",
            cycle[0],
        )

    for i, nd in enumerate(nodes):
        nc = nd.num_children
        if nc != len(children[i]) or not _is_int(nc):
            kids = ", ".join(map(str, children[i][:8])) + (", ..." if len(children[i]) > 8 else "")
            found = f"{len(children[i])} ({kids})" if kids else "0"
            raise _fail(
                f"node {i} has num_children={nc!r}, but the number of nodes whose parent "
                f"is {i} is {found}",
                i,
            )
    return _Topology(parent, children, roots, np.asarray(depth, dtype=np.int64))


# ------------------------------------------------------------------- request checks


@attrs.frozen
class _RequestPairs:
    """All (node, request) incidences, flattened in node order."""

    node: np.ndarray  # [P] int64, node of each pair
    req: np.ndarray  # [P] int64, request id of each pair


def _request_pairs(nodes: Sequence[Any]) -> _RequestPairs:
    lists = []
    for i, nd in enumerate(nodes):
        reqs = nd.requests
        if not isinstance(reqs, (list, tuple, np.ndarray)):
            raise _fail(
                f"node {i} has requests of type {type(reqs).__name__}; expected a list of ints", i
            )
        lists.append(reqs)
    counts = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    flat = list(itertools.chain.from_iterable(lists))
    node_of = np.repeat(np.arange(len(lists), dtype=np.int64), counts)
    if set(map(type, flat)) - {int}:
        for k, r in enumerate(flat):
            if not _is_int(r):
                i = int(node_of[k])
                raise _fail(f"node {i} lists request {r!r}; request ids must be ints", i)
    try:
        req = np.asarray(flat, dtype=np.int64)
    except OverflowError:
        raise _fail("a request id does not fit in 64 bits") from None
    if req.size and req.min() < 0:
        k = int(np.argmax(req < 0))
        i = int(node_of[k])
        raise _fail(f"node {i} lists request {int(req[k])}; request ids must be >= 0", i)
    return _RequestPairs(node_of, req)


def _check_requests(
    nodes: Sequence[Any], topo: _Topology, num_requests: int | None
) -> None:
    n = len(nodes)
    pairs = _request_pairs(nodes)
    node_of, req = pairs.node, pairs.req
    if num_requests is not None:
        if not _is_int(num_requests) or num_requests < 0:
            raise _fail(f"num_requests must be an int >= 0, got {num_requests!r}")
        if req.size and req.max() >= num_requests:
            k = int(np.argmax(req >= num_requests))
            i = int(node_of[k])
            raise _fail(
                f"node {i} lists request {int(req[k])}, out of range "
                f"0..{num_requests - 1} (num_requests={num_requests})",
                i,
            )
    if req.size:
        # Dense request numbering keeps the (request, node) keys small.
        uniq, dense = np.unique(req, return_inverse=True)
        dense = dense.astype(np.int64)
        keys = dense * n + node_of
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if dup.size:
            k = int(order[dup[0]])
            i = int(node_of[k])
            raise _fail(f"node {i} lists request {int(req[k])} more than once", i)

        # Every node listing r (other than a root) must have its parent list r too.
        parent_arr = np.asarray(topo.parent, dtype=np.int64)
        par = parent_arr[node_of]
        has_parent = np.flatnonzero(par >= 0)
        pkeys = dense[has_parent] * n + par[has_parent]
        pos = np.minimum(np.searchsorted(sorted_keys, pkeys), sorted_keys.size - 1)
        missing = np.flatnonzero(sorted_keys[pos] != pkeys)
        if missing.size:
            cand = has_parent[missing]
            k = int(cand[np.lexsort((node_of[cand], req[cand]))[0]])
            i, r = int(node_of[k]), int(req[k])
            raise _fail(
                f"request {r} is listed in node {i} but not in its parent {topo.parent[i]}; "
                f"a request must be a root-to-node path",
                i,
            )

        # Closed under parents, r's node set is a union of root paths; it is one path
        # exactly when it has (depth of its deepest node + 1) nodes.
        pair_depth = topo.depth[node_of]
        max_depth = np.full(uniq.size, -1, dtype=np.int64)
        np.maximum.at(max_depth, dense, pair_depth)
        count = np.bincount(dense, minlength=uniq.size)
        bad = np.flatnonzero(count != max_depth + 1)
        if bad.size:
            d = int(bad[0])
            r = int(uniq[d])
            mine = node_of[dense == d]
            deepest = int(mine[np.argmax(topo.depth[mine])])
            on_path = set()
            v = deepest
            while v != -1:
                on_path.add(v)
                v = topo.parent[v]
            other = min(int(v) for v in mine if int(v) not in on_path)
            raise _fail(
                f"request {r} is listed in two branches: node {deepest} and node {other}, "
                f"neither an ancestor of the other; a request must be one root-to-node path",
                other,
            )

    if num_requests is not None:
        present = np.zeros(num_requests, dtype=bool)
        present[req] = True
        if not present.all():
            r = int(np.argmin(present))
            raise _fail(
                f"request {r} is listed in no node; with num_requests={num_requests} "
                f"request ids must be exactly 0..{num_requests - 1}"
            )


# -------------------------------------------------------------------- public checks


def validate_tree(
    nodes: Sequence[KVTreeNode],
    *,
    num_requests: int | None = None,
    check_requests: bool = True,
) -> None:
    """Check that ``nodes`` is a well-formed KV forest in list form.

    Parameters
    ----------
    nodes : Sequence[KVTreeNode]
        The tree, indexed by id. Not modified.
    num_requests : int, optional
        If given, the request ids listed in the tree must be exactly
        ``0..num_requests-1``, each listed at least once.
    check_requests : bool, default True
        Check the ``requests`` lists too. With False only the topology is checked.

    Raises
    ------
    InvalidTreeError
        With a message naming the offending node (and request) when:
        the node at list position ``i`` does not have id ``i`` (including an id listed
        twice); a parent is neither -1 nor an existing id; a node is its own parent;
        parent pointers form a cycle; ``num_children`` differs from the number of nodes
        naming this node as parent; ``seqlen`` is negative or not an int. With
        ``check_requests``: a request id is not an int >= 0 or is listed twice by one
        node; a request listed by a node is not listed by that node's parent; a
        request's nodes lie on two branches; a request id is outside
        ``0..num_requests-1`` or one of those ids is listed nowhere.

    Notes
    -----
    Valid: several roots (a forest), requests ending at internal nodes, nodes listing no
    request, nodes with ``seqlen == 0``. Cost is O(nodes + (node, request) pairs) with
    the per-request path checks vectorised in numpy.
    """
    topo = _check_structure(nodes)
    if check_requests:
        _check_requests(nodes, topo, num_requests)


def request_end_nodes(
    nodes: Sequence[KVTreeNode], num_requests: int | None = None
) -> np.ndarray:
    """End node (deepest node listing it) of every request ``0..R-1``.

    Parameters
    ----------
    nodes : Sequence[KVTreeNode]
        A tree whose requests are root-to-node paths (see :func:`validate_tree`).
    num_requests : int, optional
        ``R``. Default: one more than the largest listed request id (0 if none).

    Returns
    -------
    numpy.ndarray
        ``[R]`` int64; entry ``r`` is the id of the node where request ``r``'s path ends.

    Raises
    ------
    InvalidTreeError
        If the topology is invalid, or a request id in ``0..R-1`` is listed by no node.
        Request paths themselves are not re-checked; use :func:`validate_tree` for that.
    """
    topo = _check_structure(nodes)
    pairs = _request_pairs(nodes)
    if num_requests is None:
        num_requests = int(pairs.req.max()) + 1 if pairs.req.size else 0
    elif not _is_int(num_requests) or num_requests < 0:
        raise _fail(f"num_requests must be an int >= 0, got {num_requests!r}")
    keep = pairs.req < num_requests
    req, node_of = pairs.req[keep], pairs.node[keep]
    present = np.bincount(req, minlength=num_requests) > 0
    if not present.all():
        r = int(np.argmin(present))
        raise _fail(f"request {r} is listed in no node (expected ids 0..{num_requests - 1})")
    # Sort by (request, depth); the last pair of each request is its deepest node.
    order = np.lexsort((topo.depth[node_of], req))
    sorted_req = req[order]
    last = np.flatnonzero(np.r_[sorted_req[1:] != sorted_req[:-1], True])
    ends = np.empty(num_requests, dtype=np.int64)
    ends[sorted_req[last]] = node_of[order[last]]
    return ends


# ------------------------------------------------------------------ building trees


def copy_tree(nodes: Sequence[KVTreeNode]) -> list[KVTreeNode]:
    """Deep copy of a tree into fresh :class:`KVTreeNode` objects.

    Parameters
    ----------
    nodes : Sequence[KVTreeNode]
        Any node list (not validated).

    Returns
    -------
    list[KVTreeNode]
        New nodes with the same fields and their own ``requests`` lists.
    """
    return [
        KVTreeNode(
            parent=nd.parent,
            id=nd.id,
            seqlen=nd.seqlen,
            num_children=nd.num_children,
            requests=list(nd.requests),
        )
        for nd in nodes
    ]


def assign_requests(nodes: Sequence[KVTreeNode]) -> list[KVTreeNode]:
    """A copy of the tree with one request per leaf, in leaf id order.

    The leaf (``num_children == 0``) with the smallest id gets request 0, the next one
    request 1, and so on; each request id is listed by every node from the leaf's root
    down to the leaf, so every ``requests`` list is increasing. Existing ``requests``
    lists are replaced.

    Parameters
    ----------
    nodes : Sequence[KVTreeNode]
        The tree, indexed by id. Not modified.

    Returns
    -------
    list[KVTreeNode]
        New nodes; the number of requests is the number of leaves.

    Raises
    ------
    InvalidTreeError
        If the topology is invalid (see :func:`validate_tree` with
        ``check_requests=False``).
    """
    topo = _check_structure(nodes)
    out = [
        KVTreeNode(parent=nd.parent, id=nd.id, seqlen=nd.seqlen, num_children=nd.num_children)
        for nd in nodes
    ]
    request = 0
    for leaf, kids in enumerate(topo.children):
        if kids:
            continue
        v = leaf
        while v != -1:
            out[v].requests.append(request)
            v = topo.parent[v]
        request += 1
    return out


def generate_tree(
    nodes_per_level: Sequence[int], tokens_per_level: Sequence[int]
) -> list[KVTreeNode]:
    """The seed benchmark's layered tree: fixed node counts and token counts per level.

    Level 0 has ``nodes_per_level[0]`` roots (more than one makes a forest). Node ``j``
    of level ``l+1`` has as parent node ``j * n_l // n_{l+1}`` of level ``l``, so the
    children are spread evenly, in consecutive runs, over the previous level. Ids go
    level by level (breadth-first), every node of level ``l`` has
    ``tokens_per_level[l]`` tokens, and requests are assigned as by
    :func:`assign_requests` (one per leaf, in id order).

    Parameters
    ----------
    nodes_per_level : Sequence[int]
        Node count of each level, each >= 1 and non-decreasing.
    tokens_per_level : Sequence[int]
        ``seqlen`` of the nodes of each level, each >= 0; same length.

    Returns
    -------
    list[KVTreeNode]
        ``sum(nodes_per_level)`` nodes indexed by id, with requests assigned.

    Raises
    ------
    InvalidTreeError
        If the lists are empty, differ in length, hold a non-int or out-of-range
        value, or a level has fewer nodes than the level above it.

    Examples
    --------
    >>> nodes = generate_tree([1, 4, 16], [256, 64, 32])
    >>> len(nodes), nodes[5].parent, nodes[5].requests
    (21, 1, [0])
    """
    counts, tokens = list(nodes_per_level), list(tokens_per_level)
    if not counts:
        raise _fail("nodes_per_level is empty; expected at least one level")
    if len(counts) != len(tokens):
        raise _fail(
            f"nodes_per_level has {len(counts)} levels but tokens_per_level has {len(tokens)}"
        )
    for level, (c, t) in enumerate(zip(counts, tokens)):
        if not _is_int(c) or c < 1:
            raise _fail(f"level {level} has {c!r} nodes; expected an int >= 1")
        if not _is_int(t) or t < 0:
            raise _fail(f"level {level} has {t!r} tokens per node; expected an int >= 0")
    for level in range(len(counts) - 1):
        if counts[level + 1] < counts[level]:
            raise _fail(
                f"level {level + 1} has {counts[level + 1]} nodes, fewer than the "
                f"{counts[level]} of level {level}; each node of a level needs a child"
            )
    nodes: list[KVTreeNode] = []
    offset = 0  # id of the first node of the previous level
    for level, (count, seqlen) in enumerate(zip(counts, tokens)):
        prev = counts[level - 1] if level else 0
        for j in range(count):
            parent = offset + j * prev // count if level else -1
            nodes.append(KVTreeNode(parent=parent, id=len(nodes), seqlen=int(seqlen)))
            if parent >= 0:
                nodes[parent].num_children += 1
        if level:
            offset += prev
    return assign_requests(nodes)


def parse_level_spec(spec: str) -> tuple[list[int], list[int]]:
    """Parse the seed suite's tree spec ``"<nodes per level> <tokens per level>"``.

    Parameters
    ----------
    spec : str
        Two whitespace-separated, comma-separated integer lists, e.g.
        ``"1,4,16 256,64,32"``.

    Returns
    -------
    tuple[list[int], list[int]]
        ``(nodes_per_level, tokens_per_level)``.

    Raises
    ------
    InvalidTreeError
        If the spec does not have that shape.
    """
    parts = str(spec).split()
    if len(parts) != 2:
        raise _fail(
            f"tree spec {spec!r}: expected two fields '<nodes per level> <tokens per level>', "
            f"found {len(parts)}"
        )
    lists = []
    for name, part in zip(("nodes per level", "tokens per level"), parts):
        items = part.split(",")
        if not all(re.fullmatch(r"\d+", it) for it in items):
            raise _fail(
                f"tree spec {spec!r}: {name} {part!r} is not a comma-separated list of "
                f"non-negative integers"
            )
        lists.append([int(it) for it in items])
    return lists[0], lists[1]


def generate_tree_from_spec(spec: str) -> list[KVTreeNode]:
    """:func:`generate_tree` from a spec string such as ``"1,4,16 256,64,32"``.

    Parameters
    ----------
    spec : str
        See :func:`parse_level_spec`.

    Returns
    -------
    list[KVTreeNode]
        The generated tree, requests assigned.
    """
    counts, tokens = parse_level_spec(spec)
    return generate_tree(counts, tokens)


# ---------------------------------------------------------------------- file format

_INT = re.compile(r"[+-]?\d+")
_NODE_FIELDS = "<parent> <id> <seqlen> <num_children>"


def _content_lines(text: str) -> list[tuple[int, list[str]]]:
    """(1-based line number, fields) of each line that is not blank or a comment."""
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if fields:
            out.append((lineno, fields))
    return out


def _parse_ints(where: str, fields: list[str], expected: str) -> list[int]:
    for f in fields:
        if not _INT.fullmatch(f):
            raise InvalidTreeError(
                f"{where}: expected integers {expected}, found non-numeric field {f!r}"
            )
    return [int(f) for f in fields]


def load_tree(path: PathLike) -> list[KVTreeNode]:
    """Read a tree file, check it, and assign one request per leaf.

    The format (see ``docs/TREE_FORMAT.md``): a first line ``<num_nodes>``, then one
    line ``<parent> <id> <seqlen> <num_children>`` per node. Blank lines and ``#``
    comments are ignored; node lines may come in any id order.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.

    Returns
    -------
    list[KVTreeNode]
        The nodes indexed by id, with requests assigned by :func:`assign_requests`.

    Raises
    ------
    InvalidTreeError
        For an empty file, a malformed count or node line (wrong number of fields,
        non-numeric field), fewer or more node lines than declared, a node id out of
        range or defined twice, or any structural error of :func:`validate_tree`. The
        message names the file, the line, and what was expected and found.
    OSError
        If the file cannot be read.
    """
    name = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        lines = _content_lines(f.read())
    if not lines:
        raise InvalidTreeError(
            f"{name}: empty file; expected a first line with the number of nodes"
        )
    count_line, count_fields = lines[0]
    where = f"{name}:{count_line}"
    if len(count_fields) != 1:
        raise InvalidTreeError(
            f"{where}: expected 1 field <num_nodes>, found {len(count_fields)} "
            f"({' '.join(count_fields)!r})"
        )
    (num_nodes,) = _parse_ints(where, count_fields, "<num_nodes>")
    if num_nodes < 0:
        raise InvalidTreeError(f"{where}: expected <num_nodes> >= 0, found {num_nodes}")
    body = lines[1:]
    if len(body) < num_nodes:
        last = body[-1][0] if body else count_line
        raise InvalidTreeError(
            f"{name}:{last}: file ends after {len(body)} node lines; "
            f"line {count_line} declares {num_nodes} nodes"
        )
    if len(body) > num_nodes:
        extra = body[num_nodes][0]
        raise InvalidTreeError(
            f"{name}:{extra}: unexpected extra line; line {count_line} declares "
            f"{num_nodes} nodes, found {len(body)} node lines"
        )

    by_id: list[KVTreeNode | None] = [None] * num_nodes
    line_of = [0] * num_nodes
    for lineno, fields in body:
        where = f"{name}:{lineno}"
        if len(fields) != 4:
            raise InvalidTreeError(
                f"{where}: expected 4 fields {_NODE_FIELDS}, found {len(fields)} "
                f"({' '.join(fields)!r})"
            )
        parent, node_id, seqlen, num_children = _parse_ints(where, fields, _NODE_FIELDS)
        if not 0 <= node_id < num_nodes:
            raise InvalidTreeError(
                f"{where}: node id {node_id} out of range 0..{num_nodes - 1} "
                f"(line {count_line} declares {num_nodes} nodes)"
            )
        if by_id[node_id] is not None:
            raise InvalidTreeError(
                f"{where}: node id {node_id} is defined twice (first on line "
                f"{line_of[node_id]}); each node has exactly one definition and one parent"
            )
        by_id[node_id] = KVTreeNode(
            parent=parent, id=node_id, seqlen=seqlen, num_children=num_children
        )
        line_of[node_id] = lineno
    # n lines, ids in range and distinct: every id 0..n-1 is defined.
    nodes: list[KVTreeNode] = by_id  # type: ignore[assignment]
    try:
        nodes = assign_requests(nodes)
    except InvalidTreeError as err:
        node_id = getattr(err, "node_id", None)
        where = f"{name}:{line_of[node_id]}" if node_id is not None else name
        raise InvalidTreeError(f"{where}: {err}") from err
    logger.debug("loaded %d nodes from %s", len(nodes), name)
    return nodes


def retrive_from_file(path: PathLike) -> list[KVTreeNode]:
    """Alias of :func:`load_tree`, under the seed artifact's name (spelling kept).

    Parameters
    ----------
    path : str or os.PathLike
        The tree file.

    Returns
    -------
    list[KVTreeNode]
        As :func:`load_tree`.
    """
    return load_tree(path)


def save_tree(nodes: Sequence[KVTreeNode], path: PathLike) -> None:
    """Write a tree in the file format read by :func:`load_tree`.

    Only the topology and the token counts are written; ``requests`` are not part of
    the format (loading assigns one request per leaf again), so a tree whose requests
    come from :func:`assign_requests` round-trips unchanged.

    Parameters
    ----------
    nodes : Sequence[KVTreeNode]
        The tree, indexed by id. Its topology is validated first.
    path : str or os.PathLike
        The file to write (replaced if it exists).

    Raises
    ------
    InvalidTreeError
        If the topology is invalid; nothing is written then.
    """
    _check_structure(nodes)
    lines = [str(len(nodes))]
    lines += [f"{nd.parent} {nd.id} {nd.seqlen} {nd.num_children}" for nd in nodes]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------ views and stats


def kv_ptrs(nodes: Sequence[KVTreeNode]) -> list[int]:
    """Start offset of every node's tokens in a flat K/V buffer laid out in id order.

    Parameters
    ----------
    nodes : Sequence[KVTreeNode]
        The tree, indexed by id.

    Returns
    -------
    list[int]
        ``[0, s0, s0+s1, ...]``, length ``n+1``; the last entry is the total token count.
    """
    return [0, *itertools.accumulate(int(nd.seqlen) for nd in nodes)]


def to_networkx(nodes: Sequence[KVTreeNode]) -> nx.DiGraph:
    """The tree as a directed graph with edges from parent to child.

    Parameters
    ----------
    nodes : Sequence[KVTreeNode]
        The tree, indexed by id (not validated, so that invalid trees can be inspected).

    Returns
    -------
    networkx.DiGraph
        One graph node per tree node, keyed by id, with attributes ``seqlen``,
        ``num_children`` and ``requests`` (a copy of the list). For a valid tree
        ``nx.is_branching(g)`` holds.
    """
    g = nx.DiGraph()
    for nd in nodes:
        g.add_node(
            nd.id, seqlen=nd.seqlen, num_children=nd.num_children, requests=list(nd.requests)
        )
    g.add_edges_from((nd.parent, nd.id) for nd in nodes if nd.parent != -1)
    return g


def tree_stats(nodes: Sequence[KVTreeNode]) -> dict[str, int | float]:
    """Size and sharing figures of a valid tree.

    Parameters
    ----------
    nodes : Sequence[KVTreeNode]
        The tree, indexed by id; validated first.

    Returns
    -------
    dict
        ``num_nodes``; ``num_roots``; ``num_requests`` (distinct request ids);
        ``depth`` (most nodes on a root-to-leaf path, 0 for an empty tree);
        ``unique_tokens`` (sum of ``seqlen``: what the tree stores);
        ``logical_tokens`` (sum over requests of their path's tokens: what per-request
        caches would store); ``sharing_ratio`` (``logical_tokens / unique_tokens``,
        0.0 when the tree holds no tokens).

    Raises
    ------
    InvalidTreeError
        If the tree is invalid.
    """
    topo = _check_structure(nodes)
    _check_requests(nodes, topo, None)
    unique = sum(int(nd.seqlen) for nd in nodes)
    logical = sum(int(nd.seqlen) * len(nd.requests) for nd in nodes)
    requests = set(itertools.chain.from_iterable(nd.requests for nd in nodes))
    return {
        "num_nodes": len(nodes),
        "num_roots": len(topo.roots),
        "num_requests": len(requests),
        "depth": int(topo.depth.max()) + 1 if len(nodes) else 0,
        "unique_tokens": unique,
        "logical_tokens": logical,
        "sharing_ratio": logical / unique if unique else 0.0,
    }


def _tidy_layout(topo: _Topology) -> tuple[list[float], list[int]]:
    """x (leaves at 0, 1, 2, ... in depth-first order; parents centred) and depth."""
    n = len(topo.parent)
    order: list[int] = []  # depth-first preorder, children in the order given
    stack = list(reversed(topo.roots))
    while stack:
        v = stack.pop()
        order.append(v)
        stack.extend(reversed(topo.children[v]))
    x = [0.0] * n
    next_leaf = 0
    for v in order:
        if not topo.children[v]:
            x[v] = float(next_leaf)
            next_leaf += 1
    for v in reversed(order):
        kids = topo.children[v]
        if kids:
            x[v] = (x[kids[0]] + x[kids[-1]]) / 2
    return x, [int(d) for d in topo.depth]


def draw_tree(nodes: Sequence[KVTreeNode], path: PathLike, *, title: str | None = None) -> None:
    """Save a PNG picture of the tree (needs matplotlib; no graphviz).

    Roots are at the top, one row per depth; leaves are spaced evenly in depth-first
    order and each parent is centred over its children. Up to 100 nodes each node is
    labelled with its id and seqlen; larger trees are drawn as dots and edges only.

    Parameters
    ----------
    nodes : Sequence[KVTreeNode]
        The tree, indexed by id; its topology is validated first.
    path : str or os.PathLike
        The PNG file to write.
    title : str, optional
        Figure title.

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    InvalidTreeError
        If the topology is invalid.
    """
    try:
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "draw_tree needs matplotlib, which is not installed (pip install matplotlib)"
        ) from err
    topo = _check_structure(nodes)
    n = len(nodes)
    x, depth = _tidy_layout(topo)
    y = [-d for d in depth]
    num_leaves = sum(1 for kids in topo.children if not kids)
    num_levels = max(depth) + 1 if n else 1
    labelled = n <= 100
    width = min(max(0.7 * num_leaves + 1.0, 4.0), 30.0)
    height = min(max(1.1 * num_levels + 1.0, 3.0), 20.0)
    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_subplot()
    segments = [((x[p], y[p]), (x[c], y[c])) for c, p in enumerate(topo.parent) if p >= 0]
    ax.add_collection(LineCollection(segments, colors="0.55", linewidths=0.8, zorder=1))
    if labelled:
        fontsize = 8 if n <= 30 else 6
        for i in range(n):
            ax.text(
                x[i], y[i], f"{i}\n{nodes[i].seqlen}",
                ha="center", va="center", fontsize=fontsize, zorder=2,
                bbox={"boxstyle": "round,pad=0.3", "facecolor": "#dbe9f6", "edgecolor": "#3b6ea5"},
            )
    else:
        ax.scatter(x, y, s=6, color="#3b6ea5", zorder=2)
    if n:
        ax.set_xlim(min(x) - 0.7, max(x) + 0.7)
        ax.set_ylim(min(y) - 0.6, 0.6)
    ax.set_axis_off()
    caption = title if title is not None else f"{n} nodes, {num_leaves} leaves"
    if labelled:
        caption += "  (label: id / seqlen)"
    ax.set_title(caption, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
