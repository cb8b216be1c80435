//! Typed chat requests (OpenAI's message shape, which is also what Hunyuan's templates read)
//! and their conversion into template values.

use std::collections::BTreeMap;

use minijinja::Value;
use serde::{Deserialize, Serialize};

use super::json::Json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// Absent and empty differ to the templates (`'content' in message`), so both are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// On a tool result: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: Some(content.into()),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// A call the assistant made, as a request carries it back in the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON string (OpenAI) or a JSON object (what Hunyuan's template also accepts).
    pub arguments: Json,
}

/// Everything a chat template renders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// Tool schemas, passed to the template as the client wrote them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Json>>,
    /// Extra template variables, e.g. `{"enable_thinking": false}` for fast thinking.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub chat_template_kwargs: BTreeMap<String, Json>,
    #[serde(default = "yes")]
    pub add_generation_prompt: bool,
}

fn yes() -> bool {
    true
}

impl ChatRequest {
    pub fn new(messages: Vec<ChatMessage>) -> Self {
        ChatRequest {
            messages,
            tools: None,
            chat_template_kwargs: BTreeMap::new(),
            add_generation_prompt: true,
        }
    }
}

/// A map value whose keys keep the order given (minijinja is built with `preserve_order`).
pub(crate) fn ordered_map(entries: Vec<(&str, Value)>) -> Value {
    Value::from_pairs(entries)
}

impl ChatMessage {
    /// The message as the template sees it: only the keys the client sent, in OpenAI's order.
    pub(crate) fn to_template_value(&self) -> Value {
        let mut entries = vec![("role", Value::from(self.role.as_str()))];
        if let Some(c) = &self.content {
            entries.push(("content", Value::from(c.as_str())));
        }
        if let Some(calls) = &self.tool_calls {
            entries.push(("tool_calls", calls.iter().map(ToolCall::to_template_value).collect()));
        }
        if let Some(id) = &self.tool_call_id {
            entries.push(("tool_call_id", Value::from(id.as_str())));
        }
        if let Some(name) = &self.name {
            entries.push(("name", Value::from(name.as_str())));
        }
        ordered_map(entries)
    }
}

impl ToolCall {
    fn to_template_value(&self) -> Value {
        let mut entries = Vec::new();
        if let Some(id) = &self.id {
            entries.push(("id", Value::from(id.as_str())));
        }
        entries.push(("type", Value::from(self.kind.as_str())));
        let function = ordered_map(vec![
            ("name", Value::from(self.function.name.as_str())),
            ("arguments", self.function.arguments.to_template_value()),
        ]);
        entries.push(("function", function));
        ordered_map(entries)
    }
}
