//! What the front end knows of the model: read from the model directory once at start
//! (`config.json`, `generation_config.json`, the tokenizer files; never the weights).

use std::path::Path;
use std::sync::Arc;

use moe_text::Tokenizer;
use moe_text::chat::{ChatTemplate, SystemClock};
use serde_json::Value;

use crate::error::{Error, Result};

/// Sampling defaults for fields a request omits, from `generation_config.json`; OpenAI's own
/// defaults where the file says nothing (temperature 1, no top-p/top-k cut, no penalties).
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub repetition_penalty: f32,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
        }
    }
}

pub struct ServedModel {
    /// The `model` requests must name.
    pub name: String,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    /// The template has Hunyuan-A13B's thinking modes: chat output is split into
    /// `reasoning_content` and `content`.
    pub thinking: bool,
    /// Prompt plus generated tokens may not exceed this (`max_position_embeddings`).
    pub context_len: usize,
    pub defaults: Defaults,
    /// Ids that end generation: `generation_config.json`'s `eos_token_id` and the tokenizer's
    /// `eos_token`.
    pub stop_ids: Vec<u32>,
    /// Unix time the front end loaded the model (`created` in `/v1/models`).
    pub created: u64,
}

impl ServedModel {
    pub fn load(dir: &Path, name: Option<String>) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let context_len = config
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::model(&config_path, "max_position_embeddings is missing or not an integer"))?
            as usize;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let template = match tokenizer.config().chat_template {
            Some(_) => Some(ChatTemplate::from_config(tokenizer.config(), Arc::new(SystemClock))?),
            None => None,
        };
        let thinking = tokenizer
            .config()
            .chat_template
            .as_deref()
            .is_some_and(|t| t.contains("enable_thinking"));
        let gen_path = dir.join("generation_config.json");
        let (defaults, mut stop_ids) = match gen_path.exists() {
            true => generation_config(&read_json(&gen_path)?, &gen_path, tokenizer.vocab_size())?,
            false => (Defaults::default(), Vec::new()),
        };
        if let Some(eos) = tokenizer
            .config()
            .eos_token
            .as_deref()
            .and_then(|n| tokenizer.special_id(n))
            && !stop_ids.contains(&eos)
        {
            stop_ids.push(eos);
        }
        let name = name.unwrap_or_else(|| {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string())
        });
        Ok(ServedModel {
            name,
            tokenizer: Arc::new(tokenizer),
            template,
            thinking,
            context_len,
            defaults,
            stop_ids,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_owned(),
        source: e,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::model(path, e.to_string()))
}

/// The sampling defaults and stop ids of a `generation_config.json`. `do_sample` is not read:
/// a client asks for greedy decoding with `temperature: 0`, as with OpenAI.
pub fn generation_config(json: &Value, path: &Path, vocab: usize) -> Result<(Defaults, Vec<u32>)> {
    let mut d = Defaults::default();
    let number = |key: &str| -> Result<Option<f64>> {
        match json.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::model(path, format!("{key} is {v}, not a number"))),
        }
    };
    if let Some(t) = number("temperature")? {
        d.temperature = t as f32;
    }
    if let Some(p) = number("top_p")? {
        d.top_p = p as f32;
    }
    if let Some(k) = number("top_k")? {
        d.top_k = k as u32;
    }
    if let Some(r) = number("repetition_penalty")? {
        d.repetition_penalty = r as f32;
    }
    let ids: Vec<u64> = match json.get("eos_token_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).collect(),
        Some(v) => v.as_u64().into_iter().collect(),
    };
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::model(
            path,
            format!("eos_token_id {bad} is outside the tokenizer's vocabulary of {vocab}"),
        ));
    }
    Ok((d, ids.into_iter().map(|id| id as u32).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a13b_generation_config_gives_defaults_and_stop_ids() {
        let json = serde_json::json!({"eos_token_id": [127960, 127967], "do_sample": true,
            "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05, "temperature": 0.7});
        let (d, stops) = generation_config(&json, Path::new("g.json"), 128167).unwrap();
        assert_eq!(
            d,
            Defaults {
                temperature: 0.7,
                top_p: 0.8,
                top_k: 20,
                repetition_penalty: 1.05
            }
        );
        assert_eq!(stops, [127960, 127967]);
        let bad = generation_config(&serde_json::json!({"temperature": "hot"}), Path::new("g.json"), 10);
        assert_eq!(
            bad.unwrap_err().to_string(),
            "g.json: temperature is \"hot\", not a number"
        );
    }
}
