//! Generated models' tokenizers: ranks + specials exactly fill the model's vocabulary, every id
//! decodes, text round-trips, and the family's chat template renders to ids the model has.

use moe_text::chat::{ChatMessage, ChatRequest, ChatTemplate, Role, SystemClock};
use moe_text::synthetic::{TemplateFamily, write_tokenizer};
use moe_text::{StreamDecoder, Tokenizer};

fn generated(vocab: usize, family: TemplateFamily) -> (tempfile::TempDir, Tokenizer) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), format!("{{\"vocab_size\": {vocab}}}")).unwrap();
    write_tokenizer(dir.path(), vocab, family).unwrap();
    let t = Tokenizer::from_dir(dir.path()).unwrap();
    (dir, t)
}

const TEXTS: [&str; 4] = [
    "Hello, world! The quick brown fox.",
    "混元 MoE 🚀 — ünïcödé\ttabs\r\nlines",
    "<|startoftext|>system<|extra_4|>user<|extra_0|>",
    "",
];

#[test]
fn every_id_decodes_and_text_round_trips() {
    for (vocab, family) in [
        (267, TemplateFamily::A13b),
        (300, TemplateFamily::Large),
        (512, TemplateFamily::A13b),
        (32000, TemplateFamily::A13b),
    ] {
        let (_dir, t) = generated(vocab, family);
        assert_eq!(t.vocab_size(), vocab);
        let all: Vec<u32> = (0..vocab as u32).collect();
        t.decode(&all, false).unwrap();
        assert!(t.decode(&[vocab as u32], false).is_err());
        for text in TEXTS {
            let ids = t.encode(text).unwrap();
            assert!(ids.iter().all(|&id| (id as usize) < vocab), "{vocab}: {ids:?}");
            assert_eq!(t.decode(&ids, false).unwrap(), text, "{vocab}");
            let mut d = StreamDecoder::new(&t, false);
            let streamed: String = ids.iter().map(|&id| d.push(id).unwrap()).collect::<String>() + &d.finish();
            assert_eq!(streamed, text, "{vocab}");
        }
    }
}

#[test]
fn merges_compress_english() {
    let (_dir, t) = generated(32000, TemplateFamily::A13b);
    // 31,790 ranks: every pair of space/letters, then triples for the first ~540 pairs. BPE
    // merges the lowest rank first: in " cat", "at" (rank 256 + 73) beats " c" + "a", and
    // " cat" itself is not a token.
    let pieces: Vec<String> = t
        .encode("the cat sat on the mat")
        .unwrap()
        .iter()
        .map(|&id| t.decode(&[id], false).unwrap())
        .collect();
    assert_eq!(
        pieces,
        ["t", "he", " c", "at", " s", "at", " on", " t", "he", " m", "at"]
    );
}

#[test]
fn the_chat_template_renders_to_the_models_ids() {
    let (_dir, t) = generated(512, TemplateFamily::A13b);
    let template = ChatTemplate::from_config(t.config(), std::sync::Arc::new(SystemClock)).unwrap();
    let request = ChatRequest::new(vec![
        ChatMessage::new(Role::System, "S"),
        ChatMessage::new(Role::User, "Hi"),
    ]);
    let rendered = template.render(&request).unwrap();
    assert_eq!(rendered, "<|startoftext|>S<|extra_4|>Hi<|extra_0|>");
    let ids = t.encode(&rendered).unwrap();
    // Single letters are their byte ranks; specials sit after the ranks in Tencent's order.
    let special = |name: &str| t.special_id(name).unwrap();
    assert_eq!(special("<|startoftext|>"), t.n_ranks() as u32 + 1);
    assert_eq!(special("<|extra_0|>"), t.n_ranks() as u32 + 5);
    let expected = [
        special("<|startoftext|>"),
        u32::from(b'S'),
        special("<|extra_4|>"),
        u32::from(b'H'),
        u32::from(b'i'),
        special("<|extra_0|>"),
    ];
    assert_eq!(ids, expected);
}
