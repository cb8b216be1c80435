#!/usr/bin/env python3
"""Write tests/fixtures/hunyuan-tiny-gptq: the tiny model (tests/fixtures/hunyuan-tiny) with every
projection (attention q/k/v/o, shared and routed experts' gate/up/down) stored as GPTQ-Int4 in
the v1 checkpoint layout (`checkpoint_format: "gptq"`, what AutoGPTQ wrote and Tencent ships),
packed by GPTQModel, plus GPTQModel's own dequantisation of each packed weight: the expected
values for the loader in this repository (tests/tests/gptq.rs).

What is GPTQModel's and what is this script's: the rounding parameters (per group min/max
round-to-nearest, as GPTQ's Quantizer.find_params computes them) are chosen here; the packing
(TorchLinear.pack), the conversion to the v1 layout (convert_gptq_v2_to_v1_format_module),
the conversion back that GPTQModel applies when it loads a v1 checkpoint
(convert_gptq_v1_to_v2_format_module) and the dequantisation (TorchLinear.dequantize_weight, eval mode,
in f16) are GPTQModel's own code, called as it calls them.

Settings: bits 4, group_size 32, desc_act true (each weight's g_idx is a random permutation's
grouping, so inputs of a group are scattered), sym false; in the first weight, four output rows
get an all-positive group, whose zero point is 0 (stored in v1 as 0xf with a borrow from the next
zero point: the case where decoding one nibble at a time goes wrong).

Run once, outside the repository's build (CI does not run it):

    python3 -m venv /tmp/gptq-venv
    /tmp/gptq-venv/bin/pip install torch==2.15.0 safetensors==0.8.0 gptqmodel==7.7.0
    /tmp/gptq-venv/bin/python tests/reference/make_gptq_fixture.py \
        tests/fixtures/hunyuan-tiny tests/fixtures/hunyuan-tiny-gptq
"""
import argparse
import json
import os
import shutil
from pathlib import Path

# Pack with GPTQModel's torch code, not its optional JIT-compiled C++ extension.
os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import gptqmodel  # noqa: E402
from gptqmodel.nn_modules.qlinear.torch import TorchLinear  # noqa: E402
from gptqmodel.quantization import QuantizeConfig  # noqa: E402
from gptqmodel.utils.model import (  # noqa: E402
    convert_gptq_v1_to_v2_format_module,
    convert_gptq_v2_to_v1_format_module,
)

BITS, GROUP, DESC_ACT, SYM = 4, 32, True, False
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Expected values are kept for these weights (the fixture stays small): every non-expert
# projection and the first experts of each layer.
KEEP_EXPERTS = 8


def keep_expected(name):
    if ".mlp.experts." not in name:
        return True
    return int(name.split(".mlp.experts.")[1].split(".")[0]) < KEEP_EXPERTS


def rounding(w, g_idx, groups):
    """Per output row and group: scale and zero point of min/max rounding to 0..15, with the
    range widened to include 0 (GPTQ's Quantizer.find_params, asymmetric)."""
    maxq = 2**BITS - 1
    scales = torch.empty(w.shape[0], groups)
    zeros = torch.empty(w.shape[0], groups)
    for g in range(groups):
        x = w[:, g_idx == g]
        xmin = torch.minimum(x.min(1).values, torch.zeros(1))
        xmax = torch.maximum(x.max(1).values, torch.zeros(1))
        scale = (xmax - xmin) / maxq
        scale[scale == 0] = 1.0
        # The packed checkpoint holds f16 scales: round them first, so the codes agree with them.
        scale = scale.half().float()
        scales[:, g] = scale
        zeros[:, g] = torch.round(-xmin / scale)
    return scales, zeros


def quantise(name, w, gen, first):
    out_f, in_f = w.shape
    groups = in_f // GROUP
    perm = torch.randperm(in_f, generator=gen)
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = torch.arange(in_f, dtype=torch.int32) // GROUP
    if first:
        w[:4, g_idx == 0] = w[:4, g_idx == 0].abs()
    scales, zeros = rounding(w, g_idx, groups)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    linear.weight.data = w.clone()
    q = TorchLinear(
        bits=BITS,
        group_size=GROUP,
        sym=SYM,
        desc_act=DESC_ACT,
        in_features=in_f,
        out_features=out_f,
        bias=False,
        pack_dtype=torch.int32,
    )
    q.pack(linear, scales, zeros, g_idx)
    if first:
        assert (zeros[:4, 0] == 0).all(), "the first weight has zero points of 0"
    config = QuantizeConfig(bits=BITS, group_size=GROUP, desc_act=DESC_ACT, sym=SYM)
    convert_gptq_v2_to_v1_format_module(q, config)
    module = name[: -len(".weight")]
    stored = {
        f"{module}.qweight": q.qweight.clone(),
        f"{module}.qzeros": q.qzeros.clone(),
        f"{module}.scales": q.scales.clone(),
        f"{module}.g_idx": q.g_idx.clone().to(torch.int32),
    }
    # As GPTQModel loads a v1 checkpoint, then its torch kernel's dequantisation.
    convert_gptq_v1_to_v2_format_module(q, bits=BITS, pack_dtype=torch.int32)
    q.eval()
    dequantised = q.dequantize_weight().T.contiguous()
    assert dequantised.dtype == torch.float16 and dequantised.shape == (out_f, in_f)
    return stored, dequantised


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(16)
    tensors = load_file(str(args.src / "model.safetensors"))
    model, expected = {}, {}
    first = True
    for name in sorted(tensors):
        w = tensors[name]
        module = name.rsplit(".", 1)[0] if name.endswith(".weight") else ""
        if not module or module.rsplit(".", 1)[-1] not in PROJECTIONS:
            model[name] = w
            continue
        stored, dequantised = quantise(name, w.float(), gen, first)
        first = False
        model.update(stored)
        if keep_expected(name):
            expected[name] = dequantised
    args.out.mkdir(parents=True, exist_ok=True)
    config = json.loads((args.src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": BITS,
        "group_size": GROUP,
        "desc_act": DESC_ACT,
        "sym": SYM,
        "checkpoint_format": "gptq",
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("tokenizer_config.json", "hy.tiktoken"):
        if (args.src / extra).exists():
            shutil.copy(args.src / extra, args.out / extra)
    save_file(model, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    meta = {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__}
    save_file(expected, str(args.out / "dequantized.safetensors"), metadata=meta)
    print(f"{len(model)} tensors, {len(expected)} expected weights; {meta}")


if __name__ == "__main__":
    main()
