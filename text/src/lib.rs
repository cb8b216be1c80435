//! Text for Hunyuan models: the byte-level BPE tokenizer of `hy.tiktoken` with an incremental
//! decoder for streaming, the model's own Jinja chat template rendered as transformers renders
//! it, generated tokenizers for the project's synthetic models, and pure parsers of model
//! output (reasoning vs answer, tool calls) for the HTTP front end.

pub mod chat;
mod error;
mod markers;
pub mod ranks;
pub mod reasoning;
pub mod specials;
pub mod stream;
pub mod synthetic;
pub mod tokenizer;
pub mod tokenizer_config;
pub mod tool_calls;

pub use error::{Error, Result};
pub use markers::partial_suffix_len;
pub use stream::StreamDecoder;
pub use tokenizer::Tokenizer;
pub use tokenizer_config::TokenizerConfig;
