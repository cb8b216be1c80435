//! Running a fixture's cases on a target and comparing every quantity it gives back.

use std::collections::{BTreeMap, HashSet};

use moe_model::engine::Greedy;
use moe_model::trace::Trace;

use super::compare::{count_topk_mismatches, max_abs_diff};
use super::fixture::Fixture;
use super::report::{CheckRow, Report};
use super::target::GoldenTarget;
use crate::error::{Error, Result};

impl Fixture {
    /// Runs every case the fixture holds on `target`.
    pub fn check(&self, target: &mut dyn GoldenTarget) -> Result<Report> {
        let mut checker = Checker {
            fixture: self,
            rows: Vec::new(),
            compared: Default::default(),
        };
        if let (true, Some(inv_freq)) = (self.has("rope.inv_freq"), target.rope_inv_freq()) {
            let (want, _) = checker.expect("rope.inv_freq")?;
            // Relative: the frequencies span many orders of magnitude.
            let rel = want
                .iter()
                .zip(&inv_freq)
                .map(|(&a, &b)| ((a as f64 - b as f64) / a as f64).abs())
                .fold(
                    if want.len() == inv_freq.len() {
                        0.0
                    } else {
                        f64::INFINITY
                    },
                    f64::max,
                );
            checker.push("rope", "inv_freq (relative)", rel, 1e-6, String::new());
        }
        for prompt in self.prompts() {
            checker.prompt(target, &prompt)?;
        }
        if self.has("batch.input_ids") {
            checker.batch(target)?;
        }
        if self.has("capacity.input_ids") {
            checker.capacity(target)?;
        }
        let compared = checker.compared.clone();
        let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
        for name in self.expected.tensor_names() {
            if !compared.contains(name) {
                let group = name.split('.').next().unwrap_or(name).to_owned();
                *skipped.entry(group).or_default() += 1;
            }
        }
        let mut not_checked: Vec<String> = skipped
            .into_iter()
            .map(|(group, n)| match group.as_str() {
                "capacity" => {
                    format!("{group}.* ({n} arrays): capacity cases need an in-process target")
                }
                _ => format!("{group}.* ({n} arrays): not compared (per-layer traces need an in-process target)"),
            })
            .collect();
        not_checked.sort();
        Ok(Report {
            fixture: self.dir.clone(),
            rows: checker.rows,
            not_checked,
        })
    }
}

/// One run of a fixture: the rows so far and the expected arrays compared so far.
pub(super) struct Checker<'a> {
    pub(super) fixture: &'a Fixture,
    rows: Vec<CheckRow>,
    pub(super) compared: HashSet<String>,
}

impl Checker<'_> {
    pub(super) fn push(&mut self, case: &str, quantity: &str, diff: f64, tolerance: f64, detail: String) {
        let passed = if tolerance == 0.0 {
            diff == 0.0
        } else {
            diff <= tolerance
        };
        self.rows.push(CheckRow {
            case: case.to_owned(),
            quantity: quantity.to_owned(),
            max_abs_diff: diff,
            tolerance,
            passed,
            detail,
        });
    }

    pub(super) fn expect(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        self.compared.insert(name.to_owned());
        self.fixture.f32(name)
    }

    pub(super) fn expect_ids(&mut self, name: &str) -> Result<Vec<i64>> {
        self.compared.insert(name.to_owned());
        self.fixture.ids(name)
    }

    /// Compares `got` with the named array; returns max |Δ| (infinite on a shape mismatch).
    pub(super) fn diff(&mut self, name: &str, got: &[f32]) -> Result<f64> {
        let (want, _) = self.expect(name)?;
        Ok(max_abs_diff(&want, got))
    }

    fn prompt(&mut self, target: &mut dyn GoldenTarget, prompt: &str) -> Result<()> {
        let tol = self.fixture.tolerances;
        let tokens = self.fixture.tokens(&format!("{prompt}.input_ids"))?;
        self.compared.insert(format!("{prompt}.input_ids"));
        let pre = target.prefill(&tokens)?;
        let d = self.diff(&format!("{prompt}.prefill_logits"), &pre.logits)?;
        self.push(prompt, "prefill_logits", d, tol.logits, String::new());

        if let Some(trace) = &pre.trace {
            self.trace(prompt, trace)?;
        }
        if let Some(kv) = &pre.kv_states {
            self.kv_states(prompt, kv, tokens.len())?;
        }

        let gen_name = format!("{prompt}.gen_ids");
        if self.fixture.has(&gen_name) {
            let want = self.expect_ids(&gen_name)?;
            let out = target.greedy(&[tokens], want.len())?.remove(0);
            self.greedy_rows(prompt, &want, &out, &format!("{prompt}.decode_logits"), None)?;
        }
        Ok(())
    }

    fn trace(&mut self, prompt: &str, trace: &Trace) -> Result<()> {
        let tol = self.fixture.tolerances;
        let d = self.diff(&format!("{prompt}.embeddings"), &trace.embeddings)?;
        self.push(prompt, "embeddings", d, tol.hidden, String::new());
        let mut worst: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
        let mut note = |q: &'static str, l: usize, d: f64| {
            let e = worst.entry(q).or_insert((0.0, 0));
            if d > e.0 || d.is_nan() {
                *e = (d, l);
            }
        };
        let mut idx_mismatch = 0usize;
        for (l, lt) in trace.layers.iter().enumerate() {
            let key = |q: &str| format!("{prompt}.layer{l}.{q}");
            for (q, got) in [
                ("attn_out", &lt.attn_out),
                ("moe_out", &lt.moe_out),
                ("hidden_out", &lt.hidden_out),
                ("router_logits", &lt.router_logits),
            ] {
                if self.fixture.has(&key(q)) {
                    let d = self.diff(&key(q), got)?;
                    note(q, l, d);
                }
            }
            if self.fixture.has(&key("topk_idx")) {
                let want = self.expect_ids(&key("topk_idx"))?;
                let got: Vec<i64> = lt.routing.experts.iter().map(|&e| e as i64).collect();
                idx_mismatch += count_topk_mismatches(&want, &got, lt.routing.topk);
                let d = self.diff(&key("topk_weight"), &lt.routing.weights)?;
                note("topk_weight", l, d);
            }
        }
        for (q, (d, l)) in worst {
            let t = match q {
                "router_logits" => tol.router_logits,
                "topk_weight" => tol.topk_weight,
                _ => tol.hidden,
            };
            self.push(prompt, &format!("layers.{q}"), d, t, format!("(worst: layer {l})"));
        }
        if !trace.layers.is_empty() {
            self.push(prompt, "layers.topk_idx", idx_mismatch as f64, 0.0, String::new());
        }
        let d = self.diff(&format!("{prompt}.final_norm"), &trace.final_norm)?;
        self.push(prompt, "final_norm", d, tol.hidden, String::new());
        Ok(())
    }

    fn kv_states(&mut self, prompt: &str, kv: &[(Vec<f32>, Vec<f32>)], len: usize) -> Result<()> {
        let tol = self.fixture.tolerances.kv_states;
        let (kv_heads, hd) = (self.fixture.config.num_kv_heads, self.fixture.config.head_dim);
        let mut worst = (0.0f64, 0usize);
        let mut any = false;
        for (l, (k, v)) in kv.iter().enumerate() {
            for (q, got) in [("key_states", k), ("value_states", v)] {
                let name = format!("{prompt}.layer{l}.{q}");
                if !self.fixture.has(&name) {
                    continue;
                }
                any = true;
                // Fixture layout is [kv_heads, len, head_dim]; ours is [len, kv_heads, head_dim].
                let mut t = vec![0.0; got.len()];
                for p in 0..len {
                    for h in 0..kv_heads {
                        let src = (p * kv_heads + h) * hd;
                        let dst = (h * len + p) * hd;
                        t[dst..dst + hd].copy_from_slice(&got[src..src + hd]);
                    }
                }
                let d = self.diff(&name, &t)?;
                if d > worst.0 || d.is_nan() {
                    worst = (d, l);
                }
            }
        }
        if any {
            self.push(
                prompt,
                "layers.kv_states",
                worst.0,
                tol,
                format!("(worst: layer {})", worst.1),
            );
        }
        Ok(())
    }

    /// Compares generated ids and the step logits (`decode_logits`), for one or several rows.
    fn greedy_rows(
        &mut self,
        case: &str,
        want_ids: &[i64],
        got: &Greedy,
        logits_name: &str,
        row: Option<usize>,
    ) -> Result<()> {
        let tol = self.fixture.tolerances.logits;
        let got_ids: Vec<i64> = got.tokens.iter().map(|&t| t as i64).collect();
        let mismatches =
            want_ids.len().abs_diff(got_ids.len()) + want_ids.iter().zip(&got_ids).filter(|(a, b)| a != b).count();
        let detail = if mismatches == 0 {
            String::new()
        } else {
            format!("(want {want_ids:?}, got {got_ids:?})")
        };
        self.push(case, "gen_ids", mismatches as f64, 0.0, detail);
        let (want, shape) = self.expect(logits_name)?;
        let steps = want_ids.len();
        let v = *shape.last().unwrap_or(&0);
        let offset = row.map_or(0, |r| r * steps * v);
        let want = want.get(offset..offset + steps * v).unwrap_or(&[]);
        let got_flat: Vec<f32> = got.step_logits.iter().flatten().copied().collect();
        self.push(case, "decode_logits", max_abs_diff(want, &got_flat), tol, String::new());
        Ok(())
    }

    fn batch(&mut self, target: &mut dyn GoldenTarget) -> Result<()> {
        let tol = self.fixture.tolerances.logits;
        let ids = self.expect_ids("batch.input_ids")?;
        let mask = self.expect_ids("batch.attention_mask")?;
        let pos = self.expect_ids("batch.position_ids")?;
        let shape = self.fixture.expected.shape("batch.input_ids")?;
        let (rows, width) = (shape[0], shape[1]);
        // Left padding: each row's real tokens are its masked positions, starting at 0.
        let mut prompts = Vec::new();
        let mut starts = Vec::new();
        for r in 0..rows {
            let row = r * width..(r + 1) * width;
            let first = mask[row.clone()].iter().position(|&m| m == 1).unwrap_or(width);
            if mask[row.start + first..row.end].iter().any(|&m| m != 1)
                || (first < width && pos[row.start + first] != 0)
            {
                return Err(Error::Fixture {
                    path: self.fixture.dir.clone(),
                    reason: format!("batch row {r} is not left-padded with positions starting at 0"),
                });
            }
            let tokens = ids[row.start + first..row.end]
                .iter()
                .map(|&t| u32::try_from(t).unwrap_or(u32::MAX))
                .collect::<Vec<u32>>();
            prompts.push(tokens);
            starts.push(first);
        }

        let (want, wshape) = self.expect("batch.prefill_logits")?;
        let v = wshape[2];
        let got = target.prefill_batch(&prompts)?;
        let mut worst = 0.0f64;
        for r in 0..rows {
            let real = (width - starts[r]) * v;
            let base = (r * width + starts[r]) * v;
            worst = worst.max(max_abs_diff(&want[base..base + real], &got[r]));
        }
        self.push(
            "batch",
            "prefill_logits",
            worst,
            tol,
            format!("({rows} rows, left padding removed)"),
        );

        if self.fixture.has("batch.gen_ids") {
            let gen_ids = self.expect_ids("batch.gen_ids")?;
            let steps = gen_ids.len() / rows;
            let out = target.greedy(&prompts, steps)?;
            for (r, g) in out.iter().enumerate() {
                self.greedy_rows(
                    &format!("batch[{r}]"),
                    &gen_ids[r * steps..(r + 1) * steps],
                    g,
                    "batch.decode_logits",
                    Some(r),
                )?;
            }
        }
        Ok(())
    }
}
