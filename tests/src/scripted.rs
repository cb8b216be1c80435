//! A scripted coordinator for front-end tests: its client API answers every generation with
//! the same token ids (a "model" that always writes one reference output), so what the
//! front end makes of known output (reasoning, tool calls, stop strings) can be checked
//! through real gRPC, and it counts the streams a client dropped before their end.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use moe_proto::v1::inference_server::{Inference, InferenceServer};
use moe_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, FinishReason, Finished, GenerateRequest, GenerateResponse,
    HealthRequest, HealthResponse, SubmitBatchRequest, SubmitBatchResponse, Token, generate_response,
};
use moe_text::synthetic::{TemplateFamily, write_tokenizer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// What the scripted model writes: A13B slow thinking, then an answer with a nested tool call.
pub const REFERENCE: &str = "<think>\nThe user wants the weather; 巴黎 is Paris.\n</think>\n<answer>\nChecking 😀 <tool_calls>[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"巴黎\", \"opts\": {\"unit\": \"c\", \"days\": [1, 2]}}}]</tool_calls>\n</answer>";

/// Writes what a front end reads of a model into `dir`: a `config.json` (vocabulary 512, a
/// context that fits [`ENDLESS`]) and a generated tokenizer with A13B's chat template.
/// Returns the ids of [`REFERENCE`].
pub fn write_text_model(dir: &std::path::Path) -> Vec<u32> {
    let config = format!(r#"{{"vocab_size": 512, "max_position_embeddings": {}}}"#, 2 * ENDLESS);
    std::fs::write(dir.join("config.json"), config).expect("writing config.json");
    write_tokenizer(dir, 512, TemplateFamily::A13b).expect("writing the tokenizer");
    moe_text::Tokenizer::from_dir(dir)
        .expect("loading the tokenizer")
        .encode(REFERENCE)
        .expect("encoding")
}

/// A request with this `max_tokens` is refused as if the cluster were full.
pub const FULL: u32 = 429;
/// A request with this `max_tokens` gets filler tokens after the reference until it has
/// them all or the front end drops the stream (far more than HTTP/2 buffers hold).
pub const ENDLESS: u32 = 1_000_000;

type Events = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

struct Scripted {
    ids: Vec<u32>,
    /// Streams the front end dropped before their end.
    dropped: Arc<AtomicUsize>,
    /// Generate calls received.
    started: Arc<AtomicUsize>,
}

/// Counts a stream as dropped unless it was sent to its end.
struct DropGuard {
    done: bool,
    dropped: Arc<AtomicUsize>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.done {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tonic::async_trait]
impl Inference for Scripted {
    type GenerateStream = Events;
    type SubmitBatchStream = Pin<Box<dyn Stream<Item = Result<SubmitBatchResponse, Status>> + Send>>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Events>, Status> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let max = request.into_inner().sampling.map_or(0, |s| s.max_tokens);
        if max == FULL {
            return Err(Status::resource_exhausted("1 requests in flight, limit 1"));
        }
        let mut ids = self.ids.clone();
        if max == ENDLESS {
            let filler = *ids.last().expect("a script");
            ids.resize(ENDLESS as usize, filler);
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let guard = DropGuard {
            done: false,
            dropped: self.dropped.clone(),
        };
        tokio::spawn(async move {
            // The whole guard moves into the task (not just the field it sets).
            let mut guard = guard;
            for (index, id) in ids.iter().enumerate().take(max as usize) {
                let token = Token {
                    index: index as u32,
                    id: *id,
                    ..Default::default()
                };
                let event = GenerateResponse {
                    event: Some(generate_response::Event::Token(token)),
                };
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            let reason = match ids.len() > max as usize {
                true => FinishReason::Length,
                false => FinishReason::Stop,
            };
            let finished = Finished {
                reason: reason as i32,
                ..Default::default()
            };
            let _ = tx
                .send(Ok(GenerateResponse {
                    event: Some(generate_response::Event::Finished(finished)),
                }))
                .await;
            guard.done = true;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn submit_batch(&self, _: Request<SubmitBatchRequest>) -> Result<Response<Self::SubmitBatchStream>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Ok(Response::new(ClusterStatusResponse::default()))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            serving: true,
            detail: "scripted".into(),
        }))
    }
}

/// A running scripted coordinator.
pub struct ScriptedCoordinator {
    pub addr: SocketAddr,
    /// Streams dropped by their client before the end.
    pub dropped: Arc<AtomicUsize>,
    pub started: Arc<AtomicUsize>,
}

impl ScriptedCoordinator {
    /// Serves `ids` on 127.0.0.1 (any port) until the runtime stops.
    pub async fn start(ids: Vec<u32>) -> Self {
        let dropped = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let scripted = Scripted {
            ids,
            dropped: dropped.clone(),
            started: started.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1");
        let addr = listener.local_addr().expect("bound");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(InferenceServer::new(scripted))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        ScriptedCoordinator { addr, dropped, started }
    }

    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Generate calls received so far.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }
}
