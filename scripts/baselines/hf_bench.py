#!/usr/bin/env python3
"""The issue's loads on HuggingFace transformers' HunYuanMoEV1ForCausalLM; prints one JSON.

    hf_bench.py MODEL_DIR [--prompt-len 128] [--gen-len 32] [--batch 8] [--threads 2]

Weights are loaded as float32 whatever the checkpoint's dtype (bf16 widens exactly), with
sdpa attention and, where transformers offers it, the grouped_mm experts kernel. Greedy
decoding with the KV cache, prompts of random token ids (no padding: all the same length).
One warm-up pass first, then:
  * batch B: one forward over the B x P prompt tokens (prefill), then G-1 decode steps, each
    feeding the B argmax tokens back (the first new token comes from the prefill, as in
    `moectl bench`, whose decode rate counts the tokens after each request's first);
  * batch 1: the same for one prompt.
Peak resident memory is this process's maximum RSS (model load included).
"""
import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM


def load(model_dir):
    kwargs = dict(dtype=torch.float32, attn_implementation="sdpa")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, experts_implementation="grouped_mm", **kwargs)
        experts = "grouped_mm"
    except (TypeError, ValueError) as err:  # a transformers without selectable expert kernels
        print(f"grouped_mm experts unavailable ({err}); using the default", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        experts = "default"
    model.eval()
    return model, getattr(model.config, "_experts_implementation", None) or experts


def run(model, ids, gen_len):
    """Prefill seconds and the list of decode step seconds for one batch of prompts."""
    t0 = time.perf_counter()
    # Only the last position's logits, as generate() asks and as the engine and llama.cpp compute.
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    prefill_s = time.perf_counter() - t0
    past, steps = out.past_key_values, []
    for _ in range(gen_len - 1):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - t0)
    return prefill_s, steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.gen_len < 2 or args.prompt_len < 1 or args.batch < 1:
        sys.exit("--gen-len must be at least 2, --prompt-len and --batch at least 1")

    torch.set_num_threads(args.threads)
    with open(Path(args.model_dir) / "config.json") as f:
        cfg = json.load(f)
    checkpoint_dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    model, experts = load(args.model_dir)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)

    def prompts(n):
        return torch.randint(5, vocab, (n, args.prompt_len), generator=gen)

    with torch.inference_mode():
        run(model, prompts(1)[:, :8], 3)  # warm-up
        b_prefill, b_steps = run(model, prompts(args.batch), args.gen_len)
        one_prefill, one_steps = run(model, prompts(1), args.gen_len)

    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    b_step = statistics.mean(b_steps)
    one_step = statistics.mean(one_steps)
    print(json.dumps({
        "engine": "transformers",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "settings": {"dtype": "float32", "attn_implementation": "sdpa", "experts_implementation": experts,
                     "threads": args.threads, "checkpoint_dtype": checkpoint_dtype},
        "load": {"batch": args.batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len},
        "batch_prefill_s": b_prefill,
        "batch_prefill_tokens_per_s": args.batch * args.prompt_len / b_prefill,
        "batch_decode_step_ms": b_step * 1e3,
        "batch_decode_step_p50_ms": statistics.median(b_steps) * 1e3,
        "batch_decode_tokens_per_s": args.batch / b_step,
        "one_prefill_tokens_per_s": args.prompt_len / one_prefill,
        "one_decode_step_ms": one_step * 1e3,
        "one_decode_step_p50_ms": statistics.median(one_steps) * 1e3,
        "peak_rss_gib": rss_gib,
    }, indent=1))


if __name__ == "__main__":
    main()
