//! What the HTTP front end will do with a generation: token ids from the model, streamed
//! through the decoder, the reasoning split and the tool-call parser. The tags are several
//! tokens each, so they arrive split; the streamed result must equal the one-shot parse.

mod common;

use common::a13b_tokenizer;
use moe_text::StreamDecoder;
use moe_text::reasoning::{ReasoningOutput, ReasoningParser, parse_reasoning};
use moe_text::tool_calls::{ParsedToolCall, ToolCallParser, parse_tool_calls};

const SLOW: &str = "<think>\n用户问天气，需要调用工具。 😀\n</think>\n<answer>\n好的。<tool_calls>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\", \"opts\": {\"unit\": \"c\", \"days\": [1, 2]}}}]</tool_calls>\n</answer>";

/// Streams the ids of `output` one token at a time through all three stages.
fn stream(output: &str) -> (ReasoningOutput, String, Vec<ParsedToolCall>) {
    let t = a13b_tokenizer();
    let ids = t.encode(output).unwrap();
    let mut decoder = StreamDecoder::new(t, true);
    let mut reasoning_parser = ReasoningParser::new();
    let mut tools = ToolCallParser::new();
    let (mut reasoning, mut content, mut calls) = (String::new(), String::new(), Vec::new());
    let mut feed = |d: moe_text::reasoning::ReasoningDelta, tools: &mut ToolCallParser| {
        reasoning += &d.reasoning;
        let c = tools.push(&d.content);
        content += &c.content;
        calls.extend(c.tool_calls);
    };
    for id in ids {
        let text = decoder.push(id).unwrap();
        feed(reasoning_parser.push(&text), &mut tools);
    }
    feed(reasoning_parser.push(&decoder.finish()), &mut tools);
    feed(reasoning_parser.finish(), &mut tools);
    let rest = tools.finish();
    content += &rest.content;
    calls.extend(rest.tool_calls);
    let split = ReasoningOutput {
        reasoning: Some(reasoning).filter(|r| !r.is_empty()),
        content: content.clone(),
    };
    (split, content, calls)
}

#[test]
fn token_stream_equals_one_shot_parse() {
    let (split, content, calls) = stream(SLOW);
    let one_shot = parse_reasoning(SLOW);
    assert_eq!(one_shot.reasoning.as_deref(), Some("用户问天气，需要调用工具。 😀"));
    assert_eq!(split.reasoning, one_shot.reasoning);
    let tools = parse_tool_calls(&one_shot.content);
    assert_eq!(content, tools.content);
    assert_eq!(content, "好的。");
    assert_eq!(calls, tools.tool_calls);
    assert_eq!(
        calls,
        [ParsedToolCall {
            index: 0,
            name: "get_weather".into(),
            arguments: r#"{"city": "北京", "opts": {"unit": "c", "days": [1, 2]}}"#.into()
        }]
    );
}

#[test]
fn fast_thinking_streams_a_clean_answer() {
    for output in [
        "<answer>\n4\n</answer><|eos|>",
        "<think>\n\n</think>\n<answer>\n4\n</answer>",
    ] {
        let (split, content, calls) = stream(output);
        assert_eq!(split.reasoning, None, "{output:?}");
        assert_eq!(content, "4", "{output:?}");
        assert!(calls.is_empty());
    }
}
