//! The model's own Jinja chat template, rendered byte-identically to transformers'
//! `apply_chat_template`: trim_blocks and lstrip_blocks, loop controls, Python's `json.dumps`
//! as `tojson`, Python string/dict methods (minijinja-contrib's pycompat), `raise_exception`,
//! and `strftime_now` on an injectable clock.

pub mod clock;
pub mod json;
pub mod messages;
mod thinking;

use std::sync::Arc;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, Value};

pub use clock::{Clock, FixedClock, SystemClock};
pub use json::Json;
pub use messages::{ChatMessage, ChatRequest, FunctionCall, Role, ToolCall};
pub use thinking::{Thinking, thinking_mode};

use crate::error::{Error, Result};
use crate::tokenizer_config::TokenizerConfig;

const TEMPLATE_NAME: &str = "chat_template";

/// Variables transformers sets itself; a kwarg of the same name would be a Python TypeError.
const RESERVED: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Special token names transformers passes to every render (`eos_token`, ...).
    special_tokens: Vec<(&'static str, Value)>,
}

impl ChatTemplate {
    /// The template of a tokenizer config; an error if it has none or it does not parse.
    pub fn from_config(config: &TokenizerConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        let source = config
            .chat_template
            .clone()
            .ok_or_else(|| Error::Template("the tokenizer config has no chat_template".into()))?;
        let mut special_tokens = Vec::new();
        for (name, value) in [
            ("bos_token", &config.bos_token),
            ("eos_token", &config.eos_token),
            ("pad_token", &config.pad_token),
        ] {
            if let Some(v) = value {
                special_tokens.push((name, Value::from(v.as_str())));
            }
        }
        if !config.additional_special_tokens.is_empty() {
            special_tokens.push((
                "additional_special_tokens",
                Value::from(config.additional_special_tokens.clone()),
            ));
        }
        let mut template = Self::new(source, clock)?;
        template.special_tokens = special_tokens;
        Ok(template)
    }

    /// A template from its source.
    pub fn new(source: String, clock: Arc<dyn Clock>) -> Result<Self> {
        let mut env = Environment::new();
        // transformers: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
        // extensions=[loopcontrols]); keep_trailing_newline stays off as in Jinja2.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", json::tojson_filter);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", move |format: String| {
            clock::strftime(clock.now(), &format).map_err(|m| minijinja::Error::new(ErrorKind::InvalidOperation, m))
        });
        env.add_template_owned(TEMPLATE_NAME, source).map_err(template_error)?;
        Ok(ChatTemplate {
            env,
            special_tokens: Vec::new(),
        })
    }

    /// The prompt text of `request` (special tokens written as text; encode it with the
    /// tokenizer, which recognises them).
    pub fn render(&self, request: &ChatRequest) -> Result<String> {
        let mut context = self.special_tokens.clone();
        for (name, value) in &request.chat_template_kwargs {
            if RESERVED.contains(&name.as_str()) {
                return Err(Error::InvalidInput(format!(
                    "chat_template_kwargs may not set `{name}`"
                )));
            }
            context.push((name.as_str(), value.to_template_value()));
        }
        let messages: Value = request.messages.iter().map(ChatMessage::to_template_value).collect();
        let tools = match &request.tools {
            Some(tools) => tools.iter().map(Json::to_template_value).collect(),
            None => Value::from(()),
        };
        context.push(("messages", messages));
        context.push(("tools", tools));
        context.push(("add_generation_prompt", Value::from(request.add_generation_prompt)));
        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        template.render(messages::ordered_map(context)).map_err(template_error)
    }
}

/// minijinja's message plus its cause chain (where the detail of a failed call sits).
fn template_error(e: minijinja::Error) -> Error {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    Error::Template(message)
}
