//! Hold-back logic shared by the streaming output parsers: tags such as `</think>` arrive
//! split across tokens, so text that could be the start of a tag is kept until it is decided.

/// Length of the longest suffix of `text` that is a proper prefix of one of `markers`: the
/// part that may still turn into a marker once more text arrives.
pub fn partial_suffix_len<M: AsRef<str>>(text: &str, markers: &[M]) -> usize {
    let longest = markers.iter().map(|m| m.as_ref().len()).max().unwrap_or(0);
    let upper = longest.saturating_sub(1).min(text.len());
    (1..=upper)
        .rev()
        .find(|&k| {
            let start = text.len() - k;
            text.is_char_boundary(start)
                && markers
                    .iter()
                    .map(AsRef::as_ref)
                    .any(|m| m.len() > k && m.starts_with(&text[start..]))
        })
        .unwrap_or(0)
}

/// Whether `text` is a proper prefix of `marker` (more text could complete it).
pub(crate) fn could_become(text: &str, marker: &str) -> bool {
    text.len() < marker.len() && marker.starts_with(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_only_what_can_still_become_a_marker() {
        let m = ["\n</think>", "</think>"];
        assert_eq!(partial_suffix_len("abc", &m), 0);
        assert_eq!(partial_suffix_len("abc\n", &m), 1);
        assert_eq!(partial_suffix_len("abc\n</thi", &m), 6);
        assert_eq!(partial_suffix_len("abc</thi", &m), 5);
        assert_eq!(partial_suffix_len("abc<", &m), 1);
        assert_eq!(
            partial_suffix_len("a</think>", &m),
            0,
            "a whole marker is found, not held"
        );
        assert_eq!(partial_suffix_len("好<", &m), 1);
        assert_eq!(partial_suffix_len("", &m), 0);
    }

    #[test]
    fn could_become_is_a_proper_prefix_test() {
        assert!(could_become("", "<think>"));
        assert!(could_become("<thi", "<think>"));
        assert!(!could_become("<think>", "<think>"));
        assert!(!could_become("<x", "<think>"));
    }
}
