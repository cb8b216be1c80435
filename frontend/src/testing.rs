//! A served model built in memory for unit tests: a generated tokenizer of 512 ids with
//! Hunyuan-A13B's released chat template.

use std::path::Path;
use std::sync::Arc;

use moe_text::chat::{ChatTemplate, FixedClock};
use moe_text::synthetic::{TemplateFamily, specials_for_vocab, synthetic_ranks};
use moe_text::{Tokenizer, TokenizerConfig};

use crate::model::{Defaults, ServedModel};

pub fn served_model(name: &str, defaults: Defaults) -> ServedModel {
    let vocab = 512;
    let specials = specials_for_vocab(vocab).unwrap();
    let config = TokenizerConfig::from_json_str(
        TemplateFamily::A13b.release_config(),
        Path::new("tokenizer_config.json"),
    )
    .unwrap();
    let tokenizer = Tokenizer::new(synthetic_ranks(vocab - specials), specials, config).unwrap();
    let clock = chrono_free_clock();
    let template = ChatTemplate::from_config(tokenizer.config(), clock).unwrap();
    let eos = tokenizer.special_id("<|eos|>").unwrap();
    ServedModel {
        name: name.into(),
        tokenizer: Arc::new(tokenizer),
        template: Some(template),
        thinking: true,
        context_len: 64,
        defaults,
        stop_ids: vec![eos],
        created: 0,
    }
}

fn chrono_free_clock() -> Arc<FixedClock> {
    let at = "2026-01-05T09:30:00".parse().unwrap();
    Arc::new(FixedClock(at))
}
