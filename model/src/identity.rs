//! Model identity: a hash of the config and the weight layout (tensor names, dtypes, shapes).
//! Workers that loaded a different model than the cluster's are refused by comparing it.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// A stable hex identity of the model in `dir`, whose weights `ckpt` has open. Cheap: reads
/// config.json and the already parsed safetensors headers, never the weights.
pub fn model_identity(dir: &Path, ckpt: &Checkpoint) -> Result<String> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| Error::io(format!("reading {}", config_path.display()), e))?;
    // Normalise the JSON (key order, whitespace) so equivalent files hash alike.
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::ConfigParse {
        path: config_path.clone(),
        message: e.to_string(),
    })?;
    let mut hash = Fnv::default();
    hash.write(json.to_string().as_bytes());
    let mut names: Vec<&str> = ckpt.tensor_names().collect();
    names.sort_unstable();
    for name in names {
        // The stored dtype as the loader names it; tensors only read raw (GPTQ's int32) by the
        // safetensors name.
        let dtype = match ckpt.info(name) {
            Ok(info) => format!("{:?}", info.dtype),
            Err(_) => ckpt.stored_dtype(name)?,
        };
        hash.write(format!("{name}:{dtype}:{:?};", ckpt.shape(name)?).as_bytes());
    }
    Ok(format!("{:016x}", hash.0))
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}
