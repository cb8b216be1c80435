//! Streaming safetensors writer: the header is computed from the tensor specs up front, then
//! each tensor's bytes are produced and written in turn, so a large model never has to sit in
//! memory. Optionally sharded with a `model.safetensors.index.json`, as HuggingFace writes it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use moe_model::checkpoint::{INDEX_FILE, SINGLE_FILE};
use moe_model::config::DType;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn size_in_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F8E4M3 => "F8_E4M3",
    }
}

/// Writes one safetensors file holding `specs` in order; `fill` appends each tensor's
/// little-endian bytes to the buffer it is given.
pub fn write_file(path: &Path, specs: &[TensorSpec], fill: &mut dyn FnMut(&TensorSpec, &mut Vec<u8>)) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for s in specs {
        let end = offset + s.size_in_bytes();
        header.insert(
            s.name.clone(),
            serde_json::json!({ "dtype": st_dtype(s.dtype), "shape": s.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&header).expect("JSON map serialises");
    // The data section starts 8-byte aligned, as the format recommends.
    while !(header.len() + 8).is_multiple_of(8) {
        header.push(b' ');
    }
    let io = |e| Error::io(format!("writing {}", path.display()), e);
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&header).map_err(io)?;
    let mut buf = Vec::new();
    for s in specs {
        buf.clear();
        fill(s, &mut buf);
        assert_eq!(
            buf.len(),
            s.size_in_bytes(),
            "fill wrote the wrong byte count for {}",
            s.name
        );
        out.write_all(&buf).map_err(io)?;
    }
    out.flush().map_err(io)
}

/// Writes `specs` into `dir` as `model.safetensors`, or, when `shard_bytes` is given, as
/// `model-0000i-of-0000n.safetensors` shards of at most that size plus the index file.
/// Returns the files written.
pub fn write_model(
    dir: &Path,
    specs: &[TensorSpec],
    shard_bytes: Option<usize>,
    fill: &mut dyn FnMut(&TensorSpec, &mut Vec<u8>),
) -> Result<Vec<PathBuf>> {
    let Some(limit) = shard_bytes else {
        let path = dir.join(SINGLE_FILE);
        write_file(&path, specs, fill)?;
        return Ok(vec![path]);
    };
    let mut shards: Vec<Vec<TensorSpec>> = vec![Vec::new()];
    let mut size = 0;
    for s in specs {
        if size > 0 && size + s.size_in_bytes() > limit {
            shards.push(Vec::new());
            size = 0;
        }
        size += s.size_in_bytes();
        shards.last_mut().expect("non-empty").push(s.clone());
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut files = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        for s in shard {
            weight_map.insert(s.name.clone(), name.clone());
        }
        let path = dir.join(&name);
        write_file(&path, shard, fill)?;
        files.push(path);
    }
    let total: usize = specs.iter().map(TensorSpec::size_in_bytes).sum();
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let path = dir.join(INDEX_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&index).expect("JSON"))
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    files.push(path);
    Ok(files)
}
