//! A client of the coordinator's API, used by `moectl` and the tests.

use std::time::{Duration, Instant};

use moe_model::sampling::GenerationRequest;
use moe_proto::PROTOCOL_VERSION;
use moe_proto::tensor::decode_f32;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, GenerateResponse, HealthRequest, SubmitBatchRequest, generate_response,
};
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::auth::AddBearer;
use crate::convert::generate_request;
use crate::net::{self, MAX_MESSAGE_BYTES};

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
}

impl Generation {
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

#[derive(Clone)]
pub struct ClusterClient {
    inner: InferenceClient<InterceptedService<Channel, AddBearer>>,
}

/// Environment variable holding the client API's bearer token, when the cluster requires one.
pub const TOKEN_ENV: &str = "MOECTL_TOKEN";

impl ClusterClient {
    /// A client of `endpoint`, sending the token in `MOECTL_TOKEN` if it is set.
    pub fn new(endpoint: &str) -> Result<Self, Status> {
        Self::with_token(endpoint, std::env::var(TOKEN_ENV).ok().as_deref())
    }

    pub fn with_token(endpoint: &str, token: Option<&str>) -> Result<Self, Status> {
        let channel =
            net::channel(endpoint).map_err(|e| Status::invalid_argument(format!("endpoint {endpoint}: {e}")))?;
        Ok(ClusterClient {
            inner: InferenceClient::with_interceptor(channel, AddBearer::new(token)?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    pub async fn generate_stream(
        &mut self,
        req: &GenerationRequest,
    ) -> Result<tonic::Streaming<GenerateResponse>, Status> {
        Ok(self.inner.generate(generate_request(req)).await?.into_inner())
    }

    pub async fn generate(&mut self, req: &GenerationRequest) -> Result<Generation, Status> {
        let since = Instant::now();
        let mut stream = self.generate_stream(req).await?;
        let mut g = Generation::default();
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
        let mut stream = self.inner.submit_batch(batch).await?.into_inner();
        let mut out = vec![Generation::default(); reqs.len()];
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
        Ok(self.inner.cluster_status(ClusterStatusRequest {}).await?.into_inner())
    }

    /// Polls health until the cluster serves, up to `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<String, Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.inner.health(HealthRequest {}).await {
                Ok(r) if r.get_ref().serving => return Ok(r.into_inner().detail),
                Ok(r) => r.into_inner().detail,
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
