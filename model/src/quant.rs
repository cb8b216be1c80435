//! How a checkpoint says it is FP8: `config.json`'s `quantization_config` (typed and validated
//! here) and, per weight, an `F8_E4M3` tensor with its scale beside it. Two layouts are read:
//!
//! * static per-tensor (AutoFP8 / AngelSlim `fp8_static`, Tencent's Hunyuan FP8 release):
//!   `<name>.weight` F8_E4M3, `<name>.weight_scale` a scalar, optionally `<name>.input_scale`;
//! * block-wise (DeepSeek-V3, `weight_block_size: [128, 128]`): `<name>.weight_scale_inv` of
//!   shape `[ceil(rows / 128), ceil(cols / 128)]`, `w = q * scale_inv[block]`.
//!
//! **What decides** whether a weight is FP8 is its stored dtype (as the FP8 fixture and vLLM
//! read it). The config must agree with the tensors in one direction: an `F8_E4M3` tensor needs
//! a `quant_method: "fp8"` config and must not be in its `ignored_layers`. The other direction
//! is accepted: an fp8 config whose tensors are all of higher precision is a consistent
//! unquantised model (every tensor says what it is), so it loads and computes unquantised.

use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::config::{DType, ModelConfig};
use crate::error::{Error, Result};
use crate::fp8::{BLOCK, Fp8Data, Fp8Scale};
use crate::gptq::GptqQuantization;
use crate::progress::LoadSize;

/// `quantization_config` as written in `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawQuantization {
    quant_method: Option<String>,
    activation_scheme: Option<String>,
    /// `null` means none, as vLLM reads it.
    #[serde(default)]
    ignored_layers: Option<Vec<String>>,
    /// transformers' `FineGrainedFP8Config` spelling of `ignored_layers`.
    #[serde(default)]
    modules_to_not_convert: Option<Vec<String>>,
    weight_block_size: Option<Vec<usize>>,
    /// DeepSeek-V3 writes `"fmt": "e4m3"`.
    fmt: Option<String>,
    #[serde(flatten)]
    gptq: crate::gptq::RawGptq,
}

impl RawQuantization {
    /// The config's FP8 and GPTQ parts, at most one of them: which one `quant_method` says.
    pub(crate) fn parse(&self) -> Result<(Option<Fp8Quantization>, Option<GptqQuantization>)> {
        match self.quant_method.as_deref() {
            Some("gptq") => Ok((None, Some(GptqQuantization::parse(&self.gptq)?))),
            _ => Ok((Some(Fp8Quantization::parse(self)?), None)),
        }
    }
}

/// When activations are quantised by a W8A8 kernel: with the stored `input_scale`s (static)
/// or from each batch (dynamic). This crate computes weight-only (activations stay f32), so the
/// scheme is recorded, not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationScheme {
    Static,
    Dynamic,
}

/// A validated `quantization_config` with `quant_method: "fp8"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Quantization {
    pub activation_scheme: ActivationScheme,
    /// Module names (or name suffixes: `"mlp.gate.wg"` stands for every layer's router) that
    /// stay in higher precision.
    pub ignored_layers: Vec<String>,
    /// `Some(128)` when the config declares 128x128 block-wise scales.
    pub weight_block: Option<usize>,
}

impl Fp8Quantization {
    pub(crate) fn parse(raw: &RawQuantization) -> Result<Self> {
        match raw.quant_method.as_deref() {
            Some("fp8") => {}
            other => {
                return Err(Error::field(
                    "quantization_config.quant_method",
                    other.unwrap_or("(missing)"),
                    "only \"fp8\" (float8 e4m3 weights with per-tensor or 128x128 block scales) and \"gptq\" \
                     (4-bit) are supported; AWQ and other methods are not",
                ));
            }
        }
        if let Some(fmt) = raw.fmt.as_deref()
            && fmt != "e4m3"
        {
            return Err(Error::field(
                "quantization_config.fmt",
                fmt,
                "only e4m3 (float8_e4m3fn) is supported",
            ));
        }
        let activation_scheme = match raw.activation_scheme.as_deref() {
            Some("static") => ActivationScheme::Static,
            // transformers' FineGrainedFP8Config default.
            Some("dynamic") | None => ActivationScheme::Dynamic,
            Some(other) => {
                return Err(Error::field(
                    "quantization_config.activation_scheme",
                    other,
                    "expected \"static\" or \"dynamic\"",
                ));
            }
        };
        let weight_block = match raw.weight_block_size.as_deref() {
            None => None,
            Some([BLOCK, BLOCK]) => Some(BLOCK),
            Some(other) => {
                return Err(Error::field(
                    "quantization_config.weight_block_size",
                    other,
                    format!("only [{BLOCK}, {BLOCK}] blocks are supported"),
                ));
            }
        };
        let mut ignored_layers = raw.ignored_layers.clone().unwrap_or_default();
        ignored_layers.extend(raw.modules_to_not_convert.iter().flatten().cloned());
        Ok(Fp8Quantization {
            activation_scheme,
            ignored_layers,
            weight_block,
        })
    }

    /// Is the module of tensor `name` (`<module>.weight`) one that must stay unquantised? An
    /// entry matches the whole module name or its trailing components.
    pub fn ignores(&self, name: &str) -> Option<&str> {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        self.ignored_layers
            .iter()
            .find(|entry| module == entry.as_str() || module.ends_with(&format!(".{entry}")))
            .map(String::as_str)
    }
}

/// The projections a checkpoint may store quantised (FP8 or GPTQ); everything else (router,
/// embedding, norms, lm_head) stays in higher precision, as the quantised releases keep it.
const QUANTISABLE_PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn is_projection(name: &str) -> bool {
    name.strip_suffix(".weight")
        .and_then(|module| module.rsplit('.').next())
        .is_some_and(|last| QUANTISABLE_PROJECTIONS.contains(&last))
}

/// Checks that the checkpoint's FP8 and GPTQ tensors agree with the config (see the module
/// docs and [`crate::gptq`]), that only projections are quantised, and that every scale sits beside an FP8 weight (a scale beside a
/// weight of higher precision means a conversion forgot to apply it). Reads only the headers.
/// Each scale's shape and values are checked where its weight is loaded ([`load_fp8`]).
pub fn check_checkpoint(ckpt: &Checkpoint, config: &ModelConfig) -> Result<()> {
    let mut names: Vec<&str> = ckpt.tensor_names().collect();
    names.sort_unstable();
    for name in names {
        if let Some(module) = name.strip_suffix(".qweight") {
            check_gptq(ckpt, config, name, module)?;
            continue;
        }
        // Unsupported dtypes are reported when (and if) the tensor is loaded.
        let Ok(info) = ckpt.info(name) else { continue };
        let refuse = |reason: String| Error::Tensor {
            tensor: name.to_owned(),
            file: info.file.clone(),
            reason,
        };
        if let Some(module) = name
            .strip_suffix(".weight_scale")
            .or_else(|| name.strip_suffix(".weight_scale_inv"))
        {
            let weight = format!("{module}.weight");
            let beside = ckpt.info(&weight).ok().map(|w| w.dtype);
            if beside != Some(DType::F8E4M3) {
                return Err(refuse(format!(
                    "a weight scale, but `{weight}` beside it is {}: the scale would be ignored",
                    beside.map_or("absent".to_owned(), |d| format!("{d:?}, not F8_E4M3"))
                )));
            }
            continue;
        }
        if info.dtype != DType::F8E4M3 {
            continue;
        }

        match &config.quantization {
            None => {
                return Err(refuse(
                    "stored as F8_E4M3, but config.json has no quantization_config (quant_method \"fp8\")".into(),
                ));
            }
            Some(q) => {
                if let Some(entry) = q.ignores(name) {
                    return Err(refuse(format!(
                        "stored as F8_E4M3, but quantization_config.ignored_layers lists `{entry}`: it must stay in higher precision"
                    )));
                }
            }
        }
        if !is_projection(name) {
            return Err(refuse(format!(
                "stored as F8_E4M3, but only the projections ({}) may be FP8; the router, embedding, norms and lm_head stay in higher precision",
                QUANTISABLE_PROJECTIONS.join(", ")
            )));
        }
    }
    Ok(())
}

/// Where an FP8 weight's scales are, found and shape-checked from the headers alone (before
/// any weight is read); [`load_fp8`] reads their values.
pub(crate) struct Fp8Tensors {
    scale: ScaleTensor,
    /// `<module>.input_scale`, when present.
    input: Option<String>,
}

enum ScaleTensor {
    /// `<module>.weight_scale`, a scalar.
    PerTensor(String),
    /// `<module>.weight_scale_inv`, one scale per 128x128 block: `[row blocks, column blocks]`.
    Blocks(String, [usize; 2]),
}

impl Fp8Tensors {
    /// The scales of the FP8 weight `name` (`<module>.weight`, `[rows, cols]`).
    pub(crate) fn locate(ckpt: &Checkpoint, name: &str, rows: usize, cols: usize) -> Result<Self> {
        let refuse = |tensor: &str, reason: String| ckpt.tensor_error(tensor, reason);
        let module = name.strip_suffix(".weight").ok_or_else(|| {
            refuse(
                name,
                "stored as F8_E4M3, but only `<module>.weight` tensors may be FP8 (their scale is `<module>.weight_scale`)"
                    .into(),
            )
        })?;
        let (per_tensor, blocks) = (format!("{module}.weight_scale"), format!("{module}.weight_scale_inv"));
        let scale = match (ckpt.contains(&per_tensor), ckpt.contains(&blocks)) {
            (true, true) => {
                return Err(refuse(
                    name,
                    format!("both `{per_tensor}` and `{blocks}` are present; an FP8 weight has one scale"),
                ));
            }
            (false, false) => {
                return Err(refuse(
                    name,
                    format!(
                        "stored as F8_E4M3 without a scale: expected `{per_tensor}` (per tensor) or `{blocks}` ({BLOCK}x{BLOCK} blocks)"
                    ),
                ));
            }
            (true, false) => {
                scalar_shape(ckpt, &per_tensor)?;
                ScaleTensor::PerTensor(per_tensor)
            }
            (false, true) => {
                let grid = [rows.div_ceil(BLOCK), cols.div_ceil(BLOCK)];
                let shape = ckpt.shape(&blocks)?;
                if shape != grid {
                    return Err(refuse(
                        &blocks,
                        format!(
                            "shape {shape:?}, expected {grid:?}: one scale per {BLOCK}x{BLOCK} block of the [{rows}, {cols}] weight `{name}`"
                        ),
                    ));
                }
                ScaleTensor::Blocks(blocks, grid)
            }
        };
        let input = format!("{module}.input_scale");
        let input = match ckpt.contains(&input) {
            true => {
                scalar_shape(ckpt, &input)?;
                Some(input)
            }
            false => None,
        };
        Ok(Fp8Tensors { scale, input })
    }

    /// What reading the scales reads.
    pub(crate) fn size(&self, ckpt: &Checkpoint) -> Result<LoadSize> {
        let scale = match &self.scale {
            ScaleTensor::PerTensor(name) | ScaleTensor::Blocks(name, _) => name,
        };
        std::iter::once(scale)
            .chain(&self.input)
            .map(|name| ckpt.data_len(name).map(LoadSize::tensor))
            .sum()
    }
}

/// A GPTQ weight (`<module>.qweight`, beside no `<module>.weight`) needs a GPTQ config, must be
/// a projection, and must have the groups the config's `group_size` gives. Reads only headers;
/// [`crate::gptq::GptqTensors::locate`] checks every shape where the weight is planned.
fn check_gptq(ckpt: &Checkpoint, config: &ModelConfig, qweight: &str, module: &str) -> Result<()> {
    let weight = format!("{module}.weight");
    let refuse = |reason: String| Err(ckpt.tensor_error(qweight, reason));
    let Some(gptq) = &config.gptq else {
        return refuse("a GPTQ weight, but config.json has no quantization_config with quant_method \"gptq\"".into());
    };
    if ckpt.contains(&weight) {
        return refuse(format!(
            "a GPTQ weight, but `{weight}` is present too: which one holds the weight?"
        ));
    }
    if !is_projection(&weight) {
        return refuse(format!(
            "a GPTQ weight, but only the projections ({}) may be quantised",
            QUANTISABLE_PROJECTIONS.join(", ")
        ));
    }
    let (scales, g_idx) = (format!("{module}.scales"), format!("{module}.g_idx"));
    if let (Ok(scales_shape), Ok(inputs)) = (ckpt.shape(&scales), ckpt.shape(&g_idx)) {
        let (groups, inputs) = (scales_shape.first().copied(), inputs.first().copied().unwrap_or(0));
        if groups != Some(gptq.groups(inputs)) {
            return Err(ckpt.tensor_error(
                &scales,
                format!(
                    "shape {scales_shape:?}: {} groups, but quantization_config.group_size {} over {inputs} inputs gives {}",
                    groups.unwrap_or(0),
                    gptq.group_size.map_or(-1, |g| g as i64),
                    gptq.groups(inputs)
                ),
            ));
        }
    }
    Ok(())
}

/// The FP8 weight `name` (`<module>.weight`, `[rows, cols]`) whose codes are `codes`, with the
/// scale stored beside it.
pub(crate) fn load_fp8(ckpt: &Checkpoint, name: &str, rows: usize, cols: usize, codes: &[u8]) -> Result<Fp8Data> {
    let tensors = Fp8Tensors::locate(ckpt, name, rows, cols)?;
    // A NaN weight is a broken checkpoint, and the kernels decode codes without a NaN check.
    if let Some(i) = codes.iter().position(|&c| c & 0x7f == 0x7f) {
        return Err(ckpt.tensor_error(
            name,
            format!(
                "holds the NaN code {:#04x} at row {}, column {}",
                codes[i],
                i / cols.max(1),
                i % cols.max(1)
            ),
        ));
    }
    let scale = match &tensors.scale {
        ScaleTensor::PerTensor(per_tensor) => Fp8Scale::PerTensor(scalar(ckpt, per_tensor)?),
        ScaleTensor::Blocks(blocks, grid) => {
            let scales = ckpt.f32_tensor(blocks, grid)?;
            if let Some(bad) = scales.iter().find(|s| !valid_scale(**s)) {
                return Err(ckpt.tensor_error(blocks, format!("holds {bad}; a scale must be finite and >= 0")));
            }
            Fp8Scale::Blocks {
                block_cols: grid[1],
                scales,
            }
        }
    };
    let input_scale = tensors.input.as_deref().map(|input| scalar(ckpt, input)).transpose()?;
    Ok(Fp8Data {
        codes: codes.to_vec(),
        scale,
        input_scale,
    })
}

fn valid_scale(s: f32) -> bool {
    s.is_finite() && s >= 0.0
}

/// A scale stored as a scalar: shape `[]` (as AutoFP8 writes it) or `[1]`.
fn scalar_shape(ckpt: &Checkpoint, name: &str) -> Result<Vec<usize>> {
    let shape = ckpt.shape(name)?;
    if !(shape.is_empty() || shape == [1]) {
        return Err(ckpt.tensor_error(
            name,
            format!("shape {shape:?}, expected a scalar ([] or [1]): per-channel scales are not supported"),
        ));
    }
    Ok(shape)
}

fn scalar(ckpt: &Checkpoint, name: &str) -> Result<f32> {
    let shape = scalar_shape(ckpt, name)?;
    let value = ckpt.f32_tensor(name, &shape)?[0];
    if !valid_scale(value) {
        return Err(ckpt.tensor_error(name, format!("holds {value}; a scale must be finite and >= 0")));
    }
    Ok(value)
}
