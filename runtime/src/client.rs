//! A client of the coordinator's API, used by `moectl` and the tests.
//!
//! Given several coordinators (`a:1,b:2`: a leader and standbys), it follows the leader: calls
//! move on while a coordinator answers UNAVAILABLE, for up to a retry window, and a generation
//! whose coordinator fails mid-stream continues on another from the tokens already received,
//! so the caller's stream has no gap and no repeat.

use std::time::{Duration, Instant};

use moe_model::sampling::{GenerationRequest, TokenLogprobs};
use moe_proto::PROTOCOL_VERSION;
use moe_proto::tensor::decode_f32;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, GenerateResponse, HealthRequest, SubmitBatchRequest, generate_response,
};
use std::pin::Pin;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::auth::AddBearer;
use crate::convert::{generate_request, token_logprobs_from_wire};
use crate::failover::{self, Failover};
use crate::net::{self, MAX_MESSAGE_BYTES};
use crate::resume::Progress;
use crate::tls::ClientTls;

/// Everything a finished generation returned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Per token, the logits it was chosen from (when asked for).
    pub token_logits: Vec<Vec<f32>>,
    /// `[prompt_len * vocab]` (when asked for).
    pub prompt_logits: Option<Vec<f32>>,
    pub finish_reason: i32,
    /// Arrival time of each token, from the moment the request was sent.
    pub token_times: Vec<Duration>,
    /// Per token, its log-probabilities (when the request asked: see `Generation::for_request`).
    pub token_logprobs: Vec<TokenLogprobs>,
    /// Whether tokens carry log-probabilities to keep.
    pub with_logprobs: bool,
}

impl Generation {
    /// An empty generation that keeps what `req` asked for.
    pub fn for_request(req: &GenerationRequest) -> Self {
        Generation {
            with_logprobs: req.sampling.logprobs,
            ..Default::default()
        }
    }

    /// Folds one event in.
    pub fn absorb(&mut self, event: GenerateResponse, since: Instant) -> Result<(), Status> {
        match event.event {
            Some(generate_response::Event::PromptLogits(p)) => {
                let t = p
                    .logits
                    .ok_or_else(|| Status::internal("prompt logits without a tensor"))?;
                self.prompt_logits = Some(decode_f32(&t).map_err(|e| Status::internal(e.to_string()))?.0);
            }
            Some(generate_response::Event::Token(t)) => {
                if t.index as usize != self.tokens.len() {
                    return Err(Status::internal(format!(
                        "token index {} after {} tokens",
                        t.index,
                        self.tokens.len()
                    )));
                }
                self.tokens.push(t.id);
                self.token_times.push(since.elapsed());
                if self.with_logprobs {
                    self.token_logprobs.push(token_logprobs_from_wire(&t));
                }
                if let Some(l) = t.logits {
                    self.token_logits
                        .push(decode_f32(&l).map_err(|e| Status::internal(e.to_string()))?.0);
                }
            }
            Some(generate_response::Event::Finished(f)) => self.finish_reason = f.reason,
            None => return Err(Status::internal("empty event")),
        }
        Ok(())
    }
}

type Inner = InferenceClient<InterceptedService<Channel, AddBearer>>;

#[derive(Clone)]
pub struct ClusterClient {
    coordinators: Failover<Inner>,
    /// How long calls keep trying while no coordinator serves (a failover in progress).
    retry_window: Duration,
}

/// A stream of generation events.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

/// Statuses after which a generation continues on another coordinator.
fn coordinator_failed(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
}

/// Environment variable holding the client API's bearer token, when the cluster requires one.
pub const TOKEN_ENV: &str = "MOECTL_TOKEN";

impl ClusterClient {
    /// A client of `endpoints` (comma-separated), sending the token in `MOECTL_TOKEN` if set.
    pub fn new(endpoints: &str) -> Result<Self, Status> {
        Self::with_token(endpoints, std::env::var(TOKEN_ENV).ok().as_deref())
    }

    /// With TLS from `MOECTL_TLS_CA` (and `MOECTL_TLS_CERT`/`_KEY`) when set, else this
    /// process's installed TLS, else none.
    pub fn with_token(endpoints: &str, token: Option<&str>) -> Result<Self, Status> {
        let tls = ClientTls::from_env()
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .or_else(|| crate::tls::installed().map(|t| t.client.clone()));
        Self::with_options(endpoints, token, tls.as_ref())
    }

    /// With one endpoint, calls fail at once when it is unavailable; with several, they keep
    /// trying for 30 s (a leader election takes a few seconds).
    pub fn with_options(endpoints: &str, token: Option<&str>, tls: Option<&ClientTls>) -> Result<Self, Status> {
        let mut targets = Vec::new();
        for endpoint in failover::addresses(endpoints) {
            let channel = net::channel_with(&endpoint, tls)
                .map_err(|e| Status::invalid_argument(format!("endpoint {endpoint}: {e}")))?;
            let client = InferenceClient::with_interceptor(channel, AddBearer::new(token)?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            targets.push((endpoint, client));
        }
        let retry_window = if targets.len() > 1 {
            Duration::from_secs(30)
        } else {
            Duration::ZERO
        };
        Ok(ClusterClient {
            coordinators: Failover::new(targets)?,
            retry_window,
        })
    }

    /// Sets how long calls keep trying while every coordinator answers UNAVAILABLE.
    pub fn with_retry_window(mut self, window: Duration) -> Self {
        self.retry_window = window;
        self
    }

    /// Calls a coordinator, moving on while they are unavailable, for up to the retry window.
    async fn call<T, F>(&mut self, mut f: impl FnMut(Inner) -> F) -> Result<T, Status>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.retry_window;
        loop {
            match self.coordinators.call(&mut f).await {
                Err(s) if failover::unreachable(&s) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                r => return r,
            }
        }
    }

    /// Streams the events of one generation. With several coordinators, a coordinator that
    /// fails mid-stream is replaced by another that continues from the tokens received.
    pub async fn generate_stream(&mut self, req: &GenerationRequest) -> Result<EventStream, Status> {
        let original = generate_request(req);
        let first = {
            let r = original.clone();
            self.call(move |mut c| {
                let r = r.clone();
                async move { c.generate(r).await }
            })
            .await?
        };
        if self.coordinators.len() == 1 {
            return Ok(Box::pin(first));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut relay = self.clone();
        tokio::spawn(async move {
            let mut upstream = first;
            let mut progress = Progress::default();
            loop {
                let failure = match upstream.next().await {
                    Some(Ok(event)) => {
                        progress.observe(&event);
                        if tx.send(Ok(event)).await.is_err() || progress.finished {
                            return;
                        }
                        continue;
                    }
                    Some(Err(s)) if coordinator_failed(s.code()) => s,
                    Some(Err(s)) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    None => Status::unavailable("the coordinator closed the stream before the end"),
                };
                tracing::warn!(status = %failure, streamed = progress.streamed.len(), "coordinator failed mid-stream; continuing on another");
                let resumed = match progress.resume(&original) {
                    Ok(r) => r,
                    Err(done) => {
                        let _ = tx.send(Ok(done)).await;
                        return;
                    }
                };
                relay.coordinators.advance();
                let next = relay
                    .call(move |mut c| {
                        let r = resumed.clone();
                        async move { c.generate(r).await }
                    })
                    .await;
                match next {
                    Ok(s) => upstream = s,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    pub async fn generate(&mut self, req: &GenerationRequest) -> Result<Generation, Status> {
        let since = Instant::now();
        let mut stream = self.generate_stream(req).await?;
        let mut g = Generation::for_request(req);
        while let Some(event) = stream.next().await {
            g.absorb(event?, since)?;
        }
        Ok(g)
    }

    /// Many requests in one `SubmitBatch` call; results in request order.
    pub async fn generate_batch(&mut self, reqs: &[GenerationRequest]) -> Result<Vec<Generation>, Status> {
        let since = Instant::now();
        let batch = SubmitBatchRequest {
            protocol_version: PROTOCOL_VERSION,
            requests: reqs.iter().map(generate_request).collect(),
        };
        let mut stream = self
            .call(move |mut c| {
                let b = batch.clone();
                async move { c.submit_batch(b).await }
            })
            .await?;
        let mut out: Vec<Generation> = reqs.iter().map(Generation::for_request).collect();
        while let Some(item) = stream.next().await {
            let item = item?;
            let g = out
                .get_mut(item.request_index as usize)
                .ok_or_else(|| Status::internal(format!("event for request {}", item.request_index)))?;
            g.absorb(
                item.event.ok_or_else(|| Status::internal("batch item without event"))?,
                since,
            )?;
        }
        Ok(out)
    }

    pub async fn status(&mut self) -> Result<ClusterStatusResponse, Status> {
        self.call(|mut c| async move { c.cluster_status(ClusterStatusRequest {}).await })
            .await
    }

    /// Polls health until the cluster serves, up to `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<String, Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self
                .coordinators
                .call(|mut c| async move { c.health(HealthRequest {}).await })
                .await;
            let last = match answer {
                Ok(r) if r.serving => return Ok(r.detail),
                Ok(r) => r.detail,
                Err(s) => s.message().to_owned(),
            };
            if Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "cluster not ready after {timeout:?}: {last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
