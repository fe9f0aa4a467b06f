"""Adapters that run real models with their attention going through a :class:`TreeKVCache`.

``treecache.integrations.transformers``
    Llama-family causal LMs from Hugging Face transformers (Llama, SmolLM, Mistral without
    sliding window, Qwen2/Qwen3). Needs the optional extra ``treecache[hf]``
    (``transformers``, ``gguf``, ``accelerate``); the adapter itself only uses torch, the
    extra is needed to load a model.

The submodules are not imported here, so ``import treecache.integrations`` never pulls in
an optional dependency.
"""

from __future__ import annotations

__all__: list[str] = []
