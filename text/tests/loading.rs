//! Loading a tokenizer from a model directory: every broken input is an error naming the file
//! (and line) at fault.

mod common;

use std::path::Path;

use moe_text::Tokenizer;

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> String {
    Tokenizer::from_dir(dir).unwrap_err().to_string()
}

/// 256 single bytes, the smallest complete byte-level ranks file.
fn byte_ranks() -> String {
    moe_text::ranks::format_ranks(&(0..=255u8).map(|b| vec![b]).collect::<Vec<_>>())
}

const CONFIG: &str = r#"{"eos_token": "<|eos|>", "chat_template": "{{ messages[0]['content'] }}"}"#;

#[test]
fn missing_files_are_named() {
    let dir = dir_with(&[("tokenizer_config.json", CONFIG)]);
    let e = load_error(dir.path());
    assert!(
        e.starts_with(&format!("{}: ", dir.path().join("hy.tiktoken").display())),
        "{e}"
    );
    let ranks = byte_ranks();
    let dir = dir_with(&[("hy.tiktoken", &ranks)]);
    let e = load_error(dir.path());
    assert!(
        e.starts_with(&format!("{}: ", dir.path().join("tokenizer_config.json").display())),
        "{e}"
    );
}

#[test]
fn a_malformed_ranks_line_is_named() {
    let ranks = format!("{}bm90IGJhc2U2NA 256\n", byte_ranks());
    let dir = dir_with(&[("hy.tiktoken", &ranks), ("tokenizer_config.json", CONFIG)]);
    let e = load_error(dir.path());
    assert!(
        e.starts_with(&format!(
            "{}:257: token \"bm90IGJhc2U2NA\" is not base64",
            dir.path().join("hy.tiktoken").display()
        )),
        "{e}"
    );
}

#[test]
fn malformed_config_json_is_named_with_its_line() {
    let ranks = byte_ranks();
    let dir = dir_with(&[
        ("hy.tiktoken", &ranks),
        (
            "tokenizer_config.json",
            "{\n  \"eos_token\": \"<|eos|>\"\n  \"x\": 1\n}",
        ),
    ]);
    let e = load_error(dir.path());
    assert!(
        e.starts_with(&format!("{}: ", dir.path().join("tokenizer_config.json").display())),
        "{e}"
    );
    assert!(e.contains("line 3"), "{e}");
}

#[test]
fn the_model_vocabulary_bounds_the_specials() {
    let ranks = byte_ranks();
    let config_json = |vocab: usize| format!("{{\"vocab_size\": {vocab}}}");
    // Room for 44 specials: <|extra_38|> is the last.
    let fits = config_json(300);
    let dir = dir_with(&[
        ("hy.tiktoken", &ranks),
        ("tokenizer_config.json", CONFIG),
        ("config.json", &fits),
    ]);
    let t = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.vocab_size(), 300);
    assert_eq!(t.special_id("<|extra_38|>"), Some(299));
    assert_eq!(t.special_id("<|extra_39|>"), None);
    assert_eq!(
        t.encode("<|extra_39|>").unwrap().len(),
        "<|extra_39|>".len(),
        "not a special here: one byte per token"
    );
    // Too small for the chat template's specials.
    let small = config_json(266);
    let dir = dir_with(&[
        ("hy.tiktoken", &ranks),
        ("tokenizer_config.json", CONFIG),
        ("config.json", &small),
    ]);
    assert_eq!(
        load_error(dir.path()),
        format!(
            "{}: vocab_size 266 leaves no room for 256 ranks of {} plus the 11 special tokens the chat template needs",
            dir.path().join("config.json").display(),
            dir.path().join("hy.tiktoken").display()
        )
    );
}

#[test]
fn a_config_naming_an_unknown_special_is_refused() {
    let ranks = byte_ranks();
    let config = r#"{"additional_special_tokens": ["<|extra_0|>", "<|im_start|>"]}"#;
    let dir = dir_with(&[("hy.tiktoken", &ranks), ("tokenizer_config.json", config)]);
    assert_eq!(
        load_error(dir.path()),
        format!(
            "{}: names special token \"<|im_start|>\", which is not among the tokenizer's specials",
            dir.path().join("tokenizer_config.json").display()
        )
    );
}

#[test]
fn ranks_without_every_single_byte_are_refused_not_a_panic_later() {
    // Byte 0xe9 given no rank of its own: encoding "é" would panic inside tiktoken.
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).filter(|&b| b != 0xe9).map(|b| vec![b]).collect();
    tokens.push(b"ab".to_vec());
    let ranks = moe_text::ranks::format_ranks(&tokens);
    let dir = dir_with(&[("hy.tiktoken", &ranks), ("tokenizer_config.json", CONFIG)]);
    let e = load_error(dir.path());
    assert!(e.contains("single byte 0xe9"), "{e}");
}
