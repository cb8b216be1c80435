//! The metric names deploy/ relies on (Grafana dashboard, Prometheus alerts, KEDA triggers,
//! HPA external metrics) and the names a coordinator's /metrics exposes, so a test can prove
//! that none of them points at nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Files that query the coordinator's metrics.
fn referencing_files() -> Vec<PathBuf> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let files: Vec<PathBuf> = [
        "monitoring/dashboard.json",
        "monitoring/alerts.yaml",
        "k8s/components/keda/scaledobjects.yaml",
        "k8s/components/hpa/autoscaling.yaml",
    ]
    .iter()
    .map(|f| deploy.join(f))
    .collect();
    for f in &files {
        assert!(f.is_file(), "{} is gone: update this list", f.display());
    }
    files
}

/// Every `moe_...` identifier in the referencing files, with the file it is in. An external
/// metric of the HPA variant named `X_per_second` is what prometheus-adapter derives from the
/// counter `X_total` (its rate), so it stands for `X_total`.
pub fn referenced() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for f in referencing_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        let file = f.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = text.as_bytes();
        let ident = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
        let mut i = 0;
        while let Some(at) = text[i..].find("moe_") {
            let start = i + at;
            let mut end = start;
            while end < bytes.len() && ident(bytes[end]) {
                end += 1;
            }
            // Only whole identifiers (not the tail of a longer word).
            if start == 0 || !ident(bytes[start - 1]) {
                let name = &text[start..end];
                let name = match name.strip_suffix("_per_second") {
                    Some(base) => format!("{base}_total"),
                    None => name.to_owned(),
                };
                out.insert((name, file.clone()));
            }
            i = end.max(start + 1);
        }
    }
    out
}

/// Sample names a Prometheus text exposition offers: each `# TYPE` name, and for histograms
/// its `_bucket`, `_sum` and `_count` series.
pub fn exposed(body: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            out.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    out
}
