//! GPTQ-Int4 checkpoints (weight only, 4-bit integers in groups), the layout AutoGPTQ and
//! GPTQModel write (`checkpoint_format: "gptq"`, "v1") and Tencent's Hunyuan GPTQ-Int4 release
//! uses. A quantised `<module>.weight` (`[out, in]`) is stored as:
//!
//! * `<module>.qweight` int32 `[in / 8, out]`: eight 4-bit codes per int32 along the input
//!   dimension, code `k` of word `[r, o]` (bits `4k..4k+4`) for input `8r + k`;
//! * `<module>.qzeros` int32 `[groups, out / 8]`: eight 4-bit zero points per int32 along the
//!   output dimension, stored minus one (the v1 format; see [`V1_ZERO_OFFSET`]);
//! * `<module>.scales` f16 `[groups, out]`;
//! * `<module>.g_idx` int32 `[in]`: the group of each input (with `desc_act` not `i / group_size`).
//!
//! `w[o, i] = (q[i, o] - z[g, o]) * scale[g, o]` with `g = g_idx[i]`.
//!
//! **Where it is dequantised: at load, into f16** (the scales' dtype, two bytes per weight, as
//! GPTQ's own torch kernel dequantises). `(q - z) * scale` is exact in f32 (a 5-bit integer
//! times an f16), so one rounding to f16 gives what that kernel computes, bit for bit. Keeping
//! the 4-bit codes in memory and dequantising in the kernels is not built.

use serde::Deserialize;

use crate::checkpoint::{Checkpoint, le_u16};
use crate::error::{Error, Result};
use crate::progress::LoadSize;

/// The `quantization_config` fields of GPTQ.
#[derive(Debug, Clone, Deserialize, Default)]
pub(crate) struct RawGptq {
    bits: Option<serde_json::Value>,
    group_size: Option<serde_json::Value>,
    desc_act: Option<serde_json::Value>,
    sym: Option<serde_json::Value>,
    checkpoint_format: Option<String>,
    /// GPTQModel writes the layout here as well (and reads it first).
    format: Option<String>,
    /// Per-module overrides of the settings above (GPTQModel): not supported.
    dynamic: Option<serde_json::Value>,
    is_marlin_format: Option<serde_json::Value>,
}

/// A validated `quantization_config` with `quant_method: "gptq"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptqQuantization {
    /// Inputs per group; `None` for `group_size: -1` (one group per output column).
    pub group_size: Option<usize>,
    /// Groups follow activation order (`g_idx` is not `i / group_size`).
    pub desc_act: bool,
    pub sym: bool,
}

impl GptqQuantization {
    pub(crate) fn parse(raw: &RawGptq) -> Result<Self> {
        let bits = raw.bits.as_ref().and_then(serde_json::Value::as_u64);
        if bits != Some(4) {
            return Err(Error::field(
                "quantization_config.bits",
                raw.bits.as_ref().map_or("(missing)".into(), |b| b.to_string()),
                "only 4-bit GPTQ is supported",
            ));
        }
        // A v2 checkpoint has v1's shapes but zero points stored without the minus one: read
        // as v1, every weight would be one zero step off, so both names must say v1.
        for (field, value) in [
            ("quantization_config.checkpoint_format", &raw.checkpoint_format),
            ("quantization_config.format", &raw.format),
        ] {
            match value.as_deref() {
                None | Some("gptq") => {}
                Some(other) => {
                    return Err(Error::field(
                        field,
                        other,
                        "only \"gptq\" (AutoGPTQ's v1 layout, zero points stored minus one) is supported",
                    ));
                }
            }
        }
        let overrides = match &raw.dynamic {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Object(m)) => !m.is_empty(),
            Some(_) => true,
        };
        if overrides {
            return Err(Error::field(
                "quantization_config.dynamic",
                raw.dynamic.as_ref().map_or(String::new(), |d| d.to_string()),
                "per-module GPTQ overrides are not supported",
            ));
        }
        if raw
            .is_marlin_format
            .as_ref()
            .is_some_and(|v| v != &serde_json::Value::Bool(false))
        {
            return Err(Error::field(
                "quantization_config.is_marlin_format",
                raw.is_marlin_format.as_ref().map_or(String::new(), |v| v.to_string()),
                "Marlin-packed GPTQ is not supported (only the GPTQ v1 packing)",
            ));
        }
        let group_size = match raw.group_size.as_ref().and_then(serde_json::Value::as_i64) {
            Some(-1) => None,
            Some(g) if g > 0 => Some(g as usize),
            _ => {
                return Err(Error::field(
                    "quantization_config.group_size",
                    raw.group_size.as_ref().map_or("(missing)".into(), |g| g.to_string()),
                    "expected -1 (one group) or a positive number of inputs per group",
                ));
            }
        };
        let flag = |field: &'static str, v: &Option<serde_json::Value>| match v {
            None => Ok(false),
            Some(serde_json::Value::Bool(b)) => Ok(*b),
            Some(other) => Err(Error::field(field, other.to_string(), "expected true or false")),
        };
        Ok(GptqQuantization {
            group_size,
            desc_act: flag("quantization_config.desc_act", &raw.desc_act)?,
            sym: flag("quantization_config.sym", &raw.sym)?,
        })
    }

    /// Groups of a weight with `inputs` inputs.
    pub fn groups(&self, inputs: usize) -> usize {
        self.group_size.map_or(1, |g| inputs.div_ceil(g))
    }
}

/// Codes per int32.
const PACK: usize = 8;

/// The v1 layout stores each zero point minus one, subtracted from the whole packed word (as
/// GPTQModel writes and reads it): adding it back to the word, carries included, restores every
/// zero point, including a zero point of 0, stored as 0xf with a borrow from the next one.
const V1_ZERO_OFFSET: u32 = 0x1111_1111;

/// The GPTQ tensors of one weight, found and shape-checked from the headers alone.
pub(crate) struct GptqTensors {
    qweight: String,
    qzeros: String,
    scales: String,
    g_idx: String,
    groups: usize,
}

impl GptqTensors {
    /// `<module>.qweight` of the weight `name` (`<module>.weight`), when it is stored that way.
    pub(crate) fn qweight_of(name: &str) -> Option<String> {
        name.strip_suffix(".weight").map(|m| format!("{m}.qweight"))
    }

    /// The GPTQ tensors of the `[rows, cols]` weight `name` (`rows` outputs, `cols` inputs).
    pub(crate) fn locate(ckpt: &Checkpoint, name: &str, rows: usize, cols: usize) -> Result<Self> {
        let module = name.strip_suffix(".weight").expect("a `.weight` name (qweight_of)");
        let [qweight, qzeros, scales, g_idx] =
            ["qweight", "qzeros", "scales", "g_idx"].map(|t| format!("{module}.{t}"));
        if let Some(missing) = [&qzeros, &scales, &g_idx].into_iter().find(|t| !ckpt.contains(t)) {
            return Err(ckpt.tensor_error(
                missing,
                format!("missing: `{qweight}` is GPTQ, which needs `{qzeros}`, `{scales}` and `{g_idx}` beside it"),
            ));
        }
        if !rows.is_multiple_of(PACK) || !cols.is_multiple_of(PACK) {
            return Err(ckpt.tensor_error(
                &qweight,
                format!("GPTQ packs 8 codes per int32, but the weight is [{rows}, {cols}]"),
            ));
        }
        let groups = ckpt.shape(&scales)?.first().copied().unwrap_or(0);
        if groups == 0 || groups > cols {
            return Err(ckpt.tensor_error(&scales, format!("{groups} groups for {cols} inputs")));
        }
        ckpt.raw_i32(&qweight, &[cols / PACK, rows])?;
        ckpt.raw_i32(&qzeros, &[groups, rows / PACK])?;
        ckpt.raw_f16(&scales, &[groups, rows])?;
        ckpt.raw_i32(&g_idx, &[cols])?;
        Ok(GptqTensors {
            qweight,
            qzeros,
            scales,
            g_idx,
            groups,
        })
    }

    pub(crate) fn size(&self, ckpt: &Checkpoint) -> Result<LoadSize> {
        [&self.qweight, &self.qzeros, &self.scales, &self.g_idx]
            .into_iter()
            .map(|t| ckpt.data_len(t).map(LoadSize::tensor))
            .sum()
    }

    /// The weight `[rows, cols]` dequantised, as f16 bits.
    pub(crate) fn dequantize(&self, ckpt: &Checkpoint, rows: usize, cols: usize) -> Result<Vec<u16>> {
        let (groups, words) = (self.groups, rows / PACK);
        let qweight = le_u32(ckpt.raw_i32(&self.qweight, &[cols / PACK, rows])?);
        let qzeros = le_u32(ckpt.raw_i32(&self.qzeros, &[groups, words])?);
        let scales: Vec<f32> = le_u16(ckpt.raw_f16(&self.scales, &[groups, rows])?)
            .into_iter()
            .map(|b| half::f16::from_bits(b).to_f32())
            .collect();
        let g_idx = le_u32(ckpt.raw_i32(&self.g_idx, &[cols])?);
        // Copied out: their mapped pages need not stay resident.
        for name in [&self.qweight, &self.qzeros, &self.scales, &self.g_idx] {
            ckpt.evict(name);
        }
        if let Some((i, g)) = g_idx.iter().enumerate().find(|&(_, &g)| g as usize >= groups) {
            return Err(ckpt.tensor_error(
                &self.g_idx,
                format!("input {i} is in group {}, but there are {groups} groups", *g as i32),
            ));
        }
        let nibble = |word: u32, k: usize| ((word >> (4 * k)) & 0xf) as i32;
        // One zero point per (group, output), decoded once rather than per input column.
        let zeros: Vec<i32> = (0..groups * rows)
            .map(|j| {
                let (g, o) = (j / rows, j % rows);
                nibble(qzeros[g * words + o / PACK].wrapping_add(V1_ZERO_OFFSET), o % PACK)
            })
            .collect();
        let mut out = vec![0u16; rows * cols];
        for i in 0..cols {
            let g = g_idx[i] as usize;
            let (codes, k) = (&qweight[(i / PACK) * rows..(i / PACK + 1) * rows], i % PACK);
            for o in 0..rows {
                let w = (nibble(codes[o], k) - zeros[g * rows + o]) as f32 * scales[g * rows + o];
                out[o * cols + i] = half::f16::from_f32(w).to_bits();
            }
        }
        Ok(out)
    }
}

fn le_u32(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}
