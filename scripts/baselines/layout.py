"""Where setup.sh puts the baseline environments, and the GGUF files made from a model.

Everything lives under $BASELINE_DIR (default /work/scratch/baselines), outside the
repository: a Python venv (torch, transformers, the converter's requirements), the unpacked
llama-cpp-python source with its vendored llama.cpp and build, and converted GGUF files.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
HERE = Path(__file__).resolve().parent


def baseline_dir():
    return Path(os.environ.get("BASELINE_DIR", "/work/scratch/baselines"))


class Paths:
    def __init__(self, root):
        self.root = Path(root)
        self.python = self.root / "venv-hf" / "bin" / "python"
        self.llama_dir = self.root / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        self.llama_bin = self.llama_dir / "build" / "bin"
        self.gguf_dir = self.root / "gguf"


def model_dtype(model):
    """f32 or bf16, from the model's config.json (`dtype`, or the older `torch_dtype`)."""
    cfg_path = Path(model) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as err:
        sys.exit(f"{cfg_path}: {err}")
    dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    names = {"float32": "f32", "bfloat16": "bf16"}
    if dtype not in names:
        sys.exit(f"{cfg_path}: field dtype is {dtype!r}; the baselines take float32 or bfloat16 checkpoints")
    return names[dtype]


def ensure_gguf(paths, model, outtype, log):
    """The model converted by llama.cpp's converter to `outtype`; converted again when the
    checkpoint is newer than the GGUF file."""
    model = Path(model).resolve()
    paths.gguf_dir.mkdir(parents=True, exist_ok=True)
    out = paths.gguf_dir / f"{model.name}-{outtype}.gguf"
    weights = sorted(model.glob("*.safetensors"))
    if not weights:
        sys.exit(f"{model}: no *.safetensors")
    if out.is_file() and out.stat().st_mtime >= max(w.stat().st_mtime for w in weights):
        return out
    tmp = out.with_suffix(".gguf.partial")
    cmd = [str(paths.python), str(HERE / "convert.py"), str(paths.llama_dir), str(model),
           "--outtype", outtype, "--outfile", str(tmp)]
    print(f"converting {model.name} to GGUF {outtype}", file=sys.stderr)
    with open(log, "ab") as err:
        err.write(f"\n$ {' '.join(cmd)}\n".encode())
        err.flush()
        if subprocess.run(cmd, stdout=err, stderr=err).returncode != 0:
            sys.exit(f"converting {model} to {outtype} failed; see {log}")
    tmp.rename(out)
    return out


def uptime():
    with open("/proc/loadavg") as f:
        return "load average " + " ".join(f.read().split()[:3])
