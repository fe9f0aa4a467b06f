"""Packaging checks: the `kernels` import name does not confuse transformers."""

import importlib.metadata

import pytest


def test_our_kernels_package_is_the_one_imported():
    import kernels

    assert hasattr(kernels, "tree_decode") and hasattr(kernels, "reference_decode")
    # No distribution named "kernels" is installed by treecache.
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("kernels")


def test_transformers_imports_beside_our_kernels_package():
    transformers = pytest.importorskip("transformers")
    import kernels  # noqa: F401 - ours is importable at the same time

    from transformers.utils import import_utils

    # transformers must not mistake our package for Hugging Face's hub-kernel loader.
    if hasattr(import_utils, "is_kernels_available"):
        assert import_utils.is_kernels_available() is False
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=64)
    model = transformers.LlamaForCausalLM(config)
    import torch

    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 64)
    assert torch.isfinite(out.logits).all()
