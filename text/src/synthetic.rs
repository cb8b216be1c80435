//! Tokenizers for the project's generated models: a valid byte-level ranks file sized so that
//! ranks + specials = the model's vocabulary (every id the model can produce decodes), with
//! Hunyuan's specials on top and the family's real `tokenizer_config.json` (chat template,
//! special token names), so text works on generated models as on the released ones.
//!
//! Layout for a vocabulary `V` (at least 256 + 11):
//! - ranks `0..256`: the single bytes (rank = byte value), so any text encodes;
//! - ranks `256..V - s`: merges, each an earlier token extended by one character of
//!   `MERGE_ALPHABET` (space and ASCII letters: level 2 is every pair, level 3 every pair plus
//!   one, ...), so English text compresses somewhat. Only decoding must cover every id; BPE
//!   merges lowest ranks first, so some longer tokens are never produced by encoding.
//! - ids `V - s..V`: the first `s = min(210, V - 256)` of Tencent's specials.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::ranks::format_ranks;
use crate::specials::{MIN_SPECIALS, N_SPECIALS};
use crate::tokenizer::RANKS_FILE;
use crate::tokenizer_config;

/// Which released `tokenizer_config.json` (and so which chat template) a model gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateFamily {
    A13b,
    Large,
}

impl TemplateFamily {
    /// Tencent's `tokenizer_config.json` of the family, verbatim (its licence is beside the
    /// copy in `tests/fixtures`).
    pub fn release_config(self) -> &'static str {
        match self {
            TemplateFamily::A13b => include_str!("../../tests/fixtures/hunyuan-a13b-release/tokenizer_config.json"),
            TemplateFamily::Large => include_str!("../../tests/fixtures/hunyuan-large-release/tokenizer_config.json"),
        }
    }
}

/// Smallest vocabulary that can carry a byte-level tokenizer and the chat template's specials.
pub const MIN_VOCAB: usize = 256 + MIN_SPECIALS;

const MERGE_ALPHABET: &[u8] = b" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// Number of specials a generated tokenizer of vocabulary `vocab` carries.
pub fn specials_for_vocab(vocab: usize) -> Result<usize> {
    if vocab < MIN_VOCAB {
        return Err(Error::InvalidInput(format!(
            "a vocabulary of {vocab} cannot hold a byte-level tokenizer: it needs 256 byte tokens and {MIN_SPECIALS} special tokens ({MIN_VOCAB} ids)"
        )));
    }
    Ok((vocab - 256).min(N_SPECIALS))
}

/// Token bytes by rank for a generated tokenizer of `n_ranks` ranks (at least 256).
pub fn synthetic_ranks(n_ranks: usize) -> Vec<Vec<u8>> {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut level: Vec<Vec<u8>> = MERGE_ALPHABET.iter().map(|&b| vec![b]).collect();
    while tokens.len() < n_ranks {
        let mut next = Vec::with_capacity(level.len() * MERGE_ALPHABET.len());
        'fill: for prefix in &level {
            for &c in MERGE_ALPHABET {
                if tokens.len() == n_ranks {
                    break 'fill;
                }
                let mut t = prefix.clone();
                t.push(c);
                tokens.push(t.clone());
                next.push(t);
            }
        }
        level = next;
    }
    tokens.truncate(n_ranks.max(256));
    tokens
}

/// Writes `hy.tiktoken` and `tokenizer_config.json` for a model of vocabulary `vocab` into
/// `dir`. Returns the files written.
pub fn write_tokenizer(dir: &Path, vocab: usize, family: TemplateFamily) -> Result<Vec<PathBuf>> {
    let n_ranks = vocab - specials_for_vocab(vocab)?;
    let ranks_path = dir.join(RANKS_FILE);
    std::fs::write(&ranks_path, format_ranks(&synthetic_ranks(n_ranks))).map_err(|e| Error::io(&ranks_path, e))?;
    let config_path = dir.join(tokenizer_config::FILE);
    std::fs::write(&config_path, family.release_config()).map_err(|e| Error::io(&config_path, e))?;
    Ok(vec![ranks_path, config_path])
}

/// Copies a real tokenizer (`hy.tiktoken`, `tokenizer_config.json`, and `chat_template.jinja`
/// when present) from `from` into `dir`. Returns the files written.
pub fn copy_tokenizer(from: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for name in [RANKS_FILE, tokenizer_config::FILE, tokenizer_config::TEMPLATE_FILE] {
        let src = from.join(name);
        if name == tokenizer_config::TEMPLATE_FILE && !src.exists() {
            continue;
        }
        let dst = dir.join(name);
        std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        files.push(dst);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_bytes_then_distinct_extensions() {
        let ranks = synthetic_ranks(256 + 53 * 53 + 3);
        assert_eq!(ranks.len(), 256 + 53 * 53 + 3);
        assert!(ranks[..256].iter().enumerate().all(|(i, t)| t == &[i as u8]));
        assert_eq!(ranks[256], b"  ");
        assert_eq!(ranks[257], b" a");
        assert_eq!(ranks[256 + 53 * 53 - 1], b"ZZ");
        assert_eq!(ranks[256 + 53 * 53], b"   ");
        let distinct: std::collections::HashSet<_> = ranks.iter().collect();
        assert_eq!(distinct.len(), ranks.len());
        // Every merge extends an earlier token by one byte.
        for (rank, t) in ranks.iter().enumerate().skip(256) {
            assert!(ranks[..rank].contains(&t[..t.len() - 1].to_vec()), "rank {rank}");
        }
    }

    #[test]
    fn specials_fill_what_the_ranks_leave() {
        assert_eq!(specials_for_vocab(512).unwrap(), 210);
        assert_eq!(specials_for_vocab(300).unwrap(), 44);
        assert_eq!(specials_for_vocab(MIN_VOCAB).unwrap(), MIN_SPECIALS);
        assert_eq!(
            specials_for_vocab(266).unwrap_err().to_string(),
            "invalid input: a vocabulary of 266 cannot hold a byte-level tokenizer: it needs 256 byte tokens and 11 special tokens (267 ids)"
        );
    }
}
