//! The front end against a scripted coordinator whose "model" always writes one reference
//! output (A13B slow thinking, then an answer with a tool call): reasoning, content and tool
//! calls reach the HTTP client whole and streamed alike; a stop string ends the answer and
//! cancels the cluster stream; RESOURCE_EXHAUSTED is 429; the bearer token is required.

use std::net::SocketAddr;
use std::time::Duration;

use moe_frontend::http_client;
use moe_tests::scripted::{ENDLESS, FULL, ScriptedCoordinator, write_text_model};
use serde_json::{Value, json};

const TOKEN: &str = "tok";

struct Setup {
    http: SocketAddr,
    coordinator: ScriptedCoordinator,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = ScriptedCoordinator::start(write_text_model(dir.path())).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let args = moe_frontend::Args {
        listen: "127.0.0.1:0".parse().unwrap(),
        coordinator: coordinator.addr.to_string(),
        model: dir.path().to_owned(),
        served_model_name: Some("scripted".into()),
        auth_token_file: Some(token_file),
        cluster_auth_token_file: None,
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        watch_stdin: false,
    };
    let state = moe_frontend::state(&args).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, moe_frontend::routes::router(state)).await });
    Setup {
        http,
        coordinator,
        _dir: dir,
    }
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": "scripted", "max_tokens": 1000,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn post(http: SocketAddr, body: Value, token: Option<&str>) -> (u16, Value) {
    let a = http_client::post(http, "/v1/chat/completions", &body, token)
        .await
        .unwrap();
    let status = a.status;
    (status, a.json().await.unwrap())
}

/// Streams a chat request; returns (reasoning, content, tool calls, finish reasons).
async fn stream(http: SocketAddr, body: Value) -> (String, String, Vec<Value>, Vec<String>) {
    let a = http_client::post(http, "/v1/chat/completions", &body, Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let (mut reasoning, mut content, mut calls, mut finish) = (String::new(), String::new(), Vec::new(), Vec::new());
    a.events(|data| {
        let chunk: Value = serde_json::from_str(data).unwrap();
        let choice = &chunk["choices"][0];
        reasoning += choice["delta"]["reasoning_content"].as_str().unwrap_or("");
        content += choice["delta"]["content"].as_str().unwrap_or("");
        calls.extend(choice["delta"]["tool_calls"].as_array().cloned().unwrap_or_default());
        if let Some(f) = choice["finish_reason"].as_str() {
            finish.push(f.to_owned());
        }
        true
    })
    .await
    .unwrap();
    (reasoning, content, calls, finish)
}

#[tokio::test]
async fn reasoning_and_tool_calls_whole_and_streamed() {
    let s = setup().await;
    let (status, body) = post(s.http, chat(json!({})), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    let message = &choice["message"];
    assert_eq!(
        message["reasoning_content"],
        "The user wants the weather; 巴黎 is Paris."
    );
    assert_eq!(message["content"], "Checking 😀 ");
    let call = &message["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(
        call["function"]["arguments"], r#"{"city": "巴黎", "opts": {"unit": "c", "days": [1, 2]}}"#,
        "a JSON string, nested, in the model's key order"
    );
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(
        body["usage"]["completion_tokens"],
        body["usage"]["total_tokens"].as_u64().unwrap() - body["usage"]["prompt_tokens"].as_u64().unwrap()
    );

    let (reasoning, content, calls, finish) = stream(s.http, chat(json!({"stream": true}))).await;
    assert_eq!(reasoning, message["reasoning_content"]);
    assert_eq!(content, message["content"]);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["function"], call["function"]);
    assert_eq!(finish, ["tool_calls"]);

    // Without tools the block stays text; fast thinking's prompt changes nothing here.
    let mut plain = chat(json!({}));
    plain.as_object_mut().unwrap().remove("tools");
    let (_, body) = post(s.http, plain, Some(TOKEN)).await;
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("<tool_calls>[{")
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(s.coordinator.dropped(), 0, "every stream was read to its end");
}

#[tokio::test]
async fn a_stop_string_ends_the_answer_and_cancels_the_cluster_stream() {
    let s = setup().await;
    let (status, body) = post(
        s.http,
        chat(json!({"stop": ["😀"], "max_tokens": ENDLESS})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "Checking ");
    assert!(body["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let (_, content, _, finish) = stream(
        s.http,
        chat(json!({"stop": ["😀"], "stream": true, "max_tokens": ENDLESS})),
    )
    .await;
    assert_eq!((content.as_str(), finish), ("Checking ", vec!["stop".to_owned()]));
    // Both cluster streams were dropped by the front end before their end (bounded wait: the
    // scripted server notices at its next send).
    for _ in 0..3000 {
        if s.coordinator.dropped() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.coordinator.dropped(), 2);
}

#[tokio::test]
async fn full_cluster_is_429_and_the_token_is_required() {
    let s = setup().await;
    for stream in [false, true] {
        let (status, body) = post(s.http, chat(json!({"max_tokens": FULL, "stream": stream})), Some(TOKEN)).await;
        assert_eq!(
            (status, body["error"]["type"].clone()),
            (429, json!("rate_limit_error")),
            "{body}"
        );
    }
    let (status, body) = post(s.http, chat(json!({})), Some("wrong")).await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (401, json!("authentication_error"))
    );
    let (status, _) = post(s.http, chat(json!({})), None).await;
    assert_eq!(status, 401);
    let a = http_client::request(s.http, "GET", "/health", None, None)
        .await
        .unwrap();
    assert_eq!(a.status, 200, "probes need no token");
    let metrics = http_client::request(s.http, "GET", "/metrics", None, None)
        .await
        .unwrap();
    let text = String::from_utf8(metrics.bytes().await.unwrap()).unwrap();
    assert!(
        text.contains("moe_http_requests_total{endpoint=\"chat_completions\",status=\"429\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("moe_http_requests_total{endpoint=\"chat_completions\",status=\"401\"} 2"),
        "{text}"
    );
}

/// A client that sends a non-streamed request and goes away cancels it too: the cluster
/// stream (endless: no stop string, ENDLESS tokens) is dropped, not read to its end.
#[tokio::test]
async fn a_non_streamed_request_whose_client_leaves_is_cancelled() {
    use tokio::io::AsyncWriteExt;
    let s = setup().await;
    let body = chat(json!({"max_tokens": ENDLESS})).to_string();
    let mut conn = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        s.http,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    // Let the request reach the cluster, then leave without reading the answer.
    for _ in 0..3000 {
        if s.coordinator.started() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.coordinator.started(), 1, "the request never reached the cluster");
    drop(conn);
    for _ in 0..3000 {
        if s.coordinator.dropped() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.coordinator.dropped(), 1, "the cluster stream outlived its client");
}
