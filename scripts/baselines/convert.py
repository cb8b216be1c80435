#!/usr/bin/env python3
"""Run llama.cpp's own `convert_hf_to_gguf.py` on a model written by `moectl gen-model`.

    convert.py LLAMA_CPP_DIR MODEL_DIR --outtype f32|bf16|q8_0 --outfile OUT.gguf

The converter is run unchanged except for one thing: its Hunyuan class asks
`AutoTokenizer.from_pretrained(dir, trust_remote_code=True)` for Tencent's `HYTokenizer`,
whose code (`tokenization_hy.py`) is in no package registry. Here that call returns
`hy_tokenizer.HYTokenizer` (same ranks, pattern and specials) for any directory that holds
`hy.tiktoken`; every other call goes to transformers as usual. (setup.sh also relaxes one
assertion in the converter's Hunyuan class; see README.md.)
"""
import argparse
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hy_tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("llama_cpp_dir", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--outtype", required=True, choices=["f32", "bf16", "q8_0"])
    ap.add_argument("--outfile", required=True, type=Path)
    args = ap.parse_args()
    script = args.llama_cpp_dir / "convert_hf_to_gguf.py"
    if not script.is_file():
        sys.exit(f"{script}: not found (run scripts/baselines/setup.sh)")
    if not (args.model_dir / "hy.tiktoken").is_file():
        sys.exit(f"{args.model_dir}/hy.tiktoken: missing; llama.cpp's converter needs the model's tokenizer")

    import transformers

    real = transformers.AutoTokenizer.from_pretrained

    def from_pretrained(path, *a, **kw):
        if (Path(path) / "hy.tiktoken").is_file():
            return hy_tokenizer.HYTokenizer(path)
        return real(path, *a, **kw)

    transformers.AutoTokenizer.from_pretrained = from_pretrained
    sys.path.insert(0, str(args.llama_cpp_dir))
    sys.argv = [str(script), str(args.model_dir), "--outtype", args.outtype, "--outfile", str(args.outfile)]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
