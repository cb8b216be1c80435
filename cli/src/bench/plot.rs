//! `moectl bench-plot`: draws the batch-size sweeps of `moectl bench --batch-sizes ... --json-out`
//! as one SVG: decode tokens/s and decode step time against batch size, one solid line per run,
//! each run's bandwidth and FLOP floors dashed in the same colour. Hand-written SVG: two panels,
//! log2 x axis, log10 y axes (the values span decades).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// One batch size of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub batch: usize,
    pub step_ms: f64,
    pub bandwidth_floor_ms: Option<f64>,
    pub flop_floor_ms: Option<f64>,
}

impl Point {
    fn tokens_per_s(batch: usize, ms: f64) -> f64 {
        batch as f64 * 1e3 / ms
    }
}

/// One run: its legend label and points in batch order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<Point>,
}

/// Reads a sweep written by `moectl bench --batch-sizes ... --json-out`. Batch sizes without a
/// measured step (no step had every request decoding) are left out.
pub fn series_from_json(v: &serde_json::Value, file: &Path) -> anyhow::Result<Series> {
    let field = |name: &str| format!("{}: field `{name}`", file.display());
    let text = |name: &str| -> anyhow::Result<&str> {
        v[name]
            .as_str()
            .with_context(|| format!("{} is missing or not a string", field(name)))
    };
    let label = format!("{}, {}", text("label")?, text("model_dtype")?);
    let Some(entries) = v["sweep"].as_array() else {
        bail!(
            "{} is missing or not an array (was the file written with --batch-sizes?)",
            field("sweep")
        );
    };
    let mut points = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let batch = e["batch_size"]
            .as_u64()
            .filter(|&b| b > 0)
            .with_context(|| format!("{} is not a positive integer", field(&format!("sweep[{i}].batch_size"))))?;
        let positive = |x: &serde_json::Value| x.as_f64().filter(|x| x.is_finite() && *x > 0.0);
        let Some(step_ms) = positive(&e["step_ms"]["p50"]) else {
            continue;
        };
        points.push(Point {
            batch: batch as usize,
            step_ms,
            bandwidth_floor_ms: positive(&e["floors"]["bandwidth"]["ms"]),
            flop_floor_ms: positive(&e["floors"]["flop"]["ms"]),
        });
    }
    points.sort_by_key(|p| p.batch);
    Ok(Series { label, points })
}

/// `moectl bench-plot FILES... --out SVG`.
pub fn run(files: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let mut series = Vec::with_capacity(files.len());
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", f.display()))?;
        series.push(series_from_json(&v, f)?);
    }
    if series.iter().all(|s| s.points.is_empty()) {
        bail!("no sweep in {files:?} has a measured step time to draw");
    }
    std::fs::write(out, svg(&series)).with_context(|| format!("writing {}", out.display()))
}

const WIDTH: f64 = 980.0;
const HEIGHT: f64 = 470.0;
const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];
const BANDWIDTH_DASH: &str = "7 4";
const FLOP_DASH: &str = "2 3";

/// A plot area: top-left corner, size, and the log ranges it shows.
#[derive(Debug, Clone, Copy)]
pub struct Panel {
    pub x0: f64,
    pub y0: f64,
    pub w: f64,
    pub h: f64,
    /// log2 of the smallest and largest batch.
    pub log2_range: (f64, f64),
    /// log10 of the bottom and top of the y axis.
    pub log10_range: (f64, f64),
}

impl Panel {
    pub fn x(&self, batch: f64) -> f64 {
        let (lo, hi) = self.log2_range;
        self.x0 + (batch.log2() - lo) / (hi - lo) * self.w
    }

    pub fn y(&self, v: f64) -> f64 {
        let (lo, hi) = self.log10_range;
        self.y0 + self.h - (v.log10() - lo) / (hi - lo) * self.h
    }
}

/// log10 range spanning `values`, widened to whole decades.
fn decades(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = (lo.log10().floor(), hi.log10().ceil());
    if hi > lo { (lo, hi) } else { (lo, lo + 1.0) }
}

/// What one panel draws: a value per point, and the floors in the same unit.
struct Quantity {
    title: &'static str,
    axis: &'static str,
    value: fn(&Point) -> f64,
    bandwidth: fn(&Point) -> Option<f64>,
    flop: fn(&Point) -> Option<f64>,
}

const TOKENS: Quantity = Quantity {
    title: "Decode throughput (floors: the rate they allow)",
    axis: "decode tokens/s",
    value: |p| Point::tokens_per_s(p.batch, p.step_ms),
    bandwidth: |p| p.bandwidth_floor_ms.map(|f| Point::tokens_per_s(p.batch, f)),
    flop: |p| p.flop_floor_ms.map(|f| Point::tokens_per_s(p.batch, f)),
};

const STEP: Quantity = Quantity {
    title: "Decode step time (all B sequences decoding)",
    axis: "decode step (ms)",
    value: |p| p.step_ms,
    bandwidth: |p| p.bandwidth_floor_ms,
    flop: |p| p.flop_floor_ms,
};

/// The panel of `q` over `series` with its top-left corner at (x0, y0).
pub fn panel_for(series: &[Series], x0: f64, y0: f64, tokens: bool) -> Panel {
    let q = if tokens { &TOKENS } else { &STEP };
    let points = || series.iter().flat_map(|s| &s.points);
    let batches = points().map(|p| (p.batch as f64).log2());
    let (lo, hi) = batches.fold((f64::MAX, f64::MIN), |(lo, hi), b| (lo.min(b), hi.max(b)));
    let log2_range = if hi > lo { (lo, hi) } else { (lo - 1.0, lo + 1.0) };
    let values = points().flat_map(|p| {
        [Some((q.value)(p)), (q.bandwidth)(p), (q.flop)(p)]
            .into_iter()
            .flatten()
    });
    Panel {
        x0,
        y0,
        w: 380.0,
        h: 300.0,
        log2_range,
        log10_range: decades(values),
    }
}

/// `points` attribute of a polyline through (batch, value) pairs.
pub fn polyline_points(panel: &Panel, pairs: &[(usize, f64)]) -> String {
    pairs
        .iter()
        .map(|&(b, v)| format!("{:.1},{:.1}", panel.x(b as f64), panel.y(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Tick values in 1, 2, 5 steps within the decades of `panel`'s y axis.
fn y_ticks(panel: &Panel) -> Vec<f64> {
    let (lo, hi) = panel.log10_range;
    let mut ticks = Vec::new();
    for d in (lo as i32)..(hi as i32) {
        for m in [1.0, 2.0, 5.0] {
            ticks.push(m * 10f64.powi(d));
        }
    }
    ticks.push(10f64.powi(hi as i32));
    ticks
}

fn draw_panel(svg: &mut String, series: &[Series], x0: f64, y0: f64, tokens: bool) {
    let q = if tokens { &TOKENS } else { &STEP };
    let panel = panel_for(series, x0, y0, tokens);
    let (right, bottom) = (panel.x0 + panel.w, panel.y0 + panel.h);
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14">{}</text>"##,
        x0 + panel.w / 2.0,
        y0 - 12.0,
        escape(q.title)
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{x0:.1}" y="{y0:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#444"/>"##,
        panel.w, panel.h
    );
    let mut batches: Vec<usize> = series.iter().flat_map(|s| s.points.iter().map(|p| p.batch)).collect();
    batches.sort_unstable();
    batches.dedup();
    for b in batches {
        let x = panel.x(b as f64);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{y0:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="11">{b}</text>"##,
            bottom + 15.0
        );
    }
    for t in y_ticks(&panel) {
        let y = panel.y(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{x0:.1}" y1="{y:.1}" x2="{right:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{t}</text>"##,
            x0 - 5.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">batch size B (log2 scale)</text>"##,
        x0 + panel.w / 2.0,
        bottom + 35.0
    );
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12" transform="rotate(-90 {:.1} {:.1})">{} (log scale)</text>"##,
        x0 - 50.0,
        y0 + panel.h / 2.0,
        x0 - 50.0,
        y0 + panel.h / 2.0,
        escape(q.axis)
    );
    for (s, colour) in series.iter().zip(COLOURS.iter().cycle()) {
        let pairs = |f: fn(&Point) -> Option<f64>| -> Vec<(usize, f64)> {
            s.points.iter().filter_map(|p| f(p).map(|v| (p.batch, v))).collect()
        };
        for (class, dash, f) in [
            ("floor-bandwidth", BANDWIDTH_DASH, q.bandwidth),
            ("floor-flop", FLOP_DASH, q.flop),
        ] {
            let floor = pairs(f);
            if !floor.is_empty() {
                let _ = writeln!(
                    svg,
                    r##"<polyline class="{class}" points="{}" fill="none" stroke="{colour}" stroke-width="1.2" stroke-dasharray="{dash}"/>"##,
                    polyline_points(&panel, &floor)
                );
            }
        }
        let values: Vec<(usize, f64)> = s.points.iter().map(|p| (p.batch, (q.value)(p))).collect();
        let _ = writeln!(
            svg,
            r##"<polyline class="series" points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"##,
            polyline_points(&panel, &values)
        );
        for &(b, v) in &values {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"##,
                panel.x(b as f64),
                panel.y(v)
            );
        }
    }
}

/// The whole plot: both panels and a legend below them.
pub fn svg(series: &[Series]) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">"##
    );
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/>"##);
    draw_panel(&mut svg, series, 80.0, 40.0, true);
    draw_panel(&mut svg, series, 560.0, 40.0, false);
    let legend_y = 405.0;
    let mut x = 80.0;
    for (s, colour) in series.iter().zip(COLOURS.iter().cycle()) {
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{legend_y:.1}" x2="{:.1}" y2="{legend_y:.1}" stroke="{colour}" stroke-width="2"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"##,
            x + 25.0,
            x + 30.0,
            legend_y + 4.0,
            escape(&s.label)
        );
        x += 40.0 + 7.0 * s.label.len() as f64;
    }
    for (i, (what, dash)) in [
        (
            "bandwidth floor (bytes the step reads / measured bandwidth)",
            BANDWIDTH_DASH,
        ),
        ("FLOP floor (step FLOPs / measured f32 matmul rate)", FLOP_DASH),
    ]
    .into_iter()
    .enumerate()
    {
        let y = legend_y + 20.0 * (i + 1) as f64;
        let _ = writeln!(
            svg,
            r##"<line x1="80" y1="{y:.1}" x2="105" y2="{y:.1}" stroke="#444" stroke-dasharray="{dash}"/><text x="110" y="{:.1}" font-size="12">{what}, in each run's colour</text>"##,
            y + 4.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(label: &str, scale: f64) -> Series {
        Series {
            label: label.into(),
            points: [1usize, 8, 32, 128]
                .iter()
                .map(|&b| Point {
                    batch: b,
                    step_ms: 10.0 * scale * (b as f64).sqrt(),
                    bandwidth_floor_ms: Some(5.0),
                    flop_floor_ms: (b > 1).then_some(0.5 * b as f64),
                })
                .collect(),
        }
    }

    /// Every tag closes in order: the document is well-formed XML as far as elements go.
    fn balanced(svg: &str) -> bool {
        let mut stack = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let Some(close) = rest[open..].find('>') else {
                return false;
            };
            let tag = &rest[open + 1..open + close];
            rest = &rest[open + close + 1..];
            let name = tag.trim_start_matches('/').split_whitespace().next().unwrap_or("");
            if tag.starts_with('/') {
                if stack.pop() != Some(name.to_string()) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                stack.push(name.to_string());
            }
        }
        stack.is_empty()
    }

    #[test]
    fn axes_map_batches_and_values_onto_the_panel() {
        let p = Panel {
            x0: 100.0,
            y0: 50.0,
            w: 300.0,
            h: 200.0,
            log2_range: (0.0, 7.0),
            log10_range: (0.0, 2.0),
        };
        assert_eq!(p.x(1.0), 100.0);
        assert_eq!(p.x(128.0), 400.0);
        assert!((p.x(8.0) - (100.0 + 300.0 * 3.0 / 7.0)).abs() < 1e-9);
        assert_eq!(p.y(1.0), 250.0);
        assert_eq!(p.y(10.0), 150.0);
        assert_eq!(p.y(100.0), 50.0);
        assert_eq!(polyline_points(&p, &[(1, 1.0), (128, 100.0)]), "100.0,250.0 400.0,50.0");
    }

    #[test]
    fn panels_span_every_batch_and_whole_decades() {
        let s = [series("a", 1.0)];
        // Step panel: values 10..~113 ms, floors 0.5*8 = 4 .. 64 ms and 5 ms -> decades 10^0..10^3.
        let step = panel_for(&s, 0.0, 0.0, false);
        assert_eq!(step.log2_range, (0.0, 7.0));
        assert_eq!(step.log10_range, (0.0, 3.0));
        // Tokens panel: 100 tokens/s at B=1 up to 2000 tokens/s for the FLOP floor at B=8+ and
        // 128 x 200 = 25600 for the bandwidth floor at B=128 -> 10^2..10^5.
        let tokens = panel_for(&s, 0.0, 0.0, true);
        assert_eq!(tokens.log10_range, (2.0, 5.0));
    }

    #[test]
    fn svg_has_one_series_line_per_run_at_the_expected_points() {
        let runs = [
            series("in-process, bf16", 1.0),
            series("cluster <2 workers>, bf16", 2.0),
        ];
        let svg = svg(&runs);
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert!(balanced(&svg), "unbalanced tags:\n{svg}");
        assert_eq!(svg.matches(r#"class="series""#).count(), 4); // two runs x two panels
        assert_eq!(svg.matches(r#"class="floor-bandwidth""#).count(), 4);
        assert_eq!(svg.matches(r#"class="floor-flop""#).count(), 4);
        assert!(svg.contains("cluster &lt;2 workers&gt;, bf16"));
        assert!(svg.contains("decode tokens/s") && svg.contains("decode step (ms)") && svg.contains("batch size B"));
        // The first run's step line: step panel at (560, 40), 380 x 300, log2 0..7, log10 0..3.
        let p = panel_for(&runs, 560.0, 40.0, false);
        let want: Vec<(usize, f64)> = runs[0].points.iter().map(|q| (q.batch, q.step_ms)).collect();
        let line = format!(r#"<polyline class="series" points="{}""#, polyline_points(&p, &want));
        assert!(svg.contains(&line), "{line} not in\n{svg}");
        // B = 1 at the left edge, 10 ms one third up a 3-decade axis: (560, 240).
        assert!(line.contains(r#"points="560.0,240.0 "#));
    }

    #[test]
    fn sweeps_are_read_with_their_labels_and_bad_fields_named() {
        let v = serde_json::json!({
            "label": "cluster", "model_dtype": "bf16",
            "sweep": [
                { "batch_size": 8, "step_ms": { "p50": 40.0 }, "floors": { "bandwidth": { "ms": 10.0 }, "flop": { "ms": 1.0 } } },
                { "batch_size": 1, "step_ms": { "p50": 20.0 }, "floors": { "bandwidth": { "ms": null }, "flop": { "ms": 0.1 } } },
                { "batch_size": 2, "step_ms": { "p50": null } },
            ],
        });
        let s = series_from_json(&v, Path::new("a.json")).unwrap();
        assert_eq!(s.label, "cluster, bf16");
        assert_eq!(s.points.iter().map(|p| p.batch).collect::<Vec<_>>(), [1, 8]);
        assert_eq!(s.points[0].bandwidth_floor_ms, None);
        assert_eq!(s.points[1].flop_floor_ms, Some(1.0));
        let bad = serde_json::json!({ "label": "x", "model_dtype": "f32", "sweep": [{ "batch_size": 0 }] });
        let e = series_from_json(&bad, Path::new("b.json")).unwrap_err().to_string();
        assert!(e.contains("b.json") && e.contains("sweep[0].batch_size"), "{e}");
        let e = series_from_json(&serde_json::json!({}), Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`label`"), "{e}");
    }
}
