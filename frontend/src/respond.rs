//! Response bodies of both generation endpoints, whole or as stream chunks, from the events
//! of [`crate::generate`].

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use moe_text::Tokenizer;
use moe_text::tool_calls::ParsedToolCall;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api_error::ApiError;
use crate::generate::{Event, Finish, TokenLogprob, random_u64};
use crate::metrics::Metrics;
use crate::output::Delta;
use crate::sse;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completions,
}

/// What every body of one response carries.
pub struct Meta {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub prompt_ids: Vec<u32>,
    pub n: u32,
    pub return_token_ids: bool,
    pub tokenizer: Arc<Tokenizer>,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completions, _) => "text_completion",
        }
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_ids.len(),
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_ids.len() + completion_tokens,
        })
    }

    /// A token's raw bytes: a byte-level token inside a multi-byte character is not UTF-8 on
    /// its own, and its `bytes` must be that byte, not U+FFFD's three.
    fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.tokenizer.decode_bytes(&[id], false).unwrap_or_default()
    }

    /// A token's text as OpenAI shows it: its bytes decoded lossily (U+FFFD where they are
    /// not UTF-8 on their own).
    fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(&self.token_bytes(id)).into_owned()
    }
}

/// Everything one choice produced.
#[derive(Default)]
struct Acc {
    text: Delta,
    logprobs: Vec<TokenLogprob>,
    tokens: Vec<u32>,
    finish: Option<Finish>,
}

fn finish_reason(finish: Option<Finish>, called_tools: bool) -> Value {
    match (finish, called_tools) {
        (None, _) => Value::Null,
        // A call cut by the token limit is reported as `length` (as OpenAI does): the client
        // must know the output was truncated rather than run a call that may be incomplete.
        (Some(Finish::Length), _) => json!("length"),
        (Some(Finish::Stop), true) => json!("tool_calls"),
        (Some(Finish::Stop), false) => json!("stop"),
    }
}

fn tool_call(call: &ParsedToolCall, with_index: bool) -> Value {
    let mut v = json!({
        "id": format!("call_{:016x}", random_u64()),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    });
    if with_index {
        v["index"] = json!(call.index);
    }
    v
}

fn chat_logprobs(meta: &Meta, lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let bytes = meta.token_bytes(id);
        json!({"token": String::from_utf8_lossy(&bytes), "logprob": logprob, "bytes": bytes})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|t| {
            let mut e = entry(t.id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// The legacy completions form; `offset` is where the first token's text starts.
fn completion_logprobs(meta: &Meta, lps: &[TokenLogprob], mut offset: usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    for t in lps {
        let text = meta.token_text(t.id);
        offsets.push(offset);
        offset += text.len();
        tokens.push(text);
        token_logprobs.push(t.logprob);
        top.push(Value::Object(alternatives(meta, &t.top)));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// The legacy `top_logprobs` map of one position, keyed by token text as OpenAI and vLLM do.
/// Two ids can decode to the same text (byte-level tokens of a split character are both
/// U+FFFD); vLLM's dict then keeps only the last one. Here every alternative is kept: one
/// whose text is already a key is keyed `token_id:<id>`, the spelling vLLM uses with
/// `return_tokens_as_token_ids`.
fn alternatives(meta: &Meta, top: &[(u32, f32)]) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    for &(id, lp) in top {
        let text = meta.token_text(id);
        let key = match map.contains_key(&text) {
            true => format!("token_id:{id}"),
            false => text,
        };
        map.insert(key, json!(lp));
    }
    map
}

/// Collects every event into the whole response body.
pub async fn collect(meta: &Meta, mut rx: mpsc::Receiver<Event>) -> Result<(Value, usize), ApiError> {
    let mut accs: Vec<Acc> = (0..meta.n).map(|_| Acc::default()).collect();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Delta {
                index,
                delta,
                token,
                logprob,
            } => {
                let acc = &mut accs[index as usize];
                acc.text.reasoning += &delta.reasoning;
                acc.text.content += &delta.content;
                acc.text.tool_calls.extend(delta.tool_calls);
                acc.tokens.extend(token);
                acc.logprobs.extend(logprob);
            }
            Event::Finish { index, reason } => accs[index as usize].finish = Some(reason),
            Event::Error(e) => return Err(e),
        }
    }
    let completion_tokens = accs.iter().map(|a| a.tokens.len()).sum();
    let choices: Vec<Value> = accs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let called = !a.text.tool_calls.is_empty();
            let mut choice = match meta.kind {
                Kind::Chat => {
                    let mut message = json!({
                        "role": "assistant",
                        "content": if called && a.text.content.is_empty() { Value::Null } else { json!(a.text.content) },
                        "reasoning_content": (!a.text.reasoning.is_empty()).then_some(&a.text.reasoning),
                    });
                    if called {
                        message["tool_calls"] = a.text.tool_calls.iter().map(|c| tool_call(c, false)).collect();
                    }
                    let logprobs = match a.logprobs.is_empty() {
                        true => Value::Null,
                        false => chat_logprobs(meta, &a.logprobs),
                    };
                    json!({"index": i, "message": message, "logprobs": logprobs})
                }
                Kind::Completions => {
                    let logprobs = match a.logprobs.is_empty() {
                        true => Value::Null,
                        false => completion_logprobs(meta, &a.logprobs, 0),
                    };
                    json!({"index": i, "text": a.text.content, "logprobs": logprobs})
                }
            };
            choice["finish_reason"] = finish_reason(a.finish, called);
            if meta.return_token_ids {
                choice["token_ids"] = json!(a.tokens);
            }
            choice
        })
        .collect();
    let mut body = json!({
        "id": meta.id, "object": meta.object(false), "created": meta.created, "model": meta.model,
        "choices": choices, "usage": meta.usage(completion_tokens),
    });
    if meta.return_token_ids {
        body["prompt_token_ids"] = json!(meta.prompt_ids);
    }
    Ok((body, completion_tokens))
}

/// Turns events into SSE chunks, one at a time.
pub struct Streamer {
    meta: Meta,
    include_usage: bool,
    completion_tokens: usize,
    called_tools: Vec<bool>,
    text_offset: Vec<usize>,
}

impl Streamer {
    pub fn new(meta: Meta, include_usage: bool) -> Self {
        let n = meta.n as usize;
        Streamer {
            meta,
            include_usage,
            completion_tokens: 0,
            called_tools: vec![false; n],
            text_offset: vec![0; n],
        }
    }

    fn chunk(&self, choices: Vec<Value>) -> Bytes {
        let mut c = json!({
            "id": self.meta.id, "object": self.meta.object(true), "created": self.meta.created,
            "model": self.meta.model, "choices": choices,
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        sse::event(&c)
    }

    /// The opening chunks: chat announces the assistant role for each choice.
    pub fn start(&self) -> Vec<Bytes> {
        match self.meta.kind {
            Kind::Chat => (0..self.meta.n)
                .map(|i| {
                    self.chunk(vec![json!({"index": i, "delta": {"role": "assistant", "content": ""},
                        "logprobs": null, "finish_reason": null})])
                })
                .collect(),
            Kind::Completions => Vec::new(),
        }
    }

    /// The chunk of one event, if it carries anything.
    pub fn on(&mut self, event: Event) -> Option<Bytes> {
        match event {
            Event::Delta {
                index,
                delta,
                token,
                logprob,
            } => {
                let i = index as usize;
                self.completion_tokens += usize::from(token.is_some());
                let ids_asked = self.meta.return_token_ids && token.is_some();
                if delta.is_empty() && logprob.is_none() && !ids_asked {
                    return None;
                }
                let lps: Vec<TokenLogprob> = logprob.into_iter().collect();
                let mut choice = match self.meta.kind {
                    Kind::Chat => {
                        let mut d = serde_json::Map::new();
                        if !delta.reasoning.is_empty() {
                            d.insert("reasoning_content".into(), json!(delta.reasoning));
                        }
                        if !delta.content.is_empty() {
                            d.insert("content".into(), json!(delta.content));
                        }
                        if !delta.tool_calls.is_empty() {
                            self.called_tools[i] = true;
                            d.insert(
                                "tool_calls".into(),
                                delta.tool_calls.iter().map(|c| tool_call(c, true)).collect(),
                            );
                        }
                        let logprobs = match lps.is_empty() {
                            true => Value::Null,
                            false => chat_logprobs(&self.meta, &lps),
                        };
                        json!({"index": i, "delta": d, "logprobs": logprobs, "finish_reason": null})
                    }
                    Kind::Completions => {
                        let logprobs = match lps.is_empty() {
                            true => Value::Null,
                            false => completion_logprobs(&self.meta, &lps, self.text_offset[i]),
                        };
                        self.text_offset[i] += delta.content.len();
                        json!({"index": i, "text": delta.content, "logprobs": logprobs, "finish_reason": null})
                    }
                };
                if self.meta.return_token_ids {
                    choice["token_ids"] = json!(token.into_iter().collect::<Vec<_>>());
                }
                Some(self.chunk(vec![choice]))
            }
            Event::Finish { index, reason } => {
                let reason = finish_reason(Some(reason), self.called_tools[index as usize]);
                let choice = match self.meta.kind {
                    Kind::Chat => json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason}),
                    Kind::Completions => json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason}),
                };
                Some(self.chunk(vec![choice]))
            }
            Event::Error(e) => Some(sse::event(&e.body())),
        }
    }

    /// The closing chunks: usage (when asked for) and `[DONE]`.
    pub fn end(&self) -> Vec<Bytes> {
        let mut out = Vec::new();
        if self.include_usage {
            out.push(sse::event(&json!({
                "id": self.meta.id, "object": self.meta.object(true), "created": self.meta.created,
                "model": self.meta.model, "choices": [], "usage": self.meta.usage(self.completion_tokens),
            })));
        }
        out.push(Bytes::from_static(sse::DONE.as_bytes()));
        out
    }

    pub fn completion_tokens(&self) -> usize {
        self.completion_tokens
    }
}

/// Writes `first` and the rest of `events` as SSE into the returned channel (the HTTP body).
/// When the client goes away the body is dropped, this task stops at its next send or at
/// once when idle, and dropping `events` stops the choices (see [`crate::generate`]).
pub fn spawn_stream(
    mut streamer: Streamer,
    first: Event,
    mut events: mpsc::Receiver<Event>,
    metrics: Arc<Metrics>,
    received: Instant,
) -> mpsc::Receiver<Result<Bytes, std::convert::Infallible>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut pending: Vec<Bytes> = streamer.start();
        pending.extend(streamer.on(first));
        loop {
            for b in pending.drain(..) {
                if tx.send(Ok(b)).await.is_err() {
                    return;
                }
            }
            let next = tokio::select! {
                e = events.recv() => e,
                _ = tx.closed() => return,
            };
            match next {
                Some(e) => pending.extend(streamer.on(e)),
                None => break,
            }
        }
        for b in streamer.end() {
            let _ = tx.send(Ok(b)).await;
        }
        metrics.finished(
            received.elapsed(),
            streamer.meta.prompt_ids.len(),
            streamer.completion_tokens(),
        );
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Defaults;

    fn meta(kind: Kind) -> Meta {
        let m = crate::testing::served_model("m", Defaults::default());
        Meta {
            kind,
            id: "x".into(),
            created: 7,
            model: "m".into(),
            prompt_ids: vec![1, 2, 3],
            n: 1,
            return_token_ids: false,
            tokenizer: m.tokenizer,
        }
    }

    fn delta(content: &str, token: u32) -> Event {
        Event::Delta {
            index: 0,
            delta: Delta {
                content: content.into(),
                ..Delta::default()
            },
            token: Some(token),
            logprob: None,
        }
    }

    fn parse(b: &Bytes) -> Value {
        let s = std::str::from_utf8(b).unwrap();
        serde_json::from_str(s.strip_prefix("data: ").unwrap().trim_end()).unwrap()
    }

    #[test]
    fn chat_stream_chunks_role_deltas_finish_usage_done() {
        let mut s = Streamer::new(meta(Kind::Chat), true);
        let start = s.start();
        assert_eq!(
            parse(&start[0])["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let c = parse(&s.on(delta("Hel", 5)).unwrap());
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(
            c["usage"],
            Value::Null,
            "every chunk carries usage: null when usage is asked for"
        );
        assert_eq!(c["choices"][0]["delta"], json!({"content": "Hel"}));
        assert!(s.on(delta("", 6)).is_none(), "a token without text makes no chunk");
        let f = parse(
            &s.on(Event::Finish {
                index: 0,
                reason: Finish::Length,
            })
            .unwrap(),
        );
        assert_eq!(f["choices"][0]["finish_reason"], "length");
        let end = s.end();
        assert_eq!(
            parse(&end[0])["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
        );
        assert_eq!(parse(&end[0])["choices"], json!([]));
        assert_eq!(end[1], Bytes::from_static(b"data: [DONE]\n\n"));
    }

    #[test]
    fn tool_calls_set_the_finish_reason() {
        let mut s = Streamer::new(meta(Kind::Chat), false);
        let call = ParsedToolCall {
            index: 0,
            name: "f".into(),
            arguments: "{\"a\": 1}".into(),
        };
        let e = Event::Delta {
            index: 0,
            delta: Delta {
                tool_calls: vec![call],
                ..Delta::default()
            },
            token: Some(9),
            logprob: None,
        };
        let c = parse(&s.on(e).unwrap());
        assert!(c.get("usage").is_none());
        let tc = &c["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(
            (tc["index"].clone(), tc["function"]["arguments"].clone()),
            (json!(0), json!("{\"a\": 1}"))
        );
        let f = parse(
            &s.on(Event::Finish {
                index: 0,
                reason: Finish::Stop,
            })
            .unwrap(),
        );
        assert_eq!(f["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn a_call_cut_by_the_limit_finishes_by_length() {
        assert_eq!(finish_reason(Some(Finish::Length), true), "length");
        assert_eq!(finish_reason(Some(Finish::Stop), true), "tool_calls");
        assert_eq!(finish_reason(Some(Finish::Stop), false), "stop");
        assert_eq!(finish_reason(None, true), Value::Null);
    }

    /// Ids 0xC3 and 0xA9 are the single-byte tokens of "é"'s two bytes (the synthetic
    /// tokenizer's ranks 0..256 are the bytes): each alone is U+FFFD as text, its own byte
    /// as `bytes`, and both stay in the completions map.
    #[test]
    fn logprobs_carry_raw_bytes_and_keep_colliding_alternatives() {
        let m = meta(Kind::Chat);
        let lp = TokenLogprob {
            id: 0xC3,
            logprob: -0.5,
            top: vec![(0xC3, -0.5), (0xA9, -1.5), (u32::from(b'a'), -2.0)],
        };
        let chat = chat_logprobs(&m, std::slice::from_ref(&lp));
        let first = &chat["content"][0];
        assert_eq!(first["token"], "\u{FFFD}");
        assert_eq!(first["bytes"], json!([0xC3]));
        assert_eq!(first["top_logprobs"][1]["bytes"], json!([0xA9]));
        let legacy = completion_logprobs(&m, &[lp], 0);
        assert_eq!(
            legacy["top_logprobs"][0],
            json!({"\u{FFFD}": -0.5, "token_id:169": -1.5, "a": -2.0})
        );
    }

    #[tokio::test]
    async fn whole_completion_body() {
        let (tx, rx) = mpsc::channel(8);
        tx.send(delta("a", 5)).await.unwrap();
        tx.send(delta("b", 6)).await.unwrap();
        tx.send(Event::Finish {
            index: 0,
            reason: Finish::Stop,
        })
        .await
        .unwrap();
        drop(tx);
        let (body, n) = collect(&meta(Kind::Completions), rx).await.unwrap();
        assert_eq!(n, 2);
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["choices"][0]["text"], "ab");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["total_tokens"], 5);
    }
}
