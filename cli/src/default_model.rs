//! The built-in default model: the `medium` preset, generated once into a cache directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use moe_model::DType;
use moe_model_tools::synthetic::{ModelShape, SynthOptions, available_memory_bytes, write_random_model};

const PRESET: &str = "medium";
const SEED: u64 = 0;

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("MOECTL_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("moectl");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("moectl"),
        None => std::env::temp_dir().join("moectl-cache"),
    }
}

/// Adds the generated tokenizer to a cached model made before models carried one. Written
/// into a temporary sibling and moved file by file, so a concurrent reader never sees half a
/// file.
fn ensure_tokenizer(dir: &Path) -> anyhow::Result<()> {
    if dir.join(moe_text::tokenizer::RANKS_FILE).exists() {
        return Ok(());
    }
    let shape = ModelShape::preset(PRESET)?;
    let tmp = dir.with_extension(format!("tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let files = moe_text::synthetic::write_tokenizer(&tmp, shape.vocab, shape.family.template_family())?;
    for file in files {
        let name = file.file_name().expect("a file name");
        std::fs::rename(&file, dir.join(name))
            .with_context(|| format!("moving {} into {}", file.display(), dir.display()))?;
    }
    let _ = std::fs::remove_dir(&tmp);
    Ok(())
}

/// Directory of the default model, generating it on first use. Generation writes into a
/// temporary sibling and renames it, so an interrupted run never leaves half a model behind.
pub fn default_model_dir() -> anyhow::Result<PathBuf> {
    let dir = cache_root().join(format!("{PRESET}-seed{SEED}-bf16"));
    if dir.join("config.json").exists() {
        ensure_tokenizer(&dir)?;
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("partial-{}", std::process::id()));
    eprintln!("generating the built-in `{PRESET}` model into {} (once)", dir.display());
    let options = SynthOptions {
        seed: SEED,
        dtype: DType::BF16,
        shard_bytes: None,
        max_bytes: available_memory_bytes(),
    };
    write_random_model(&ModelShape::preset(PRESET)?, &options, &tmp).context("generating the default model")?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process won the race; use its copy.
        Err(_) if dir.join("config.json").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e).with_context(|| format!("moving the model into {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model cached before models carried a tokenizer gets one, sized to its vocabulary.
    #[test]
    fn an_older_cached_model_gets_its_tokenizer() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("medium-seed0-bf16");
        std::fs::create_dir(&dir).unwrap();
        let vocab = ModelShape::preset(PRESET).unwrap().vocab;
        std::fs::write(dir.join("config.json"), format!("{{\"vocab_size\": {vocab}}}")).unwrap();
        ensure_tokenizer(&dir).unwrap();
        let t = moe_text::Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(t.vocab_size(), vocab);
        assert_eq!(t.decode(&t.encode("Hi 你好").unwrap(), false).unwrap(), "Hi 你好");
        // Nothing is left beside it.
        let entries: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["medium-seed0-bf16"]);
        // A second call keeps what is there.
        let before = std::fs::metadata(dir.join("hy.tiktoken")).unwrap().modified().unwrap();
        ensure_tokenizer(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(dir.join("hy.tiktoken")).unwrap().modified().unwrap(),
            before
        );
    }
}
