//! One choice's output, token by token: decoded without breaking characters, cut at stop
//! strings, then (chat) split into reasoning and answer and parsed for tool calls. Streaming
//! and whole responses run this same machine, so they agree for any way the output arrives.

use std::sync::Arc;

use moe_text::reasoning::ReasoningParser;
use moe_text::tool_calls::{ParsedToolCall, ToolCallParser};
use moe_text::{StreamDecoder, Tokenizer};

use crate::stop::StopMatcher;

/// Text released by one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub reasoning: String,
    pub content: String,
    pub tool_calls: Vec<ParsedToolCall>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.tool_calls.is_empty()
    }

    fn append(&mut self, other: Delta) {
        self.reasoning += &other.reasoning;
        self.content += &other.content;
        self.tool_calls.extend(other.tool_calls);
    }
}

/// What to parse out of the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsing {
    pub reasoning: bool,
    pub tool_calls: bool,
}

pub struct Output {
    decoder: StreamDecoder<Arc<Tokenizer>>,
    text: TextOutput,
}

impl Output {
    pub fn new(tokenizer: Arc<Tokenizer>, stops: Vec<String>, parsing: Parsing) -> Self {
        Output {
            // Special tokens (the end-of-turn id the cluster streams) are not text.
            decoder: StreamDecoder::new(tokenizer, true),
            text: TextOutput::new(stops, parsing),
        }
    }

    /// One generated token: the text it releases, and whether a stop string ended the output
    /// (then the delta is final: the parsers are flushed).
    pub fn push_token(&mut self, id: u32) -> moe_text::Result<(Delta, bool)> {
        let text = self.decoder.push(id)?;
        Ok(self.text.push(&text))
    }

    /// The end of the generation: everything held back.
    pub fn finish(self) -> Delta {
        let rest = self.decoder.finish();
        self.text.finish(&rest)
    }
}

/// The text half of [`Output`] (everything after decoding), separate so that it can be tested
/// on text cut anywhere.
pub struct TextOutput {
    stop: Option<StopMatcher>,
    reasoning: Option<ReasoningParser>,
    tools: Option<ToolCallParser>,
}

impl TextOutput {
    pub fn new(stops: Vec<String>, parsing: Parsing) -> Self {
        TextOutput {
            stop: Some(StopMatcher::new(stops)),
            reasoning: parsing.reasoning.then(ReasoningParser::new),
            tools: parsing.tool_calls.then(ToolCallParser::new),
        }
    }

    /// Adds text; returns what is released and whether a stop string matched (the output is
    /// then over and everything is flushed).
    pub fn push(&mut self, text: &str) -> (Delta, bool) {
        let Some(stop) = self.stop.as_mut() else {
            return (Delta::default(), true);
        };
        let released = stop.push(text);
        let mut delta = self.parse(&released.text);
        if released.stopped {
            self.stop = None;
            delta.append(self.flush(&released.after));
        }
        (delta, released.stopped)
    }

    pub fn finish(mut self, rest: &str) -> Delta {
        let Some(stop) = self.stop.as_mut() else {
            return Delta::default();
        };
        let mut held = stop.push(rest);
        if !held.stopped {
            let stop = self.stop.take().expect("checked");
            held.text += &stop.finish();
        }
        let mut delta = self.parse(&held.text);
        delta.append(self.flush(&held.after));
        delta
    }

    fn parse(&mut self, text: &str) -> Delta {
        let (reasoning, content) = match self.reasoning.as_mut() {
            Some(r) => {
                let d = r.push(text);
                (d.reasoning, d.content)
            }
            None => (String::new(), text.to_owned()),
        };
        self.parse_content(reasoning, &content)
    }

    fn parse_content(&mut self, reasoning: String, content: &str) -> Delta {
        match self.tools.as_mut() {
            Some(t) => {
                let d = t.push(content);
                Delta {
                    reasoning,
                    content: d.content,
                    tool_calls: d.tool_calls,
                }
            }
            None => Delta {
                reasoning,
                content: content.to_owned(),
                tool_calls: Vec::new(),
            },
        }
    }

    /// Ends the parsers: text held for a tag that never completed is released, unless the
    /// stop string that ended the output (`after`, empty without one) continues it into a tag.
    fn flush(&mut self, after: &str) -> Delta {
        let (reasoning, content) = match self.reasoning.take() {
            Some(r) => {
                let d = r.finish_cut(after);
                (d.reasoning, d.content)
            }
            None => (String::new(), String::new()),
        };
        let mut delta = self.parse_content(reasoning, &content);
        if let Some(t) = self.tools.take() {
            let d = t.finish();
            delta.content += &d.content;
            delta.tool_calls.extend(d.tool_calls);
        }
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: Parsing = Parsing {
        reasoning: true,
        tool_calls: true,
    };

    fn run(pieces: &[&str], stops: &[&str], parsing: Parsing) -> (Delta, bool) {
        let mut out = TextOutput::new(stops.iter().map(|s| s.to_string()).collect(), parsing);
        let mut all = Delta::default();
        for p in pieces {
            let (d, stopped) = out.push(p);
            all.append(d);
            if stopped {
                return (all, true);
            }
        }
        all.append(out.finish(""));
        (all, false)
    }

    const REFERENCE: &str = "<think>\nThe user wants weather; 巴黎 is Paris.\n</think>\n<answer>\nChecking 😀 <tool_calls>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"巴黎\", \"opts\": {\"unit\": \"c\"}}}]</tool_calls>\n</answer>";

    /// The reference output cut into two pieces at every character, and fed one character at
    /// a time, splits exactly as the whole text does: reasoning, content and tool calls.
    #[test]
    fn streaming_and_whole_agree_at_every_cut() {
        let (whole, _) = run(&[REFERENCE], &[], BOTH);
        assert_eq!(whole.reasoning, "The user wants weather; 巴黎 is Paris.");
        assert_eq!(whole.content, "Checking 😀 ");
        assert_eq!(whole.tool_calls.len(), 1);
        assert_eq!(
            whole.tool_calls[0].arguments,
            r#"{"city": "巴黎", "opts": {"unit": "c"}}"#
        );
        for (cut, _) in REFERENCE.char_indices() {
            assert_eq!(
                run(&[&REFERENCE[..cut], &REFERENCE[cut..]], &[], BOTH),
                run(&[REFERENCE], &[], BOTH),
                "cut at {cut}"
            );
        }
        let chars: Vec<String> = REFERENCE.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&pieces, &[], BOTH).0, whole);
    }

    /// A stop string inside the answer ends it there, at every cut, and the parsers release
    /// what they held.
    #[test]
    fn a_stop_string_cuts_the_answer_at_every_cut() {
        let text = "<think>\nr\n</think>\n<answer>\nfirst STOP second\n</answer>";
        let (whole, stopped) = run(&[text], &["STOP"], BOTH);
        assert!(stopped);
        assert_eq!((whole.reasoning.as_str(), whole.content.as_str()), ("r", "first "));
        for (cut, _) in text.char_indices() {
            assert_eq!(
                run(&[&text[..cut], &text[cut..]], &["STOP"], BOTH),
                (whole.clone(), true),
                "cut {cut}"
            );
        }
    }

    /// A stop string that cuts a tag (`answer` in `<answer>`) leaks no `<`, at every cut.
    #[test]
    fn a_stop_string_inside_a_tag_leaks_nothing() {
        let text = "<think>\nr\n</think>\n<answer>\nhi\n</answer>";
        for (cut, _) in text.char_indices() {
            assert_eq!(
                run(&[&text[..cut], &text[cut..]], &["answer"], BOTH),
                (
                    Delta {
                        reasoning: "r".into(),
                        ..Delta::default()
                    },
                    true
                ),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn plain_output_passes_through() {
        let parsing = Parsing {
            reasoning: false,
            tool_calls: false,
        };
        let (d, stopped) = run(&["<think>x", "</think>"], &[], parsing);
        assert_eq!((d.content.as_str(), stopped), ("<think>x</think>", false));
    }
}
