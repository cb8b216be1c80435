//! One expert worker's dispatch stream, owned by a task and reached through a cheap handle.
//! Requests are sent as they come, so several layer dispatches (micro-batches) can be in
//! flight on one link; the expert worker answers a stream's messages in order.

use std::collections::VecDeque;
use std::time::Duration;

use moe_proto::v1::expert_client::ExpertClient;
use moe_proto::v1::{DispatchRequest, DispatchResponse};
use moe_runtime::dispatch::{Answer, AnswerError};
use moe_runtime::net::{self, MAX_MESSAGE_BYTES};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// How long an answer may take before the worker is considered lost.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a link produced no answer to a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Closed(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("refused ({code}): {message}")]
    Refused { code: Code, message: String },
    #[error("malformed answer: {0}")]
    Malformed(String),
}

impl LinkError {
    /// Transport failures: the worker may be gone.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            LinkError::Unreachable(_) | LinkError::Closed(_) | LinkError::Timeout(_)
        )
    }
}

impl From<AnswerError> for LinkError {
    fn from(e: AnswerError) -> Self {
        LinkError::Malformed(e.to_string())
    }
}

/// An answer, with the bytes it took on the wire.
#[derive(Debug)]
pub(crate) struct Received {
    pub answer: Answer,
    pub bytes: usize,
}

type ReplyTo = oneshot::Sender<Result<Received, LinkError>>;
pub(crate) type Reply = oneshot::Receiver<Result<Received, LinkError>>;

struct Call {
    request: DispatchRequest,
    reply: ReplyTo,
}

#[derive(Clone)]
pub(crate) struct Link {
    calls: mpsc::Sender<Call>,
}

impl Link {
    /// Starts the link's task; it connects on the first request and again after a failure.
    pub fn spawn(handle: &tokio::runtime::Handle, address: String, hidden: usize) -> Self {
        let (calls, rx) = mpsc::channel(64);
        handle.spawn(run(address, hidden, rx));
        Link { calls }
    }

    /// Queues a request from a thread outside the runtime; its answer arrives on the receiver.
    pub fn send(&self, request: DispatchRequest) -> Result<Reply, LinkError> {
        let (reply, rx) = oneshot::channel();
        self.calls
            .blocking_send(Call { request, reply })
            .map_err(|_| LinkError::Closed("dispatch link stopped".into()))?;
        Ok(rx)
    }
}

/// An open dispatch stream.
struct Stream {
    requests: mpsc::Sender<DispatchRequest>,
    answers: tonic::Streaming<DispatchResponse>,
}

impl Stream {
    async fn open(address: &str) -> Result<Self, LinkError> {
        let channel =
            net::channel(address).map_err(|e| LinkError::Unreachable(format!("bad address {address}: {e}")))?;
        let mut client = ExpertClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (requests, rx) = mpsc::channel(16);
        let answers = client
            .dispatch(ReceiverStream::new(rx))
            .await
            .map_err(|s| LinkError::Unreachable(format!("opening the dispatch stream: {}", s.message())))?
            .into_inner();
        Ok(Stream { requests, answers })
    }
}

/// A request sent and not yet answered.
struct Waiting {
    id: u64,
    deadline: Instant,
    reply: ReplyTo,
}

/// The link's task: sends each request as it comes, matches answers to requests in order,
/// and on any failure fails every waiting request and reconnects on the next one.
async fn run(address: String, hidden: usize, mut calls: mpsc::Receiver<Call>) {
    let mut stream: Option<Stream> = None;
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    loop {
        let deadline = waiting.front().map(|w| w.deadline);
        tokio::select! {
            call = calls.recv() => {
                let Some(Call { request, reply }) = call else { break };
                if stream.is_none() {
                    match Stream::open(&address).await {
                        Ok(s) => stream = Some(s),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                    }
                }
                let id = request.request_id;
                let open = stream.as_ref().expect("opened above");
                if open.requests.send(request).await.is_err() {
                    stream = None;
                    fail_all(&mut waiting, &LinkError::Closed("dispatch stream closed".into()));
                    let _ = reply.send(Err(LinkError::Closed("dispatch stream closed".into())));
                    continue;
                }
                waiting.push_back(Waiting { id, deadline: Instant::now() + ANSWER_TIMEOUT, reply });
            }
            answer = next_answer(&mut stream), if !waiting.is_empty() => {
                let failure = match answer {
                    Some(Ok(resp)) => {
                        let w = waiting.pop_front().expect("a request is waiting");
                        if resp.request_id == w.id {
                            let _ = w.reply.send(parse(&resp, hidden));
                            continue;
                        }
                        let e = LinkError::Malformed(format!("answer to request {} while waiting for {}", resp.request_id, w.id));
                        let _ = w.reply.send(Err(e.clone()));
                        e
                    }
                    Some(Err(s)) => LinkError::Closed(format!("dispatch stream failed: {}", s.message())),
                    None => LinkError::Closed("dispatch stream ended".into()),
                };
                stream = None;
                fail_all(&mut waiting, &failure);
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                // The oldest request is overdue: the worker is frozen or cut off.
                stream = None;
                fail_all(&mut waiting, &LinkError::Timeout(ANSWER_TIMEOUT));
            }
        }
    }
}

async fn next_answer(stream: &mut Option<Stream>) -> Option<Result<DispatchResponse, tonic::Status>> {
    match stream {
        Some(s) => s.answers.next().await,
        None => std::future::pending().await,
    }
}

fn parse(resp: &DispatchResponse, hidden: usize) -> Result<Received, LinkError> {
    match Answer::decode(resp, hidden)? {
        Answer::Refused { code, message } => Err(LinkError::Refused { code, message }),
        answer => Ok(Received {
            answer,
            bytes: prost::Message::encoded_len(resp),
        }),
    }
}

fn fail_all(waiting: &mut VecDeque<Waiting>, error: &LinkError) {
    for w in waiting.drain(..) {
        let _ = w.reply.send(Err(error.clone()));
    }
}
