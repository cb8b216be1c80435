"""A stand-in for Tencent's `tokenization_hy.HYTokenizer`, enough for llama.cpp's converter.

The converter's `HunYuanMoEModel.set_vocab` calls
`AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`, which needs Tencent's
`tokenization_hy.py`. That file is not in any package registry, so `convert.py` hands the
converter this object instead. It reads the model's `hy.tiktoken` and builds the same
tiktoken encoding as Tencent's file (and as the project's `moe-text` crate: the pattern and
special list below are `text/src/specials.rs`): ranks first, then the five named specials and
205 `<|extra_i|>` tokens. Text is NFC-normalised before encoding, as Tencent's tokenizer does.

The converter uses exactly these members: `mergeable_ranks`, `special_tokens`, `vocab_size`
and `encode` (to hash its check text; with the real ranks the hash is the one it lists for
tencent/Hunyuan-A13B-Instruct, which is how we know this encoder agrees with Tencent's).
"""
import base64
import unicodedata
from pathlib import Path

import tiktoken

# text/src/specials.rs: SPLIT_PATTERN, the named specials, N_EXTRA.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NAMED_SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>"]
N_EXTRA = 205


def load_ranks(path):
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected '<base64 token> <rank>'")
            ranks[base64.b64decode(parts[0])] = int(parts[1])
    return ranks


class HYTokenizer:
    def __init__(self, model_dir):
        path = Path(model_dir) / "hy.tiktoken"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the model has no hy.tiktoken (write it with `moectl gen-model --tokenizer`)")
        self.mergeable_ranks = load_ranks(path)
        names = NAMED_SPECIALS + [f"<|extra_{i}|>" for i in range(N_EXTRA)]
        first = len(self.mergeable_ranks)
        self.special_tokens = {name: first + i for i, name in enumerate(names)}
        self.vocab_size = first + len(names)
        self._enc = tiktoken.Encoding(
            name="hy",
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )

    def encode(self, text, **_kwargs):
        return self._enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def decode(self, ids, **_kwargs):
        return self._enc.decode(ids)
