//! The outcome of a check: one row per compared quantity, and its plain-text rendering.

use std::path::PathBuf;

use serde::Serialize;

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    pub case: String,
    pub quantity: String,
    /// Max |Δ| for float quantities; number of mismatches for exact ones.
    pub max_abs_diff: f64,
    /// 0 for exact comparisons.
    pub tolerance: f64,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub fixture: PathBuf,
    pub rows: Vec<CheckRow>,
    /// Arrays present in the fixture that this check does not compare, with the reason.
    pub not_checked: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.passed)
    }

    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.passed).count()
    }

    /// A plain-text table.
    pub fn render(&self) -> String {
        let mut s = format!("fixture {}\n", self.fixture.display());
        s += &format!(
            "{:<20} {:<22} {:>12} {:>10}  {}\n",
            "case", "quantity", "max|Δ|", "tolerance", "result"
        );
        for r in &self.rows {
            let (diff, tol) = if r.tolerance == 0.0 {
                (format!("{} off", r.max_abs_diff), "exact".to_string())
            } else {
                (format!("{:.3e}", r.max_abs_diff), format!("{:.1e}", r.tolerance))
            };
            let verdict = if r.passed { "ok" } else { "FAIL" };
            s += &format!(
                "{:<20} {:<22} {:>12} {:>10}  {verdict} {}\n",
                r.case, r.quantity, diff, tol, r.detail
            );
        }
        for n in &self.not_checked {
            s += &format!("not checked: {n}\n");
        }
        s += &format!(
            "{} checks, {} failed: {}\n",
            self.rows.len(),
            self.failures(),
            if self.passed() { "PASS" } else { "FAIL" }
        );
        s
    }
}
