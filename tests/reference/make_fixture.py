#!/usr/bin/env python3
"""Write a golden fixture for a model directory, computed by HuggingFace transformers'
HunYuanMoEV1ForCausalLM (the same reference as shared/golden), in the format of
shared/golden/README.md.

Used once to produce the extra fixtures under tests/fixtures/ (other shapes than the shared
ones, models written by `moectl gen-model`, f32 and bf16 weights). CI does not run it; it needs
`pip install torch transformers==5.23.0 numpy safetensors`.

    moectl gen-model --preset tiny --dtype f32 --layers 3 ... --out DIR
    python3 tests/reference/make_fixture.py DIR --prompt-lens 1,5,19 --steps 12
"""
import argparse
import json
import shutil
import sys

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM


def load(model_dir):
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


class Recorder:
    """Forward hooks that capture every traced quantity of one forward pass."""

    def __init__(self, model):
        self.model = model
        self.data = {}
        self.handles = []
        inner = model.model
        self._hook(inner.embed_tokens, "embeddings", lambda o: o)
        self._hook(inner.norm, "final_norm", lambda o: o)
        for l, layer in enumerate(inner.layers):
            self._hook(layer.self_attn, f"layer{l}.attn_out", lambda o: o[0])
            self._hook(layer.mlp, f"layer{l}.moe_out", lambda o: o)
            self._hook(layer, f"layer{l}.hidden_out", lambda o: o[0] if isinstance(o, tuple) else o)
            self._hook(layer.mlp.gate, f"layer{l}.gate", lambda o: o)

    def _hook(self, module, key, pick):
        def fn(_m, _i, out):
            self.data[key] = pick(out)
        self.handles.append(module.register_forward_hook(fn))

    def close(self):
        for h in self.handles:
            h.remove()


def prefill_trace(model, ids):
    rec = Recorder(model)
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False)
    rec.close()
    arrays = {"prefill_logits": out.logits[0].numpy()}
    router_gap = np.inf
    for key, val in rec.data.items():
        if key.endswith(".gate"):
            layer = key[: -len(".gate")]
            logits, weights, experts = val
            arrays[f"{layer}.router_logits"] = logits.numpy()
            arrays[f"{layer}.topk_weight"] = weights.numpy()
            arrays[f"{layer}.topk_idx"] = experts.numpy().astype(np.int64)
            k = experts.shape[1]
            srt = np.sort(logits.numpy(), axis=1)[:, ::-1]
            if srt.shape[1] > k:
                router_gap = min(router_gap, float((srt[:, k - 1] - srt[:, k]).min()))
        else:
            arrays[key] = val[0].numpy()
    return arrays, router_gap


def greedy(model, prompts, steps, pad_id):
    """Left-padded batched greedy decoding with the KV cache; returns ids, logits, prefill logits."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    gen, logits_out, gap = [], [], np.inf
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        prefill = out.logits.clone() * mask[..., None]
        past = out.past_key_values
        step_logits = out.logits[:, -1]
        for _ in range(steps):
            top2 = torch.topk(step_logits, 2, dim=-1).values
            gap = min(gap, float((top2[:, 0] - top2[:, 1]).min()))
            nxt = step_logits.argmax(-1)
            gen.append(nxt)
            logits_out.append(step_logits)
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past = out.past_key_values
            step_logits = out.logits[:, -1]
    return (
        torch.stack(gen, 1).numpy().astype(np.int64),
        torch.stack(logits_out, 1).numpy(),
        prefill.numpy(),
        ids.numpy().astype(np.int64),
        (mask[:, :width]).numpy().astype(np.int64),
        (torch.tensor([[0] * (width - len(p)) + list(range(len(p))) for p in prompts])).numpy().astype(np.int64),
        gap,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--prompt-lens", default="1,5,19")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None, help="fixture directory (default: the model directory)")
    args = ap.parse_args()
    out_dir = args.out or args.model_dir
    model = load(args.model_dir)
    cfg = model.config
    lens = [int(x) for x in args.prompt_lens.split(",")]

    for attempt in range(50):
        rng = np.random.default_rng(args.seed + attempt)
        prompts = [rng.integers(5, cfg.vocab_size, size=n).tolist() for n in lens]
        expected, router_gap, greedy_gap = {}, np.inf, np.inf
        distinct = []
        for i, p in enumerate(prompts):
            arrays, gap = prefill_trace(model, p)
            router_gap = min(router_gap, gap)
            for k, v in arrays.items():
                expected[f"prompt{i}.{k}"] = v
            expected[f"prompt{i}.input_ids"] = np.array(p, dtype=np.int64)
            gen, logits, _, _, _, _, g = greedy(model, [p], args.steps, 0)
            greedy_gap = min(greedy_gap, g)
            expected[f"prompt{i}.gen_ids"] = gen[0]
            expected[f"prompt{i}.decode_logits"] = logits[0]
            distinct.append(len(set(gen[0].tolist())))
        batch_prompts = prompts[1:] if len(prompts) > 2 else prompts
        gen, logits, prefill, ids, mask, pos, g = greedy(model, batch_prompts, args.steps, 0)
        greedy_gap = min(greedy_gap, g)
        expected.update({
            "batch.input_ids": ids, "batch.attention_mask": mask, "batch.position_ids": pos,
            "batch.prefill_logits": prefill, "batch.gen_ids": gen, "batch.decode_logits": logits,
        })
        if router_gap >= 1e-3 and greedy_gap >= 1e-2 and min(distinct) >= max(2, args.steps // 4):
            break
        print(f"attempt {attempt}: router gap {router_gap:.2e}, greedy gap {greedy_gap:.2e}, distinct {distinct}; redrawing", file=sys.stderr)
    else:
        sys.exit("no decisive prompt draw found")

    expected["rope.inv_freq"] = model.model.rotary_emb.inv_freq.numpy()
    expected = {k: np.ascontiguousarray(v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in expected.items()}
    save_file(expected, f"{out_dir}/expected.safetensors")
    cases = {
        "description": "Extra golden fixture: a model written by `moectl gen-model`, expected values from "
                       "HuggingFace transformers HunYuanMoEV1ForCausalLM (float32, CPU, eager, 1 thread). "
                       "Format of shared/golden/README.md.",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "model": {k: getattr(cfg, k) for k in ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads", "head_dim", "num_experts", "moe_topk",
                                               "intermediate_size", "tie_word_embeddings"]},
        "decisiveness": {"min_router_logit_gap_kth_vs_next": router_gap, "min_greedy_top1_top2_logit_gap": greedy_gap},
        "suggested_tolerance": {"logits_atol": 5e-4, "hidden_atol": 5e-4, "router_logits_atol": 5e-4,
                                "topk_weight_atol": 1e-4},
        "prompt_lens": lens, "decode_steps": args.steps,
        "arrays": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in sorted(expected.items())},
    }
    with open(f"{out_dir}/cases.json", "w") as f:
        json.dump(cases, f, indent=1)
    print(f"wrote {out_dir}: router gap {router_gap:.2e}, greedy gap {greedy_gap:.2e}")


if __name__ == "__main__":
    main()
