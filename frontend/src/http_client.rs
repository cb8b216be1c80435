//! A minimal HTTP/1.1 client of this front end (one request per connection, JSON bodies,
//! chunked or sized answers), for `moectl demo`/`chat` and the tests; not a general client.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// An answer: the status and the body, read as it arrives.
pub struct Answer {
    pub status: u16,
    reader: BufReader<TcpStream>,
    chunked: bool,
    /// Bytes left in the current chunk (chunked) or in the body (sized).
    left: Option<usize>,
    done: bool,
}

pub async fn post(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
    token: Option<&str>,
) -> std::io::Result<Answer> {
    request(addr, "POST", path, Some(body), token).await
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    token: Option<&str>,
) -> std::io::Result<Answer> {
    let mut stream = TcpStream::connect(addr).await?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("malformed status line {line:?}")))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok();
        }
    }
    Ok(Answer {
        status,
        reader,
        chunked,
        left: if chunked { Some(0) } else { length },
        done: false,
    })
}

fn bad(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

impl Answer {
    /// The next piece of the body; None at its end.
    pub async fn next_bytes(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        if self.chunked && self.left == Some(0) {
            let mut size = String::new();
            self.reader.read_line(&mut size).await?;
            if size.trim().is_empty() {
                // The CRLF that ends the previous chunk.
                size.clear();
                self.reader.read_line(&mut size).await?;
            }
            let n = usize::from_str_radix(size.trim(), 16).map_err(|_| bad(format!("chunk size {size:?}")))?;
            if n == 0 {
                self.done = true;
                return Ok(None);
            }
            self.left = Some(n);
        }
        let want = self.left.unwrap_or(64 * 1024).min(64 * 1024);
        let mut buf = vec![0; want];
        let got = self.reader.read(&mut buf).await?;
        if got == 0 {
            self.done = true;
            return Ok(None);
        }
        buf.truncate(got);
        if let Some(left) = &mut self.left {
            *left -= got;
            if *left == 0 && !self.chunked {
                self.done = true;
            }
        }
        Ok(Some(buf))
    }

    /// The whole body.
    pub async fn bytes(mut self) -> std::io::Result<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(b) = self.next_bytes().await? {
            all.extend(b);
        }
        Ok(all)
    }

    pub async fn json(self) -> std::io::Result<serde_json::Value> {
        let body = self.bytes().await?;
        serde_json::from_slice(&body).map_err(|e| bad(format!("{e}: {}", String::from_utf8_lossy(&body))))
    }

    /// The `data:` payloads of an SSE body, in order, each passed to `each` as it arrives;
    /// stops at `[DONE]` (or when `each` returns false).
    pub async fn events(mut self, mut each: impl FnMut(&str) -> bool) -> std::io::Result<()> {
        // Bytes, not text: a read may end inside a character.
        let mut pending: Vec<u8> = Vec::new();
        while let Some(b) = self.next_bytes().await? {
            pending.extend(b);
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                let event = String::from_utf8_lossy(&event);
                let Some(data) = event.trim_end().strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" || !each(data) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
