//! Histogram buckets that a worker counts into and the coordinator exposes, so both agree on
//! the bounds without sending them.

/// Upper bounds, in microseconds, of the layer dispatch round-trip buckets: from a loopback
/// round trip (~0.25 ms) to a stalled one (1 s).
pub const LAYER_DISPATCH_MICROS: &[u64] = &[
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// The bucket `value` falls in: the first bound at or above it, or `bounds.len()` (+Inf).
pub fn index<T: PartialOrd + Copy>(bounds: &[T], value: T) -> usize {
    bounds.iter().position(|&b| value <= b).unwrap_or(bounds.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_the_last_bucket_is_unbounded() {
        assert_eq!(index(LAYER_DISPATCH_MICROS, 0), 0);
        assert_eq!(index(LAYER_DISPATCH_MICROS, 250), 0);
        assert_eq!(index(LAYER_DISPATCH_MICROS, 251), 1);
        assert_eq!(index(LAYER_DISPATCH_MICROS, 1_000_000), 10);
        assert_eq!(index(LAYER_DISPATCH_MICROS, 1_000_001), 11);
        assert!(LAYER_DISPATCH_MICROS.windows(2).all(|w| w[0] < w[1]));
    }
}
