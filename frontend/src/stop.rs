//! Stop strings over streamed text: a stop string may arrive split across tokens, so text that
//! could still become the start of one is held back, and nothing at or after a match is ever
//! released (OpenAI: the stop sequence is not part of the output).

/// Matches stop strings in text pushed piece by piece.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What one push released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop string matched: `text` ends where it began and the output is over.
    pub stopped: bool,
    /// After a match: the held text from the match on (the stop string and what followed it),
    /// so that parsers can tell a tag the stop string cut from plain text; empty otherwise.
    pub after: String,
}

impl StopMatcher {
    /// `stops` must not contain empty strings (request validation refuses them).
    pub fn new(stops: Vec<String>) -> Self {
        debug_assert!(stops.iter().all(|s| !s.is_empty()));
        StopMatcher {
            stops,
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Released {
        self.held.push_str(text);
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first {
            let after = self.held.split_off(at);
            return Released {
                text: std::mem::take(&mut self.held),
                stopped: true,
                after,
            };
        }
        let ready = self.held.len() - moe_text::partial_suffix_len(&self.held, &self.stops);
        Released {
            text: self.held.drain(..ready).collect(),
            stopped: false,
            after: String::new(),
        }
    }

    /// The end of the output without a match: what was held back is text after all.
    pub fn finish(self) -> String {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces`; returns the released text and whether a stop matched.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out += &r.text;
            if r.stopped {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn a_stop_split_across_pieces_is_found_and_cut() {
        assert_eq!(run(&["END"], &["abc E", "N", "D tail"]), ("abc ".into(), true));
        assert_eq!(run(&["\n\n"], &["line\n", "\nnext"]), ("line".into(), true));
        assert_eq!(run(&["好的"], &["你", "好", "的", "!"]), ("你".into(), true));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
        assert_eq!(run(&["bcd", "c"], &["ab", "cd"]), ("a".into(), true));
    }

    #[test]
    fn a_near_miss_is_released_in_full() {
        assert_eq!(run(&["END"], &["EN", "d", "!"]), ("ENd!".into(), false));
        assert_eq!(run(&["END"], &["xEN"]), ("xEN".into(), false));
    }

    /// Nothing that could start a stop string is released before it is decided, and every
    /// cut of a text into two pieces gives the one-piece answer.
    #[test]
    fn never_streams_past_a_stop_at_any_cut() {
        let stops = ["</s>", "STOP", "ß!"];
        for text in ["hello </s> world", "aSTOSTOP", "ß ß! x", "no stop here </", "STO"] {
            let whole = run(&stops, &[text]);
            for (cut, _) in text.char_indices() {
                let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
                let first = m.push(&text[..cut]);
                let released_early = first.text.clone();
                if !first.stopped {
                    assert!(whole.0.starts_with(&released_early), "{text:?} cut {cut}");
                }
                assert_eq!(run(&stops, &[&text[..cut], &text[cut..]]), whole, "{text:?} cut {cut}");
            }
        }
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("xST").text, "x", "the possible start is held");
        assert_eq!(m.push("A").text, "STA", "released once it cannot match");
    }
}
