//! Incremental decoding for streaming: text is released as tokens arrive, but a UTF-8
//! character whose bytes are split across tokens is held back until it is complete, so a
//! client never sees a broken character and the pieces concatenate to the one-shot decode.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Generic over how the tokenizer is held (`&Tokenizer`, or an `Arc` in a stream that must
/// own it).
pub struct StreamDecoder<T> {
    tokenizer: T,
    skip_special: bool,
    pending: Vec<u8>,
}

impl<T: std::ops::Deref<Target = Tokenizer>> StreamDecoder<T> {
    pub fn new(tokenizer: T, skip_special: bool) -> Self {
        StreamDecoder {
            tokenizer,
            skip_special,
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text it completes (often empty mid-character).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tokenizer.append_token(id, self.skip_special, &mut self.pending)?;
        Ok(take_complete(&mut self.pending))
    }

    /// The rest at the end of the stream: an unfinished character becomes U+FFFD, as in
    /// [`Tokenizer::decode`].
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

/// Removes and returns the longest prefix of `bytes` whose decoding can no longer change:
/// everything except a trailing incomplete (but so far valid) UTF-8 sequence. Invalid
/// sequences become U+FFFD exactly where `String::from_utf8_lossy` puts them, since both
/// follow the standard's maximal-subpart rule (`Utf8Error::error_len`).
pub(crate) fn take_complete(bytes: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&bytes[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = bytes.len();
                break;
            }
            Err(e) => {
                let valid = start + e.valid_up_to();
                out.push_str(std::str::from_utf8(&bytes[start..valid]).expect("checked valid"));
                match e.error_len() {
                    // Incomplete at the end: wait for the next token.
                    None => {
                        start = valid;
                        break;
                    }
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        start = valid + n;
                    }
                }
            }
        }
    }
    bytes.drain(..start);
    out
}

#[cfg(test)]
mod tests {
    use super::take_complete;

    /// Feeding any byte string in any two pieces gives what one-shot lossy decoding gives.
    #[test]
    fn split_bytes_decode_like_one_shot() {
        let cases: [&[u8]; 5] = [
            "a😀b".as_bytes(),
            "你好".as_bytes(),
            b"\xe4\xbd\x41",         // a character cut short by an ASCII byte
            b"\xff\xfe ok \xf0\x9f", // invalid bytes, then an unfinished emoji at the end
            b"\xed\xa0\x80x",        // a surrogate: invalid in UTF-8
        ];
        for bytes in cases {
            let expected = String::from_utf8_lossy(bytes).into_owned();
            for cut in 0..=bytes.len() {
                let mut pending = bytes[..cut].to_vec();
                let mut text = take_complete(&mut pending);
                assert!(pending.len() < 4, "holds at most an unfinished character");
                pending.extend_from_slice(&bytes[cut..]);
                text += &take_complete(&mut pending);
                text += &String::from_utf8_lossy(&pending);
                assert_eq!(text, expected, "{bytes:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn holds_an_unfinished_character() {
        let mut pending = vec![b'a', 0xf0, 0x9f];
        assert_eq!(take_complete(&mut pending), "a");
        assert_eq!(pending, [0xf0, 0x9f]);
        pending.extend([0x98, 0x80]);
        assert_eq!(take_complete(&mut pending), "😀");
        assert!(pending.is_empty());
    }
}
