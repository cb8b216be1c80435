//! What the cluster refuses and what it exposes: bad requests, bad dispatches, malformed
//! messages, a worker with another model, too many requests, the bearer token, the metrics.

use std::time::Duration;

use moe_model::sampling::GenerationRequest;
use moe_proto::PROTOCOL_VERSION;
use moe_proto::v1::{GenerateRequest, Role};
use moe_runtime::client::ClusterClient;
use moe_tests::cluster::LocalCluster;
use moe_tests::fixtures_dir;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::common::*;
use crate::{http_get, metric_names, wait_idle};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_invalid_argument_and_disturb_nothing() {
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &["--max-in-flight", "8"]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let (prompt, want) = decisive_prompts(&tiny(), &[9], 40).remove(0);
    let mut long = client.clone();
    let bystander = tokio::spawn(async move { long.generate(&greedy(&prompt, 40)).await });

    let base = greedy(&[5, 6, 7], 4);
    let with = |f: &dyn Fn(&mut GenerationRequest)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    let cases: Vec<(GenerationRequest, &str)> = vec![
        (with(&|r| r.prompt.clear()), "prompt_ids is empty"),
        (with(&|r| r.prompt.push(512)), "outside the vocabulary"),
        (with(&|r| r.sampling.max_tokens = 0), "max_tokens"),
        (with(&|r| r.sampling.max_tokens = u32::MAX), "max_tokens"),
        (with(&|r| r.sampling.max_tokens = 32_766), "context length"),
        // Fits the context but not this attention worker's KV pool (1024 blocks of 16).
        (with(&|r| r.sampling.max_tokens = 32_000), "KV blocks"),
        (with(&|r| r.sampling.temperature = -1.0), "temperature"),
        (with(&|r| r.sampling.temperature = f32::NAN), "temperature"),
        (with(&|r| r.sampling.top_p = 1.5), "top_p"),
        (with(&|r| r.sampling.top_k = 100_000), "top_k"),
        (with(&|r| r.sampling.stop_ids = vec![9999]), "stop_ids"),
        (with(&|r| r.sampling.repetition_penalty = -1.0), "repetition_penalty"),
        (with(&|r| r.sampling.frequency_penalty = 3.0), "frequency_penalty"),
        (with(&|r| r.sampling.top_logprobs = 3), "top_logprobs"),
    ];
    for (req, want_msg) in cases {
        let err = client.generate(&req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{want_msg}: {err:?}");
        assert!(
            err.message().contains(want_msg),
            "`{}` should mention `{want_msg}`",
            err.message()
        );
    }
    // Unknown protocol version, straight on the wire.
    let mut raw =
        moe_proto::v1::inference_client::InferenceClient::new(moe_runtime::net::channel(&cluster.endpoint).unwrap());
    let err = raw
        .generate(GenerateRequest {
            protocol_version: PROTOCOL_VERSION + 7,
            prompt_ids: vec![5],
            sampling: Some(moe_proto::v1::SamplingParams {
                max_tokens: 1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("protocol_version"));
    // No sampling parameters at all.
    let err = raw
        .generate(GenerateRequest {
            protocol_version: PROTOCOL_VERSION,
            prompt_ids: vec![5],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A batch with one bad request is refused whole, naming it.
    let err = client
        .generate_batch(&[base.clone(), with(&|r| r.prompt.clear())])
        .await
        .unwrap_err();
    assert!(err.message().contains("requests[1]"), "{}", err.message());

    // Metadata far over any real call's (64 KiB) is refused on its own stream; a stream on
    // the same HTTP/2 connection goes on to its end.
    let channel = moe_runtime::net::channel(&cluster.endpoint).unwrap();
    let mut neighbour = moe_proto::v1::inference_client::InferenceClient::new(channel.clone());
    let mut tokens = neighbour
        .generate(moe_runtime::convert::generate_request(&greedy(&[5, 6, 7], 30)))
        .await
        .unwrap()
        .into_inner();
    let first = tokens.next().await.expect("a first event").unwrap();
    let mut oversize = tonic::Request::new(moe_runtime::convert::generate_request(&base));
    oversize
        .metadata_mut()
        .insert("x-padding", "p".repeat(64 << 10).parse().unwrap());
    let err = moe_proto::v1::inference_client::InferenceClient::new(channel)
        .generate(oversize)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("metadata"), "{}", err.message());
    let mut events = vec![first];
    while let Some(e) = tokens.next().await {
        events.push(e.expect("the neighbouring stream broke"));
    }
    let streamed: usize = events
        .iter()
        .filter(|e| matches!(e.event, Some(moe_proto::v1::generate_response::Event::Token(_))))
        .count();
    assert_eq!(
        streamed, 30,
        "the neighbouring stream on the same connection was cut: {events:?}"
    );
    // A message larger than any valid one (a prompt far past the context: 2M ids, about 4 MB,
    // against a limit of 8 requests of a 32K-token context) is refused before it is buffered.
    let huge = with(&|r| r.prompt = (0..2_000_000u32).map(|i| 5 + i % 400).collect());
    let err = client.generate(&huge).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());

    let got = bystander.await.unwrap().unwrap();
    assert_eq!(got.tokens, want, "the bystander request was disturbed");
    wait_idle(&client, "the cluster did not go idle after the bystander").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_requests_than_the_queue_allows_get_resource_exhausted() {
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 1, &["--max-in-flight", "2"]);
    let client = ClusterClient::new(&cluster.endpoint).unwrap();
    // Two long requests hold the two admission slots.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut c = client.clone();
        let mut s = c.generate_stream(&greedy(&[5, 6, 7], 3000)).await.unwrap();
        s.next().await.unwrap().unwrap();
        holders.push(s);
    }
    let err = client.clone().generate(&greedy(&[5], 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    drop(holders);
    // Slots come back once the holders are gone.
    let g = eventually(Duration::from_secs(20), "the admission slots never came back", || {
        let mut client = client.clone();
        async move {
            match client.generate(&greedy(&[5], 2)).await {
                Err(e) if e.code() == Code::ResourceExhausted => Err(e),
                other => Ok(other.unwrap_or_else(|e| panic!("{e:?}"))),
            }
        }
    })
    .await;
    assert_eq!(g.tokens.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expert_worker_refuses_bad_dispatches_and_keeps_serving() {
    // Every malformed field has a unit test beside the codec (moe_runtime::dispatch); this
    // proves the wiring: refusals that need the worker's state, one malformed message, and
    // good messages on the same stream afterwards.
    use moe_model::experts::ExpertAssignment;
    use moe_proto::tensor::WireDtype;
    use moe_proto::v1::expert_client::ExpertClient;
    use moe_runtime::dispatch::{Answer, Dispatch, Rows};

    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &[]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    let status = client.status().await.unwrap();
    let worker = status.workers.iter().find(|w| w.role == Role::Expert as i32).unwrap();
    let held = worker.expert_slots[0] % 64; // layer 0
    let not_held = (0..64u32).find(|e| !worker.expert_slots.contains(e)).unwrap();
    let version = status.placement_version;

    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut expert = ExpertClient::new(moe_runtime::net::channel(&worker.address).unwrap());
    let mut responses = expert
        .dispatch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let assignment = |row, expert, weight| ExpertAssignment { row, expert, weight };
    let good = |id: u64, dtype: WireDtype| Dispatch {
        request_id: id,
        layer: 0,
        placement_version: version,
        num_rows: 2,
        rows: Rows::Inline {
            values: vec![0.25; 2 * 64],
            dtype,
        },
        assignments: vec![assignment(0, held, 0.5), assignment(1, held, 1.0)],
    };
    let cases: Vec<(Dispatch, Code, &str)> = vec![
        (
            Dispatch {
                assignments: vec![assignment(0, not_held, 0.5), assignment(1, not_held, 1.0)],
                ..good(1, WireDtype::F32)
            },
            Code::FailedPrecondition,
            "not held",
        ),
        (
            Dispatch {
                placement_version: version + 5,
                ..good(2, WireDtype::F32)
            },
            Code::FailedPrecondition,
            "placement version",
        ),
        (
            Dispatch {
                rows: Rows::Nccl {
                    epoch: 1,
                    sender_rank: 0,
                },
                ..good(3, WireDtype::F32)
            },
            Code::FailedPrecondition,
            "not on the NCCL data plane",
        ),
        (
            Dispatch {
                layer: 2,
                ..good(4, WireDtype::F32)
            },
            Code::InvalidArgument,
            "layer 2",
        ),
    ];
    for (dispatch, code, msg) in cases {
        let id = dispatch.request_id;
        tx.send(dispatch.encode(64)).await.unwrap();
        let resp = responses.next().await.unwrap().unwrap();
        assert_eq!(resp.request_id, id);
        match Answer::decode(&resp, 64).unwrap() {
            Answer::Refused { code: got, message } => {
                assert_eq!(got, code, "case {id}: {message}");
                assert!(message.contains(msg), "case {id}: `{message}` should mention `{msg}`");
            }
            other => panic!("case {id} was not refused: {other:?}"),
        }
    }
    // The same stream still serves a good message, and answers bf16 rows in bf16.
    tx.send(good(5, WireDtype::Bf16).encode(64)).await.unwrap();
    let resp = responses.next().await.unwrap().unwrap();
    let Some(moe_proto::v1::dispatch_response::Result::Output(t)) = &resp.result else {
        panic!("good bf16 message refused: {resp:?}")
    };
    assert_eq!(t.dtype, moe_proto::v1::Dtype::Bf16 as i32);
    assert_eq!(t.data.len(), 2 * 64 * 2);
    tx.send(good(6, WireDtype::F32).encode(64)).await.unwrap();
    let resp = responses.next().await.unwrap().unwrap();
    let Answer::Inline { values, dtype } = Answer::decode(&resp, 64).unwrap() else {
        panic!("good message refused: {resp:?}")
    };
    assert_eq!((values.len(), dtype), (2 * 64, WireDtype::F32));
    // Row 1 has weight 1.0 on the same input as row 0 with 0.5.
    for h in 0..64 {
        assert!((values[64 + h] - 2.0 * values[h]).abs() < 1e-5);
    }
    // And the cluster still answers.
    assert_eq!(client.generate(&greedy(&[5, 6], 3)).await.unwrap().tokens.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_model_is_refused() {
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 1, &[]);
    let other = fixtures_dir().join("mqa-wide-heads");
    let out = std::process::Command::new(moectl())
        .args(["expert-worker", "--coordinator", &cluster.endpoint, "--model"])
        .arg(&other)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("serves model") && err.contains("refusing"), "{err}");
    // The cluster is undisturbed.
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    assert_eq!(client.generate(&greedy(&[5, 6, 7], 4)).await.unwrap().tokens.len(), 4);
    assert_eq!(client.status().await.unwrap().workers.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_the_autoscaling_signals() {
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = cluster.metrics.clone().expect("metrics address printed");
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    client.generate(&greedy(&[5, 6, 7], 8)).await.unwrap();
    // One request refused at validation: counted as rejected, not timed.
    let mut invalid = greedy(&[5, 6, 7], 8);
    invalid.sampling.top_p = 1.5;
    assert_eq!(
        client.generate(&invalid).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(http_get(&metrics, "/healthz").0, 200);
    assert_eq!(http_get(&metrics, "/livez").0, 200);
    assert_eq!(http_get(&metrics, "/nope").0, 404);
    // Counters arrive with heartbeats: wait (bounded) until the request shows.
    let metrics = &metrics;
    let body = eventually(
        Duration::from_secs(10),
        "tokens never showed in the metrics",
        || async move {
            let (code, body) = http_get(metrics, "/metrics");
            assert_eq!(code, 200);
            let tokens: f64 = body
                .lines()
                .filter(|l| l.starts_with("moe_tokens_processed_total{"))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
                .sum();
            // The request's own metrics are recorded once its stream ends.
            let ended = body.contains("moe_request_duration_seconds_count 1\n");
            if tokens >= 10.0 && ended {
                Ok(body)
            } else {
                Err(Text(body))
            }
        },
    )
    .await;
    for name in [
        "moe_requests_in_flight ",
        "moe_requests_queued ",
        "moe_kv_utilization ",
        "moe_expert_rows_served_total{worker=",
        "moe_workers{role=\"expert\"} 2",
        "moe_placement_version 1",
        "moe_coordinator_leader 1",
        "moe_expert_load_imbalance ",
        "moe_expert_load_share{worker=",
        "moe_expert_busy_seconds_total{worker=",
        "moe_worker_resident_bytes{worker=",
        "moe_worker_weight_bytes{worker=",
        // The one request: 3 prompt tokens, 8 generated, 8 tokens timed (1 first, 7 gaps).
        "moe_prompt_tokens_total 3\n",
        "moe_generation_tokens_total 8\n",
        "moe_requests_total{outcome=\"finished\"} 1\n",
        "moe_requests_total{outcome=\"failed\"} 0\n",
        "moe_requests_total{outcome=\"rejected\"} 1\n",
        "moe_time_to_first_token_seconds_count 1\n",
        "moe_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1\n",
        "moe_inter_token_latency_seconds_count 7\n",
        "moe_request_duration_seconds_count 1\n",
        "moe_request_queue_wait_seconds_count 1\n",
    ] {
        assert!(body.contains(name), "missing `{name}` in:\n{body}");
    }
    // Bounded cardinality: at most one series per worker, never per (layer, expert), which
    // would be 128 series on this model; the histograms have fixed buckets.
    let histogram_series = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| ["_bucket{", "_sum ", "_count "].iter().any(|s| l.contains(s)))
        .count();
    // Three request histograms of 13 bounds, inter-token latency and layer dispatch of 11.
    assert_eq!(histogram_series, 3 * (13 + 1 + 2) + 2 * (11 + 1 + 2), "{body}");
    // Every layer dispatch the workers counted is in the round-trip histogram (once a heartbeat
    // taken after the last dispatch has arrived).
    eventually(
        Duration::from_secs(10),
        "layer dispatches and their histogram disagree",
        || async move {
            let (_, body) = http_get(metrics, "/metrics");
            let sample = |series: &str| -> f64 {
                body.lines()
                    .filter(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
                    .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
                    .sum()
            };
            let dispatches = sample("moe_layer_dispatches_total");
            let histogram = sample("moe_layer_dispatch_round_trip_seconds_count");
            if dispatches > 0.0 && histogram == dispatches {
                Ok(())
            } else {
                Err((dispatches, histogram))
            }
        },
    )
    .await;
    let series = body.lines().filter(|l| !l.starts_with('#')).count() - histogram_series;
    // 3 workers x ~15 per-worker gauges plus the cluster-wide ones: well under the 128 a
    // per-(layer, expert) metric alone would add.
    assert!(series < 80, "{series} series:\n{body}");

    // Every metric the dashboard, the alerts and the autoscalers in deploy/ query is served.
    let exposed = metric_names::exposed(&body);
    let referenced = metric_names::referenced();
    assert!(referenced.len() >= 25, "{referenced:?}");
    let missing: Vec<_> = referenced.iter().filter(|(name, _)| !exposed.contains(name)).collect();
    assert!(
        missing.is_empty(),
        "deploy/ uses metrics /metrics does not serve: {missing:?}\nserved: {exposed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_bearer_token_guards_the_client_api() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let cluster = LocalCluster::start(
        moectl(),
        &tiny(),
        1,
        1,
        &["--auth-token-file", token_file.to_str().unwrap()],
    );
    for token in [None, Some("wrong")] {
        let mut client = ClusterClient::with_token(&cluster.endpoint, token).unwrap();
        let err = client.generate(&greedy(&[5, 6], 2)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
        assert_eq!(client.status().await.unwrap_err().code(), Code::Unauthenticated);
    }
    let mut client = ClusterClient::with_token(&cluster.endpoint, Some("s3cret-token")).unwrap();
    assert_eq!(client.generate(&greedy(&[5, 6], 2)).await.unwrap().tokens.len(), 2);
    // The one token closes the control plane too: without it, no placement, no drain.
    let mut control = moe_proto::v1::control_client::ControlClient::new(
        moe_runtime::net::channel_with(&cluster.endpoint, None).unwrap(),
    );
    let err = control
        .get_placement(moe_proto::v1::GetPlacementRequest { target: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let err = control
        .drain(moe_proto::v1::DrainRequest {
            worker_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    // moectl reads the token from MOECTL_TOKEN.
    let out = std::process::Command::new(moectl())
        .args(["status", "--endpoint", &cluster.endpoint])
        .env("MOECTL_TOKEN", "s3cret-token")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Passes bytes through untouched, to put malformed messages on the wire.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_refused_and_disturb_nothing() {
    use tonic::codegen::http::uri::PathAndQuery;
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 1, &[]);
    // Not protobuf at all, on the client API.
    let mut grpc = tonic::client::Grpc::new(moe_runtime::net::channel(&cluster.endpoint).unwrap());
    grpc.ready().await.unwrap();
    let garbage = vec![0xff, 0xff, 0xff, 0x07, 0x01];
    let path = PathAndQuery::from_static("/moe.v1.Inference/Generate");
    let err = grpc
        .server_streaming(tonic::Request::new(garbage.clone()), path, RawCodec)
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    assert!(err.message().to_lowercase().contains("decode"), "{err:?}");

    // And inside a dispatch stream: the stream ends, the worker goes on serving.
    let expert = cluster.addresses("expert-worker").remove(0);
    let mut grpc = tonic::client::Grpc::new(moe_runtime::net::channel(&expert).unwrap());
    grpc.ready().await.unwrap();
    let path = PathAndQuery::from_static("/moe.v1.Expert/Dispatch");
    let outcome = grpc
        .streaming(tonic::Request::new(tokio_stream::iter(vec![garbage])), path, RawCodec)
        .await;
    if let Ok(resp) = outcome {
        let mut answers = resp.into_inner();
        assert!(
            !matches!(answers.next().await, Some(Ok(_))),
            "a malformed dispatch got an answer"
        );
    }
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
    assert_eq!(client.generate(&greedy(&[5, 6, 7], 4)).await.unwrap().tokens.len(), 4);
}
