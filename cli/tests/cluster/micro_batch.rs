//! Micro-batch overlap through a real cluster: with `--micro-batches 2` (the default) and 1,
//! a batch of requests gets the single-process engine's tokens and logits, and the attention
//! worker's counters say which steps were split and how long the halves overlapped.

use std::time::Duration;

use moe_model_tools::golden::max_abs_diff;
use moe_proto::v1::{Role, WorkerStatus};
use moe_runtime::client::ClusterClient;
use moe_tests::cluster::LocalCluster;

use crate::common::*;

/// As the other cluster parity tests: batch compositions and kernel paths over fewer rows
/// move logits by float rounding only.
const LOGIT_TOLERANCE: f64 = 1e-4;

/// The attention worker's status once its heartbeat carries every one of the `rows` the
/// batch just run fed it.
async fn attention_status(client: &ClusterClient, rows: u64) -> WorkerStatus {
    eventually(Duration::from_secs(20), "attention worker reports its steps", || {
        let mut client = client.clone();
        async move {
            let s = client.status().await.map_err(|e| e.to_string())?;
            s.workers
                .into_iter()
                .find(|w| w.role == Role::Attention as i32 && w.tokens_processed >= rows)
                .ok_or_else(|| "the batch's rows are not reported yet".to_string())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_batches_change_no_token_and_report_their_overlap() {
    let prompts = decisive_prompts(&tiny(), &[3, 17, 1, 8, 12, 5], 8);
    for micro_batches in ["2", "1"] {
        let cluster = LocalCluster::start(
            moectl(),
            &tiny(),
            1,
            2,
            &["--micro-batches", micro_batches, "--micro-batch-min-rows", "1"],
        );
        let mut client = ClusterClient::new(&cluster.endpoint).unwrap();
        // One SubmitBatch: the requests are admitted together, so steps hold several sequences.
        let reqs: Vec<_> = prompts
            .iter()
            .map(|(p, _)| {
                let mut r = greedy(p, 8);
                r.return_token_logits = true;
                r
            })
            .collect();
        let out = client.generate_batch(&reqs).await.unwrap();
        let mut engine = moe_model::Engine::load(&tiny(), moe_model::EngineOptions::default()).unwrap();
        for ((prompt, want), got) in prompts.iter().zip(&out) {
            assert_eq!(&got.tokens, want, "--micro-batches {micro_batches}: prompt {prompt:?}");
            let reference = engine
                .generate_greedy(std::slice::from_ref(prompt), 8, &[], true)
                .unwrap()
                .remove(0);
            for (t, (g, w)) in got.token_logits.iter().zip(&reference.step_logits).enumerate() {
                let d = max_abs_diff(w, g);
                assert!(
                    d < LOGIT_TOLERANCE,
                    "--micro-batches {micro_batches}: token {t}: |Δlogit| {d}"
                );
            }
        }
        // Each prompt once, then 7 decode rows (the 8th token is not fed back).
        let rows = prompts.iter().map(|(p, _)| p.len() as u64 + 7).sum();
        let w = attention_status(&client, rows).await;
        assert!(w.steps > 0, "{w:?}");
        assert!(w.overlap_micros <= w.step_micros, "{w:?}");
        if micro_batches == "2" {
            assert!(w.micro_batched_steps > 0, "no step was split: {w:?}");
            // Each half's attention ran while the other's dispatch was out on the network.
            assert!(w.overlap_micros > 0, "no overlap counted: {w:?}");
        } else {
            assert_eq!((w.micro_batched_steps, w.overlap_micros), (0, 0), "{w:?}");
        }
    }
}
