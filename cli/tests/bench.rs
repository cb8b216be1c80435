//! `moectl bench --batch-sizes` on the tiny model in process, and `moectl bench-plot` on what it
//! wrote: the JSON's shape and its internal arithmetic, and one line per run in each panel of the
//! SVG. Rates are whatever this machine gives; nothing here depends on how fast it is.

mod common;

use std::process::Command;

use common::{moectl, tiny};
use moe_model::ModelConfig;
use serde_json::Value;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs()
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

#[test]
fn batch_sweep_json_is_consistent_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("sweep.json");
    let out = Command::new(moectl())
        .args([
            "bench",
            "--batch-sizes",
            "1,2",
            "--prompt-len",
            "4",
            "--gen-len",
            "8",
            "--model",
        ])
        .arg(tiny())
        .arg("--json-out")
        .arg(&json_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(printed, v, "--json-out differs from what was printed");

    let config = ModelConfig::from_file(&tiny().join("config.json")).unwrap();
    assert_eq!(v["label"], "in-process");
    assert!(
        v["model_dtype"].as_str().is_some_and(|d| !d.is_empty()),
        "{}",
        v["model_dtype"]
    );
    assert!(num(&v["machine"]["memory_bandwidth_gbps"], "bandwidth") > 0.0);
    let sweep = v["sweep"].as_array().expect("sweep array");
    assert_eq!(sweep.len(), 2);
    for (e, b) in sweep.iter().zip([1usize, 2]) {
        assert_eq!(e["batch_size"], b);
        assert_eq!(e["failed"], 0);
        // At least one step had every request decoding: one gap per request per step.
        assert!(e["gaps_measured"].as_u64().unwrap() >= b as u64, "{e}");
        let step = num(&e["step_ms"]["p50"], "step p50");
        assert!(step > 0.0 && num(&e["step_ms"]["mean"], "step mean") > 0.0);
        assert!(
            close(num(&e["decode_tokens_per_s"], "tokens/s"), b as f64 * 1000.0 / step),
            "{e}"
        );

        let bw = &e["floors"]["bandwidth"];
        let flop = &e["floors"]["flop"];
        for (x, what) in [
            (&bw["weight_bytes"], "weight bytes"),
            (&bw["kv_bytes"], "kv bytes"),
            (&bw["ms"], "bandwidth floor"),
            (&flop["flops"], "flops"),
            (&flop["ms"], "flop floor"),
        ] {
            assert!(num(x, what) > 0.0, "{what}: {e}");
        }
        assert!(close(
            num(&e["step_over_bandwidth_floor"], "bw ratio"),
            step / num(&bw["ms"], "bw")
        ));
        assert!(close(
            num(&e["step_over_flop_floor"], "flop ratio"),
            step / num(&flop["ms"], "flop")
        ));
        assert!(bw["routed_experts_are"].as_str().unwrap().starts_with("estimate"));
        let distinct = bw["routed_experts_per_layer"].as_array().unwrap();
        assert_eq!(distinct.len(), config.num_layers);
        if b == 1 {
            // One token touches exactly its top-k experts in each layer.
            for (d, l) in distinct.iter().zip(&config.layers) {
                assert!(
                    close(num(d, "distinct"), l.moe_topk as f64),
                    "{d} vs top-{}",
                    l.moe_topk
                );
            }
        }
    }
    // A bigger batch reads more: more distinct experts and more KV.
    let bytes = |i: usize, k: &str| num(&sweep[i]["floors"]["bandwidth"][k], k);
    assert!(bytes(1, "weight_bytes") > bytes(0, "weight_bytes"));
    assert!(close(bytes(1, "kv_bytes"), 2.0 * bytes(0, "kv_bytes")));

    let svg_path = dir.path().join("perf.svg");
    let out = Command::new(moectl())
        .arg("bench-plot")
        .arg(&json_path)
        .arg("--out")
        .arg(&svg_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    // One run: its line in the tokens/s panel and in the step-time panel, each with both floors.
    assert_eq!(svg.matches(r#"<polyline class="series""#).count(), 2, "{svg}");
    assert_eq!(svg.matches(r#"<polyline class="floor-bandwidth""#).count(), 2);
    assert_eq!(svg.matches(r#"<polyline class="floor-flop""#).count(), 2);
    let label = format!("in-process, {}", v["model_dtype"].as_str().unwrap());
    assert!(svg.contains(&label), "legend lacks {label}");

    // A file without a sweep is refused, naming the field.
    let out = Command::new(moectl())
        .arg("bench-plot")
        .arg(tiny().join("config.json"))
        .arg("--out")
        .arg(dir.path().join("bad.svg"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`label`"));
}
