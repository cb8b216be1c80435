//! Hunyuan's fixed special tokens and pre-tokenizer pattern (from Tencent's
//! `tokenization_hy.py`; its `tokenizer_config.json` has no `added_tokens_decoder`).

/// Pre-tokenizer split: cl100k's pattern except that digits are split one at a time (`\p{N}`,
/// not `\p{N}{1,3}`). The `\s+(?!\S)` look-ahead is why this needs `fancy-regex`.
pub const SPLIT_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Number of `<|extra_i|>` tokens in Tencent's list.
pub const N_EXTRA: usize = 205;

/// Length of the full special list: five named tokens then the extras.
pub const N_SPECIALS: usize = 5 + N_EXTRA;

/// The specials the chat templates and stop conditions use (up to `<|extra_5|>`, the
/// end-of-document id): a tokenizer with fewer than this many cannot carry a conversation.
pub const MIN_SPECIALS: usize = 5 + 6;

pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const STARTOFTEXT: &str = "<|startoftext|>";
pub const BOS: &str = "<|bos|>";
/// Ends an assistant turn.
pub const EOS: &str = "<|eos|>";
pub const PAD: &str = "<|pad|>";
/// Ends user and tool turns.
pub const EXTRA_0: &str = "<|extra_0|>";
/// Ends the system turn.
pub const EXTRA_4: &str = "<|extra_4|>";
/// End of document: the other stop token.
pub const EOD: &str = "<|extra_5|>";

/// The first `n` names of Tencent's special list, in id order (id = number of ranks + index).
pub fn special_names(n: usize) -> Vec<String> {
    [ENDOFTEXT, STARTOFTEXT, BOS, EOS, PAD]
        .into_iter()
        .map(str::to_owned)
        .chain((0..N_EXTRA).map(|i| format!("<|extra_{i}|>")))
        .take(n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_tencents_order() {
        let names = special_names(N_SPECIALS);
        assert_eq!(names.len(), 210);
        assert_eq!(names[0], ENDOFTEXT);
        assert_eq!(names[3], EOS);
        assert_eq!(names[5], EXTRA_0);
        assert_eq!(names[9], EXTRA_4);
        assert_eq!(names[10], EOD);
        assert_eq!(names[209], "<|extra_204|>");
        assert_eq!(special_names(MIN_SPECIALS).last().unwrap(), EOD);
    }
}
