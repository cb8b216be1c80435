//! One expert worker's dispatch stream, owned by a task and reached through a cheap handle.
//! Requests are sent as they come, so several layer dispatches (micro-batches) can be in
//! flight on one link; the expert worker answers a stream's messages in order.
//!
//! Nothing in the link's task ever waits to send: requests go into an unbounded queue that
//! the gRPC stream drains as HTTP/2 flow control allows, so the task always reads answers (a
//! task parked on a full request channel while the peer is parked on its full answer channel
//! would be a deadlock no timeout can end). What is queued is bounded by the caller: the rows
//! of the dispatches in flight, which are in memory already.

use std::collections::VecDeque;
use std::time::Duration;

use moe_proto::v1::expert_client::ExpertClient;
use moe_proto::v1::{DispatchRequest, DispatchResponse};
use moe_runtime::net::{self, MAX_MESSAGE_BYTES};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Code;

/// Why a link produced no answer to a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinkError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Closed(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The stream answered another request than the oldest waiting: it cannot be trusted.
    #[error("answer to request {got} while waiting for {want}")]
    OutOfOrder { got: u64, want: u64 },
    #[error("refused ({code}): {message}")]
    Refused { code: Code, message: String },
    #[error("malformed answer: {0}")]
    Malformed(String),
}

impl LinkError {
    /// Transport failures: the worker or its stream may be gone.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            LinkError::Unreachable(_) | LinkError::Closed(_) | LinkError::Timeout(_) | LinkError::OutOfOrder { .. }
        )
    }
}

/// An answer and when it came off the stream (the caller may ask for it later: the round
/// trip and the micro-batch overlap are measured to this instant, not to the caller's wait).
pub(crate) type Arrived = (DispatchResponse, std::time::Instant);
type ReplyTo = oneshot::Sender<Result<Arrived, LinkError>>;
/// The raw answer to one request (decoded by the caller, off the runtime's threads).
pub(crate) type Reply = oneshot::Receiver<Result<Arrived, LinkError>>;

struct Call {
    request: DispatchRequest,
    reply: ReplyTo,
}

#[derive(Clone)]
pub(crate) struct Link {
    calls: mpsc::UnboundedSender<Call>,
}

impl Link {
    /// Starts the link's task; it connects on the first request and again after a failure.
    /// An answer may take `timeout` from its request's send or the previous answer on the
    /// link, whichever is later, before the worker is considered lost.
    pub fn spawn(handle: &tokio::runtime::Handle, address: String, timeout: Duration) -> Self {
        let (calls, rx) = mpsc::unbounded_channel();
        handle.spawn(run(address, timeout, rx));
        Link { calls }
    }

    /// Queues a request (never waits); its answer arrives on the receiver.
    pub fn send(&self, request: DispatchRequest) -> Result<Reply, LinkError> {
        let (reply, rx) = oneshot::channel();
        self.calls
            .send(Call { request, reply })
            .map_err(|_| LinkError::Closed("dispatch link stopped".into()))?;
        Ok(rx)
    }
}

/// An open dispatch stream.
struct Stream {
    requests: mpsc::UnboundedSender<DispatchRequest>,
    answers: tonic::Streaming<DispatchResponse>,
}

impl Stream {
    async fn open(address: &str) -> Result<Self, LinkError> {
        let channel =
            net::channel(address).map_err(|e| LinkError::Unreachable(format!("bad address {address}: {e}")))?;
        let mut client = ExpertClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (requests, rx) = mpsc::unbounded_channel();
        let answers = client
            .dispatch(UnboundedReceiverStream::new(rx))
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
async fn run(address: String, timeout: Duration, mut calls: mpsc::UnboundedReceiver<Call>) {
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
                if stream.as_ref().expect("opened above").requests.send(request).is_err() {
                    let closed = LinkError::Closed("dispatch stream closed".into());
                    stream = None;
                    fail_all(&mut waiting, &closed);
                    let _ = reply.send(Err(closed));
                    continue;
                }
                waiting.push_back(Waiting { id, deadline: Instant::now() + timeout, reply });
            }
            answer = next_answer(&mut stream), if !waiting.is_empty() => {
                let failure = match answer {
                    Some(Ok(resp)) => {
                        let w = waiting.pop_front().expect("a request is waiting");
                        if resp.request_id == w.id {
                            let _ = w.reply.send(Ok((resp, std::time::Instant::now())));
                            // The next request's clock starts now at the latest: requests
                            // queued together do not share one budget.
                            if let Some(next) = waiting.front_mut() {
                                next.deadline = next.deadline.max(Instant::now() + timeout);
                            }
                            continue;
                        }
                        let e = LinkError::OutOfOrder { got: resp.request_id, want: w.id };
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
                fail_all(&mut waiting, &LinkError::Timeout(timeout));
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

fn fail_all(waiting: &mut VecDeque<Waiting>, error: &LinkError) {
    for w in waiting.drain(..) {
        let _ = w.reply.send(Err(error.clone()));
    }
}
