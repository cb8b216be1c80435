//! The tokenizer against Tencent's vectors (hunyuan-release README) and the 37 golden vectors
//! made with tiktoken from the real `hy.tiktoken`.

mod common;

use common::{a13b_tokenizer, golden};
use moe_text::{StreamDecoder, Tokenizer};

#[test]
fn real_tokenizer_has_hunyuans_vocabulary() {
    let t = a13b_tokenizer();
    assert_eq!(t.n_ranks(), 127_957);
    assert_eq!(t.vocab_size(), 128_167);
    for (name, id) in [
        ("<|endoftext|>", 127_957),
        ("<|startoftext|>", 127_958),
        ("<|bos|>", 127_959),
        ("<|eos|>", 127_960),
        ("<|pad|>", 127_961),
        ("<|extra_0|>", 127_962),
        ("<|extra_4|>", 127_966),
        ("<|extra_5|>", 127_967),
        ("<|extra_204|>", 128_166),
    ] {
        assert_eq!(t.special_id(name), Some(id), "{name}");
    }
    assert_eq!(t.special_id("<|extra_205|>"), None);
    assert_eq!(t.config().eos_token.as_deref(), Some("<|eos|>"));
}

#[test]
fn readme_vectors() {
    let t = a13b_tokenizer();
    for (text, ids) in [
        ("<|startoftext|>Hi<|extra_0|>", &[127958, 13347, 127962][..]),
        ("<think>\n\n</think>\n", &[14023, 771, 1363, 524, 27963, 397]),
        ("<answer>\n", &[27, 9399, 397]),
        ("/no_think", &[34200, 5978, 771]),
        ("Hello, world! 12345", &[9906, 11, 1917, 0, 220, 16, 17, 18, 19, 20]),
        ("你好，世界", &[109419, 3922, 100561]),
        // From NOTES: the tags of a slow-thinking answer.
        ("<think>\n", &[14023, 771, 397]),
        ("\n</think>\n<answer>\n", &[198, 524, 27963, 397, 27, 9399, 397]),
        ("\n</answer>", &[198, 524, 9399, 29]),
    ] {
        assert_eq!(t.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(t.decode(ids, false).unwrap(), text);
    }
}

#[test]
fn golden_vectors_ids_and_both_decodings() {
    let t = a13b_tokenizer();
    let cases = golden().tokenizer;
    assert_eq!(cases.len(), 37);
    for c in &cases {
        assert_eq!(t.encode(&c.text).unwrap(), c.ids, "encode {:?}", c.text);
        assert_eq!(t.decode(&c.ids, false).unwrap(), c.decoded, "decode {:?}", c.text);
        assert_eq!(
            t.decode(&c.ids, true).unwrap(),
            c.decoded_skip_special,
            "decode skipping specials {:?}",
            c.text
        );
    }
}

#[test]
fn nfc_normalises_before_encoding() {
    let t = a13b_tokenizer();
    // "e" + combining acute encodes as the precomposed "é"; decoding gives the NFC form.
    assert_eq!(t.encode("e\u{301}").unwrap(), t.encode("\u{e9}").unwrap());
    assert_eq!(t.decode(&t.encode("e\u{301}").unwrap(), false).unwrap(), "\u{e9}");
}

#[test]
fn round_trips_nfc_text() {
    let t = a13b_tokenizer();
    let texts = [
        "",
        "plain ASCII with  double  spaces\tand tabs\r\n",
        "混元 MoE：专家并行推理 🚀🇨🇳 👨‍👩‍👧‍👦",
        "<|startoftext|>sys<|extra_4|>user<|extra_0|>reply<|eos|>",
        "<|notaspecial|> <|extra_999|> <|eos",
        "\u{0}\u{1f}\u{7f}\u{ffff}\u{10ffff}",
        "   \n\n   trailing   ",
    ];
    for text in texts {
        assert_eq!(t.decode(&t.encode(text).unwrap(), false).unwrap(), text, "{text:?}");
    }
}

#[test]
fn unknown_ids_are_errors() {
    let t = a13b_tokenizer();
    for skip in [false, true] {
        assert_eq!(
            t.decode(&[13347, 128_167], skip).unwrap_err().to_string(),
            "token id 128167 is outside the tokenizer's vocabulary"
        );
    }
}

/// Streams `ids` token by token, the pieces concatenated.
fn stream(t: &Tokenizer, ids: &[u32], skip: bool) -> (Vec<String>, String) {
    let mut d = StreamDecoder::new(t, skip);
    let mut pieces: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
    pieces.push(d.finish());
    let whole = pieces.concat();
    (pieces, whole)
}

#[test]
fn streaming_never_breaks_a_character_and_matches_one_shot() {
    let t = a13b_tokenizer();
    let mut cases: Vec<Vec<u32>> = golden().tokenizer.into_iter().map(|c| c.ids).collect();
    // Ids that are not valid UTF-8 on their own or at all: half an emoji, then a lone byte.
    cases.push(vec![38623, 91416, 124967, 235, 13347]);
    cases.push(vec![124967, 13347, 235]);
    for ids in &cases {
        for skip in [false, true] {
            let expected = t.decode(ids, skip).unwrap();
            let (pieces, whole) = stream(t, ids, skip);
            assert_eq!(whole, expected, "{ids:?}");
            // No piece ends in a replacement character unless the one-shot decode has one.
            if !expected.contains('\u{fffd}') {
                assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')), "{pieces:?}");
            }
            // Cutting the stream anywhere: what was released is a prefix of the one-shot text.
            for cut in 0..=ids.len() {
                let mut d = StreamDecoder::new(t, skip);
                let released: String = ids[..cut].iter().map(|&id| d.push(id).unwrap()).collect();
                assert!(expected.starts_with(&released), "{ids:?} cut at {cut}: {released:?}");
                let rest: String = ids[cut..].iter().map(|&id| d.push(id).unwrap()).collect();
                assert_eq!(released + &rest + &d.finish(), expected, "{ids:?} cut at {cut}");
            }
        }
    }
}

#[test]
fn a_split_character_is_held_until_complete() {
    let t = a13b_tokenizer();
    // "😀" is [124967, 235]: four bytes in two tokens.
    let ids = t.encode("a😀").unwrap();
    assert_eq!(ids.len(), 3, "{ids:?}");
    let mut d = StreamDecoder::new(t, false);
    assert_eq!(d.push(ids[0]).unwrap(), "a");
    assert_eq!(d.push(ids[1]).unwrap(), "");
    assert_eq!(d.push(ids[2]).unwrap(), "😀");
    assert_eq!(d.finish(), "");
}
