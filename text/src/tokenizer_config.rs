//! The parts of HuggingFace's `tokenizer_config.json` that Hunyuan uses: the chat template and
//! the names of the special tokens the template and the stop condition refer to.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

pub const FILE: &str = "tokenizer_config.json";
/// Newer transformers save the template beside the config instead of inside it.
pub const TEMPLATE_FILE: &str = "chat_template.jinja";

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub additional_special_tokens: Vec<String>,
}

/// A token as HF writes it: a bare string or an `AddedToken` object with `content`.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenName {
    Plain(String),
    Added { content: String },
}

impl From<TokenName> for String {
    fn from(t: TokenName) -> String {
        match t {
            TokenName::Plain(s) | TokenName::Added { content: s } => s,
        }
    }
}

/// A single template, or HF's list of named templates (the one named `default` is used).
#[derive(Deserialize)]
#[serde(untagged)]
enum Template {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize)]
struct Raw {
    chat_template: Option<Template>,
    bos_token: Option<TokenName>,
    eos_token: Option<TokenName>,
    pad_token: Option<TokenName>,
    #[serde(default)]
    additional_special_tokens: Vec<TokenName>,
}

impl TokenizerConfig {
    /// Reads `dir/tokenizer_config.json`, and `dir/chat_template.jinja` when the config has no
    /// template.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut config = Self::from_json_str(&text, &path)?;
        let template_path = dir.join(TEMPLATE_FILE);
        if config.chat_template.is_none() && template_path.exists() {
            let template = std::fs::read_to_string(&template_path).map_err(|e| Error::io(&template_path, e))?;
            config.chat_template = Some(template);
        }
        Ok(config)
    }

    /// Parses the config's text (`path` only names it in errors).
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| Error::config(path, e.to_string()))?;
        let chat_template = match raw.chat_template {
            None => None,
            Some(Template::One(t)) => Some(t),
            Some(Template::Named(list)) => Some(
                list.into_iter()
                    .find(|t| t.name == "default")
                    .ok_or_else(|| Error::config(path, "chat_template lists named templates but none is `default`"))?
                    .template,
            ),
        };
        Ok(TokenizerConfig {
            chat_template,
            bos_token: raw.bos_token.map(String::from),
            eos_token: raw.eos_token.map(String::from),
            pad_token: raw.pad_token.map(String::from),
            additional_special_tokens: raw.additional_special_tokens.into_iter().map(String::from).collect(),
        })
    }

    /// Every special token the config names (for checking them against the vocabulary).
    pub fn named_specials(&self) -> impl Iterator<Item = &str> {
        [&self.bos_token, &self.eos_token, &self.pad_token]
            .into_iter()
            .flatten()
            .chain(&self.additional_special_tokens)
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TokenizerConfig> {
        TokenizerConfig::from_json_str(text, Path::new("dir/tokenizer_config.json"))
    }

    #[test]
    fn reads_plain_and_added_token_forms() {
        let c = parse(
            r#"{"eos_token": {"content": "<|eos|>", "lstrip": false}, "pad_token": "<|pad|>",
            "additional_special_tokens": ["<|extra_0|>"], "chat_template": "{{ x }}", "other": 1}"#,
        )
        .unwrap();
        assert_eq!(c.eos_token.as_deref(), Some("<|eos|>"));
        assert_eq!(c.pad_token.as_deref(), Some("<|pad|>"));
        assert_eq!(c.bos_token, None);
        assert_eq!(c.chat_template.as_deref(), Some("{{ x }}"));
        assert_eq!(
            c.named_specials().collect::<Vec<_>>(),
            ["<|eos|>", "<|pad|>", "<|extra_0|>"]
        );
    }

    #[test]
    fn picks_the_default_of_named_templates() {
        let c = parse(
            r#"{"chat_template": [{"name": "tool_use", "template": "a"}, {"name": "default", "template": "b"}]}"#,
        )
        .unwrap();
        assert_eq!(c.chat_template.as_deref(), Some("b"));
        let e = parse(r#"{"chat_template": [{"name": "tool_use", "template": "a"}]}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "dir/tokenizer_config.json: chat_template lists named templates but none is `default`"
        );
    }

    #[test]
    fn malformed_json_names_file_and_line() {
        let e = parse("{\n\"eos_token\": ,\n}").unwrap_err().to_string();
        assert!(e.starts_with("dir/tokenizer_config.json: "), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }
}
