"""Beam search and speculative decoding on a :class:`TreeKVCache`.

Both are written with the cache's four verbs and nothing else:

* the prompt is prefilled **once**; its K/V sit at the root of the tree;
* **beam search** keeps one request per live beam. A beam that several winners continue is
  forked (no KV copy), a beam nobody continues is pruned (its private pages go back to the
  pool), and every decode step attends one query per beam;
* **speculative decoding** lays a drafter's token tree out as requests (a draft token is a
  request forked from its parent's), verifies all of it with one tree-attention call (one
  query per draft token, each attending its root-to-token path), keeps the accepted path
  with ``cache.accept`` and prunes the rest.

``model`` is either a Hugging Face Llama-family model (wrapped in
:class:`treecache.integrations.transformers.TreeCacheModel`) or any object with the same
``prefill`` / ``decode`` / ``new_cache`` / ``kv_bytes_per_token`` / ``eos_token_ids`` members.

:func:`beam_search` follows the selection rules of transformers' beam search (top
``max(2, 1 + n_eos) * num_beams`` candidates per step, length penalty, ``early_stopping``
in its three forms), so with the same model it returns the same best sequences as
``model.generate(num_beams=W, do_sample=False)``. Greedy :func:`speculative_decode` is
lossless: it returns exactly the tokens of greedy decoding.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import torch

from .errors import ShapeMismatchError

__all__ = [
    "BeamSearchResult",
    "BeamSearchStats",
    "DraftTree",
    "Drafter",
    "NgramDrafter",
    "SpeculativeResult",
    "SpeculativeStats",
    "as_tree_model",
    "beam_search",
    "speculative_decode",
]

logger = logging.getLogger(__name__)

# transformers marks impossible candidates by adding this much to their score.
_NEG = -1.0e9


# --------------------------------------------------------------------------- model protocol


@runtime_checkable
class TreeModel(Protocol):
    """What the generation loops need from a model (see ``TreeCacheModel``)."""

    def new_cache(self, capacity_tokens: int, *, page_size: int = 1, backend: str = "auto") -> Any: ...

    def prefill(self, cache: Any, input_ids: Any) -> tuple[int, torch.Tensor]: ...

    def decode(
        self, cache: Any, requests: Sequence[int], token_ids: Any, *, slots: Any = None
    ) -> torch.Tensor: ...

    def kv_bytes_per_token(self) -> int: ...

    @property
    def eos_token_ids(self) -> list[int]: ...


def as_tree_model(model: Any) -> TreeModel:
    """``model`` itself if it already speaks the protocol, else a ``TreeCacheModel`` around it."""
    if isinstance(model, TreeModel):
        return model
    from .integrations.transformers import TreeCacheModel

    return TreeCacheModel(model)


# --------------------------------------------------------------------------- beam search


@attrs.frozen
class BeamSearchStats:
    """Counters and timings of one :func:`beam_search` call.

    Memory is counted in KV bytes over all layers. ``peak_tree_kv_bytes`` is the most the
    tree held at once (pages in use, partial pages included); ``peak_per_beam_kv_bytes`` is
    what a cache with one contiguous copy of the context per beam (the usual layout, and
    transformers' own) holds at the same moment: the sum of the live beams' lengths.
    """

    num_beams: int
    prompt_tokens: int
    steps: int  #: decode forward passes (one query per live beam each)
    forks: int
    prunes: int
    plan_rebuilds: int | None  #: from ``cache.stats()``, if the cache reports it
    kv_bytes_per_token: int
    peak_tree_kv_bytes: int
    peak_per_beam_kv_bytes: int
    prefill_seconds: float
    decode_seconds: float  #: all decode forward passes
    total_seconds: float  #: the whole call, bookkeeping included

    @property
    def kv_saving(self) -> float:
        """Fraction of the per-beam cache's peak KV memory that the tree did not need."""
        if self.peak_per_beam_kv_bytes == 0:
            return 0.0
        return 1.0 - self.peak_tree_kv_bytes / self.peak_per_beam_kv_bytes

    @property
    def mean_step_seconds(self) -> float:
        return self.decode_seconds / self.steps if self.steps else 0.0


@attrs.frozen
class BeamSearchResult:
    """Best hypotheses of :func:`beam_search`, best first.

    ``sequences[i]`` holds the generated token ids only (the prompt is ``prompt_ids``); a
    hypothesis that ended with an end-of-sequence token includes it.
    """

    sequences: list[list[int]]
    scores: list[float]  #: length-penalised sum of log-probabilities
    prompt_ids: list[int]
    texts: list[str] | None  #: decoded ``sequences`` when a tokenizer was given
    stats: BeamSearchStats


@attrs.define
class _Beam:
    request: int  # cache request whose path is the prompt + tokens[:-1]
    tokens: list[int]  # generated tokens; the last one is fed at the next step


def beam_search(
    model: Any,
    input_ids_or_text: str | torch.Tensor | Sequence[int],
    num_beams: int,
    max_new_tokens: int,
    *,
    tokenizer: Any = None,
    eos_token_id: int | Sequence[int] | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    page_size: int = 1,
    backend: str = "auto",
    capacity_tokens: int | None = None,
) -> BeamSearchResult:
    """Beam search over a tree KV cache: the prompt stored once, beams forking and dying.

    Parameters
    ----------
    model : transformers model or TreeModel
        A Llama-family causal LM (wrapped in ``TreeCacheModel``) or an adapter.
    input_ids_or_text : str, LongTensor [n] or [1, n], or sequence of int
        One prompt. A string needs ``tokenizer``.
    num_beams : int
        Beam width W.
    max_new_tokens : int
        Most tokens generated per hypothesis.
    tokenizer : optional
        Encodes a string prompt and decodes the results into ``texts``.
    eos_token_id : int or sequence of int, optional
        End-of-sequence ids; by default the model's generation config's. Pass ``[]`` to
        generate ``max_new_tokens`` tokens regardless.
    length_penalty : float
        A finished hypothesis scores ``sum_logprob / generated_len ** length_penalty``.
    early_stopping : bool or "never"
        As in transformers: ``True`` stops once ``num_beams`` hypotheses are finished;
        ``False`` stops when a heuristic says no running beam can beat the finished ones;
        ``"never"`` uses the exact bound where the length penalty allows it.
    num_return_sequences : int
        How many hypotheses to return (``<= num_beams``).
    page_size, backend, capacity_tokens :
        Passed to the cache. ``capacity_tokens`` defaults to what the search can need.

    Returns
    -------
    BeamSearchResult
    """
    t_start = time.perf_counter()
    tm = as_tree_model(model)
    prompt = _prompt_ids(input_ids_or_text, tokenizer)
    eos = _eos_ids(tm, eos_token_id)
    _check_positive(num_beams=num_beams, max_new_tokens=max_new_tokens, page_size=page_size)
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(
            f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences}"
        )
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")

    n_prompt = len(prompt)
    max_length = n_prompt + max_new_tokens
    width = num_beams
    keep = max(2, 1 + len(eos)) * width  # candidates examined per step
    if capacity_tokens is None:
        capacity_tokens = n_prompt + width * (max_new_tokens + 2 * page_size + 1) + page_size
    capacity_tokens = -(-capacity_tokens // page_size) * page_size
    cache = tm.new_cache(capacity_tokens, page_size=page_size, backend=backend)
    bytes_per_token = tm.kv_bytes_per_token()

    t0 = time.perf_counter()
    root, logits = tm.prefill(cache, prompt)
    logits = logits[None]
    _synchronize(logits.device)
    prefill_seconds = time.perf_counter() - t0
    # Selection runs where the logits are (as in transformers); Python sees a few scalars.
    dev = logits.device
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
    in_top_width = torch.arange(keep, device=dev) < width
    neg = torch.tensor(_NEG, device=dev)

    # Running beams. transformers starts with W copies of the prompt, all but the first at
    # a score of -1e9 so that they never reach the top-K; one beam is the same search.
    running = [_Beam(root, [])]
    running_scores = torch.zeros(1, device=dev)
    # Finished hypotheses: W slots, -1e9 while empty, kept sorted best first.
    fin_scores = torch.full((width,), _NEG, device=dev)
    fin_done = torch.zeros(width, dtype=torch.bool, device=dev)
    fin_tokens: list[list[int]] = [[] for _ in range(width)]
    improvable = True
    cur_len = n_prompt
    steps = forks = prunes = 0
    decode_seconds = 0.0
    peak_tree = peak_per_beam = n_prompt * bytes_per_token

    while True:
        vocab = logits.shape[-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [beams, V]
        totals = (log_probs + running_scores[:, None]).reshape(-1)
        top_scores, top_index = torch.topk(totals, keep)
        top_beam = top_index // vocab
        top_token = top_index % vocab
        stops = torch.isin(top_token, eos_t) | (cur_len + 1 >= max_length)

        # Beams that go on: the best W candidates that did not stop.
        run_scores = top_scores + stops.float() * _NEG
        chosen = torch.topk(run_scores, width).indices

        # Hypotheses that end here (only among the top W candidates) compete for the W
        # finished slots, with the length penalty.
        ended = top_scores / ((cur_len + 1 - n_prompt) ** length_penalty)
        if early_stopping is True and bool(fin_done.all()):
            ended = ended + _NEG
        if not improvable:
            ended = ended + _NEG
        just_done = stops & in_top_width
        ended = ended + (~just_done).float() * _NEG
        merged = torch.topk(torch.cat((fin_scores, ended)), width).indices
        candidates = [running[b].tokens + [t] for b, t in zip(top_beam.tolist(), top_token.tolist())]
        fin_tokens = [fin_tokens[i] if i < width else candidates[i - width] for i in merged.tolist()]
        fin_scores = torch.cat((fin_scores, ended))[merged]
        fin_done = torch.cat((fin_done, just_done))[merged]

        cur_len += 1
        running_scores = run_scores[chosen]
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - n_prompt
        else:
            best_len = cur_len - n_prompt
        best_possible = running_scores[0] / (best_len**length_penalty)
        worst_finished = torch.where(fin_done, fin_scores.min(), neg)
        improvable = improvable and bool((best_possible > worst_finished).any())
        open_beam = not (bool(fin_done.all()) and early_stopping is True)
        if not (improvable and open_beam and not bool(stops.all())):
            break

        # Tree maintenance: beams nobody continues die, beams continued k times fork k-1 times.
        parents = top_beam[chosen].tolist()
        tokens = top_token[chosen].tolist()
        children = collections.Counter(parents)
        dead = [beam.request for b, beam in enumerate(running) if children[b] == 0]
        cache.prune(dead)
        prunes += len(dead)
        claimed: set[int] = set()
        next_running = []
        for p, t in zip(parents, tokens):
            if p in claimed:
                request = cache.fork(running[p].request)
                forks += 1
            else:
                request = running[p].request
                claimed.add(p)
            next_running.append(_Beam(request, running[p].tokens + [t]))
        running = next_running

        requests = [b.request for b in running]
        t0 = time.perf_counter()
        logits = tm.decode(cache, requests, tokens)
        _synchronize(logits.device)
        decode_seconds += time.perf_counter() - t0
        steps += 1
        tree_bytes, per_beam_bytes = _kv_bytes(cache, requests, page_size, bytes_per_token)
        peak_tree = max(peak_tree, tree_bytes)
        peak_per_beam = max(peak_per_beam, per_beam_bytes)
        logger.debug(
            "beam step %d: forks=%d prunes=%d tree=%d B per-beam=%d B",
            steps, forks, prunes, tree_bytes, per_beam_bytes,
        )

    sequences = fin_tokens[:num_return_sequences]
    stats = BeamSearchStats(
        num_beams=width,
        prompt_tokens=n_prompt,
        steps=steps,
        forks=forks,
        prunes=prunes,
        plan_rebuilds=_cache_stat(cache, "plan_rebuilds"),
        kv_bytes_per_token=bytes_per_token,
        peak_tree_kv_bytes=peak_tree,
        peak_per_beam_kv_bytes=peak_per_beam,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        total_seconds=time.perf_counter() - t_start,
    )
    return BeamSearchResult(
        sequences=sequences,
        scores=fin_scores[:num_return_sequences].tolist(),
        prompt_ids=prompt,
        texts=_decode_texts(tokenizer, sequences),
        stats=stats,
    )


# --------------------------------------------------------------------------- drafting


@attrs.frozen
class DraftTree:
    """Draft tokens proposed below a root token (the token known to come next).

    Nodes are in topological order: ``parents[i]`` is the index of node i's parent, smaller
    than ``i``, or ``-1`` when node i is a child of the root. Node i's draft continuation is
    the root token followed by the tokens on the path to i.
    """

    tokens: tuple[int, ...] = attrs.field(converter=tuple, default=())
    parents: tuple[int, ...] = attrs.field(converter=tuple, default=())

    def __attrs_post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.parents)} parents")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"parents[{i}] = {p}: expected -1 <= parent < {i} (topological order)")

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        """Depth of each node; children of the root have depth 1."""
        depth: list[int] = []
        for p in self.parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return depth

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]], max_tokens: int | None = None) -> DraftTree:
        """Merge continuations into a trie (shared prefixes become shared nodes).

        Paths are inserted in order; insertion stops once the tree has ``max_tokens`` nodes.
        """
        index: dict[tuple[int, int], int] = {}
        tokens: list[int] = []
        parents: list[int] = []
        for path in paths:
            parent = -1
            for t in path:
                node = index.get((parent, int(t)))
                if node is None:
                    if max_tokens is not None and len(tokens) >= max_tokens:
                        break
                    node = len(tokens)
                    index[(parent, int(t))] = node
                    tokens.append(int(t))
                    parents.append(parent)
                parent = node
        return cls(tokens, parents)

    def truncated(self, max_tokens: int, max_depth: int) -> DraftTree:
        """The first ``max_tokens`` nodes no deeper than ``max_depth`` (a valid tree again)."""
        keep: dict[int, int] = {}
        tokens, parents = [], []
        for i, (t, p, d) in enumerate(zip(self.tokens, self.parents, self.depths())):
            if len(tokens) >= max_tokens:
                break
            if d > max_depth or (p >= 0 and p not in keep):
                continue
            keep[i] = len(tokens)
            tokens.append(t)
            parents.append(keep[p] if p >= 0 else -1)
        return DraftTree(tokens, parents)


@runtime_checkable
class Drafter(Protocol):
    """Proposes a draft tree given the token history (prompt + generated + the root token)."""

    def propose(self, history: Sequence[int]) -> DraftTree: ...


@attrs.define
class NgramDrafter:
    """Prompt-lookup drafting: continuations of earlier occurrences of the latest n-gram.

    The last ``n`` tokens of the history (``n`` from ``max_ngram`` down to ``min_ngram``)
    are looked up among the earlier tokens; the tokens that followed each match, most
    recent match first and longer n-grams first, are candidate continuations of up to
    ``max_depth`` tokens. Up to ``num_branches`` distinct continuations are merged into a
    token tree. Costs O(len(history) * max_ngram) Python operations per call.
    """

    max_ngram: int = 3
    min_ngram: int = 1
    num_branches: int = 4
    max_depth: int = 6

    def propose(self, history: Sequence[int]) -> DraftTree:
        h = list(history)
        paths: list[tuple[int, ...]] = []
        for n in range(min(self.max_ngram, len(h) - 1), self.min_ngram - 1, -1):
            key = h[-n:]
            last = key[-1]
            # Matches ending before the latest token, most recent first.
            for start in range(len(h) - n - 1, -1, -1):
                if h[start + n - 1] != last or h[start : start + n] != key:
                    continue
                cont = tuple(h[start + n : start + n + self.max_depth])
                if cont and not any(p[: len(cont)] == cont for p in paths):
                    paths.append(cont)
                    if len(paths) >= self.num_branches:
                        return DraftTree.from_paths(paths)
        return DraftTree.from_paths(paths)


# --------------------------------------------------------------------------- speculative decoding


@attrs.frozen
class SpeculativeStats:
    """Counters and timings of one :func:`speculative_decode` call."""

    prompt_tokens: int
    generated_tokens: int
    steps: int  #: verification forward passes (tree attention, one query per draft token)
    drafted_tokens: int  #: draft tokens verified, all steps (root tokens not counted)
    accepted_tokens: int  #: draft tokens accepted, all steps
    plan_rebuilds: int | None
    kv_bytes_per_token: int
    peak_tree_kv_bytes: int  #: most KV held at once (prompt, output and the draft tree)
    prefill_seconds: float
    draft_seconds: float
    verify_seconds: float
    total_seconds: float

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over drafted tokens."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_per_step(self) -> float:
        return self.accepted_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Generated tokens per forward pass (prefill included), 1.0 for plain decoding."""
        return self.generated_tokens / (self.steps + 1)


@attrs.frozen
class SpeculativeResult:
    """Output of :func:`speculative_decode`: generated ids (prompt excluded)."""

    tokens: list[int]
    prompt_ids: list[int]
    text: str | None
    stats: SpeculativeStats


def speculative_decode(
    model: Any,
    input_ids_or_text: str | torch.Tensor | Sequence[int],
    max_new_tokens: int,
    *,
    drafter: Drafter | None = None,
    max_draft_tokens: int = 16,
    tokenizer: Any = None,
    eos_token_id: int | Sequence[int] | None = None,
    page_size: int = 1,
    backend: str = "auto",
    capacity_tokens: int | None = None,
) -> SpeculativeResult:
    """Greedy speculative decoding with a token-tree drafter, verified by tree attention.

    Each step, the token known to come next (the root) and a drafter's tree of guesses
    below it are laid out in the cache: the root extends the sequence's request, every
    draft token is a request forked from its parent's. One ``decode`` call gives, for every
    node, the logits after its root-to-node path. The path is accepted while the argmax
    after a node equals one of its children; the argmax after the last accepted node is
    the next root. The output is exactly greedy decoding's.

    Parameters
    ----------
    model : transformers model or TreeModel
    input_ids_or_text : str, LongTensor [n] or [1, n], or sequence of int
    max_new_tokens : int
    drafter : Drafter, optional
        Defaults to :class:`NgramDrafter`.
    max_draft_tokens : int
        Most draft tokens verified per step; 0 turns drafting off (plain greedy decoding).
    tokenizer, eos_token_id, page_size, backend, capacity_tokens :
        As in :func:`beam_search`.

    Returns
    -------
    SpeculativeResult
    """
    t_start = time.perf_counter()
    tm = as_tree_model(model)
    prompt = _prompt_ids(input_ids_or_text, tokenizer)
    eos = set(_eos_ids(tm, eos_token_id))
    _check_positive(max_new_tokens=max_new_tokens, page_size=page_size)
    if max_draft_tokens < 0:
        raise ValueError(f"max_draft_tokens must be >= 0, got {max_draft_tokens}")
    drafter = NgramDrafter() if drafter is None else drafter
    n_prompt = len(prompt)
    if capacity_tokens is None:
        capacity_tokens = n_prompt + max_new_tokens + (max_draft_tokens + 2) * (page_size + 1)
    capacity_tokens = -(-capacity_tokens // page_size) * page_size
    cache = tm.new_cache(capacity_tokens, page_size=page_size, backend=backend)
    bytes_per_token = tm.kv_bytes_per_token()

    t0 = time.perf_counter()
    request, logits = tm.prefill(cache, prompt)
    _synchronize(logits.device)
    prefill_seconds = time.perf_counter() - t0

    history = list(prompt)
    out: list[int] = []
    steps = drafted = accepted_total = 0
    draft_seconds = verify_seconds = 0.0
    peak_tree = n_prompt * bytes_per_token
    root = int(torch.argmax(logits))
    while True:
        out.append(root)
        history.append(root)
        budget = max_new_tokens - len(out)  # draft tokens that could still be used
        if root in eos or budget <= 0:
            break

        t0 = time.perf_counter()
        tree = DraftTree()
        if max_draft_tokens > 0:
            tree = drafter.propose(history).truncated(max_draft_tokens, budget)
        tree = _breadth_first(tree)
        draft_seconds += time.perf_counter() - t0

        t0 = time.perf_counter()
        node_requests, slots = _lay_out_draft(cache, request, tree)
        logits = tm.decode(cache, node_requests, [root, *tree.tokens], slots=slots)
        _synchronize(logits.device)
        verify_seconds += time.perf_counter() - t0
        steps += 1
        drafted += len(tree)
        tree_bytes, _ = _kv_bytes(cache, node_requests, page_size, bytes_per_token)
        peak_tree = max(peak_tree, tree_bytes)

        # Walk down from the root while the model's greedy choice is a drafted child.
        # Node 0 is the root, draft node i is node i + 1.
        children: dict[int, dict[int, int]] = collections.defaultdict(dict)
        for i, (t, p) in enumerate(zip(tree.tokens, tree.parents)):
            children[p + 1].setdefault(t, i + 1)
        predicted = logits.argmax(dim=-1).tolist()
        node, accepted = 0, []
        while predicted[node] in children[node] and (not accepted or accepted[-1] not in eos):
            node = children[node][predicted[node]]
            accepted.append(tree.tokens[node - 1])

        rejected = [r for i, r in enumerate(node_requests) if i not in (0, node)]
        if node != 0:
            cache.accept(request, node_requests[node], discard=rejected)
        else:
            cache.prune(rejected)
        accepted_total += len(accepted)
        out.extend(accepted)
        history.extend(accepted)
        logger.debug("speculative step %d: drafted %d, accepted %d", steps, len(tree), len(accepted))
        if (accepted and accepted[-1] in eos) or len(out) >= max_new_tokens:
            break
        root = predicted[node]

    stats = SpeculativeStats(
        prompt_tokens=n_prompt,
        generated_tokens=len(out),
        steps=steps,
        drafted_tokens=drafted,
        accepted_tokens=accepted_total,
        plan_rebuilds=_cache_stat(cache, "plan_rebuilds"),
        kv_bytes_per_token=bytes_per_token,
        peak_tree_kv_bytes=peak_tree,
        prefill_seconds=prefill_seconds,
        draft_seconds=draft_seconds,
        verify_seconds=verify_seconds,
        total_seconds=time.perf_counter() - t_start,
    )
    text = _decode_texts(tokenizer, [out])
    return SpeculativeResult(tokens=out, prompt_ids=prompt, text=text[0] if text else None, stats=stats)


def _breadth_first(tree: DraftTree) -> DraftTree:
    """The same tree with its nodes sorted by depth (stable), parents renumbered."""
    order = sorted(range(len(tree)), key=tree.depths().__getitem__)
    new_index = {old: new for new, old in enumerate(order)}
    return DraftTree(
        [tree.tokens[i] for i in order],
        [new_index[tree.parents[i]] if tree.parents[i] >= 0 else -1 for i in order],
    )


def _lay_out_draft(cache: Any, request: int, tree: DraftTree) -> tuple[list[int], torch.Tensor]:
    """Give the root token a slot on ``request`` and every draft token a forked request.

    ``tree`` must be breadth-first. A node is forked from its parent after the parent's
    slot is reserved, so its path is the parent's path plus its own slot. Returns the
    requests (root first, then draft nodes in order) and their slots in the same order.
    """
    requests = [request]
    slots = [cache.reserve([request])]
    depths = tree.depths()
    i = 0
    while i < len(tree):
        j = i
        while j < len(tree) and depths[j] == depths[i]:
            j += 1
        level = [cache.fork(requests[tree.parents[k] + 1]) for k in range(i, j)]
        slots.append(cache.reserve(level))
        requests.extend(level)
        i = j
    return requests, torch.cat(slots)


# --------------------------------------------------------------------------- helpers


def _prompt_ids(prompt: str | torch.Tensor | Sequence[int], tokenizer: Any) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs `tokenizer=`")
        ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, torch.Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1:
            raise ShapeMismatchError(
                f"input_ids must be [n] or [1, n] (one prompt), got shape {tuple(prompt.shape)}"
            )
        ids = prompt.tolist()
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty")
    return [int(t) for t in ids]


def _eos_ids(tm: Any, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return list(getattr(tm, "eos_token_ids", []) or [])
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_stat(cache: Any, key: str) -> Any:
    stats = getattr(cache, "stats", None)
    return stats().get(key) if callable(stats) else None


def _kv_bytes(cache: Any, requests: Sequence[int], page_size: int, bytes_per_token: int) -> tuple[int, int]:
    """(KV bytes the tree holds now, KV bytes a cache with one copy per request would hold)."""
    per_request = sum(cache.length(r) for r in requests)
    stats = cache.stats() if hasattr(cache, "stats") else {}
    if "kv_bytes_used" in stats:
        return int(stats["kv_bytes_used"]), per_request * bytes_per_token
    if "pages_used" in stats:
        held = int(stats["pages_used"]) * page_size
    else:
        held = int(stats.get("unique_tokens", per_request))
    return held * bytes_per_token, per_request * bytes_per_token


def _decode_texts(tokenizer: Any, sequences: Sequence[Sequence[int]]) -> list[str] | None:
    if tokenizer is None:
        return None
    return [tokenizer.decode(list(s), skip_special_tokens=True) for s in sequences]
