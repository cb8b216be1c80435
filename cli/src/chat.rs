//! `moectl demo`'s request and `moectl chat`: talking to the HTTP front end as any OpenAI
//! client does.

use std::io::{BufRead, Write};
use std::net::SocketAddr;

use anyhow::{Context, bail};
use moe_frontend::http_client;
use serde_json::{Value, json};

/// Environment variable with the front end's bearer token, when it requires one.
pub const HTTP_TOKEN_ENV: &str = "MOECTL_HTTP_TOKEN";

#[derive(clap::Args)]
pub struct Args {
    /// The front end's address (`moectl up --http` prints it). Its token, if it requires one,
    /// comes from `MOECTL_HTTP_TOKEN`.
    #[arg(long, default_value = "127.0.0.1:8000")]
    http: SocketAddr,
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// 0 = greedy; default: the model's generation_config.json.
    #[arg(long)]
    temperature: Option<f32>,
    /// Fast thinking: no reasoning block (`chat_template_kwargs.enable_thinking = false`).
    #[arg(long)]
    no_think: bool,
}

async fn model_name(http: SocketAddr, token: Option<&str>) -> anyhow::Result<String> {
    let answer = http_client::request(http, "GET", "/v1/models", None, token).await?;
    let status = answer.status;
    let body = answer.json().await?;
    if status != 200 {
        bail!("GET /v1/models: {status} {body}");
    }
    body["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .context("GET /v1/models listed no model")
}

/// One greedy chat request; prints the reasoning, the answer and the token ids.
pub async fn ask(http: SocketAddr, token: Option<&str>, prompt: &str, max_tokens: u32) -> anyhow::Result<()> {
    let model = model_name(http, token).await?;
    let request = json!({
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0, "return_token_ids": true,
    });
    let answer = http_client::post(http, "/v1/chat/completions", &request, token).await?;
    let status = answer.status;
    let body = answer.json().await?;
    if status != 200 {
        bail!("POST /v1/chat/completions: {status} {body}");
    }
    let choice = &body["choices"][0];
    println!("user: {prompt}");
    if let Some(r) = choice["message"]["reasoning_content"].as_str() {
        println!("reasoning: {r}");
    }
    println!("assistant: {}", choice["message"]["content"].as_str().unwrap_or(""));
    let ids: Vec<String> = choice["token_ids"]
        .as_array()
        .map(|a| a.iter().map(Value::to_string).collect())
        .unwrap_or_default();
    println!("token ids: {}", ids.join(","));
    println!("finish_reason: {}  usage: {}", choice["finish_reason"], body["usage"]);
    Ok(())
}

/// The interactive chat: each line a user turn; the answer streams, reasoning on stderr.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let token = std::env::var(HTTP_TOKEN_ENV).ok();
    let token = token.as_deref();
    let model = model_name(args.http, token).await?;
    eprintln!(
        "chatting with {model} at http://{}; an empty line or Ctrl-D ends",
        args.http
    );
    let mut history: Vec<Value> = Vec::new();
    let stdin = std::io::stdin();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        history.push(json!({"role": "user", "content": line.trim_end()}));
        let mut request = json!({
            "model": model, "messages": history, "max_tokens": args.max_tokens, "stream": true,
        });
        if let Some(t) = args.temperature {
            request["temperature"] = json!(t);
        }
        if args.no_think {
            request["chat_template_kwargs"] = json!({"enable_thinking": false});
        }
        let answer = http_client::post(args.http, "/v1/chat/completions", &request, token).await?;
        if answer.status != 200 {
            let status = answer.status;
            eprintln!("error {status}: {}", String::from_utf8_lossy(&answer.bytes().await?));
            history.pop();
            continue;
        }
        let mut content = String::new();
        let mut thinking = false;
        answer
            .events(|data| {
                let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                    return true;
                };
                if let Some(e) = chunk.get("error") {
                    eprintln!("\nerror: {e}");
                    return false;
                }
                let delta = &chunk["choices"][0]["delta"];
                if let Some(r) = delta["reasoning_content"].as_str() {
                    if !thinking {
                        eprint!("[thinking] ");
                        thinking = true;
                    }
                    eprint!("{r}");
                }
                if let Some(c) = delta["content"].as_str() {
                    if thinking && !c.is_empty() {
                        eprintln!();
                        thinking = false;
                    }
                    print!("{c}");
                    let _ = std::io::stdout().flush();
                    content.push_str(c);
                }
                true
            })
            .await?;
        println!();
        history.push(json!({"role": "assistant", "content": content}));
    }
}
