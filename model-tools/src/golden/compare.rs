//! Element-wise comparison of expected and computed arrays.

/// Count of each expert id (negative ids, "none", are skipped).
pub(super) fn histogram(experts: usize, ids: impl Iterator<Item = i64>) -> Vec<i64> {
    let mut h = vec![0i64; experts];
    ids.filter(|&e| e >= 0).for_each(|e| h[e as usize] += 1);
    h
}

/// Max |a - b|; infinite when the lengths differ or a value is not finite.
pub fn max_abs_diff(want: &[f32], got: &[f32]) -> f64 {
    if want.len() != got.len() {
        return f64::INFINITY;
    }
    want.iter().zip(got).fold(0.0f64, |m, (&a, &b)| {
        let d = (a as f64 - b as f64).abs();
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    })
}

/// Rows whose top-k expert ids differ (as ordered lists; equal sets in another order count as
/// a mismatch of order only when the weights tie, which the fixtures screen out).
pub(super) fn count_topk_mismatches(want: &[i64], got: &[i64], k: usize) -> usize {
    if want.len() != got.len() {
        return want.len().max(got.len()) / k.max(1);
    }
    want.chunks(k).zip(got.chunks(k)).filter(|(a, b)| a != b).count()
}
