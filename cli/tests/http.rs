//! The HTTP front end on a real cluster (`moectl up --http` on a generated model, 2 attention
//! and 3 expert workers): the official `openai` Python client runs its checks
//! (cli/tests/http/openai_client.py), then greedy parity with `moectl generate`, then a client
//! that disconnects mid-stream is shown to cancel its request in the cluster.
//!
//! The Python client lives in a virtual environment that `scripts/test.sh` creates
//! (`target/py-openai`, or `MOE_PY_OPENAI` naming its python); without it this test fails and
//! says how to make one.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{eventually, moectl};
use moe_frontend::http_client;
use moe_model::{Engine, EngineOptions};
use moe_runtime::client::ClusterClient;
use moe_tests::cluster::LocalCluster;
use moe_tests::scripted::{ScriptedCoordinator, write_text_model};
use serde_json::{Value, json};

const TOKEN: &str = "s3cret-http-token";

fn python() -> PathBuf {
    let python = match std::env::var_os("MOE_PY_OPENAI") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py-openai/bin/python"),
    };
    assert!(
        python.exists(),
        "{} is missing: the openai client test needs a Python virtual environment with the `openai` package; \
         run scripts/test.sh (it makes one), or `python3 -m venv target/py-openai && target/py-openai/bin/pip install openai`, \
         or point MOE_PY_OPENAI at a python that has it",
        python.display()
    );
    python
}

/// Runs `cli/tests/http/<script>` with `env` (and the token in API_KEY); it must pass.
fn run_python(python: &Path, script: &str, env: &[(&str, String)]) {
    let out = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/http").join(script))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("API_KEY", TOKEN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("ALL PASSED"),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn gen_model(dir: &Path) {
    let out = Command::new(moectl())
        .args(["gen-model", "--preset", "tiny", "--seed", "3", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `moectl frontend` before `coordinator`, as a process of its own.
struct Frontend {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Frontend {
    fn start(model: &Path, token_file: &Path, coordinator: &str) -> Self {
        let mut child = Command::new(moectl())
            .args([
                "frontend",
                "--listen",
                "127.0.0.1:0",
                "--watch-stdin",
                "--coordinator",
                coordinator,
            ])
            .arg("--model")
            .arg(model)
            .arg("--auth-token-file")
            .arg(token_file)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().expect("a LISTENING line").unwrap();
        let addr = line.strip_prefix("LISTENING frontend ").expect(&line).parse().unwrap();
        Frontend { child, addr }
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn http_addr(cluster: &LocalCluster) -> SocketAddr {
    let url = cluster.http.as_deref().expect("moectl up --http printed HTTP");
    url.strip_prefix("http://").unwrap().parse().unwrap()
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    post_with(addr, path, body, Some(TOKEN)).await
}

/// To a front end that requires no token.
async fn post_plain(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    post_with(addr, path, body, None).await
}

async fn post_with(addr: SocketAddr, path: &str, body: Value, token: Option<&str>) -> (u16, Value) {
    let answer = http_client::post(addr, path, &body, token).await.unwrap();
    let status = answer.status;
    (status, answer.json().await.unwrap())
}

/// Smallest top-1/top-2 logit gap over `steps` greedy steps of `prompt` on the engine: a
/// cluster sums expert outputs in another order (~1e-5 apart), so only prompts with a clear
/// gap can be compared token for token.
fn min_gap(engine: &mut Engine, prompt: &[u32], steps: usize) -> f32 {
    let g = engine
        .generate_greedy(&[prompt.to_vec()], steps, &[], true)
        .unwrap()
        .remove(0);
    g.step_logits
        .iter()
        .map(|l| {
            let mut s = l.clone();
            s.sort_by(|a, b| b.total_cmp(a));
            s[0] - s[1]
        })
        .fold(f32::INFINITY, f32::min)
}

fn moectl_generate(args: &[&str]) -> String {
    let out = Command::new(moectl())
        .arg("generate")
        .args(args)
        .env("MOECTL_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim_end_matches('\n').to_owned()
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_parity_and_cancellation_on_a_cluster() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-chat");
    gen_model(&model);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let token_arg = token_file.to_string_lossy().into_owned();
    let cluster = LocalCluster::start(
        moectl(),
        &model,
        2,
        3,
        &[
            "--http",
            "127.0.0.1:0",
            "--max-in-flight",
            "2",
            "--auth-token-file",
            &token_arg,
        ],
    );
    let http = http_addr(&cluster);
    // Nothing listens on port 1.
    let dead = Frontend::start(&model, &token_file, "127.0.0.1:1");

    // 1. The openai client.
    run_python(
        &python,
        "openai_client.py",
        &[
            ("BASE_URL", format!("http://{http}/v1")),
            ("DEAD_URL", format!("http://{}/v1", dead.addr)),
            ("MODEL", "tiny-chat".into()),
        ],
    );

    // 2. Greedy parity: the ids behind a chat completion are what `moectl generate` makes
    // from the rendered prompt's ids, in process and through the cluster.
    let steps = 8;
    let mut engine = Engine::load(&model, EngineOptions::default()).unwrap();
    let served = moe_frontend::model::ServedModel::load(&model, None).unwrap();
    let stop_ids = ids_arg(&served.stop_ids);
    let mut compared = 0;
    for question in [
        "Hello!",
        "What is the capital of France?",
        "Write a haiku.",
        "2+2=?",
        "Hi there",
        "Why?",
    ] {
        let request = json!({"model": "tiny-chat", "messages": [{"role": "user", "content": question}],
            "max_tokens": steps, "temperature": 0, "return_token_ids": true});
        let (status, body) = post(http, "/v1/chat/completions", request.clone()).await;
        assert_eq!(status, 200, "{body}");
        let prompt: Vec<u32> = serde_json::from_value(body["prompt_token_ids"].clone()).unwrap();
        let tokens: Vec<u32> = serde_json::from_value(body["choices"][0]["token_ids"].clone()).unwrap();
        let (_, tokenized) = post(http, "/tokenize", json!({"messages": request["messages"]})).await;
        assert_eq!(tokenized["tokens"], json!(prompt), "/tokenize renders the same prompt");
        if min_gap(&mut engine, &prompt, steps as usize) < 2e-3 {
            continue;
        }
        let steps_arg = steps.to_string();
        let ids = ids_arg(&prompt);
        let mut args = vec![
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            &ids,
            "--max-tokens",
            &steps_arg,
        ];
        if !stop_ids.is_empty() {
            args.extend(["--stop-ids", &stop_ids]);
        }
        let in_process = moectl_generate(&args);
        args.extend(["--endpoint", &cluster.endpoint]);
        let through_cluster = moectl_generate(&args);
        assert_eq!(in_process, ids_arg(&tokens), "in process, {question:?}");
        assert_eq!(through_cluster, ids_arg(&tokens), "through the cluster, {question:?}");
        // With penalties, the front end's request equals `moectl generate`'s through the cluster.
        let mut penalised = request.clone();
        penalised["repetition_penalty"] = json!(1.3);
        penalised["frequency_penalty"] = json!(0.5);
        let (status, body_p) = post(http, "/v1/chat/completions", penalised).await;
        assert_eq!(status, 200, "{body_p}");
        let tokens_p: Vec<u32> = serde_json::from_value(body_p["choices"][0]["token_ids"].clone()).unwrap();
        args.extend(["--repetition-penalty", "1.3", "--frequency-penalty", "0.5"]);
        assert_eq!(
            moectl_generate(&args),
            ids_arg(&tokens_p),
            "with penalties, {question:?}"
        );
        // The completion's text is the decoding of those ids, as `generate --prompt` prints it.
        let text = served.tokenizer.decode(&tokens, true).unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], json!(text), "{question:?}");
        compared += 1;
    }
    assert!(
        compared >= 2,
        "only {compared} prompts had a clear enough greedy margin to compare"
    );

    // `moectl generate --prompt TEXT` prints what /v1/completions answers for the same text.
    let (_, completion) = post(
        http,
        "/v1/completions",
        json!({"model": "tiny-chat", "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}),
    )
    .await;
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "6",
    ];
    if !stop_ids.is_empty() {
        args.extend(["--stop-ids", &stop_ids]);
    }
    assert_eq!(json!(moectl_generate(&args)), completion["choices"][0]["text"]);

    // 3. A client that disconnects mid-stream cancels its request in the cluster.
    let status_client = ClusterClient::with_token(&cluster.endpoint, Some(TOKEN)).unwrap();
    let processed =
        |s: &moe_proto::v1::ClusterStatusResponse| s.workers.iter().map(|w| w.tokens_processed).sum::<u64>();
    let before = processed(&status_client.clone().status().await.unwrap());
    // Far more than is generated before the check below gives up (the KV cache of `moectl
    // up` holds 16384 positions). `ignore_eos` (and no stop string): the output can end only at
    // max_tokens or by cancellation, so stopping short of it proves the cancellation.
    let max_tokens = 12000;
    let answer = http_client::post(
        http,
        "/v1/chat/completions",
        &json!({"model": "tiny-chat", "messages": [{"role": "user", "content": "Count forever."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": true, "ignore_eos": true}),
        Some(TOKEN),
    )
    .await
    .unwrap();
    if answer.status != 200 {
        let status = answer.status;
        panic!("{status}: {}", String::from_utf8_lossy(&answer.bytes().await.unwrap()));
    }
    let mut seen = 0;
    let answer = {
        let mut answer = answer;
        // Read until some text arrived, then drop the connection.
        while seen < 3 {
            let piece = answer.next_bytes().await.unwrap().expect("the stream ended early");
            let piece = String::from_utf8_lossy(&piece);
            assert!(
                !piece.contains("[DONE]"),
                "the stream finished before the drop: {piece}"
            );
            seen += piece.matches("data: ").count();
        }
        answer
    };
    let running = |c: ClusterClient| async move {
        let s = c.clone().status().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((s.running_requests, processed(&s)))
    };
    // Workers report what they run with their heartbeats.
    eventually(
        Duration::from_secs(30),
        "the streamed request never showed as running",
        || {
            let c = status_client.clone();
            async move {
                match running(c).await? {
                    (1, _) => Ok(()),
                    (n, _) => Err(format!("{n} running")),
                }
            }
        },
    )
    .await;
    drop(answer);
    let after = eventually(Duration::from_secs(30), "the request was not cancelled", || {
        let c = status_client.clone();
        async move {
            match running(c).await? {
                (0, tokens) => Ok(tokens),
                (n, _) => Err(format!("{n} running")),
            }
        }
    })
    .await;
    let generated = after - before;
    assert!(
        generated < max_tokens as u64,
        "the cluster stopped after {generated} tokens, not at max_tokens {max_tokens}"
    );
    drop(dead);
    drop(cluster);
}

/// `moectl demo` starts a cluster with the front end and prints the answer as text: the
/// decoding of the token ids it prints beside it.
#[test]
fn demo_prints_the_answer_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("demo-model");
    gen_model(&model);
    let out = Command::new(moectl())
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--prompt",
            "Hi there",
            "--max-tokens",
            "6",
            "--model",
        ])
        .arg(&model)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids_line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("token ids: "))
        .unwrap_or_else(|| panic!("no token ids in:\n{stdout}"));
    let ids: Vec<u32> = ids_line.split(',').map(|t| t.parse().unwrap()).collect();
    assert_eq!(ids.len(), 6, "{stdout}");
    let text = moe_text::Tokenizer::from_dir(&model)
        .unwrap()
        .decode(&ids, true)
        .unwrap();
    assert!(
        stdout.contains(&format!("user: Hi there\nassistant: {text}\n")),
        "{stdout}"
    );
}

/// An A13B-shaped generated model carrying Tencent's real tokenizer: the front end renders and
/// encodes every golden conversation of `chat-golden.json` without tools (tool prompts embed
/// the clock) to the ids transformers made, and serves a chat completion on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a13b_shaped_model_with_the_real_tokenizer() {
    let release = moe_tests::fixtures_dir().join("hunyuan-a13b-release");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("a13b-real-tokenizer");
    let out = Command::new(moectl())
        .args(["gen-model", "--preset", "tiny", "--vocab", "128167", "--tokenizer"])
        .arg(&release)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cluster = LocalCluster::start(moectl(), &model, 1, 2, &["--http", "127.0.0.1:0"]);
    let http = http_addr(&cluster);
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(release.join("chat-golden.json")).unwrap()).unwrap();
    let mut checked = 0;
    for case in golden["chat"].as_array().unwrap() {
        if case["family"] != "a13b" || !case["tools"].is_null() {
            continue;
        }
        let request = json!({"messages": case["messages"], "chat_template_kwargs": case["kwargs"]});
        let (status, body) = post_plain(http, "/tokenize", request).await;
        assert_eq!(status, 200, "{}: {body}", case["case"]);
        assert_eq!(body["tokens"], case["ids"], "{}", case["case"]);
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} golden conversations without tools");
    let request = json!({"model": "a13b-real-tokenizer", "messages": [{"role": "user", "content": "你好"}],
        "max_tokens": 4, "temperature": 0});
    let (status, body) = post_plain(http, "/v1/chat/completions", request).await;
    assert_eq!(status, 200, "{body}");
    let (_, tokenized) = post_plain(
        http,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "你好"}]}),
    )
    .await;
    assert_eq!(body["usage"]["prompt_tokens"], tokenized["count"], "{body}");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() >= 1, "{body}");
}

/// The openai client on output with reasoning and a nested tool call (a scripted coordinator
/// writes it): `reasoning_content`, `tool_calls` with arguments as a JSON string, whole and
/// streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_sees_reasoning_and_tool_calls() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let coordinator = ScriptedCoordinator::start(write_text_model(dir.path())).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let frontend = Frontend::start(dir.path(), &token_file, &coordinator.addr.to_string());
    let model = dir.path().file_name().unwrap().to_string_lossy().into_owned();
    let base_url = format!("http://{}/v1", frontend.addr);
    let python_env = [("BASE_URL", base_url), ("MODEL", model)];
    // The python client blocks; the scripted coordinator runs on this runtime meanwhile.
    tokio::task::spawn_blocking(move || run_python(&python, "openai_tools.py", &python_env))
        .await
        .unwrap();
}
