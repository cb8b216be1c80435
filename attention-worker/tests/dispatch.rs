//! The dispatch path against real gRPC expert services on 127.0.0.1: a layer dispatch retries
//! by itself on the next placement when a worker cannot be reached, gives up at once on a
//! refusal that would repeat, and two dispatches can be in flight at once. The expert services
//! here compute with the in-process experts, so results are compared with them exactly. The
//! link's own failure modes (a stream that breaks with several requests waiting, answers out of
//! order, a worker that never answers, many large messages queued on one stream) are proved
//! with misbehaving services in `link_failures` below.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use moe_attention_worker::dispatch::{DispatchConfig, RemoteExperts};
use moe_model::ModelConfig;
use moe_model::checkpoint::Checkpoint;
use moe_model::experts::{ExpertAssignment, ExpertCompute, ExpertSelection, LocalExperts};
use moe_proto::tensor::WireDtype;
use moe_proto::v1::expert_server::{Expert, ExpertServer};
use moe_proto::v1::{DispatchRequest, DispatchResponse};
use moe_runtime::PlacementView;
use moe_runtime::dispatch::{Answer, Dispatch, DispatchLimits, Rows};
use moe_runtime::placement::ExpertWorkerRef;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

/// An expert service holding every expert; `refuse` makes it refuse every message instead.
struct TestExperts {
    experts: Arc<LocalExperts>,
    limits: DispatchLimits,
    refuse: Option<Code>,
    messages: Arc<AtomicUsize>,
}

impl TestExperts {
    fn answer(&self, req: &DispatchRequest) -> Answer {
        self.messages.fetch_add(1, Ordering::SeqCst);
        if let Some(code) = self.refuse {
            return Answer::Refused {
                code,
                message: "refused by the test".into(),
            };
        }
        let d = Dispatch::decode(req, &self.limits).expect("the attention side sends valid messages");
        let Rows::Inline { values, dtype } = d.rows else {
            panic!("rows over gRPC")
        };
        let values = self
            .experts
            .compute(d.layer, &values, d.num_rows, &d.assignments)
            .unwrap();
        Answer::Inline { values, dtype }
    }
}

struct Service(Arc<TestExperts>);

#[tonic::async_trait]
impl Expert for Service {
    type DispatchStream = Pin<Box<dyn Stream<Item = Result<DispatchResponse, Status>> + Send>>;

    async fn dispatch(
        &self,
        request: Request<Streaming<DispatchRequest>>,
    ) -> Result<Response<Self::DispatchStream>, Status> {
        let me = self.0.clone();
        let hidden = me.limits.hidden;
        let answers = request
            .into_inner()
            .map(move |req| req.map(|req| me.answer(&req).encode(req.request_id, hidden)));
        Ok(Response::new(Box::pin(answers)))
    }
}

/// Serves `service` as the `Expert` service on a free port of 127.0.0.1; returns the address.
fn serve_on_loopback<S: Expert>(runtime: &tokio::runtime::Runtime, service: S) -> String {
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = ExpertServer::new(service)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    address
}

struct Setup {
    runtime: tokio::runtime::Runtime,
    config: ModelConfig,
    local: Arc<LocalExperts>,
}

fn setup() -> Setup {
    let dir = moe_tests::fixtures_dir().join("hunyuan-tiny");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let local = Arc::new(LocalExperts::load(&ckpt, &config, &ExpertSelection::All).unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    Setup { runtime, config, local }
}

impl Setup {
    /// Serves a test expert service on a port of 127.0.0.1; returns its address and message count.
    fn serve(&self, refuse: Option<Code>) -> (String, Arc<AtomicUsize>) {
        let messages = Arc::new(AtomicUsize::new(0));
        let service = Arc::new(TestExperts {
            experts: self.local.clone(),
            limits: DispatchLimits::for_model(&self.config),
            refuse,
            messages: messages.clone(),
        });
        (serve_on_loopback(&self.runtime, Service(service)), messages)
    }

    fn remote(&self, recover_timeout: Duration) -> RemoteExperts {
        RemoteExperts::new(
            self.runtime.handle().clone(),
            DispatchConfig {
                hidden: self.config.hidden_size,
                num_layers: self.config.num_layers,
                num_experts: self.config.num_experts,
                slot_capacity: None,
                wire: WireDtype::F32,
                recover_timeout,
                answer_timeout: DispatchConfig::ANSWER_TIMEOUT,
            },
            None,
        )
    }

    fn placement(&self, version: u64, id: &str, address: &str) -> PlacementView {
        let worker = ExpertWorkerRef {
            id: id.into(),
            address: address.into(),
        };
        PlacementView::even_slices(version, self.config.num_layers, self.config.num_experts, vec![worker])
    }

    /// Rows and top-2 style assignments over several experts.
    fn layer_input(&self, rows: usize, seed: usize) -> (Vec<f32>, Vec<ExpertAssignment>) {
        let h = self.config.hidden_size;
        let e = self.config.num_experts as u32;
        let values = (0..rows * h).map(|i| ((i + seed) as f32 * 0.37).sin()).collect();
        let assignments = (0..rows as u32)
            .flat_map(|r| {
                let first = (r * 7 + seed as u32) % e;
                [(first, 0.625), ((first + 3) % e, 0.375)].map(|(expert, weight)| ExpertAssignment {
                    row: r,
                    expert,
                    weight,
                })
            })
            .collect();
        (values, assignments)
    }
}

/// An address nothing listens on.
fn closed_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn a_layer_whose_worker_is_unreachable_reports_it_and_resends_on_the_next_placement() {
    let s = setup();
    let (good, messages) = s.serve(None);
    let remote = Arc::new(s.remote(Duration::from_secs(20)));
    remote.set_placement(s.placement(1, "dead", &closed_address()));
    let (rows, assignments) = s.layer_input(5, 0);
    let want = s.local.compute(1, &rows, 5, &assignments).unwrap();

    let pending = remote.begin(1, &rows, 5, &assignments).unwrap();
    // The coordinator's part, played here: once the failure is reported, a placement without
    // the dead worker.
    let coordinator = {
        let (remote, placement) = (remote.clone(), s.placement(2, "good", &good));
        std::thread::spawn(move || {
            for _ in 0..400 {
                let suspects = remote.take_suspects();
                if let Some((worker, why)) = suspects.first() {
                    remote.set_placement(placement);
                    return (worker.clone(), why.clone());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("the unreachable worker was never reported");
        })
    };
    let got = pending.wait().unwrap();
    let (worker, why) = coordinator.join().unwrap();
    assert_eq!(worker, "dead");
    assert!(why.contains("unreachable"), "{why}");
    assert_eq!(got, want, "the resent rows give exactly the in-process result");
    assert_eq!(messages.load(Ordering::SeqCst), 1, "one message to the good worker");
    assert_eq!(remote.stats.retried_dispatches.load(Ordering::Relaxed), 1);
    assert_eq!(remote.stats.layer_dispatches.load(Ordering::Relaxed), 1);
    // Its round trip, retry included, is counted once in the histogram's buckets.
    let buckets = remote.stats.layer_dispatch_buckets();
    assert_eq!(buckets.len(), moe_runtime::buckets::LAYER_DISPATCH_MICROS.len() + 1);
    assert_eq!(buckets.iter().sum::<u64>(), 1);
}

#[test]
fn a_refusal_that_would_repeat_fails_the_layer_without_a_retry() {
    let s = setup();
    let (address, messages) = s.serve(Some(Code::InvalidArgument));
    let remote = s.remote(Duration::from_secs(20));
    remote.set_placement(s.placement(1, "w0", &address));
    let (rows, assignments) = s.layer_input(2, 1);
    let err = remote.begin(0, &rows, 2, &assignments).unwrap().wait().unwrap_err();
    assert!(matches!(err, moe_model::Error::Experts(_)), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("w0") && message.contains("refused by the test"),
        "{message}"
    );
    assert_eq!(messages.load(Ordering::SeqCst), 1);
    assert!(
        remote.take_suspects().is_empty(),
        "a worker that answers is not reported"
    );
}

#[test]
fn with_no_placement_coming_the_layer_fails_after_the_recovery_timeout() {
    let s = setup();
    let remote = s.remote(Duration::from_millis(300));
    let (rows, assignments) = s.layer_input(1, 2);
    let err = remote.begin(0, &rows, 1, &assignments).unwrap().wait().unwrap_err();
    assert!(err.to_string().contains("no expert placement"), "{err}");
}

#[test]
fn two_dispatches_can_be_in_flight_at_once() {
    let s = setup();
    let (address, messages) = s.serve(None);
    let remote = s.remote(Duration::from_secs(20));
    remote.set_placement(s.placement(1, "w0", &address));
    // Two micro-batches of the same layer: both sent before either is waited for.
    let (rows_a, assign_a) = s.layer_input(3, 10);
    let (rows_b, assign_b) = s.layer_input(4, 20);
    let a = remote.begin(0, &rows_a, 3, &assign_a).unwrap();
    let b = remote.begin(0, &rows_b, 4, &assign_b).unwrap();
    // Waited for in the other order.
    assert_eq!(b.wait().unwrap(), s.local.compute(0, &rows_b, 4, &assign_b).unwrap());
    assert_eq!(a.wait().unwrap(), s.local.compute(0, &rows_a, 3, &assign_a).unwrap());
    assert_eq!(messages.load(Ordering::SeqCst), 2);
}

/// Expert services that misbehave in one way each, over an identity "expert": a row's answer
/// is the sum of its assignments' weights times the row, which any caller can check.
mod link_failures {
    use super::*;

    #[derive(Clone, Copy, PartialEq)]
    enum Misbehaviour {
        None,
        /// Receives this many messages, then ends the stream without answering any.
        HangUpAfter(usize),
        /// Answers with the wrong request id.
        WrongId,
        /// Never answers.
        Silent,
    }

    struct Identity {
        limits: DispatchLimits,
        how: Misbehaviour,
    }

    fn identity(d: &Dispatch, hidden: usize) -> Vec<f32> {
        let Rows::Inline { values, .. } = &d.rows else {
            panic!("rows over gRPC")
        };
        let mut out = vec![0.0; d.num_rows * hidden];
        for a in &d.assignments {
            let r = a.row as usize;
            for c in 0..hidden {
                out[r * hidden + c] += a.weight * values[r * hidden + c];
            }
        }
        out
    }

    struct IdentityService(Arc<Identity>);

    #[tonic::async_trait]
    impl Expert for IdentityService {
        type DispatchStream = Pin<Box<dyn Stream<Item = Result<DispatchResponse, Status>> + Send>>;

        async fn dispatch(
            &self,
            request: Request<Streaming<DispatchRequest>>,
        ) -> Result<Response<Self::DispatchStream>, Status> {
            let me = self.0.clone();
            let mut incoming = request.into_inner();
            // Shaped like the real service: in order, answers through a small channel.
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            tokio::spawn(async move {
                let mut seen = 0;
                while let Some(Ok(req)) = incoming.next().await {
                    seen += 1;
                    let hidden = me.limits.hidden;
                    let id = match me.how {
                        Misbehaviour::HangUpAfter(n) if seen >= n => return,
                        Misbehaviour::Silent | Misbehaviour::HangUpAfter(_) => continue,
                        Misbehaviour::WrongId => req.request_id + 1,
                        Misbehaviour::None => req.request_id,
                    };
                    let d = Dispatch::decode(&req, &me.limits).unwrap();
                    let answer = Answer::Inline {
                        values: identity(&d, hidden),
                        dtype: WireDtype::F32,
                    };
                    if tx.send(Ok(answer.encode(id, hidden))).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
        }
    }

    struct Bench {
        runtime: tokio::runtime::Runtime,
        hidden: usize,
    }

    impl Bench {
        fn new(hidden: usize) -> Self {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            Bench { runtime, hidden }
        }

        fn serve(&self, how: Misbehaviour) -> String {
            let limits = DispatchLimits {
                num_layers: 1,
                num_experts: 1,
                hidden: self.hidden,
                max_rows: 1 << 20,
            };
            serve_on_loopback(&self.runtime, IdentityService(Arc::new(Identity { limits, how })))
        }

        /// One expert, every row a micro-batch of its own (`slot_capacity` 1).
        fn remote(&self, answer_timeout: Duration) -> Arc<RemoteExperts> {
            Arc::new(RemoteExperts::new(
                self.runtime.handle().clone(),
                DispatchConfig {
                    hidden: self.hidden,
                    num_layers: 1,
                    num_experts: 1,
                    slot_capacity: Some(1),
                    wire: WireDtype::F32,
                    recover_timeout: Duration::from_secs(20),
                    answer_timeout,
                },
                None,
            ))
        }

        fn placement(&self, version: u64, id: &str, address: &str) -> PlacementView {
            let worker = ExpertWorkerRef {
                id: id.into(),
                address: address.into(),
            };
            PlacementView::even_slices(version, 1, 1, vec![worker])
        }

        /// `n` rows, each to the one expert with weight 0.5: the answer is half of each row.
        fn run(&self, remote: &RemoteExperts, n: usize) -> Result<(), String> {
            let rows: Vec<f32> = (0..n * self.hidden).map(|i| (i % 97) as f32).collect();
            let assignments: Vec<_> = (0..n as u32)
                .map(|row| ExpertAssignment {
                    row,
                    expert: 0,
                    weight: 0.5,
                })
                .collect();
            let got = remote
                .begin(0, &rows, n, &assignments)
                .and_then(|p| p.wait())
                .map_err(|e| e.to_string())?;
            let want: Vec<f32> = rows.iter().map(|v| 0.5 * v).collect();
            assert_eq!(got, want);
            Ok(())
        }

        /// A failure on `bad` must be reported, and the dispatch must finish on `good` once
        /// the placement moves there.
        fn recovers_from(&self, how: Misbehaviour, answer_timeout: Duration, says: &str) {
            let (bad, good) = (self.serve(how), self.serve(Misbehaviour::None));
            let remote = self.remote(answer_timeout);
            remote.set_placement(self.placement(1, "bad", &bad));
            let coordinator = {
                let (remote, placement) = (remote.clone(), self.placement(2, "good", &good));
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        if let Some((worker, why)) = remote.take_suspects().pop() {
                            remote.set_placement(placement);
                            return (worker, why);
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    panic!("the bad worker was never reported");
                })
            };
            self.run(&remote, 5).unwrap();
            let (worker, why) = coordinator.join().unwrap();
            assert_eq!(worker, "bad");
            assert!(why.contains(says), "`{why}` should say `{says}`");
        }
    }

    #[test]
    fn many_large_messages_queued_on_one_stream_all_come_back() {
        // 200 micro-batches of 64 KiB rows to one worker: far more than the HTTP/2 windows and
        // both sides' channels hold, so a link that waits to send while answers pile up would
        // hang here.
        let b = Bench::new(16384);
        let remote = b.remote(DispatchConfig::ANSWER_TIMEOUT);
        remote.set_placement(b.placement(1, "w0", &b.serve(Misbehaviour::None)));
        b.run(&remote, 200).unwrap();
        assert_eq!(remote.stats.layer_dispatches.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_stream_that_ends_with_several_requests_waiting_fails_them_all_and_the_layer_moves_on() {
        Bench::new(32).recovers_from(Misbehaviour::HangUpAfter(3), DispatchConfig::ANSWER_TIMEOUT, "stream");
    }

    #[test]
    fn an_answer_to_another_request_is_a_broken_stream() {
        Bench::new(32).recovers_from(
            Misbehaviour::WrongId,
            DispatchConfig::ANSWER_TIMEOUT,
            "while waiting for",
        );
    }

    #[test]
    fn a_worker_that_never_answers_times_out() {
        Bench::new(32).recovers_from(Misbehaviour::Silent, Duration::from_millis(300), "no answer within");
    }
}
