//! Server-sent events as OpenAI streams them: one `data: <json>` event per chunk, then
//! `data: [DONE]`.

use bytes::Bytes;

pub const DONE: &str = "data: [DONE]\n\n";

/// One event carrying `json` (serialised on one line, so the event is one `data:` field).
pub fn event(json: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_single_data_lines() {
        let e = event(&serde_json::json!({"text": "a\nb", "n": 1}));
        assert_eq!(e, Bytes::from("data: {\"n\":1,\"text\":\"a\\nb\"}\n\n"));
        assert_eq!(DONE, "data: [DONE]\n\n");
    }
}
