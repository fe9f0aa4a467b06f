"""Tests of treecache.tree: the node type, file format, validation, generators, exports."""

from __future__ import annotations

import re
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treecache.errors import InvalidTreeError, TreeCacheError
from treecache.tree import (
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

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "tree_example.txt"


def make_tree(parents, seqlens=None):
    """Nodes with the given parent array, correct num_children, no requests."""
    n = len(parents)
    seqlens = seqlens if seqlens is not None else [10] * n
    nodes = [KVTreeNode(parent=p, id=i, seqlen=s) for i, (p, s) in enumerate(zip(parents, seqlens))]
    for p in parents:
        if p >= 0:
            nodes[p].num_children += 1
    return nodes


def small_forest():
    """Root 0 (100) -> 1 (10) -> 3 (5); 0 -> 2 (20); root 4 (7). Leaves 2, 3, 4."""
    return assign_requests(make_tree([-1, 0, 0, 1, -1], [100, 10, 20, 5, 7]))


def write(tmp_path, text, name="t.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


def raises_naming(*needles):
    """Context manager: InvalidTreeError whose message contains every needle."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(InvalidTreeError)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._ctx.__exit__(*exc)
            msg = str(self.info.value)
            for needle in needles:
                assert needle in msg, f"{needle!r} not in {msg!r}"
            return handled

    return _Check()


# ------------------------------------------------------------------------ KVTreeNode


def test_node_defaults():
    n = KVTreeNode()
    assert (n.parent, n.id, n.seqlen, n.num_children, n.requests) == (-1, -1, 0, 0, [])


def test_node_requests_not_shared():
    a, b = KVTreeNode(), KVTreeNode()
    a.requests.append(3)
    assert b.requests == []
    assert a.requests is not b.requests


def test_node_seed_style_and_keywords():
    n = KVTreeNode()
    n.parent, n.id, n.seqlen = -1, 0, 128
    n.num_children, n.requests = 2, [0, 1]
    k = KVTreeNode(parent=-1, id=0, seqlen=128, num_children=2, requests=[0, 1])
    assert n == k
    assert KVTreeNode(-1, 0, 128, 2, [0, 1]) == k


def test_invalid_tree_error_kinds():
    assert issubclass(InvalidTreeError, TreeCacheError)
    assert issubclass(InvalidTreeError, ValueError)


# ------------------------------------------------------------------------ files


def test_load_example():
    nodes = load_tree(EXAMPLE)
    assert [n.id for n in nodes] == list(range(10))
    assert [n.parent for n in nodes] == [-1, 0, 0, 0, 1, 1, 2, 2, 2, 3]
    assert [n.seqlen for n in nodes] == [512, 40, 56, 32, 128, 96, 200, 64, 150, 80]
    assert nodes[0].requests == [0, 1, 2, 3, 4, 5]
    assert nodes[2].requests == [2, 3, 4]
    assert nodes[9].requests == [5]
    assert request_end_nodes(nodes).tolist() == [4, 5, 6, 7, 8, 9]
    validate_tree(nodes, num_requests=6)
    assert retrive_from_file(str(EXAMPLE)) == nodes


def test_round_trip(tmp_path):
    nodes = small_forest()
    path = tmp_path / "forest.txt"
    save_tree(nodes, path)
    assert path.read_text() == "5\n-1 0 100 2\n0 1 10 1\n0 2 20 0\n1 3 5 0\n-1 4 7 0\n"
    assert load_tree(path) == nodes


def test_load_accepts_comments_blank_lines_and_any_order(tmp_path):
    p = write(tmp_path, "# a tree\n\n3\n0 2 5 0  # leaf\n-1 0 8 2\n\n0 1 4 0\n")
    nodes = load_tree(p)
    assert [(n.parent, n.id, n.seqlen, n.num_children) for n in nodes] == [
        (-1, 0, 8, 2),
        (0, 1, 4, 0),
        (0, 2, 5, 0),
    ]
    assert [n.requests for n in nodes] == [[0, 1], [0], [1]]


def test_load_empty_file(tmp_path):
    p = write(tmp_path, "")
    with raises_naming(str(p), "empty file"):
        load_tree(p)


def test_load_only_comments_is_empty(tmp_path):
    p = write(tmp_path, "# nothing\n\n")
    with raises_naming(str(p), "empty file"):
        load_tree(p)


def test_load_truncated(tmp_path):
    p = write(tmp_path, "3\n-1 0 8 2\n0 1 4 0\n")
    with raises_naming(f"{p}:3:", "after 2 node lines", "declares 3 nodes"):
        load_tree(p)


def test_load_extra_lines(tmp_path):
    p = write(tmp_path, "2\n-1 0 8 1\n0 1 4 0\n0 2 4 0\n")
    with raises_naming(f"{p}:4:", "extra line", "declares 2 nodes", "found 3"):
        load_tree(p)


def test_load_non_numeric(tmp_path):
    p = write(tmp_path, "2\n-1 0 8 1\n0 1 x4 0\n")
    with raises_naming(f"{p}:3:", "non-numeric", "'x4'"):
        load_tree(p)


def test_load_non_numeric_count(tmp_path):
    p = write(tmp_path, "two\n-1 0 8 1\n0 1 4 0\n")
    with raises_naming(f"{p}:1:", "'two'"):
        load_tree(p)


def test_load_wrong_field_count(tmp_path):
    p = write(tmp_path, "2\n-1 0 8 1\n0 1 4\n")
    with raises_naming(f"{p}:3:", "expected 4 fields", "found 3"):
        load_tree(p)


def test_load_duplicate_id(tmp_path):
    p = write(tmp_path, "3\n-1 0 8 2\n0 1 4 0\n0 1 5 0\n")
    with raises_naming(f"{p}:4:", "node id 1", "defined twice", "line 3"):
        load_tree(p)


def test_load_id_out_of_range(tmp_path):
    p = write(tmp_path, "2\n-1 0 8 1\n0 5 4 0\n")
    with raises_naming(f"{p}:3:", "node id 5", "out of range"):
        load_tree(p)


def test_load_structural_error_names_line(tmp_path):
    p = write(tmp_path, "3\n-1 0 8 2\n0 1 4 0\n7 2 4 0\n")
    with raises_naming(f"{p}:4:", "node 2", "parent 7"):
        load_tree(p)


def test_save_rejects_invalid_and_writes_nothing(tmp_path):
    nodes = make_tree([-1, 0])
    nodes[1].parent = 1
    path = tmp_path / "bad.txt"
    with raises_naming("node 1", "own parent"):
        save_tree(nodes, path)
    assert not path.exists()


# ------------------------------------------------------------------------ requests


def test_requests_in_leaf_id_order_on_every_ancestor():
    # Leaves are 2, 4, 5 (in id order) -> requests 0, 1, 2.
    nodes = assign_requests(make_tree([-1, 0, 0, 1, 3, 1]))
    assert [n.requests for n in nodes] == [[0, 1, 2], [1, 2], [0], [1], [1], [2]]
    ends = request_end_nodes(nodes)
    assert ends.dtype == np.int64
    assert ends.tolist() == [2, 4, 5]
    for r, end in enumerate(ends.tolist()):
        v = end
        while v != -1:
            assert r in nodes[v].requests
            v = nodes[v].parent


def test_assign_requests_does_not_mutate():
    nodes = make_tree([-1, 0, 0])
    nodes[0].requests = [9]
    before = copy_tree(nodes)
    out = assign_requests(nodes)
    assert nodes == before
    assert all(a is not b for a, b in zip(out, nodes))
    assert [n.requests for n in out] == [[0, 1], [0], [1]]


def test_forest_is_valid():
    nodes = small_forest()
    validate_tree(nodes, num_requests=3)
    assert [n.requests for n in nodes] == [[0, 1], [1], [0], [1], [2]]
    assert request_end_nodes(nodes, 3).tolist() == [2, 3, 4]


def test_request_ending_at_internal_node_is_valid():
    nodes = make_tree([-1, 0, 1])
    nodes[0].requests = [0, 1, 2]
    nodes[1].requests = [1, 2]
    nodes[2].requests = [2]
    validate_tree(nodes, num_requests=3)
    assert request_end_nodes(nodes).tolist() == [0, 1, 2]


def test_node_without_requests_is_valid():
    nodes = make_tree([-1, 0, 0])
    nodes[0].requests = [0]
    nodes[1].requests = [0]
    validate_tree(nodes, num_requests=1)


def test_request_end_nodes_missing_request():
    nodes = small_forest()
    with raises_naming("request 3", "no node"):
        request_end_nodes(nodes, 4)


def test_copy_tree_is_deep():
    nodes = small_forest()
    c = copy_tree(nodes)
    assert c == nodes
    c[0].requests.append(99)
    assert nodes[0].requests == [0, 1]


def test_kv_ptrs():
    assert kv_ptrs(small_forest()) == [0, 100, 110, 130, 135, 142]
    assert kv_ptrs([]) == [0]


# ------------------------------------------------------------------------ rejections


def test_reject_cycle():
    nodes = make_tree([-1, 3, 1, 2])
    with raises_naming("cycle", "node 1", "1 -> 3 -> 2 -> 1"):
        validate_tree(nodes, check_requests=False)


def test_reject_own_parent():
    nodes = make_tree([-1, 0, 0])
    nodes[0].num_children = 1
    nodes[2].parent = 2
    nodes[2].num_children = 0
    with raises_naming("node 2", "its own parent"):
        validate_tree(nodes)


def test_reject_bad_id_order():
    nodes = make_tree([-1, 0, 0])
    nodes[1].id, nodes[2].id = 2, 1
    with raises_naming("position 1", "id 2", "expected id 1"):
        validate_tree(nodes)


def test_reject_duplicate_id_in_list():
    nodes = make_tree([-1, 0, 0])
    nodes[2].id = 1
    with raises_naming("node id 1", "positions 1 and 2"):
        validate_tree(nodes)


def test_reject_dangling_parent():
    nodes = make_tree([-1, 0, 0])
    nodes[1].parent = 7
    nodes[0].num_children = 1
    with raises_naming("node 1", "parent 7", "not a node id"):
        validate_tree(nodes)


def test_reject_negative_parent_other_than_root():
    nodes = make_tree([-1, 0])
    nodes[1].parent = -2
    with raises_naming("node 1", "parent -2"):
        validate_tree(nodes)


def test_reject_num_children_mismatch():
    nodes = make_tree([-1, 0, 0, 1])
    nodes[0].num_children = 3
    with raises_naming("node 0", "num_children=3", "is 2 (1, 2)"):
        validate_tree(nodes)


def test_reject_negative_seqlen():
    nodes = make_tree([-1, 0], [4, -3])
    with raises_naming("node 1", "seqlen -3"):
        validate_tree(nodes)


def test_reject_request_missing_from_parent():
    nodes = assign_requests(make_tree([-1, 0, 1, 0]))
    nodes[1].requests = []  # request 0 still in node 2, not in its parent 1
    with raises_naming("request 0", "node 2", "parent 1"):
        validate_tree(nodes)


def test_reject_request_in_two_branches():
    nodes = make_tree([-1, 0, 0])
    nodes[0].requests = [0]
    nodes[1].requests = [0]
    nodes[2].requests = [0]
    with raises_naming("request 0", "two branches", "node 1", "node 2"):
        validate_tree(nodes)


def test_reject_request_in_two_roots():
    nodes = make_tree([-1, -1])
    nodes[0].requests = [0]
    nodes[1].requests = [0]
    with raises_naming("request 0", "two branches"):
        validate_tree(nodes)


def test_reject_request_ids_missing():
    nodes = small_forest()
    with raises_naming("request 3", "listed in no node", "0..3"):
        validate_tree(nodes, num_requests=4)


def test_reject_request_id_out_of_range():
    nodes = small_forest()
    with raises_naming("node 4", "request 2", "out of range 0..1"):
        validate_tree(nodes, num_requests=2)


def test_reject_negative_request_id():
    nodes = make_tree([-1])
    nodes[0].requests = [-1]
    with raises_naming("node 0", "request -1"):
        validate_tree(nodes)


def test_reject_non_int_request_id():
    nodes = make_tree([-1])
    nodes[0].requests = [0.5]
    with raises_naming("node 0", "0.5"):
        validate_tree(nodes)


def test_reject_request_listed_twice_by_a_node():
    nodes = make_tree([-1])
    nodes[0].requests = [0, 0]
    with raises_naming("node 0", "request 0", "more than once"):
        validate_tree(nodes)


def test_check_requests_false_skips_requests():
    nodes = make_tree([-1, 0, 0])
    nodes[2].requests = [5]
    validate_tree(nodes, check_requests=False)
    with pytest.raises(InvalidTreeError):
        validate_tree(nodes)


def test_validate_does_not_mutate():
    nodes = small_forest()
    before = copy_tree(nodes)
    validate_tree(nodes, num_requests=3)
    tree_stats(nodes)
    request_end_nodes(nodes)
    assert nodes == before


# ------------------------------------------------------------------------ generator


def test_generate_small_tree():
    nodes = generate_tree([1, 4, 16], [256, 64, 32])
    assert len(nodes) == 21
    assert [n.parent for n in nodes[1:5]] == [0, 0, 0, 0]
    assert [n.parent for n in nodes[5:21]] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert [n.num_children for n in nodes[:5]] == [4, 4, 4, 4, 4]
    assert nodes[2].requests == [4, 5, 6, 7]
    assert request_end_nodes(nodes).tolist() == list(range(5, 21))
    validate_tree(nodes, num_requests=16)


def test_generate_seed_largest_tree():
    nodes = generate_tree([1, 4, 16, 64, 256, 1024], [256, 8, 256, 64, 32, 256])
    stats = tree_stats(nodes)
    assert stats["num_nodes"] == 1365
    assert stats["num_requests"] == 1024
    assert stats["unique_tokens"] == 278816
    assert stats["depth"] == 6
    assert sum(len(n.requests) for n in nodes) == 6 * 1024
    validate_tree(nodes, num_requests=1024)


def test_generate_uneven_spread():
    nodes = generate_tree([2, 3], [5, 6])  # forest of two roots: children 0, 0, 1
    assert [n.parent for n in nodes] == [-1, -1, 0, 0, 1]
    assert tree_stats(nodes)["num_roots"] == 2


def test_generate_from_spec():
    assert parse_level_spec(" 1,4,16   256,64,32 ") == ([1, 4, 16], [256, 64, 32])
    nodes = generate_tree_from_spec("1,1024 2048,32")
    assert sum(n.seqlen for n in nodes) == 34816
    assert kv_ptrs(nodes)[-1] == 34816
    assert tree_stats(nodes)["num_requests"] == 1024


@pytest.mark.parametrize("spec", ["1,4,16", "1,4 2,x", "1,4 2,3 5", "1;4 2,3", ""])
def test_parse_level_spec_rejects(spec):
    with pytest.raises(InvalidTreeError, match="tree spec"):
        parse_level_spec(spec)


def test_generate_rejects():
    with raises_naming("level 1", "fewer"):
        generate_tree([4, 2], [1, 1])
    with raises_naming("2 levels", "3"):
        generate_tree([1, 2], [1, 1, 1])
    with raises_naming("level 1", "0 nodes"):
        generate_tree([1, 0], [1, 1])
    with raises_naming("empty"):
        generate_tree([], [])


# ------------------------------------------------------------------------ exports


def test_networkx_export():
    nodes = small_forest()
    g = to_networkx(nodes)
    assert nx.is_forest(g.to_undirected())
    assert nx.is_branching(g)
    assert sorted(g.edges) == [(0, 1), (0, 2), (1, 3)]
    assert g.nodes[1] == {"seqlen": 10, "num_children": 1, "requests": [1]}
    assert g.nodes[4]["requests"] == [2]
    g.nodes[0]["requests"].append(7)
    assert nodes[0].requests == [0, 1]


def test_tree_stats_hand_built():
    assert tree_stats(small_forest()) == {
        "num_nodes": 5,
        "num_roots": 2,
        "num_requests": 3,
        "depth": 3,
        "unique_tokens": 142,
        "logical_tokens": 120 + 115 + 7,
        "sharing_ratio": 242 / 142,
    }


def test_tree_stats_example_file():
    stats = tree_stats(load_tree(EXAMPLE))
    assert (stats["unique_tokens"], stats["logical_tokens"], stats["depth"]) == (1358, 4070, 3)


def test_tree_stats_empty():
    assert tree_stats([]) == {
        "num_nodes": 0,
        "num_roots": 0,
        "num_requests": 0,
        "depth": 0,
        "unique_tokens": 0,
        "logical_tokens": 0,
        "sharing_ratio": 0.0,
    }


def test_draw_tree(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "tree.png"
    draw_tree(small_forest(), path, title="forest")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    big = tmp_path / "big.png"
    draw_tree(generate_tree([1, 4, 128], [8, 8, 8]), big)
    assert big.stat().st_size > 0


# ------------------------------------------------------------------------ properties


@st.composite
def random_forests(draw):
    n = draw(st.integers(min_value=1, max_value=40))
    parents = [-1]
    for i in range(1, n):
        parents.append(draw(st.one_of(st.just(-1), st.integers(0, i - 1))))
    seqlens = draw(st.lists(st.integers(0, 300), min_size=n, max_size=n))
    return assign_requests(make_tree(parents, seqlens))


@settings(max_examples=60, deadline=None)
@given(nodes=random_forests())
def test_property_random_forest_valid_and_round_trips(nodes, tmp_path_factory):
    num_leaves = sum(1 for n in nodes if n.num_children == 0)
    validate_tree(nodes, num_requests=num_leaves)
    ends = request_end_nodes(nodes)
    assert sorted(ends.tolist()) == [n.id for n in nodes if n.num_children == 0]
    path = tmp_path_factory.mktemp("rt") / "tree.txt"
    save_tree(nodes, path)
    assert load_tree(path) == nodes
    g = to_networkx(nodes)
    assert nx.is_forest(g.to_undirected())
    assert nx.is_branching(g)
    stats = tree_stats(nodes)
    depth = {n.id: (0 if n.parent == -1 else None) for n in nodes}
    for n in nodes:  # parents precede children in these forests
        if n.parent != -1:
            depth[n.id] = depth[n.parent] + 1
    assert stats["depth"] == max(depth.values()) + 1
    assert stats["logical_tokens"] == sum(
        sum(nodes[v].seqlen for v in nx.ancestors(g, end) | {end}) for end in ends.tolist()
    )


@settings(max_examples=60, deadline=None)
@given(nodes=random_forests(), data=st.data())
def test_property_cycle_rejected(nodes, data):
    g = to_networkx(nodes)
    victim = data.draw(st.sampled_from(range(len(nodes))))
    # Pointing a node at itself or one of its descendants closes a cycle.
    target = data.draw(st.sampled_from(sorted(nx.descendants(g, victim) | {victim})))
    bad = copy_tree(nodes)
    bad[victim].parent = target
    for nd in bad:
        nd.num_children = 0
    for nd in bad:
        if nd.parent >= 0:
            bad[nd.parent].num_children += 1
    with pytest.raises(InvalidTreeError) as info:
        validate_tree(bad, check_requests=False)
    msg = str(info.value)
    if target == victim:
        assert f"node {victim} is its own parent" in msg
    else:
        cycle = re.search(r"\(([\d >-]+),", msg).group(1).split(" -> ")
        assert "cycle" in msg and str(victim) in cycle
