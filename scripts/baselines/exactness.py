#!/usr/bin/env python3
"""Logits side by side: the engine and llama.cpp, each against transformers in float32.

* Engine: tests/reference/make_fixture.py (the project's golden-fixture writer) computes
  transformers' logits and greedy tokens for random prompts on the model, and
  `moectl check-golden --json` reports the engine's max |Δ| per quantity against them.
* llama.cpp: `llama-debug --save-logits` writes the last position's logits and the token ids
  of a fixed text prompt; transformers runs the same ids (this file's `--hf-last-logits` mode,
  under the venv's Python) and the largest |Δlogit| and top-1 agreement are reported.

`measure` runs with the standard library only (compare.py calls it); torch is imported only in
the `--hf-last-logits` mode.
"""
import array
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROMPT = ("The expert-parallel cluster routes every token to eight of sixty-four experts; "
          "the attention worker keeps the key-value cache and the router. 1234 + 5678 = ?")
MODEL_FILES = ("config.json", "generation_config.json", "hy.tiktoken", "tokenizer_config.json")


def _run(cmd, log, check=True):
    with open(log, "ab") as err:
        err.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        err.flush()
        proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=err)
    if check and proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed with exit status {proc.returncode}; see {log}")
    return proc


def engine_vs_transformers(paths, model, moectl, out, log):
    fixture = out / "fixture"
    fixture.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES + tuple(p.name for p in Path(model).glob("*.safetensors*")):
        link, target = fixture / name, Path(model).resolve() / name
        if target.exists() and not link.exists():
            link.symlink_to(target)
    _run([paths.python, REPO / "tests" / "reference" / "make_fixture.py", model, "--out", fixture,
          "--prompt-lens", "1,16", "--steps", "4"], log)
    proc = _run([moectl, "check-golden", "--fixture", fixture, "--json"], log, check=False)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        sys.exit(f"moectl check-golden printed no JSON (exit {proc.returncode}); see {log}")
    logits = [r for r in report["rows"] if "logits" in r["quantity"] and "router" not in r["quantity"]]
    tokens = [r for r in report["rows"] if "ids" in r["quantity"]]
    return {
        "max_abs_dlogit": max(r["max_abs_diff"] for r in logits),
        "logit_rows": len(logits),
        "token_rows_equal": f"{sum(r['passed'] for r in tokens)}/{len(tokens)}",
        "check_golden_exit": proc.returncode,
    }


def read_f32(path):
    a = array.array("f")
    a.frombytes(Path(path).read_bytes())
    return a


def llama_vs_transformers(paths, model, gguf, out, log):
    d = out / f"llama-{gguf.stem}"
    _run([paths.llama_bin / "llama-debug", "-m", gguf, "-p", PROMPT, "-c", 512, "-t", 2,
          "--save-logits", "--logits-output-dir", d], log)
    logits = read_f32(d / f"llamacpp-{gguf.stem}.bin")
    tokens = d / f"llamacpp-{gguf.stem}-tokens.bin"
    hf_out = d / "transformers-last-logits.bin"
    _run([paths.python, __file__, "--hf-last-logits", model, tokens, hf_out], log)
    ref = read_f32(hf_out)
    if len(ref) != len(logits):
        sys.exit(f"llama.cpp gave {len(logits)} logits, transformers {len(ref)}")
    diff = max(abs(a - b) for a, b in zip(logits, ref))
    top = max(range(len(ref)), key=ref.__getitem__)
    return {
        "max_abs_dlogit": diff,
        "prompt_tokens": len(array.array("i", tokens.read_bytes())),
        "same_top1": top == max(range(len(logits)), key=logits.__getitem__),
        "logit_range": [min(ref), max(ref)],
    }


def measure(paths, model, moectl, ggufs, out, log):
    out.mkdir(parents=True, exist_ok=True)
    res = {"engine vs transformers": engine_vs_transformers(paths, model, moectl, out, log)}
    for t, g in ggufs.items():
        res[f"llama.cpp {t} vs transformers (last position of a {len(PROMPT)}-character prompt)"] = \
            llama_vs_transformers(paths, model, g, out, log)
    return res


def hf_last_logits(model, tokens_path, out_path):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    ids = np.fromfile(tokens_path, dtype=np.int32).astype(np.int64)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        logits = m(input_ids=torch.from_numpy(ids)[None], use_cache=False).logits[0, -1]
    logits.numpy().astype(np.float32).tofile(out_path)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--hf-last-logits":
        hf_last_logits(*sys.argv[2:])
    else:
        sys.exit("usage: exactness.py --hf-last-logits MODEL_DIR TOKENS.bin OUT.bin (compare.py runs the rest)")
