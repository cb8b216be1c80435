//! The fields both generation endpoints share, validated against OpenAI's ranges and the
//! model: every refusal names its field.

use serde::Deserialize;

use crate::api_error::{ApiError, ApiResult};
use crate::fields::Fields;
use crate::model::ServedModel;

/// Most choices one request may ask for.
pub const MAX_N: u32 = 16;
/// Most stop strings.
pub const MAX_STOPS: usize = 16;
/// Longest stop string in bytes: every generated piece is matched against each stop string's
/// tail, so its length bounds the per-token work and the text held back from a stream.
pub const MAX_STOP_BYTES: usize = 1024;
/// Most alternatives per token (what the cluster returns at most).
pub use moe_model::sampling::MAX_TOP_LOGPROBS;
use moe_model::sampling::{MAX_PRESENCE_FREQUENCY_PENALTY as MAX_PF, MAX_REPETITION_PENALTY};
/// OpenAI's default `max_tokens` of `/v1/completions`.
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: Option<u64>,
    /// None: up to the end of the context.
    pub max_tokens: Option<u32>,
    /// The field `max_tokens` came from (errors name it).
    pub max_tokens_field: &'static str,
    pub stop: Vec<String>,
    pub n: u32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logprobs: bool,
    pub top_logprobs: u32,
    /// vLLM's `ignore_eos`: the model's end-of-turn ids do not end the output (stop strings
    /// and the token limit still do); for benchmarks and tests that need a fixed length.
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    pub sampling: Sampling,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's extension: the prompt's and each choice's token ids in the response.
    pub return_token_ids: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Which endpoint: they differ in `logprobs` (a bool and `top_logprobs` for chat, a count for
/// completions) and in the default length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(name: &str, v: Option<T>, lo: T, hi: T) -> ApiResult<Option<T>> {
    match v {
        Some(x) if !(x >= lo && x <= hi) => Err(ApiError::field(name, format!("must be in [{lo}, {hi}], got {x}"))),
        v => Ok(v),
    }
}

pub fn common(f: &Fields, model: &ServedModel, endpoint: Endpoint) -> ApiResult<Common> {
    match f.get::<String>("model")? {
        None => return Err(ApiError::field("model", "is required")),
        Some(m) if m != model.name => {
            return Err(ApiError::field(
                "model",
                format!("unknown model {m:?}; this server serves {:?}", model.name),
            ));
        }
        Some(_) => {}
    }
    let d = &model.defaults;
    let temperature = range("temperature", f.get::<f32>("temperature")?, 0.0, 2.0)?.unwrap_or(d.temperature);
    let top_p = range("top_p", f.get::<f32>("top_p")?, f32::MIN_POSITIVE, 1.0)?.unwrap_or(d.top_p);
    let top_k = match f.get::<i64>("top_k")? {
        None => d.top_k,
        // vLLM's spelling of "no cut".
        Some(-1) | Some(0) => 0,
        Some(k) if k > 0 && k <= u32::MAX as i64 => k as u32,
        Some(k) => {
            return Err(ApiError::field(
                "top_k",
                format!("must be -1, 0 (off) or positive, got {k}"),
            ));
        }
    };
    let seed = f.get::<u64>("seed")?;
    let max_tokens = {
        let a = range("max_tokens", f.get::<u32>("max_tokens")?, 1, u32::MAX)?;
        let b = range(
            "max_completion_tokens",
            f.get::<u32>("max_completion_tokens")?,
            1,
            u32::MAX,
        )?;
        let field = if b.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        let value = match (endpoint, b.or(a)) {
            (Endpoint::Completions, None) => Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
            (_, m) => m,
        };
        (value, field)
    };
    let (max_tokens, max_tokens_field) = max_tokens;
    let stop = match f.get::<Stop>("stop")? {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::field(
            "stop",
            format!("at most {MAX_STOPS} strings, got {}", stop.len()),
        ));
    }
    if let Some(i) = stop.iter().position(String::is_empty) {
        return Err(ApiError::field(format!("stop[{i}]"), "must not be empty"));
    }
    if let Some(i) = stop.iter().position(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::field(
            format!("stop[{i}]"),
            format!("at most {MAX_STOP_BYTES} bytes, got {}", stop[i].len()),
        ));
    }
    let n = range("n", f.get::<u32>("n")?, 1, MAX_N)?.unwrap_or(1);
    let repetition_penalty = match f.get::<f32>("repetition_penalty")? {
        Some(r) if !(r > 0.0 && r <= MAX_REPETITION_PENALTY) => {
            return Err(ApiError::field(
                "repetition_penalty",
                format!("must be in (0, {MAX_REPETITION_PENALTY}], got {r}"),
            ));
        }
        r => r.unwrap_or(d.repetition_penalty),
    };
    let presence_penalty =
        range("presence_penalty", f.get::<f32>("presence_penalty")?, -MAX_PF, MAX_PF)?.unwrap_or(0.0);
    let frequency_penalty =
        range("frequency_penalty", f.get::<f32>("frequency_penalty")?, -MAX_PF, MAX_PF)?.unwrap_or(0.0);
    let (logprobs, top_logprobs) = match endpoint {
        Endpoint::Chat => {
            let on = f.get::<bool>("logprobs")?.unwrap_or(false);
            let top = range("top_logprobs", f.get::<u32>("top_logprobs")?, 0, MAX_TOP_LOGPROBS)?;
            if top.is_some_and(|t| t > 0) && !on {
                return Err(ApiError::field("top_logprobs", "needs logprobs: true"));
            }
            (on, top.unwrap_or(0))
        }
        Endpoint::Completions => match range("logprobs", f.get::<u32>("logprobs")?, 0, MAX_TOP_LOGPROBS)? {
            None => (false, 0),
            Some(k) => (true, k),
        },
    };
    let stream = f.get::<bool>("stream")?.unwrap_or(false);
    let include_usage = match f.get::<StreamOptions>("stream_options")? {
        Some(_) if !stream => return Err(ApiError::field("stream_options", "is only allowed with stream: true")),
        Some(o) => o.include_usage,
        None => false,
    };
    // Fields this server does not implement are accepted only at the value that means "off"
    // (clients such as LangChain send them by default); compared as parsed JSON, so `{ }` is
    // the empty object too.
    let off = [
        ("logit_bias", serde_json::json!({})),
        ("best_of", serde_json::json!(1)),
        ("echo", serde_json::json!(false)),
        ("suffix", serde_json::json!("")),
    ];
    for (unsupported, off) in off {
        if let Some(v) = f.get::<serde_json::Value>(unsupported)?
            && v != off
        {
            return Err(ApiError::field(
                unsupported,
                format!("is not supported by this server (only {off} is accepted)"),
            ));
        }
    }
    Ok(Common {
        sampling: Sampling {
            temperature,
            top_p,
            top_k,
            seed,
            max_tokens,
            max_tokens_field,
            stop,
            n,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logprobs,
            top_logprobs,
            ignore_eos: f.get::<bool>("ignore_eos")?.unwrap_or(false),
        },
        stream,
        include_usage,
        return_token_ids: f.get::<bool>("return_token_ids")?.unwrap_or(false),
    })
}

/// Tokens to generate for a prompt of `prompt_len`: the request's `max_tokens` (from the field
/// `max_field`), refused when prompt and answer would not fit the context; without one, the
/// rest of the context. `field` names the prompt in errors.
pub fn max_new_tokens(
    requested: Option<u32>,
    max_field: &str,
    prompt_len: usize,
    context: usize,
    field: &str,
) -> ApiResult<u32> {
    if prompt_len >= context {
        return Err(ApiError::field(
            field,
            format!(
                "the prompt has {prompt_len} tokens; the model's context is {context}, which leaves no room for an answer"
            ),
        ));
    }
    let room = (context - prompt_len).min(moe_model::sampling::MAX_NEW_TOKENS as usize) as u32;
    match requested {
        None => Ok(room),
        Some(m) if m > room => Err(ApiError::field(
            max_field,
            format!(
                "{m} tokens after a prompt of {prompt_len} exceed the model's context of {context} (at most {room})"
            ),
        )),
        Some(m) => Ok(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Defaults;

    fn model() -> ServedModel {
        crate::testing::served_model("m", Defaults::default())
    }

    fn parse(body: &str, endpoint: Endpoint) -> ApiResult<Common> {
        common(&Fields::parse(body.as_bytes()).unwrap(), &model(), endpoint)
    }

    fn refused(body: &str) -> (String, String) {
        let e = parse(body, Endpoint::Chat).unwrap_err();
        assert_eq!(e.status.as_u16(), 400, "{body}");
        (e.param.unwrap_or_default(), e.message)
    }

    #[test]
    fn bad_fields_are_named() {
        let too_long_stop = format!(
            r#"{{"model": "m", "stop": ["a", "{}"]}}"#,
            "x".repeat(MAX_STOP_BYTES + 1)
        );
        let cases = [
            (r#"{}"#, "model"),
            (r#"{"model": "other"}"#, "model"),
            (r#"{"model": "m", "temperature": 2.5}"#, "temperature"),
            (r#"{"model": "m", "temperature": "x"}"#, "temperature"),
            (r#"{"model": "m", "top_p": 0}"#, "top_p"),
            (r#"{"model": "m", "top_k": -2}"#, "top_k"),
            (r#"{"model": "m", "max_tokens": 0}"#, "max_tokens"),
            (
                r#"{"model": "m", "max_completion_tokens": -1}"#,
                "max_completion_tokens",
            ),
            (r#"{"model": "m", "n": 17}"#, "n"),
            (r#"{"model": "m", "stop": ["a", ""]}"#, "stop[1]"),
            (r#"{"model": "m", "stop": 3}"#, "stop"),
            (too_long_stop.as_str(), "stop[1]"),
            (r#"{"model": "m", "presence_penalty": -3}"#, "presence_penalty"),
            (r#"{"model": "m", "frequency_penalty": 2.1}"#, "frequency_penalty"),
            (r#"{"model": "m", "repetition_penalty": 0}"#, "repetition_penalty"),
            (r#"{"model": "m", "top_logprobs": 3}"#, "top_logprobs"),
            (
                r#"{"model": "m", "logprobs": true, "top_logprobs": 21}"#,
                "top_logprobs",
            ),
            (r#"{"model": "m", "seed": -1}"#, "seed"),
            (
                r#"{"model": "m", "stream_options": {"include_usage": true}}"#,
                "stream_options",
            ),
            (r#"{"model": "m", "logit_bias": {"5": 1}}"#, "logit_bias"),
            (r#"{"model": "m", "best_of": 2}"#, "best_of"),
            (r#"{"model": "m", "echo": true}"#, "echo"),
            (r#"{"model": "m", "suffix": "x"}"#, "suffix"),
        ];
        for (body, field) in cases {
            let (param, message) = refused(body);
            assert_eq!(param, field, "{body}: {message}");
        }
    }

    #[test]
    fn unsupported_fields_at_their_off_value_are_accepted() {
        let body = r#"{"model": "m", "logit_bias": { }, "best_of": 1, "echo": false, "suffix": "",
            "stop": ["a"]}"#;
        let c = parse(body, Endpoint::Completions).unwrap();
        assert_eq!(c.sampling.stop, ["a"]);
        let longest = format!(r#"{{"model": "m", "stop": "{}"}}"#, "x".repeat(MAX_STOP_BYTES));
        assert_eq!(
            parse(&longest, Endpoint::Chat).unwrap().sampling.stop[0].len(),
            MAX_STOP_BYTES
        );
    }

    #[test]
    fn defaults_come_from_the_model_and_openai() {
        let c = parse(r#"{"model": "m"}"#, Endpoint::Chat).unwrap();
        assert_eq!(c.sampling.temperature, 1.0);
        assert_eq!(c.sampling.max_tokens, None);
        assert_eq!(c.sampling.n, 1);
        let c = parse(r#"{"model": "m"}"#, Endpoint::Completions).unwrap();
        assert_eq!(c.sampling.max_tokens, Some(COMPLETIONS_DEFAULT_MAX_TOKENS));
        let tuned = crate::testing::served_model(
            "m",
            Defaults {
                temperature: 0.7,
                top_p: 0.8,
                top_k: 20,
                repetition_penalty: 1.05,
            },
        );
        let f = Fields::parse(br#"{"model": "m", "top_k": -1, "temperature": 0}"#).unwrap();
        let c = common(&f, &tuned, Endpoint::Chat).unwrap();
        assert_eq!(
            (
                c.sampling.temperature,
                c.sampling.top_p,
                c.sampling.top_k,
                c.sampling.repetition_penalty
            ),
            (0.0, 0.8, 0, 1.05)
        );
    }

    #[test]
    fn request_fields_are_read() {
        let c = parse(
            r#"{"model": "m", "stop": "END", "max_completion_tokens": 7, "max_tokens": 9, "seed": 3, "n": 2,
               "logprobs": true, "top_logprobs": 4, "stream": true, "stream_options": {"include_usage": true}}"#,
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(c.sampling.stop, ["END"]);
        assert_eq!(c.sampling.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!(c.sampling.max_tokens_field, "max_completion_tokens");
        assert_eq!((c.sampling.seed, c.sampling.n), (Some(3), 2));
        assert_eq!((c.sampling.logprobs, c.sampling.top_logprobs), (true, 4));
        assert!(c.stream && c.include_usage);
        let c = parse(r#"{"model": "m", "logprobs": 2}"#, Endpoint::Completions).unwrap();
        assert_eq!((c.sampling.logprobs, c.sampling.top_logprobs), (true, 2));
    }

    #[test]
    fn prompt_and_answer_must_fit_the_context() {
        assert_eq!(max_new_tokens(None, "max_tokens", 10, 64, "messages").unwrap(), 54);
        assert_eq!(max_new_tokens(Some(54), "max_tokens", 10, 64, "messages").unwrap(), 54);
        let e = max_new_tokens(Some(55), "max_completion_tokens", 10, 64, "messages").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_completion_tokens"));
        let e = max_new_tokens(None, "max_tokens", 64, 64, "prompt").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }
}
