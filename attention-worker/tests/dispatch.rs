//! The dispatch path against real gRPC expert services on 127.0.0.1: a layer dispatch retries
//! by itself on the next placement when a worker cannot be reached, gives up at once on a
//! refusal that would repeat, and two dispatches can be in flight at once. The expert services
//! here compute with the in-process experts, so results are compared with them exactly.

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
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let address = listener.local_addr().unwrap().to_string();
        self.runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(ExpertServer::new(Service(service)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (address, messages)
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
