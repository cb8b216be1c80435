//! Splits Hunyuan-A13B output into reasoning and answer. Slow thinking writes
//! `<think>\n…\n</think>\n<answer>\n…\n</answer>`; fast thinking writes only the answer block
//! (after an empty think block in the prompt or in the output). Tags and the newline just
//! inside each tag are removed. Output with no tags at all (Hunyuan-Large, generated models)
//! is all content. The parser is a streaming state machine over text; the one-shot
//! [`parse_reasoning`] runs the same machine, so both give the same split for any chunking.

use crate::markers::{could_become, partial_suffix_len};

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const ANSWER_OPEN: &str = "<answer>";
const ANSWER_CLOSE: &str = "</answer>";

/// Text released by one step: reasoning and content to append to what came before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReasoningDelta {
    pub reasoning: String,
    pub content: String,
}

impl ReasoningDelta {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty()
    }
}

/// A whole output, split.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReasoningOutput {
    /// None when the model did not reason (fast thinking, or an empty think block).
    pub reasoning: Option<String>,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing decided yet: is the output tagged?
    Start,
    /// Inside `<think>`; `fresh` until the newline after the tag has been dropped.
    Think {
        fresh: bool,
    },
    /// After `</think>`, expecting `<answer>`.
    BetweenBlocks,
    Answer {
        fresh: bool,
    },
    /// After `</answer>`: whitespace is dropped, anything else is content.
    AfterAnswer,
    /// Untagged text: everything is content.
    Plain,
}

#[derive(Debug, Clone)]
pub struct ReasoningParser {
    state: State,
    buf: String,
}

impl Default for ReasoningParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ReasoningParser {
    pub fn new() -> Self {
        ReasoningParser {
            state: State::Start,
            buf: String::new(),
        }
    }

    /// Adds decoded text; returns what can be released now.
    pub fn push(&mut self, text: &str) -> ReasoningDelta {
        self.buf.push_str(text);
        let mut out = ReasoningDelta::default();
        while self.step(&mut out) {}
        out
    }

    /// Ends the stream: text held back for a tag that never completed is released as what it
    /// would have been without the tag.
    pub fn finish(self) -> ReasoningDelta {
        self.finish_cut("")
    }

    /// Ends a stream that a stop string cut, `after` being the text from the cut on (the stop
    /// string first). A held `<…` that `after` continues into a tag (stop `answer` cutting
    /// `<answer>`) was the tag's start, not text: it is dropped, with the newline that belongs
    /// to a closing tag. A held `<` that `after` does not continue into a tag (`x <` cut at
    /// ` y`) is released as text, as [`finish`](Self::finish) does.
    pub fn finish_cut(mut self, after: &str) -> ReasoningDelta {
        let mut out = self.push("");
        if !after.is_empty()
            && let Some(lt) = self.buf.rfind('<')
        {
            let joined = format!("{}{after}", &self.buf[lt..]);
            let cut_a_tag = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]
                .iter()
                .any(|t| joined.starts_with(t) || could_become(&joined, t));
            if cut_a_tag {
                self.buf.truncate(lt);
                if matches!(self.state, State::Think { .. } | State::Answer { .. }) && self.buf.ends_with('\n') {
                    self.buf.pop();
                }
            }
        }
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Think { .. } => out.reasoning.push_str(&rest),
            State::AfterAnswer => {}
            State::Start | State::BetweenBlocks | State::Answer { .. } | State::Plain => out.content.push_str(&rest),
        }
        out
    }

    /// One transition; false when it needs more text.
    fn step(&mut self, out: &mut ReasoningDelta) -> bool {
        match self.state {
            State::Start => {
                let trimmed = self.buf.trim_start();
                if let Some(rest) = trimmed.strip_prefix(THINK_OPEN) {
                    self.buf = rest.to_owned();
                    self.state = State::Think { fresh: true };
                } else if let Some(rest) = trimmed.strip_prefix(ANSWER_OPEN) {
                    self.buf = rest.to_owned();
                    self.state = State::Answer { fresh: true };
                } else if could_become(trimmed, THINK_OPEN) || could_become(trimmed, ANSWER_OPEN) {
                    return false;
                } else {
                    self.state = State::Plain;
                }
                true
            }
            State::Think { fresh } => self.inside(fresh, THINK_CLOSE, out, Field::Reasoning),
            State::Answer { fresh } => self.inside(fresh, ANSWER_CLOSE, out, Field::Content),
            State::BetweenBlocks => {
                let trimmed = self.buf.trim_start().to_owned();
                if let Some(rest) = trimmed.strip_prefix(ANSWER_OPEN) {
                    self.buf = rest.to_owned();
                    self.state = State::Answer { fresh: true };
                    true
                } else if could_become(&trimmed, ANSWER_OPEN) {
                    self.buf = trimmed;
                    false
                } else {
                    // An answer without its tag: the rest is plain content.
                    self.buf = trimmed;
                    self.state = State::Plain;
                    true
                }
            }
            State::AfterAnswer => {
                let trimmed = self.buf.trim_start();
                if trimmed.is_empty() {
                    self.buf.clear();
                    return false;
                }
                self.buf = trimmed.to_owned();
                self.state = State::Plain;
                true
            }
            State::Plain => {
                out.content.push_str(&std::mem::take(&mut self.buf));
                false
            }
        }
    }

    /// Releases the text of a block up to `close`, holding back a possible partial tag and
    /// the newline that precedes the tag.
    fn inside(&mut self, fresh: bool, close: &str, out: &mut ReasoningDelta, field: Field) -> bool {
        let target = match field {
            Field::Reasoning => &mut out.reasoning,
            Field::Content => &mut out.content,
        };
        if fresh {
            if self.buf.is_empty() {
                return false;
            }
            if self.buf.starts_with('\n') {
                self.buf.remove(0);
            }
            self.set_fresh(false);
        }
        if let Some(at) = self.buf.find(close) {
            let body = &self.buf[..at];
            target.push_str(body.strip_suffix('\n').unwrap_or(body));
            self.buf = self.buf[at + close.len()..].to_owned();
            self.state = match field {
                Field::Reasoning => State::BetweenBlocks,
                Field::Content => State::AfterAnswer,
            };
            return true;
        }
        let newline_close = format!("\n{close}");
        let hold = partial_suffix_len(&self.buf, &[&newline_close, close]);
        let ready = self.buf.len() - hold;
        target.push_str(&self.buf[..ready]);
        self.buf.drain(..ready);
        false
    }

    fn set_fresh(&mut self, value: bool) {
        match &mut self.state {
            State::Think { fresh } | State::Answer { fresh } => *fresh = value,
            _ => {}
        }
    }
}

#[derive(Clone, Copy)]
enum Field {
    Reasoning,
    Content,
}

/// Splits a whole output.
pub fn parse_reasoning(text: &str) -> ReasoningOutput {
    let mut parser = ReasoningParser::new();
    let mut all = parser.push(text);
    let rest = parser.finish();
    all.reasoning.push_str(&rest.reasoning);
    all.content.push_str(&rest.content);
    ReasoningOutput {
        reasoning: Some(all.reasoning).filter(|r| !r.is_empty()),
        content: all.content,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stop string that cuts a tag (`answer` inside `<answer>`) leaves no `<` behind, at
    /// every tag; a `<` the stop string does not continue into a tag stays text.
    #[test]
    fn a_tag_cut_by_a_stop_string_leaves_nothing() {
        let cases = [
            ("<think>\nr\n</think>\n<", "answer>\nhi", "r", ""),
            ("<think>\nr\n</", "think>\n", "r", ""),
            ("<answer>\nhi\n</", "answer>", "", "hi"),
            ("<", "think>\nr", "", ""),
            ("<answer>\nx <", " y", "", "x <"),
            ("<think>\nr\n</think>\n<answer>\na<", "b>", "r", "a<"),
        ];
        for (before, after, reasoning, content) in cases {
            let mut p = ReasoningParser::new();
            let mut d = p.push(before);
            let rest = p.finish_cut(after);
            d.reasoning += &rest.reasoning;
            d.content += &rest.content;
            assert_eq!(
                (d.reasoning.as_str(), d.content.as_str()),
                (reasoning, content),
                "{before:?} cut at {after:?}"
            );
        }
    }

    const SLOW: &str = "<think>\nThe user greets; 你好 means hello.\nReply briefly.\n</think>\n<answer>\nHello! 😀 <b>ok</b>\n</answer>";

    fn split(reasoning: Option<&str>, content: &str) -> ReasoningOutput {
        ReasoningOutput {
            reasoning: reasoning.map(str::to_owned),
            content: content.to_owned(),
        }
    }

    #[test]
    fn slow_thinking_splits_and_removes_tags() {
        assert_eq!(
            parse_reasoning(SLOW),
            split(
                Some("The user greets; 你好 means hello.\nReply briefly."),
                "Hello! 😀 <b>ok</b>"
            )
        );
    }

    #[test]
    fn fast_thinking_has_no_reasoning_and_no_stray_tags() {
        // enable_thinking=false: the empty think block is in the prompt, the output starts at <answer>.
        assert_eq!(parse_reasoning("<answer>\n4\n</answer>"), split(None, "4"));
        // /no_think: the model writes the empty think block itself.
        assert_eq!(
            parse_reasoning("<think>\n\n</think>\n<answer>\n4\n</answer>"),
            split(None, "4")
        );
    }

    #[test]
    fn untagged_output_is_all_content() {
        assert_eq!(parse_reasoning("  Hello <there>\n"), split(None, "  Hello <there>\n"));
        assert_eq!(parse_reasoning(""), split(None, ""));
    }

    #[test]
    fn unfinished_output_keeps_its_text() {
        // Stopped by max_tokens inside the reasoning, or just after it, or mid-tag.
        assert_eq!(
            parse_reasoning("<think>\nstill going\n</thi"),
            split(Some("still going\n</thi"), "")
        );
        assert_eq!(parse_reasoning("<think>\nr\n</think>\n<ans"), split(Some("r"), "<ans"));
        assert_eq!(parse_reasoning("<answer>\npartial"), split(None, "partial"));
        assert_eq!(parse_reasoning("<thi"), split(None, "<thi"));
    }

    #[test]
    fn answer_without_its_tag_after_thinking_is_content() {
        assert_eq!(
            parse_reasoning("<think>\nr\n</think>\nplain answer"),
            split(Some("r"), "plain answer")
        );
    }

    #[test]
    fn inner_newlines_are_kept_except_the_ones_next_to_tags() {
        assert_eq!(
            parse_reasoning("<think>\n\n  code\n\n</think>\n<answer>\n\nx\n\n</answer>\n"),
            split(Some("\n  code\n"), "\nx\n")
        );
    }

    /// Streaming in two chunks, cut at every character, equals the one-shot split; so does
    /// streaming one character at a time.
    #[test]
    fn streaming_matches_one_shot_at_every_cut() {
        let outputs = [
            SLOW,
            "<answer>\n4\n</answer>",
            "<think>\n\n</think>\n<answer>\n4\n</answer>",
            "<think>\nr\n\n</think>\n\n<answer>\n<answer> x </answer>\n</answer>\n\ntrailing",
            "Hello <think> not a tag here",
            "<think>\nunfinished\n</thi",
        ];
        for text in outputs {
            let expected = parse_reasoning(text);
            let cuts: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
            for &cut in &cuts {
                assert_eq!(
                    stream(&[&text[..cut], &text[cut..]]),
                    expected,
                    "{text:?} cut at byte {cut}"
                );
            }
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
            assert_eq!(stream(&pieces), expected, "{text:?} char by char");
        }
    }

    fn stream(pieces: &[&str]) -> ReasoningOutput {
        let mut parser = ReasoningParser::new();
        let (mut reasoning, mut content) = (String::new(), String::new());
        for piece in pieces {
            let d = parser.push(piece);
            reasoning += &d.reasoning;
            content += &d.content;
        }
        let d = parser.finish();
        reasoning += &d.reasoning;
        content += &d.content;
        ReasoningOutput {
            reasoning: Some(reasoning).filter(|r| !r.is_empty()),
            content,
        }
    }

    #[test]
    fn releases_text_as_soon_as_it_is_decided() {
        let mut p = ReasoningParser::new();
        assert!(p.push("<thi").is_empty());
        assert!(p.push("nk>").is_empty());
        assert_eq!(p.push("\nab\n").reasoning, "ab");
        assert_eq!(p.push("c</").reasoning, "\nc");
        assert!(p.push("think>\n<answer>\n").is_empty());
        assert_eq!(p.push("Hi").content, "Hi");
    }
}
