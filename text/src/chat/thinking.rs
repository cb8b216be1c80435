//! Hunyuan-A13B's two reasoning modes, as Tencent documents them: slow thinking (a
//! `<think>` block before the answer) by default; fast thinking when the request sets
//! `chat_template_kwargs.enable_thinking` to false (the template then appends an empty think
//! block) or when the last user message starts with `/no_think` (the model itself obeys it).

use super::messages::{ChatRequest, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thinking {
    Slow,
    Fast,
}

pub const NO_THINK_PREFIX: &str = "/no_think";

pub fn thinking_mode(request: &ChatRequest) -> Thinking {
    let kwarg_off = request
        .chat_template_kwargs
        .get("enable_thinking")
        .is_some_and(|v| v.text().trim() == "false");
    let prefixed = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .and_then(|m| m.content.as_deref())
        .is_some_and(|c| c.trim_start().starts_with(NO_THINK_PREFIX));
    if kwarg_off || prefixed {
        Thinking::Fast
    } else {
        Thinking::Slow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{ChatMessage, Json};

    fn request(user: &str, kwargs: &[(&str, &str)]) -> ChatRequest {
        let mut r = ChatRequest::new(vec![
            ChatMessage::new(Role::User, "/no_think earlier"),
            ChatMessage::new(Role::User, user),
        ]);
        for (k, v) in kwargs {
            r.chat_template_kwargs.insert(k.to_string(), Json::parse(v).unwrap());
        }
        r
    }

    #[test]
    fn slow_by_default_fast_by_kwarg_or_prefix() {
        assert_eq!(thinking_mode(&request("Hi", &[])), Thinking::Slow);
        assert_eq!(
            thinking_mode(&request("Hi", &[("enable_thinking", "true")])),
            Thinking::Slow
        );
        assert_eq!(
            thinking_mode(&request("Hi", &[("enable_thinking", "false")])),
            Thinking::Fast
        );
        assert_eq!(thinking_mode(&request("/no_think Hi", &[])), Thinking::Fast);
        assert_eq!(thinking_mode(&request("Hi /no_think", &[])), Thinking::Slow);
    }
}
