//! The client API: validation, admission (a bounded number of requests in flight; beyond it
//! RESOURCE_EXHAUSTED, never unbounded memory), hand-off to the least busy attention worker, and
//! relaying its token stream. A client that goes away drops the relay, which drops the stream
//! to the attention worker, which frees the request's KV blocks.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_model::ModelConfig;
use moe_proto::v1::attention_client::AttentionClient;
use moe_proto::v1::inference_server::Inference;
use moe_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, GenerateRequest, GenerateResponse, HealthRequest, HealthResponse,
    SubmitBatchRequest, SubmitBatchResponse, generate_response,
};
use moe_runtime::net::ClusterChannel;
use moe_runtime::net::{self, MAX_MESSAGE_BYTES};
use moe_runtime::resume::Progress;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::latency::{Outcome, RequestMetrics, RequestTimer};
use crate::state::StateHandle;

pub struct InferenceService {
    pub state: StateHandle,
    pub config: ModelConfig,
    pub admission: Arc<Semaphore>,
    pub max_in_flight: usize,
    pub handoff: Arc<Handoff>,
}

/// Hands requests to attention workers and relays their streams, resuming a request elsewhere
/// when its attention worker fails.
pub struct Handoff {
    pub state: StateHandle,
    /// How long a request waits for the cluster to become ready (placement, attention worker).
    pub ready_timeout: Duration,
    pub channels: Mutex<HashMap<String, ClusterChannel>>,
    pub metrics: Arc<RequestMetrics>,
}

/// Times a request is moved to another attention worker before its error reaches the client.
const MAX_RESUMES: usize = 3;

/// Statuses that say the worker (or the way to it) failed, not the request.
fn worker_failed(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(code, Unavailable | Unknown | Cancelled | Aborted | Internal)
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl InferenceService {
    fn validate(&self, req: &GenerateRequest) -> Result<(), Status> {
        let r = moe_runtime::convert::generation_request(req)?;
        r.validate(&self.config).map_err(|e| moe_runtime::convert::status(&e))
    }

    /// Validates every request of `batch` and admits them together.
    fn admit_batch(&self, batch: &SubmitBatchRequest) -> Result<OwnedSemaphorePermit, Status> {
        moe_runtime::convert::check_version(batch.protocol_version)?;
        if batch.requests.is_empty() {
            return Err(Status::invalid_argument("requests is empty"));
        }
        for (i, r) in batch.requests.iter().enumerate() {
            self.validate(r)
                .map_err(|s| Status::invalid_argument(format!("requests[{i}]: {}", s.message())))?;
        }
        let n = u32::try_from(batch.requests.len()).map_err(|_| Status::invalid_argument("too many requests"))?;
        self.admit(n)
    }

    fn admit(&self, n: u32) -> Result<OwnedSemaphorePermit, Status> {
        self.admission.clone().try_acquire_many_owned(n).map_err(|_| {
            Status::resource_exhausted(format!(
                "too many requests in flight (limit {}); retry later",
                self.max_in_flight
            ))
        })
    }
}

impl Handoff {
    fn channel(&self, address: &str) -> Result<ClusterChannel, Status> {
        let mut channels = self.channels.lock().expect("lock");
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let c =
            net::channel(address).map_err(|e| Status::internal(format!("attention worker address {address}: {e}")))?;
        channels.insert(address.to_owned(), c.clone());
        Ok(c)
    }

    /// Starts `req` on an attention worker not in `exclude` and returns its event stream. The
    /// returned guard keeps the worker's in-flight count until the stream is done.
    async fn start(
        &self,
        req: GenerateRequest,
        exclude: &mut Vec<String>,
    ) -> Result<(tonic::Streaming<GenerateResponse>, crate::state::Assignment), Status> {
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            let assignment = loop {
                match self.state.pick(exclude) {
                    Ok(a) => break a,
                    Err(why) if Instant::now() >= deadline => return Err(why.into()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            let mut client = AttentionClient::new(self.channel(&assignment.address)?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            match client.serve(req.clone()).await {
                Ok(stream) => return Ok((stream.into_inner(), assignment)),
                // The worker died between its last heartbeat and now: try another.
                Err(s) if worker_failed(s.code()) && Instant::now() < deadline => {
                    tracing::warn!(worker = %assignment.worker_id, status = %s, "attention worker unreachable; trying another");
                    exclude.push(assignment.worker_id.clone());
                }
                Err(s) => return Err(s),
            }
        }
    }
}

impl Handoff {
    /// Starts `req` and relays its events into `tx` until it finishes or the client goes away,
    /// timing it into the request metrics from `arrived`.
    async fn serve<T: Send + 'static>(
        self: Arc<Self>,
        req: GenerateRequest,
        arrived: Instant,
        tx: mpsc::Sender<Result<T, Status>>,
        wrap: impl Fn(GenerateResponse) -> T + Send + 'static,
    ) {
        let mut timer = RequestTimer::start(&self.metrics, arrived, req.prompt_ids.len());
        let outcome = self.relay(req, &tx, &wrap, &mut timer).await;
        timer.end(outcome);
    }

    /// When the attention worker serving the request fails, the request continues on another
    /// one from the prompt plus the tokens already streamed, so the client sees no gap and no
    /// repeat.
    async fn relay<T>(
        &self,
        req: GenerateRequest,
        tx: &mpsc::Sender<Result<T, Status>>,
        wrap: &impl Fn(GenerateResponse) -> T,
        timer: &mut RequestTimer<'_>,
    ) -> Outcome {
        let mut exclude = Vec::new();
        let (mut upstream, mut assignment) = match self.start(req.clone(), &mut exclude).await {
            Ok(started) => started,
            Err(s) => {
                let _ = tx.send(Err(s)).await;
                return Outcome::Failed;
            }
        };
        timer.accepted();
        let mut progress = Progress::default();
        let mut resumes = 0;
        loop {
            let failure = match upstream.next().await {
                Some(Ok(event)) => {
                    progress.observe(&event);
                    let token = matches!(event.event, Some(generate_response::Event::Token(_)));
                    if tx.send(Ok(wrap(event))).await.is_err() {
                        return Outcome::Cancelled; // dropping `upstream` cancels the work
                    }
                    if token {
                        timer.token();
                    }
                    if progress.finished {
                        return Outcome::Finished;
                    }
                    continue;
                }
                Some(Err(s)) if worker_failed(s.code()) => s,
                Some(Err(s)) => {
                    let _ = tx.send(Err(s)).await;
                    return Outcome::Failed;
                }
                None => Status::unavailable("attention worker closed the stream before finishing"),
            };
            if resumes == MAX_RESUMES {
                let _ = tx.send(Err(failure)).await;
                return Outcome::Failed;
            }
            resumes += 1;
            tracing::warn!(worker = %assignment.worker_id, status = %failure, streamed = progress.streamed.len(), "attention worker failed mid-request; resuming elsewhere");
            exclude.push(assignment.worker_id.clone());
            let resumed = match progress.resume(&req) {
                Ok(r) => r,
                Err(done) => {
                    return match tx.send(Ok(wrap(done))).await {
                        Ok(()) => Outcome::Finished,
                        Err(_) => Outcome::Cancelled,
                    };
                }
            };
            match self.start(resumed, &mut exclude).await {
                Ok((u, a)) => {
                    upstream = u;
                    assignment = a;
                }
                Err(s) => {
                    let _ = tx.send(Err(s)).await;
                    return Outcome::Failed;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = EventStream<GenerateResponse>;
    type SubmitBatchStream = EventStream<SubmitBatchResponse>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let arrived = Instant::now();
        let req = request.into_inner();
        let permit = self
            .validate(&req)
            .and_then(|()| self.admit(1))
            .inspect_err(|_| self.handoff.metrics.reject(1))?;
        let span = tracing::info_span!("generate", prompt = req.prompt_ids.len());
        let (tx, rx) = mpsc::channel(64);
        let handoff = self.handoff.clone();
        tokio::spawn(
            async move {
                handoff.serve(req, arrived, tx, |r| r).await;
                drop(permit);
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn submit_batch(
        &self,
        request: Request<SubmitBatchRequest>,
    ) -> Result<Response<Self::SubmitBatchStream>, Status> {
        let arrived = Instant::now();
        let batch = request.into_inner();
        let permit = self
            .admit_batch(&batch)
            .inspect_err(|_| self.handoff.metrics.reject(batch.requests.len().max(1) as u64))?;
        let permit = Arc::new(permit);
        let (tx, rx) = mpsc::channel(64);
        for (i, req) in batch.requests.into_iter().enumerate() {
            let (tx, permit, handoff) = (tx.clone(), permit.clone(), self.handoff.clone());
            tokio::spawn(async move {
                let index = i as u32;
                handoff
                    .serve(req, arrived, tx, move |event| SubmitBatchResponse {
                        request_index: index,
                        event: Some(event),
                    })
                    .await;
                drop(permit);
            });
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Ok(Response::new(self.state.status()))
    }

    async fn health(&self, _request: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let status = self.state.status();
        let attention = status
            .workers
            .iter()
            .filter(|w| w.role == moe_proto::v1::Role::Attention as i32 && w.placement_version > 0)
            .count();
        let (serving, detail) = match (status.placement_version, attention) {
            (0, _) => (false, "waiting for expert workers to load a placement".to_owned()),
            (_, 0) => (
                false,
                "no attention worker is routing with the placement yet".to_owned(),
            ),
            (v, a) => (
                true,
                format!(
                    "placement {v}, {a} attention worker(s), {} worker(s) in all",
                    status.workers.len()
                ),
            ),
        };
        Ok(Response::new(HealthResponse { serving, detail }))
    }
}
