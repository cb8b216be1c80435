//! One seeded draw from softmax(logits / temperature), cut by top-k and top-p, without sorting
//! the vocabulary.
//!
//! The draw walks the candidates in descending logit order (ties: lower id first) and stops
//! where the top-p mass or the uniform number runs out, which is almost always within the first
//! few hundred of a 128k vocabulary. So only a prefix of that order is built: the largest `n`
//! by selection (O(vocab)), sorted (O(n log n)), and `n` grows fourfold while the walk needs
//! more. The order, the probabilities and so the chosen id are those of a full sort; only the
//! normalising sum over the whole vocabulary (no top-k, or one at least the vocabulary) is added
//! in id order instead of logit order (f64: the sums differ by rounding at the 1e-16 level).

use super::SamplingParams;
use crate::rng::SplitMix64;

/// Candidates sorted per round at first; a flat distribution grows it to the whole vocabulary.
const FIRST_PREFIX: usize = 256;

pub(super) fn draw(logits: &[f32], p: &SamplingParams, rng: &mut SplitMix64) -> u32 {
    // Each candidate as one integer whose ascending order is the walk's order: selection and
    // sorting then compare plain u64s (several times faster than comparing through the ids).
    let mut keys: Vec<u64> = logits.iter().enumerate().map(|(id, &l)| key(l, id as u32)).collect();
    let first = *keys.iter().min().expect("a vocabulary of at least one token");
    let max = logits[id_of(first) as usize];
    let weight = |id: u32| (((logits[id as usize] - max) / p.temperature) as f64).exp();
    let total: f64 = if p.top_k > 0 && (p.top_k as usize) < keys.len() {
        // A top-k set is small: sorted whole, summed in order as a full sort would.
        let k = p.top_k as usize;
        keys.select_nth_unstable(k - 1);
        keys.truncate(k);
        keys.sort_unstable();
        keys.iter().map(|&c| weight(id_of(c))).sum()
    } else {
        (0..logits.len() as u32).map(weight).sum()
    };
    let top_p = (p.top_p > 0.0 && p.top_p < 1.0).then_some(p.top_p as f64);
    let u = rng.unit();
    let candidates = keys.len();
    let mut n = FIRST_PREFIX.min(candidates);
    loop {
        let prefix: Vec<u32> = sorted_prefix(&mut keys, n).iter().map(|&c| id_of(c)).collect();
        match walk(&prefix, &weight, total, top_p, u) {
            Walk::Chose(id) => return id,
            // The top-p set ended inside the prefix: the draw is within it, renormalised.
            Walk::Kept(kept) => {
                let kept = &prefix[..kept];
                let kept_total: f64 = kept.iter().map(|&i| weight(i) / total).sum();
                return pick(kept, |i| weight(i) / total / kept_total, u);
            }
            // Every candidate walked and `u` (or the top-p mass) not used up: rounding left a
            // sliver, or NaN weights compared false all along. The reference takes the last
            // candidate then too.
            Walk::Beyond if n == candidates => return *prefix.last().expect("at least one candidate"),
            Walk::Beyond => n = (4 * n).min(candidates),
        }
    }
}

/// Higher logit first (in `f32::total_cmp`'s order), the lower id on a tie, as one ascending
/// integer: the logit's order-preserving bits, inverted, above the id.
fn key(logit: f32, id: u32) -> u64 {
    let bits = logit.to_bits();
    // total_cmp's trick: flip the magnitude bits of negatives so the integers order as floats.
    let ordered = bits ^ ((((bits as i32) >> 31) as u32) >> 1) ^ 0x8000_0000;
    (u64::from(!ordered) << 32) | u64::from(id)
}

fn id_of(key: u64) -> u32 {
    key as u32
}

/// The `n` smallest of `keys`, sorted, at the front of `keys`.
fn sorted_prefix(keys: &mut [u64], n: usize) -> &[u64] {
    if n < keys.len() {
        keys.select_nth_unstable(n - 1);
    }
    keys[..n].sort_unstable();
    &keys[..n]
}

enum Walk {
    Chose(u32),
    /// The top-p set is the first this many of the prefix.
    Kept(usize),
    /// Neither the mass nor `u` ran out within the prefix.
    Beyond,
}

/// Walks the sorted `prefix`: with top-p, to where the mass reaches it; without, to where `u`
/// runs out. As a full walk would, since every earlier candidate is in the prefix.
fn walk(prefix: &[u32], weight: &impl Fn(u32) -> f64, total: f64, top_p: Option<f64>, u: f64) -> Walk {
    match top_p {
        Some(top_p) => {
            let mut acc = 0.0;
            for (k, &id) in prefix.iter().enumerate() {
                acc += weight(id) / total;
                if acc >= top_p {
                    return Walk::Kept(k + 1);
                }
            }
            Walk::Beyond
        }
        None => {
            let mut u = u;
            for &id in prefix {
                let pr = weight(id) / total;
                if u <= pr {
                    return Walk::Chose(id);
                }
                u -= pr;
            }
            Walk::Beyond
        }
    }
}

/// The candidate where `u` runs out walking `ids` with probabilities `prob` (the last one when
/// rounding leaves some over).
fn pick(ids: &[u32], prob: impl Fn(u32) -> f64, mut u: f64) -> u32 {
    for &id in ids {
        let pr = prob(id);
        if u <= pr {
            return id;
        }
        u -= pr;
    }
    *ids.last().expect("at least one candidate")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys order as the walk must: higher logit first in `total_cmp`'s order (so -0.0
    /// after 0.0, infinities and NaNs at the ends), the lower id on a tie.
    #[test]
    fn keys_order_by_descending_logit_then_id() {
        let values = [
            f32::NAN,
            f32::INFINITY,
            3.5,
            1.0,
            1.0,
            0.0,
            -0.0,
            -1e-30,
            -2.0,
            f32::NEG_INFINITY,
            -f32::NAN,
        ];
        let mut ids: Vec<u32> = (0..values.len() as u32).rev().collect();
        ids.sort_by(|&a, &b| values[b as usize].total_cmp(&values[a as usize]).then(a.cmp(&b)));
        let mut keys: Vec<u64> = ids.iter().map(|&i| key(values[i as usize], i)).collect();
        keys.sort_unstable();
        let by_key: Vec<u32> = keys.into_iter().map(id_of).collect();
        assert_eq!(by_key, ids);
        assert_eq!(ids, (0..values.len() as u32).collect::<Vec<_>>());
    }
}
