//! Running a request's choices on the cluster: one task per choice streams its tokens from a
//! coordinator through [`Output`] and sends events to the response being written. When the
//! response goes away (the client disconnected), each task sees its channel close, stops, and
//! drops its gRPC stream, which cancels the request in the cluster.

use std::hash::{BuildHasher, Hasher};
use std::time::Instant;

use moe_model::sampling::{GenerationRequest, SamplingParams};
use moe_proto::v1::{FinishReason, generate_response};
use moe_runtime::client::ClusterClient;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::api_error::ApiError;
use crate::output::{Delta, Output, Parsing};
use crate::params::Sampling;
use crate::state::AppState;

/// A generated token's log-probability and its most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

#[derive(Debug)]
pub enum Event {
    /// Text released by one token (possibly empty), with that token.
    Delta {
        index: u32,
        delta: Delta,
        token: Option<u32>,
        logprob: Option<TokenLogprob>,
    },
    Finish {
        index: u32,
        reason: Finish,
    },
    Error(ApiError),
}

/// A request's generation as the cluster runs it.
pub struct Job {
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    pub max_tokens: u32,
    pub parsing: Parsing,
}

/// Starts every choice of `job`; events arrive on the receiver until every choice finished.
pub fn start(state: &AppState, job: Job, received: Instant) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(64);
    for index in 0..job.sampling.n {
        let request = GenerationRequest::new(job.prompt.clone(), cluster_sampling(&job, index, &state.model.stop_ids));
        let output = Output::new(state.model.tokenizer.clone(), job.sampling.stop.clone(), job.parsing);
        let choice = Choice {
            client: state.client.clone(),
            request,
            index,
            output: Some(output),
            logprobs: job.sampling.logprobs,
            tx: tx.clone(),
            state: state.clone(),
            received,
        };
        tokio::spawn(choice.run());
    }
    rx
}

/// The cluster's sampling parameters for choice `index` (each choice has its own seed).
fn cluster_sampling(job: &Job, index: u32, stop_ids: &[u32]) -> SamplingParams {
    let s = &job.sampling;
    let mut p = SamplingParams::greedy(job.max_tokens);
    p.temperature = s.temperature;
    p.top_k = s.top_k;
    p.top_p = s.top_p;
    p.seed = match s.seed {
        Some(seed) => seed.wrapping_add(index as u64),
        None => random_u64(),
    };
    p.stop_ids = match s.ignore_eos {
        true => Vec::new(),
        false => stop_ids.to_vec(),
    };
    p.repetition_penalty = s.repetition_penalty;
    p.presence_penalty = s.presence_penalty;
    p.frequency_penalty = s.frequency_penalty;
    p.logprobs = s.logprobs;
    p.top_logprobs = s.top_logprobs;
    p
}

/// A random number: the standard library's randomly keyed hasher over a counter (ids and
/// unseeded sampler seeds need to differ, not to be secret).
pub fn random_u64() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}

struct Choice {
    client: ClusterClient,
    request: GenerationRequest,
    index: u32,
    output: Option<Output>,
    logprobs: bool,
    tx: mpsc::Sender<Event>,
    state: AppState,
    received: Instant,
}

impl Choice {
    async fn run(mut self) {
        let index = self.index;
        let tx = self.tx.clone();
        let result = tokio::select! {
            r = self.stream() => r,
            // The response is gone: dropping `stream()` drops the gRPC stream.
            _ = tx.closed() => return,
        };
        let event = match result {
            Ok(reason) => Event::Finish { index, reason },
            Err(e) => Event::Error(e),
        };
        let _ = tx.send(event).await;
    }

    async fn stream(&mut self) -> Result<Finish, ApiError> {
        let mut stream = self
            .client
            .generate_stream(&self.request)
            .await
            .map_err(|s| ApiError::from_status(&s))?;
        let mut last: Option<Instant> = None;
        let mut output = self.output.take();
        while let Some(event) = stream.next().await {
            let event = event.map_err(|s| ApiError::from_status(&s))?;
            match event.event {
                Some(generate_response::Event::Token(t)) => {
                    match last {
                        None => self.state.metrics.first_token(self.received.elapsed()),
                        Some(at) => self.state.metrics.next_token(at.elapsed()),
                    }
                    last = Some(Instant::now());
                    let out = output.as_mut().expect("present until the end");
                    let (delta, stopped) = out
                        .push_token(t.id)
                        .map_err(|e| ApiError::internal(format!("decoding the cluster's token: {e}")))?;
                    let logprob = self.logprobs.then(|| TokenLogprob {
                        id: t.id,
                        logprob: t.logprob,
                        top: t.top_logprobs.iter().map(|a| (a.id, a.logprob)).collect(),
                    });
                    self.send(delta, Some(t.id), logprob).await?;
                    if stopped {
                        // A stop string: the rest of the generation is not wanted; returning
                        // drops the stream, which cancels it in the cluster.
                        return Ok(Finish::Stop);
                    }
                }
                Some(generate_response::Event::Finished(f)) => {
                    let delta = output.take().expect("present until the end").finish();
                    self.send(delta, None, None).await?;
                    return Ok(match FinishReason::try_from(f.reason) {
                        Ok(FinishReason::Length) => Finish::Length,
                        _ => Finish::Stop,
                    });
                }
                _ => {}
            }
        }
        Err(ApiError::from_status(&tonic::Status::unavailable(
            "the coordinator closed the stream before the generation finished",
        )))
    }

    async fn send(&self, delta: Delta, token: Option<u32>, logprob: Option<TokenLogprob>) -> Result<(), ApiError> {
        if delta.is_empty() && token.is_none() {
            return Ok(());
        }
        let event = Event::Delta {
            index: self.index,
            delta,
            token,
            logprob,
        };
        // A closed channel means the response is gone; `run` notices it too.
        self.tx
            .send(event)
            .await
            .map_err(|_| ApiError::internal("the response was dropped"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::Fields;
    use crate::model::Defaults;
    use crate::params::{Endpoint, common};

    fn job(body: &str) -> Job {
        let model = crate::testing::served_model("m", Defaults::default());
        let c = common(&Fields::parse(body.as_bytes()).unwrap(), &model, Endpoint::Chat).unwrap();
        Job {
            prompt: vec![1],
            sampling: c.sampling,
            max_tokens: 9,
            parsing: Parsing {
                reasoning: false,
                tool_calls: false,
            },
        }
    }

    #[test]
    fn ignore_eos_sends_no_stop_ids() {
        let eos = [7, 8];
        let normal = cluster_sampling(&job(r#"{"model": "m", "seed": 4}"#), 1, &eos);
        assert_eq!((normal.stop_ids.as_slice(), normal.seed), (&eos[..], 5));
        let ignoring = cluster_sampling(&job(r#"{"model": "m", "ignore_eos": true}"#), 0, &eos);
        assert!(ignoring.stop_ids.is_empty(), "{:?}", ignoring.stop_ids);
        assert_eq!(ignoring.max_tokens, 9);
    }
}
