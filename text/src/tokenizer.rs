//! Hunyuan's tokenizer: byte-level BPE over a tiktoken ranks file with Tencent's split
//! pattern, NFC normalisation, and the special tokens at `number of ranks + index`.

use std::collections::HashSet;
use std::path::Path;

use tiktoken_rs::CoreBPE;
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};
use crate::ranks::read_ranks;
use crate::specials::{MIN_SPECIALS, N_SPECIALS, SPLIT_PATTERN, special_names};
use crate::tokenizer_config::TokenizerConfig;

/// The ranks file of a model directory, as Tencent names it.
pub const RANKS_FILE: &str = "hy.tiktoken";

pub struct Tokenizer {
    bpe: CoreBPE,
    n_ranks: u32,
    specials: Vec<String>,
    config: TokenizerConfig,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("n_ranks", &self.n_ranks)
            .field("n_specials", &self.specials.len())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads `dir/hy.tiktoken` and `dir/tokenizer_config.json`. When `dir/config.json` gives a
    /// `vocab_size` smaller than ranks + Tencent's 210 specials (the project's small generated
    /// models), only the specials that fit are kept, so that every id the tokenizer makes is
    /// one the model can embed; at least the 11 the chat template uses must fit.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let ranks_path = dir.join(RANKS_FILE);
        let ranks = read_ranks(&ranks_path)?;
        let config = TokenizerConfig::from_dir(dir)?;
        let n_specials = match model_vocab_size(dir)? {
            None => N_SPECIALS,
            Some(vocab) => {
                let room = vocab.checked_sub(ranks.len()).filter(|&r| r >= MIN_SPECIALS).ok_or_else(|| {
                    Error::config(
                        dir.join("config.json"),
                        format!(
                            "vocab_size {vocab} leaves no room for {} ranks of {} plus the {MIN_SPECIALS} special tokens the chat template needs",
                            ranks.len(),
                            ranks_path.display()
                        ),
                    )
                })?;
                room.min(N_SPECIALS)
            }
        };
        let tokenizer = Self::new(ranks, n_specials, config)?;
        if let Some(missing) = tokenizer
            .config
            .named_specials()
            .find(|s| tokenizer.special_id(s).is_none())
        {
            return Err(Error::config(
                dir.join(crate::tokenizer_config::FILE),
                format!("names special token {missing:?}, which is not among the tokenizer's specials"),
            ));
        }
        Ok(tokenizer)
    }

    /// A tokenizer of `ranks` (token bytes by rank) and the first `n_specials` of Tencent's
    /// specials.
    pub fn new(ranks: Vec<Vec<u8>>, n_specials: usize, config: TokenizerConfig) -> Result<Self> {
        if n_specials > N_SPECIALS {
            return Err(Error::InvalidInput(format!(
                "{n_specials} special tokens requested; Hunyuan defines {N_SPECIALS}"
            )));
        }
        let n_ranks = u32::try_from(ranks.len())
            .ok()
            .filter(|n| n.checked_add(n_specials as u32).is_some())
            .ok_or_else(|| Error::InvalidInput(format!("{} ranks do not fit 32-bit ids", ranks.len())))?;
        // Byte-level BPE falls back to single bytes: one without a rank would make encoding
        // any text that contains it panic inside tiktoken.
        let singles: std::collections::HashSet<u8> = ranks.iter().filter(|t| t.len() == 1).map(|t| t[0]).collect();
        if let Some(missing) = (0..=255u8).find(|b| !singles.contains(b)) {
            return Err(Error::InvalidInput(format!(
                "the ranks have no token for the single byte {missing:#04x}: byte-level BPE needs all 256"
            )));
        }
        let specials = special_names(n_specials);
        let encoder = ranks.into_iter().zip(0..).collect();
        let special_encoder = specials.iter().cloned().zip(n_ranks..).collect();
        let bpe = CoreBPE::new(encoder, special_encoder, SPLIT_PATTERN)
            .map_err(|e| Error::InvalidInput(format!("building the BPE: {e}")))?;
        Ok(Tokenizer {
            bpe,
            n_ranks,
            specials,
            config,
        })
    }

    /// Token ids of `text` after NFC normalisation; special tokens written in the text become
    /// their ids (as Tencent's tokenizer does). No BOS or EOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let text: String = text.nfc().collect();
        let allowed: HashSet<&str> = self.specials.iter().map(String::as_str).collect();
        self.bpe
            .encode(&text, &allowed)
            .map(|(ids, _)| ids)
            .map_err(|e| Error::Encode(e.message))
    }

    /// Token ids of `text` after NFC normalisation with special-token text treated as ordinary
    /// text (`<|eos|>` becomes the tokens of its characters, not the special id).
    pub fn encode_ordinary(&self, text: &str) -> Vec<u32> {
        let text: String = text.nfc().collect();
        self.bpe.encode_ordinary(&text)
    }

    /// Names of the special tokens, in id order.
    pub fn special_names(&self) -> &[String] {
        &self.specials
    }

    /// The bytes of `ids`; special tokens as their names, or dropped with `skip_special`.
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            self.append_token(id, skip_special, &mut out)?;
        }
        Ok(out)
    }

    /// The text of `ids`; bytes that are not valid UTF-8 become U+FFFD (Python's
    /// `errors="replace"`, which is what Tencent's tokenizer does).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids, skip_special)?).into_owned())
    }

    pub(crate) fn append_token(&self, id: u32, skip_special: bool, out: &mut Vec<u8>) -> Result<()> {
        if skip_special && self.is_special(id) {
            return self.check_id(id);
        }
        out.extend(self.bpe.decode_bytes(&[id]).map_err(|e| Error::UnknownId(e.token))?);
        Ok(())
    }

    fn check_id(&self, id: u32) -> Result<()> {
        match (id as usize) < self.vocab_size() {
            true => Ok(()),
            false => Err(Error::UnknownId(id)),
        }
    }

    /// True for ids at or above the number of ranks (ids past the vocabulary included).
    pub fn is_special(&self, id: u32) -> bool {
        id >= self.n_ranks
    }

    /// Id of the special token `name` (e.g. `<|eos|>`).
    pub fn special_id(&self, name: &str) -> Option<u32> {
        self.specials
            .iter()
            .position(|s| s == name)
            .map(|i| self.n_ranks + i as u32)
    }

    pub fn n_ranks(&self) -> usize {
        self.n_ranks as usize
    }

    /// Ranks plus specials: every id below this decodes.
    pub fn vocab_size(&self) -> usize {
        self.n_ranks as usize + self.specials.len()
    }

    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }
}

/// `vocab_size` of the model's `config.json` beside the tokenizer, if there is one.
fn model_vocab_size(dir: &Path) -> Result<Option<usize>> {
    let path = dir.join("config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::config(&path, e.to_string()))?;
    match json.get("vocab_size") {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|v| Some(v as usize))
            .ok_or_else(|| Error::config(&path, format!("vocab_size {v} is not a non-negative integer"))),
    }
}
