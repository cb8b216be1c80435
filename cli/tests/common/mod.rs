//! Helpers shared by the cluster test binaries.
#![allow(dead_code)] // each test binary uses its own subset

use std::fmt::{Debug, Display};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moe_model::sampling::{GenerationRequest, SamplingParams};
use moe_model::{Engine, EngineOptions};
use moe_runtime::client::ClusterClient;
use moe_tests::fixtures_dir;
use tokio_stream::StreamExt;

/// How often `eventually` and `eventually_blocking` check again.
pub const POLL: Duration = Duration::from_millis(10);

/// Waits (bounded) until `check` succeeds and returns what it returned. `check` answers
/// `Err(last_seen)` for "not yet"; when `timeout` has passed without success, this panics with
/// `what`, the timeout and the last thing seen. `check` runs at least once, then every `POLL`.
/// A check that needs `&mut` state across polls clones it (a client) inside the closure, or
/// shares it through an `Arc`.
pub async fn eventually<T, E, F, Fut>(timeout: Duration, what: impl Display, mut check: F) -> T
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(done) => return done,
            Err(last) if start.elapsed() >= timeout => {
                panic!("{what} (waited {timeout:?}); last seen: {last:?}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// `eventually` for a synchronous check (sleeps the thread between polls).
pub fn eventually_blocking<T, E, F>(timeout: Duration, what: impl Display, mut check: F) -> T
where
    E: Debug,
    F: FnMut() -> Result<T, E>,
{
    let start = Instant::now();
    loop {
        match check() {
            Ok(done) => return done,
            Err(last) if start.elapsed() >= timeout => {
                panic!("{what} (waited {timeout:?}); last seen: {last:?}")
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// A multi-line text (a metrics page) shown as it is in an `eventually` failure, not escaped.
pub struct Text(pub String);

impl Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\n{}", self.0)
    }
}

pub fn moectl() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_moectl"))
}

pub fn tiny() -> PathBuf {
    fixtures_dir().join("hunyuan-tiny")
}

pub fn greedy(prompt: &[u32], max_tokens: u32) -> GenerationRequest {
    GenerationRequest::new(prompt.to_vec(), SamplingParams::greedy(max_tokens))
}

/// Prompts (deterministic draws) whose greedy decoding on the engine never has a top-1/top-2
/// logit gap below 2e-3, so float rounding differences between batch compositions (~1e-5)
/// cannot flip a token. Returns each prompt with its engine tokens.
pub fn decisive_prompts(model: &Path, lens: &[usize], steps: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    prompts_with_gap(model, lens, steps, 2e-3)
}

/// Like `decisive_prompts` with another minimum gap.
pub fn prompts_with_gap(model: &Path, lens: &[usize], steps: usize, min_gap: f32) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut engine = Engine::load(model, EngineOptions::default()).unwrap();
    let vocab = engine.config().vocab_size as u64;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (5 + state % (vocab - 5)) as u32
    };
    let mut out = Vec::new();
    for &len in lens {
        for _attempt in 0..50 {
            let prompt: Vec<u32> = (0..len).map(|_| next()).collect();
            let g = engine
                .generate_greedy(std::slice::from_ref(&prompt), steps, &[], true)
                .unwrap()
                .remove(0);
            let gap = g
                .step_logits
                .iter()
                .map(|l| {
                    let mut s = l.clone();
                    s.sort_by(|a, b| b.total_cmp(a));
                    s[0] - s[1]
                })
                .fold(f32::INFINITY, f32::min);
            if gap >= min_gap {
                out.push((prompt, g.tokens));
                break;
            }
        }
    }
    assert_eq!(out.len(), lens.len(), "could not draw decisive prompts");
    out
}

/// Streams `req` and counts tokens into `progress` as they arrive.
pub async fn tracked(
    mut client: ClusterClient,
    req: GenerationRequest,
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Result<Vec<u32>, tonic::Status> {
    let since = Instant::now();
    let mut stream = client.generate_stream(&req).await?;
    let mut g = moe_runtime::client::Generation::default();
    while let Some(event) = stream.next().await {
        // `absorb` refuses a token index that is not the next one: no gap, no repeat.
        g.absorb(event?, since)?;
        progress.store(g.tokens.len(), std::sync::atomic::Ordering::SeqCst);
    }
    Ok(g.tokens)
}

/// Starts tracked streams for `prompts` and waits (bounded) until each has a token.
pub async fn start_tracked(
    endpoint: &str,
    prompts: &[(Vec<u32>, Vec<u32>)],
    max_tokens: u32,
) -> Vec<(
    tokio::task::JoinHandle<Result<Vec<u32>, tonic::Status>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    let mut streams = Vec::new();
    for (prompt, _) in prompts {
        let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let client = ClusterClient::new(endpoint).unwrap();
        let task = tokio::spawn(tracked(client, greedy(prompt, max_tokens), progress.clone()));
        streams.push((task, progress));
    }
    let started = &streams;
    eventually(Duration::from_secs(30), "streams did not start", || async move {
        let waiting = started
            .iter()
            .filter(|(_, p)| p.load(std::sync::atomic::Ordering::SeqCst) == 0)
            .count();
        if waiting == 0 {
            Ok(())
        } else {
            Err(format!("{waiting} of {} streams without a token", started.len()))
        }
    })
    .await;
    streams
}

pub type Tracked = Vec<(
    tokio::task::JoinHandle<Result<Vec<u32>, tonic::Status>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)>;

/// Streams that have not received all `steps` tokens yet; a disruption test asserts some exist
/// at the moment of the disruption, or it proves nothing.
pub fn assert_some_unfinished(streams: &Tracked, steps: u32) {
    let unfinished = streams
        .iter()
        .filter(|(_, p)| p.load(std::sync::atomic::Ordering::SeqCst) < steps as usize)
        .count();
    assert!(
        unfinished > 0,
        "every request finished before the disruption; the test proved nothing"
    );
}

/// Awaits every stream: none failed, each got exactly the tokens of an undisturbed run.
pub async fn assert_streams_match(streams: Tracked, prompts: &[(Vec<u32>, Vec<u32>)]) {
    for ((task, _), (prompt, want)) in streams.into_iter().zip(prompts) {
        let got = task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("request for {prompt:?} failed: {e}"));
        assert_eq!(&got, want, "prompt {prompt:?}");
    }
}

/// An expert worker started by a test beside a cluster (`--watch-stdin`): it stops when this is
/// dropped, which closes its stdin.
pub struct Joiner {
    child: std::process::Child,
}

/// Starts `moectl expert-worker` on the tiny model against `endpoint`, with `extra` flags.
pub fn start_expert_worker(endpoint: &str, extra: &[&str]) -> Joiner {
    let child = std::process::Command::new(moectl())
        .args(["expert-worker", "--watch-stdin", "--coordinator", endpoint])
        .args(extra)
        .arg("--model")
        .arg(tiny())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Joiner { child }
}

impl Joiner {
    /// `kill -9`: the worker dies without leaving.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Joiner {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Experts each expert worker holds per layer (slots over `layers`), smallest first.
pub fn experts_per_layer(status: &moe_proto::v1::ClusterStatusResponse, layers: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = status
        .workers
        .iter()
        .filter(|w| w.role == moe_proto::v1::Role::Expert as i32)
        .map(|w| w.expert_slots.len() / layers)
        .collect();
    sizes.sort_unstable();
    sizes
}
