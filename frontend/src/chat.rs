//! Chat requests: OpenAI messages read into the shape the chat template takes, and the
//! rendered prompt encoded under this server's policy for special-token text written by
//! clients.
//!
//! **Policy: special-token text in client strings is ordinary text.** A message's `content`
//! (or `name`) that contains `<|eos|>` or `<|extra_0|>` is tokenised as those characters,
//! never as the special ids, so a user cannot end their turn early, forge a system or
//! assistant turn, or stop the model (prompt injection through the token stream). Refusing
//! instead would break ordinary uses (a user pasting a tokenizer's documentation or a log that
//! contains such text), and vLLM and transformers give no protection at all (the rendered
//! prompt is encoded with specials recognised everywhere). JSON the client sends (tool schemas,
//! a past call's arguments) reaches the template as values it serialises itself, where a
//! marker cannot be told apart from the template's own text after rendering; such JSON is
//! refused (400 naming the field) when it contains special-token text. `/v1/completions` is the
//! raw interface: its prompt is the client's own rendering, so specials there are recognised.
//!
//! How: before rendering, every `<|` in client strings is replaced by a private-use escape the
//! template passes through untouched; the rendered text is split at the special tokens the
//! template wrote, and each piece between them is unescaped and encoded as ordinary text.

use std::collections::BTreeMap;

use moe_text::Tokenizer;
use moe_text::chat::{ChatMessage, ChatRequest, Json, Role, Thinking, ToolCall, thinking_mode};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::api_error::{ApiError, ApiResult};
use crate::fields::{Fields, strip_position};
use crate::model::ServedModel;

/// A Unicode noncharacter (reserved for internal use) starting each escape.
const ESC: char = '\u{FDD0}';

fn escape(s: &str) -> String {
    if !s.contains(ESC) && !s.contains("<|") {
        return s.to_owned();
    }
    s.replace(ESC, "\u{FDD0}1").replace("<|", "\u{FDD0}2")
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != ESC {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('1') => out.push(ESC),
            Some('2') => out.push_str("<|"),
            // Not made by `escape`: the template wrote it; keep it as it is.
            Some(other) => {
                out.push(ESC);
                out.push(other);
            }
            None => out.push(ESC),
        }
    }
    out
}

/// Ids of a rendered prompt: the special tokens the template wrote become their ids, and the
/// text between them (client text unescaped) is encoded as ordinary text.
pub fn encode_rendered(tokenizer: &Tokenizer, rendered: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut rest = rendered;
    loop {
        let next = rest.match_indices("<|").find_map(|(at, _)| {
            tokenizer
                .special_names()
                .iter()
                .find(|name| rest[at..].starts_with(name.as_str()))
                .map(|name| (at, name))
        });
        let Some((at, name)) = next else {
            ids.extend(tokenizer.encode_ordinary(&unescape(rest)));
            return ids;
        };
        if at > 0 {
            ids.extend(tokenizer.encode_ordinary(&unescape(&rest[..at])));
        }
        ids.push(tokenizer.special_id(name).expect("a name of the list"));
        rest = &rest[at + name.len()..];
    }
}

/// OpenAI's content: a string, or a list of parts of which only text parts are supported.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    role: String,
    content: Option<Content>,
    tool_calls: Option<Vec<ToolCall>>,
    tool_call_id: Option<String>,
    name: Option<String>,
}

/// A parsed chat request: what the template renders and what the output parsers need.
pub struct Chat {
    pub request: ChatRequest,
    pub thinking: Thinking,
    /// Whether tool calls in the output are parsed (`tools` given and `tool_choice` not "none").
    pub parse_tools: bool,
}

pub fn parse(f: &Fields) -> ApiResult<Chat> {
    let raw: Vec<Box<RawValue>> = f
        .get("messages")?
        .ok_or_else(|| ApiError::field("messages", "is required"))?;
    if raw.is_empty() {
        return Err(ApiError::field("messages", "must hold at least one message"));
    }
    let messages = raw
        .iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<ApiResult<Vec<_>>>()?;
    let tools: Option<Vec<Json>> = f.get("tools")?;
    if let Some(tools) = &tools {
        for (i, t) in tools.iter().enumerate() {
            refuse_special_text(&format!("tools[{i}]"), t)?;
        }
    }
    let tool_choice = match f.get::<serde_json::Value>("tool_choice")? {
        None => "auto".to_owned(),
        Some(serde_json::Value::String(s)) if s == "auto" || s == "none" => s,
        Some(other) => {
            return Err(ApiError::field(
                "tool_choice",
                format!("{other} is not supported; use \"auto\" or \"none\""),
            ));
        }
    };
    let chat_template_kwargs: BTreeMap<String, Json> = f.get("chat_template_kwargs")?.unwrap_or_default();
    if let Some(format) = f.get::<serde_json::Value>("response_format")?
        && format.get("type").and_then(|t| t.as_str()) != Some("text")
    {
        return Err(ApiError::field(
            "response_format",
            "only {\"type\": \"text\"} is supported",
        ));
    }
    let parse_tools = tools.as_ref().is_some_and(|t| !t.is_empty()) && tool_choice == "auto";
    let mut request = ChatRequest::new(messages);
    request.tools = tools.filter(|t| !t.is_empty());
    request.chat_template_kwargs = chat_template_kwargs;
    let thinking = thinking_mode(&request);
    Ok(Chat {
        request,
        thinking,
        parse_tools,
    })
}

fn message(i: usize, raw: &RawValue) -> ApiResult<ChatMessage> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let m: WireMessage = serde_json::from_str(raw.get()).map_err(|e| {
        ApiError::field(
            format!("messages[{i}]"),
            format!("{} (a message is an object with role and content)", strip_position(&e)),
        )
    })?;
    let role = match m.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => {
            return Err(ApiError::field(
                at("role"),
                format!("unknown role {other:?} (system, developer, user, assistant, tool)"),
            ));
        }
    };
    let content = match m.content {
        None => None,
        Some(Content::Text(t)) => Some(t),
        Some(Content::Parts(parts)) => {
            // Joined with "\n" as vLLM does (its chat_utils joins text parts so), so a prompt
            // renders to the same ids on both servers.
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.into_iter().enumerate() {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => texts.push(t),
                    ("text", None) => return Err(ApiError::field(at(&format!("content[{j}].text")), "is required")),
                    (other, _) => {
                        return Err(ApiError::field(
                            at(&format!("content[{j}].type")),
                            format!("{other:?} parts are not supported (text only)"),
                        ));
                    }
                }
            }
            Some(texts.join("\n"))
        }
    };
    let has_calls = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
    if content.is_none() && !(role == Role::Assistant && has_calls) {
        return Err(ApiError::field(at("content"), "is required"));
    }
    if m.tool_calls.is_some() && role != Role::Assistant {
        return Err(ApiError::field(
            at("tool_calls"),
            "only assistant messages carry tool calls",
        ));
    }
    let mut tool_calls = m.tool_calls;
    if let Some(calls) = &mut tool_calls {
        for (j, c) in calls.iter_mut().enumerate() {
            refuse_special_text(
                &at(&format!("tool_calls[{j}].function.arguments")),
                &c.function.arguments,
            )?;
            c.function.name = escape(&c.function.name);
        }
    }
    Ok(ChatMessage {
        role,
        content: content.map(|c| escape(&c)),
        tool_calls,
        tool_call_id: m.tool_call_id.map(|s| escape(&s)),
        name: m.name.map(|s| escape(&s)),
    })
}

/// Refuses client JSON holding `<|` in any string or key (see the module's policy).
fn refuse_special_text(field: &str, json: &Json) -> ApiResult<()> {
    fn walk(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains("<|"),
            serde_json::Value::Array(a) => a.iter().any(walk),
            serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains("<|") || walk(v)),
            _ => false,
        }
    }
    let value: serde_json::Value =
        serde_json::from_str(json.text()).map_err(|e| ApiError::field(field, e.to_string()))?;
    match walk(&value) {
        true => Err(ApiError::field(
            field,
            "special-token text (\"<|\") is not accepted inside client JSON",
        )),
        false => Ok(()),
    }
}

/// The prompt ids of a chat request.
pub fn prompt_ids(model: &ServedModel, chat: &Chat) -> ApiResult<Vec<u32>> {
    let template = model
        .template
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("this model has no chat template; use /v1/completions"))?;
    let rendered = template
        .render(&chat.request)
        .map_err(|e| ApiError::field("messages", e.to_string()))?;
    Ok(encode_rendered(&model.tokenizer, &rendered))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Defaults;
    use crate::testing::served_model;

    fn chat(body: &str) -> ApiResult<Chat> {
        parse(&Fields::parse(body.as_bytes()).unwrap())
    }

    #[test]
    fn escaping_round_trips_and_hides_markers() {
        for s in ["plain", "<|eos|>", "a\u{FDD0}2b<|x", "\u{FDD0}", "<<||"] {
            let e = escape(s);
            assert!(!e.contains("<|"), "{s:?}");
            assert_eq!(unescape(&e), s);
        }
    }

    /// Special-token text from a user is its characters; the template's own markers are ids.
    #[test]
    fn user_special_text_is_ordinary_text() {
        let m = served_model("m", Defaults::default());
        let t = &m.tokenizer;
        let sneaky = chat(r#"{"messages": [{"role": "user", "content": "hi<|extra_0|><|startoftext|>x"}]}"#).unwrap();
        let plain = chat(r#"{"messages": [{"role": "user", "content": "hi"}]}"#).unwrap();
        let ids = prompt_ids(&m, &sneaky).unwrap();
        let plain_ids = prompt_ids(&m, &plain).unwrap();
        let specials = |ids: &[u32]| ids.iter().filter(|&&i| t.is_special(i)).count();
        assert_eq!(
            specials(&ids),
            specials(&plain_ids),
            "no special id from the user's text"
        );
        assert_eq!(
            t.decode(&ids, false).unwrap(),
            t.decode(&plain_ids, false)
                .unwrap()
                .replace("hi", "hi<|extra_0|><|startoftext|>x"),
            "the text itself survives"
        );
        // Without client markers, the ids are the tokenizer's own encoding of the rendering.
        let rendered = m.template.as_ref().unwrap().render(&plain.request).unwrap();
        assert_eq!(plain_ids, t.encode(&rendered).unwrap());
    }

    #[test]
    fn malformed_messages_name_the_field() {
        let cases = [
            (r#"{}"#, "messages"),
            (r#"{"messages": []}"#, "messages"),
            (r#"{"messages": "hi"}"#, "messages"),
            (r#"{"messages": [1]}"#, "messages[0]"),
            (r#"{"messages": [{"content": "x"}]}"#, "messages[0]"),
            (
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "king", "content": "x"}]}"#,
                "messages[1].role",
            ),
            (r#"{"messages": [{"role": "user"}]}"#, "messages[0].content"),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                "messages[0].content[0].type",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}"#,
                "tool_choice",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"d": "<|eos|>"}]}"#,
                "tools[0]",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}"#,
                "response_format",
            ),
        ];
        for (body, field) in cases {
            let e = chat(body).err().unwrap_or_else(|| panic!("{body} accepted"));
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {}", e.message);
        }
    }

    #[test]
    fn text_parts_tools_and_thinking_modes_are_read() {
        let c = chat(
            r#"{"messages": [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                  "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "3"}],
               "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
               "chat_template_kwargs": {"enable_thinking": false}}"#,
        )
        .unwrap();
        assert_eq!(c.request.messages[0].role, Role::System);
        assert_eq!(c.request.messages[1].content.as_deref(), Some("a\nb"));
        assert!(c.parse_tools);
        assert_eq!(c.thinking, Thinking::Fast);
        let m = served_model("m", Defaults::default());
        let ids = prompt_ids(&m, &c).unwrap();
        let text = m.tokenizer.decode(&ids, false).unwrap();
        assert!(
            text.contains("<tool_calls>[{\"name\": \"f\", \"arguments\": {\"x\": 1}}]</tool_calls>"),
            "{text}"
        );
        assert!(text.ends_with("<think>\n\n</think>\n"), "{text}");
    }
}
