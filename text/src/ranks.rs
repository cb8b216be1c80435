//! The tiktoken ranks format: one `base64(token bytes) rank` per line.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::error::{Error, Result};

/// Token byte strings indexed by rank, read from a ranks file. The ranks must be exactly
/// `0..n` (each once) so that the specials can sit at `n + index` without colliding, and no
/// byte string may repeat (the encoder maps bytes to one rank).
pub fn read_ranks(path: &Path) -> Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_ranks(&text, path)
}

/// As [`read_ranks`], from the file's text (`path` only names it in errors).
pub fn parse_ranks(text: &str, path: &Path) -> Result<Vec<Vec<u8>>> {
    let err = |line: usize, message: String| Error::Ranks {
        path: path.to_owned(),
        line,
        message,
    };
    let mut by_rank: Vec<Option<Vec<u8>>> = Vec::new();
    let mut seen = rustc_hash::FxHashMap::<Vec<u8>, usize>::default();
    let mut count = 0usize;
    let mut last_line = 1;
    let n_lines = text.lines().count();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        // tiktoken's own loader skips empty lines.
        if line.is_empty() {
            continue;
        }
        let (token, rank) = line
            .split_once(' ')
            .ok_or_else(|| err(line_no, format!("expected `base64 rank`, got {line:?}")))?;
        let bytes = STANDARD
            .decode(token)
            .map_err(|e| err(line_no, format!("token {token:?} is not base64: {e}")))?;
        if bytes.is_empty() {
            return Err(err(line_no, "empty token".into()));
        }
        let rank: usize = rank
            .parse()
            .map_err(|_| err(line_no, format!("rank {rank:?} is not a non-negative integer")))?;
        // Ranks are contiguous from 0, so none reaches the number of lines: checked here, before
        // a table that large is made (a stray `4000000000` would ask for ~96 GB).
        if rank >= n_lines {
            return Err(err(
                line_no,
                format!("rank {rank} is beyond the file's {n_lines} lines: ranks must run from 0 without gaps"),
            ));
        }
        if let Some(first) = seen.insert(bytes.clone(), line_no) {
            return Err(err(line_no, format!("token {token:?} already appears on line {first}")));
        }
        if rank >= by_rank.len() {
            by_rank.resize(rank + 1, None);
        }
        if by_rank[rank].is_some() {
            return Err(err(line_no, format!("rank {rank} appears twice")));
        }
        by_rank[rank] = Some(bytes);
        count += 1;
        last_line = line_no;
    }
    if count == 0 {
        return Err(err(1, "no ranks".into()));
    }
    by_rank
        .into_iter()
        .enumerate()
        .map(|(rank, bytes)| {
            bytes.ok_or_else(|| err(last_line, format!("ranks are not contiguous: rank {rank} is missing")))
        })
        .collect()
}

/// The file text of `tokens` (rank = index), as [`read_ranks`] reads it.
pub fn format_ranks(tokens: &[Vec<u8>]) -> String {
    let mut out = String::new();
    for (rank, bytes) in tokens.iter().enumerate() {
        out.push_str(&STANDARD.encode(bytes));
        out.push(' ');
        out.push_str(&rank.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Vec<u8>>> {
        parse_ranks(text, Path::new("x.tiktoken"))
    }

    fn message(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn reads_what_it_writes() {
        let tokens = vec![b"a".to_vec(), b"b".to_vec(), b"ab".to_vec(), vec![0xff]];
        assert_eq!(parse(&format_ranks(&tokens)).unwrap(), tokens);
    }

    #[test]
    fn ranks_may_come_in_any_order() {
        assert_eq!(parse("Yg== 1\nYQ== 0\n").unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn errors_name_the_file_and_line() {
        assert_eq!(
            message("YQ== 0\nYg==\n"),
            "x.tiktoken:2: expected `base64 rank`, got \"Yg==\""
        );
        assert_eq!(
            message("YQ== 0\n!!! 1\n").split(':').take(2).collect::<Vec<_>>(),
            ["x.tiktoken", "2"]
        );
        assert!(message("YQ== 0\n!!! 1\n").contains("is not base64"));
        assert_eq!(
            message("YQ== x\n"),
            "x.tiktoken:1: rank \"x\" is not a non-negative integer"
        );
        assert_eq!(
            message("YQ== 0\nYQ== 1\n"),
            "x.tiktoken:2: token \"YQ==\" already appears on line 1"
        );
        assert_eq!(message("YQ== 0\nYg== 0\n"), "x.tiktoken:2: rank 0 appears twice");
        assert_eq!(
            message("YQ== 0\nYg== 2\n"),
            "x.tiktoken:2: rank 2 is beyond the file's 2 lines: ranks must run from 0 without gaps"
        );
        assert_eq!(
            message("YQ== 0\nYg== 4000000000\n"),
            "x.tiktoken:2: rank 4000000000 is beyond the file's 2 lines: ranks must run from 0 without gaps"
        );
        // A gap the line count cannot see (an empty line stands in for the missing rank).
        assert_eq!(
            message("YQ== 0\n\nYg== 2\n"),
            "x.tiktoken:3: ranks are not contiguous: rank 1 is missing"
        );
        assert_eq!(message(""), "x.tiktoken:1: no ranks");
    }
}
