//! Penalties and log-probabilities end to end: what the cluster returns equals what a client
//! computes from the raw logits it was sent, and `moectl generate` in process agrees with it.

use std::collections::HashMap;

use moe_model::sampling::{GenerationRequest, SamplingParams};
use moe_runtime::client::ClusterClient;
use moe_tests::cluster::LocalCluster;

use crate::common::*;

/// The proto's penalties, written out again in f64 from its comments (not the sampler's code).
fn penalised(raw: &[f32], prompt: &[u32], generated: &[u32], s: &SamplingParams) -> Vec<f64> {
    let mut counts: HashMap<u32, u32> = HashMap::new();
    for &t in generated {
        *counts.entry(t).or_default() += 1;
    }
    let r = if s.repetition_penalty == 0.0 {
        1.0
    } else {
        s.repetition_penalty as f64
    };
    raw.iter()
        .enumerate()
        .map(|(id, &x)| {
            let id = id as u32;
            let mut x = x as f64;
            let n = counts.get(&id).copied().unwrap_or(0);
            if prompt.contains(&id) || n > 0 {
                x = if x > 0.0 { x / r } else { x * r };
            }
            if n > 0 {
                x -= s.presence_penalty as f64 + s.frequency_penalty as f64 * n as f64;
            }
            x
        })
        .collect()
}

fn log_softmax(x: &[f64], temperature: f64) -> Vec<f64> {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = x.iter().map(|v| ((v - max) / temperature).exp()).sum::<f64>().ln();
    x.iter().map(|v| (v - max) / temperature - z).collect()
}

/// Largest and second largest values' gap.
fn gap(x: &[f64]) -> f64 {
    let mut s = x.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    s[0] - s[1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_and_penalties_through_a_cluster_match_the_raw_logits_and_the_engine() {
    let cluster = LocalCluster::start(moectl(), &tiny(), 1, 2, &[]);
    let mut client = ClusterClient::new(&cluster.endpoint).unwrap();

    // Seeded sampling with every penalty and logprobs: each token's logprob and alternatives
    // are log_softmax(penalised raw logits / T), the raw logits being the ones streamed with it.
    let sampling = SamplingParams {
        temperature: 0.8,
        seed: 5,
        repetition_penalty: 1.3,
        presence_penalty: 0.4,
        frequency_penalty: 0.2,
        logprobs: true,
        top_logprobs: 5,
        ..SamplingParams::greedy(10)
    };
    let prompt = vec![5u32, 17, 5, 301, 44, 17];
    let req = GenerationRequest {
        return_token_logits: true,
        ..GenerationRequest::new(prompt.clone(), sampling.clone())
    };
    let got = client.generate(&req).await.unwrap();
    assert_eq!(got.tokens.len(), 10);
    assert_eq!(got.token_logprobs.len(), 10);
    for (i, (raw, lp)) in got.token_logits.iter().zip(&got.token_logprobs).enumerate() {
        let want = log_softmax(&penalised(raw, &prompt, &got.tokens[..i], &sampling), 0.8);
        let chosen = got.tokens[i] as usize;
        assert!(
            (lp.logprob as f64 - want[chosen]).abs() < 1e-5,
            "token {i}: logprob {} vs {}",
            lp.logprob,
            want[chosen]
        );
        let mut order: Vec<usize> = (0..want.len()).collect();
        order.sort_by(|&a, &b| want[b].total_cmp(&want[a]).then(a.cmp(&b)));
        let ids: Vec<u32> = lp.top.iter().map(|t| t.id).collect();
        let want_ids: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
        assert_eq!(ids, want_ids, "token {i}: top alternatives");
        for t in &lp.top {
            assert!(
                (t.logprob as f64 - want[t.id as usize]).abs() < 1e-5,
                "token {i}: {t:?}"
            );
        }
    }

    // Greedy with a repetition penalty: pick a prompt whose penalised choices are decisive (so
    // rounding differences between processes cannot flip them) and whose output the penalty
    // changes; the cluster and `moectl generate` in process must give the same tokens.
    let penalty = SamplingParams {
        repetition_penalty: 2.0,
        ..SamplingParams::greedy(12)
    };
    let mut chosen = None;
    for (prompt, plain) in decisive_prompts(&tiny(), &[3, 6, 9, 14], 12) {
        let req = GenerationRequest {
            return_token_logits: true,
            ..GenerationRequest::new(prompt.clone(), penalty.clone())
        };
        let g = client.generate(&req).await.unwrap();
        let decisive = g
            .token_logits
            .iter()
            .enumerate()
            .all(|(i, raw)| gap(&penalised(raw, &prompt, &g.tokens[..i], &penalty)) >= 2e-3);
        if decisive && g.tokens != plain {
            chosen = Some((prompt, g.tokens));
            break;
        }
    }
    let (prompt, through_cluster) = chosen.expect("no prompt whose penalised greedy output is decisive and changed");
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let out = std::process::Command::new(moectl())
        .args([
            "generate",
            "--max-tokens",
            "12",
            "--repetition-penalty",
            "2",
            "--logprobs",
            "2",
        ])
        .args(["--prompt-ids", &ids.join(","), "--model"])
        .arg(tiny())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let in_process: Vec<u32> = lines.iter().map(|v| v["id"].as_u64().unwrap() as u32).collect();
    assert_eq!(in_process, through_cluster);
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["index"], i);
        let top = v["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["id"], v["id"]);
        assert_eq!(top[0]["logprob"], v["logprob"]);
        assert!(v["logprob"].as_f64().unwrap() <= 0.0);
    }
}
