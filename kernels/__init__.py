"""Tree-decode attention kernels (Triton) and their float32 torch reference.

This package is pure compute: tensors in, tensors out. It knows nothing about trees;
a planner (such as :mod:`treecache.plan`) turns a tree into the vnode index arrays the
kernels take. See :mod:`kernels.tree_decode` for the data layout.

Note on the name: the PyPI project ``kernels`` (Hugging Face's hub-kernel loader) uses
the same import name. This package is installed by the ``treecache`` distribution, so
``importlib.metadata`` never reports a ``kernels`` distribution for it.
"""

from .backend import Backend, select_backend
from .reference import reference_decode, softcap_logits, torch_tree_decode
from .tree_decode import (
    SUPPORTED_DTYPES,
    Phase,
    launch_form,
    merge_phases,
    scaled_partials,
    stage1_block_sizes,
    stage2_blocks,
    tree_decode,
    tree_decode_launcher,
    tree_decode_stage1,
    tree_decode_stage2,
)

__all__ = [
    "Backend",
    "Phase",
    "SUPPORTED_DTYPES",
    "launch_form",
    "merge_phases",
    "reference_decode",
    "scaled_partials",
    "select_backend",
    "softcap_logits",
    "stage1_block_sizes",
    "stage2_blocks",
    "torch_tree_decode",
    "tree_decode",
    "tree_decode_launcher",
    "tree_decode_stage1",
    "tree_decode_stage2",
]
