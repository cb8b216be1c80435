//! Extracts tool calls from Hunyuan output: `<tool_calls>[{"name": …, "arguments": {…}}, …]
//! </tool_calls>` becomes a list of calls whose `arguments` is a JSON string (what OpenAI's
//! API carries), copied byte for byte from the model's text so key order and nesting survive.
//! Text around the block stays content. A block that is not a valid list of calls, or never
//! closes, is left in the content as written. Streaming and one-shot share one machine.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::markers::partial_suffix_len;

const OPEN: &str = "<tool_calls>";
const CLOSE: &str = "</tool_calls>";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    /// Position among the calls of this output (OpenAI streams calls by index).
    pub index: usize,
    pub name: String,
    /// JSON text of the arguments object.
    pub arguments: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCallDelta {
    pub content: String,
    pub tool_calls: Vec<ParsedToolCall>,
}

#[derive(Debug, Clone, Default)]
pub struct ToolCallParser {
    buf: String,
    inside: bool,
    calls: usize,
    /// Inside a block: how much of `buf` has been searched for the closing tag already, so a
    /// long call is scanned once, not once per pushed piece.
    searched: usize,
}

#[derive(Deserialize)]
struct RawCall {
    name: String,
    arguments: Option<Box<RawValue>>,
}

impl ToolCallParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds content text; returns the content that can be released and any calls completed.
    pub fn push(&mut self, text: &str) -> ToolCallDelta {
        self.buf.push_str(text);
        let mut out = ToolCallDelta::default();
        loop {
            if self.inside {
                // The tag may straddle what was searched and what was pushed: back up by its
                // length (less one) to a character boundary.
                let mut from = self.searched.saturating_sub(CLOSE.len() - 1);
                while !self.buf.is_char_boundary(from) {
                    from -= 1;
                }
                let Some(found) = self.buf[from..].find(CLOSE) else {
                    self.searched = self.buf.len();
                    break;
                };
                let at = from + found;
                self.searched = 0;
                let block: String = self.buf.drain(..at + CLOSE.len()).collect();
                let body = &block[..at];
                match parse_calls(body, self.calls) {
                    Some(calls) => {
                        self.calls += calls.len();
                        out.tool_calls.extend(calls);
                    }
                    None => {
                        out.content.push_str(OPEN);
                        out.content.push_str(&block);
                    }
                }
                self.inside = false;
            } else if let Some(at) = self.buf.find(OPEN) {
                out.content.extend(self.buf.drain(..at));
                self.buf.drain(..OPEN.len());
                self.inside = true;
                self.searched = 0;
            } else {
                let ready = self.buf.len() - partial_suffix_len(&self.buf, &[OPEN]);
                out.content.extend(self.buf.drain(..ready));
                break;
            }
        }
        out
    }

    /// Ends the stream: an unclosed block or a partial tag is content.
    pub fn finish(mut self) -> ToolCallDelta {
        let mut out = self.push("");
        if self.inside {
            out.content.push_str(OPEN);
        }
        out.content.push_str(&self.buf);
        out
    }
}

/// The calls of a block's JSON list, numbered from `first_index`; None if it is not one.
fn parse_calls(body: &str, first_index: usize) -> Option<Vec<ParsedToolCall>> {
    let raw: Vec<RawCall> = serde_json::from_str(body.trim()).ok()?;
    raw.into_iter()
        .enumerate()
        .map(|(i, call)| {
            let arguments = match call.arguments {
                None => "{}".to_owned(),
                // Already a JSON string (OpenAI style): its content is the arguments text.
                Some(a) if a.get().starts_with('"') => serde_json::from_str::<String>(a.get()).ok()?,
                Some(a) => a.get().to_owned(),
            };
            Some(ParsedToolCall {
                index: first_index + i,
                name: call.name,
                arguments,
            })
        })
        .collect()
}

/// Splits a whole output into content and calls.
pub fn parse_tool_calls(text: &str) -> ToolCallDelta {
    let mut parser = ToolCallParser::new();
    let mut all = parser.push(text);
    let rest = parser.finish();
    all.content.push_str(&rest.content);
    all.tool_calls.extend(rest.tool_calls);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(index: usize, name: &str, arguments: &str) -> ParsedToolCall {
        ParsedToolCall {
            index,
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn calls_become_arguments_strings_in_the_models_key_order() {
        let out = parse_tool_calls(
            r#"<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, {"name": "search", "arguments": {"q": "x", "filter": {"z": [1, {"b": 2, "a": null}], "a": "城市"}}}]</tool_calls>"#,
        );
        assert_eq!(out.content, "");
        assert_eq!(
            out.tool_calls,
            [
                call(0, "get_weather", r#"{"city": "Paris", "unit": "c"}"#),
                call(
                    1,
                    "search",
                    r#"{"q": "x", "filter": {"z": [1, {"b": 2, "a": null}], "a": "城市"}}"#
                ),
            ]
        );
    }

    #[test]
    fn string_and_missing_arguments() {
        let out =
            parse_tool_calls(r#"<tool_calls>[{"name": "f", "arguments": "{\"a\": 1}"}, {"name": "g"}]</tool_calls>"#);
        assert_eq!(out.tool_calls, [call(0, "f", r#"{"a": 1}"#), call(1, "g", "{}")]);
    }

    #[test]
    fn text_around_blocks_is_content_and_indices_continue() {
        let out = parse_tool_calls(
            "Sure. <tool_calls>[{\"name\": \"a\", \"arguments\": {}}]</tool_calls> then <tool_calls>[{\"name\": \"b\", \"arguments\": {}}]</tool_calls>.",
        );
        assert_eq!(out.content, "Sure.  then .");
        assert_eq!(out.tool_calls, [call(0, "a", "{}"), call(1, "b", "{}")]);
    }

    #[test]
    fn malformed_or_unclosed_blocks_stay_content() {
        for text in [
            "<tool_calls>[{\"name\": }]</tool_calls>",
            "<tool_calls>{\"name\": \"a\"}</tool_calls>",
            "x <tool_calls>[{\"name\": \"a\"",
            "x <tool_ca",
            "a < b",
        ] {
            let out = parse_tool_calls(text);
            assert_eq!((out.content.as_str(), out.tool_calls.len()), (text, 0), "{text}");
        }
    }

    #[test]
    fn streaming_matches_one_shot_at_every_cut() {
        let text = "Calling: <tool_calls>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"巴黎\"}}]</tool_calls>\nbad: <tool_calls>[nope]</tool_calls> end <tool_c";
        let expected = parse_tool_calls(text);
        assert_eq!(expected.tool_calls, [call(0, "get_weather", r#"{"city": "巴黎"}"#)]);
        assert_eq!(
            expected.content,
            "Calling: \nbad: <tool_calls>[nope]</tool_calls> end <tool_c"
        );
        for (cut, _) in text.char_indices() {
            let mut parser = ToolCallParser::new();
            let mut got = parser.push(&text[..cut]);
            let d = parser.push(&text[cut..]);
            got.content += &d.content;
            got.tool_calls.extend(d.tool_calls);
            let d = parser.finish();
            got.content += &d.content;
            got.tool_calls.extend(d.tool_calls);
            assert_eq!(got, expected, "cut at byte {cut}");
        }
    }

    #[test]
    fn content_is_not_held_longer_than_a_possible_tag() {
        let mut p = ToolCallParser::new();
        assert_eq!(p.push("Hello <tool").content, "Hello ");
        assert_eq!(p.push("s>").content, "<tools>");
    }
}
