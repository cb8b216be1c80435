//! The 19 chat renderings of `chat-golden.json` (transformers 5.23 with strftime_now frozen),
//! byte for byte and id for id, from the real A13B and Large templates.

mod common;

use std::sync::Arc;

use chrono::NaiveDateTime;
use common::{a13b_dir, a13b_tokenizer, golden, large_dir};
use moe_text::chat::{ChatMessage, ChatRequest, ChatTemplate, FixedClock, Role};
use moe_text::{Error, TokenizerConfig};

fn template(family: &str, now: &str) -> ChatTemplate {
    let dir = match family {
        "a13b" => a13b_dir(),
        "large" => large_dir(),
        other => panic!("unknown family {other}"),
    };
    let config = TokenizerConfig::from_dir(&dir).unwrap();
    let now = NaiveDateTime::parse_from_str(now, "%Y-%m-%dT%H:%M:%S").unwrap();
    ChatTemplate::from_config(&config, Arc::new(FixedClock(now))).unwrap()
}

#[test]
fn golden_renderings_byte_and_id_exact() {
    let golden = golden();
    assert_eq!(golden.chat.len(), 19);
    let tokenizer = a13b_tokenizer();
    for c in &golden.chat {
        let template = template(&c.family, &golden.frozen_now);
        let request = ChatRequest {
            messages: c.messages.clone(),
            tools: c.tools.clone(),
            chat_template_kwargs: c.kwargs.clone(),
            add_generation_prompt: true,
        };
        let rendered = template
            .render(&request)
            .unwrap_or_else(|e| panic!("{} {}: {e}", c.family, c.case));
        assert_eq!(rendered, c.rendered, "{} {}", c.family, c.case);
        assert_eq!(tokenizer.encode(&rendered).unwrap(), c.ids, "{} {}", c.family, c.case);
        assert_eq!(
            tokenizer.decode(&c.ids, false).unwrap(),
            c.rendered,
            "{} {}",
            c.family,
            c.case
        );
    }
}

#[test]
fn the_tool_prompt_uses_the_injected_clock() {
    let golden = golden();
    let case = golden.chat.iter().find(|c| c.case == "tools").unwrap();
    let request = ChatRequest {
        tools: case.tools.clone(),
        ..ChatRequest::new(case.messages.clone())
    };
    let rendered = template("a13b", "2026-11-29T23:59:58").render(&request).unwrap();
    assert!(rendered.contains("当前时间：2026-11-29 23:59:58 星期日"), "{rendered}");
}

#[test]
fn requests_deserialise_from_openai_json() {
    let request: ChatRequest = serde_json::from_str(
        r#"{"messages": [{"role": "user", "content": "Hi"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
            "chat_template_kwargs": {"enable_thinking": false}}"#,
    )
    .unwrap();
    assert!(request.add_generation_prompt);
    assert_eq!(request.messages[1].content, None);
    // OpenAI sends arguments as a string: the template inserts it as written.
    let rendered = template("a13b", "2026-01-05T09:30:00")
        .render(&ChatRequest {
            tools: Some(vec![moe_text::chat::Json::parse("{}").unwrap()]),
            ..request
        })
        .unwrap();
    assert!(rendered.contains(r#"<tool_calls>[{"name": "f", "arguments": {"a": 1}}]</tool_calls><|eos|><tool_response>ok</tool_response><|extra_0|><think>"#), "{rendered}");
}

#[test]
fn bad_requests_are_clear_errors() {
    let t = template("a13b", "2026-01-05T09:30:00");
    let mut request = ChatRequest::new(vec![ChatMessage::new(Role::User, "Hi")]);
    request
        .chat_template_kwargs
        .insert("messages".into(), moe_text::chat::Json::parse("[]").unwrap());
    let e = t.render(&request).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid input: chat_template_kwargs may not set `messages`"
    );
    // An empty first message makes the template call dict.update, which fails in
    // transformers' immutable sandbox as in minijinja.
    let request = ChatRequest::new(vec![
        ChatMessage::new(Role::User, ""),
        ChatMessage::new(Role::User, "Hi"),
    ]);
    assert!(matches!(t.render(&request), Err(Error::Template(_))));
    let unknown_role = serde_json::from_str::<ChatRequest>(r#"{"messages": [{"role": "robot", "content": "x"}]}"#);
    assert!(
        unknown_role
            .unwrap_err()
            .to_string()
            .contains("unknown variant `robot`")
    );
}

#[test]
fn a_config_without_template_is_an_error() {
    let config = TokenizerConfig::default();
    let e = ChatTemplate::from_config(&config, Arc::new(moe_text::chat::SystemClock))
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "chat template: the tokenizer config has no chat_template"
    );
}
