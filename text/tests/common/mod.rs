//! Paths of the release files in `tests/fixtures` and the golden vectors made from them.

#![allow(dead_code)] // each test binary uses part of this

use std::path::PathBuf;

use moe_text::Tokenizer;
use serde::Deserialize;

/// Tencent's A13B release files (hy.tiktoken is byte-identical in the Large release).
pub fn a13b_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hunyuan-a13b-release")
}

pub fn large_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hunyuan-large-release")
}

/// Loaded once per test binary: parsing 128K ranks takes a moment.
pub fn a13b_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_dir(&a13b_dir()).expect("release tokenizer loads"))
}

#[derive(Deserialize)]
pub struct Golden {
    pub frozen_now: String,
    pub tokenizer: Vec<TokenizerCase>,
    pub chat: Vec<ChatCase>,
}

#[derive(Deserialize)]
pub struct TokenizerCase {
    pub text: String,
    pub ids: Vec<u32>,
    pub decoded: String,
    pub decoded_skip_special: String,
}

#[derive(Deserialize)]
pub struct ChatCase {
    pub family: String,
    pub case: String,
    pub messages: Vec<moe_text::chat::ChatMessage>,
    pub tools: Option<Vec<moe_text::chat::Json>>,
    pub kwargs: std::collections::BTreeMap<String, moe_text::chat::Json>,
    pub rendered: String,
    pub ids: Vec<u32>,
}

/// `chat-golden.json`: made with transformers 5.23 and tiktoken 0.14 from the release files.
pub fn golden() -> Golden {
    let text = std::fs::read_to_string(a13b_dir().join("chat-golden.json")).expect("golden file");
    serde_json::from_str(&text).expect("golden parses")
}
