//! A small log-linear histogram of microsecond values (latencies).
//!
//! Each client thread owns one and records into it without locks; the main
//! thread merges them at the end. Values below 128 are exact; above, each
//! power of two is split into 64 linear sub-buckets, so a reported quantile is
//! within 1/64 (about 1.6 %) of the true value. The maximum, minimum and mean
//! are exact.

/// Linear sub-buckets per power of two (6 bits of precision).
const SUB_BUCKETS: u64 = 64;
/// Values below this are recorded exactly, one bucket each.
const EXACT_BELOW: u64 = 2 * SUB_BUCKETS;
/// log2 of `EXACT_BELOW`.
const EXACT_BITS: u32 = 7;
/// Buckets needed to cover every `u64`.
const BUCKETS: usize = (EXACT_BELOW + (64 - EXACT_BITS as u64) * SUB_BUCKETS) as usize;

/// Counts of values by log-linear bucket, plus exact count, sum, min and max.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn index(value: u64) -> usize {
        if value < EXACT_BELOW {
            return value as usize;
        }
        let exponent = 63 - value.leading_zeros(); // >= EXACT_BITS
        let shift = exponent - (EXACT_BITS - 1);
        let mantissa = value >> shift; // in [SUB_BUCKETS, 2 * SUB_BUCKETS)
        (EXACT_BELOW + u64::from(exponent - EXACT_BITS) * SUB_BUCKETS + (mantissa - SUB_BUCKETS))
            as usize
    }

    /// The largest value that falls in bucket `index`.
    fn highest_in(index: usize) -> u64 {
        let index = index as u64;
        if index < EXACT_BELOW {
            return index;
        }
        let exponent = (index - EXACT_BELOW) / SUB_BUCKETS + u64::from(EXACT_BITS);
        let mantissa = (index - EXACT_BELOW) % SUB_BUCKETS + SUB_BUCKETS;
        let shift = exponent - u64::from(EXACT_BITS - 1);
        let low = mantissa << shift;
        low.saturating_add((1u64 << shift) - 1)
    }

    /// Records one value.
    #[inline]
    pub fn record(&mut self, value: u64) {
        self.counts[Self::index(value)] += 1;
        self.count += 1;
        self.sum += u128::from(value);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Adds every value recorded in `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += *theirs;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The exact largest value, or 0 when empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The exact smallest value, or 0 when empty.
    pub fn min(&self) -> u64 {
        if self.count == 0 { 0 } else { self.min }
    }

    /// The exact mean, or 0 when empty.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The value at quantile `q` (0..=1): the highest value of the bucket that
    /// holds the rank, capped at the exact maximum; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::highest_in(index).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_u64() {
        let mut previous = None;
        for index in 0..BUCKETS {
            let high = Histogram::highest_in(index);
            assert_eq!(Histogram::index(high), index, "index {index}");
            if let Some(prev) = previous {
                assert_eq!(Histogram::index(prev + 1), index, "gap before {index}");
            }
            previous = Some(high);
        }
        assert_eq!(previous, Some(u64::MAX));
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), 50);
        assert_eq!(h.quantile(0.99), 99);
        assert_eq!(h.quantile(1.0), 100);
        assert_eq!(h.min(), 1);
        assert_eq!(h.max(), 100);
        assert!((h.mean() - 50.5).abs() < 1e-9);
    }

    #[test]
    fn large_values_are_within_relative_error() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        for q in [0.5, 0.9, 0.99, 0.999] {
            let truth = (q * 100_000.0) as u64 * 10;
            let got = h.quantile(q);
            assert!(got >= truth, "q {q}: {got} < {truth}");
            assert!(
                (got - truth) as f64 / truth as f64 <= 1.0 / 64.0,
                "q {q}: {got} vs {truth}"
            );
        }
        assert_eq!(h.quantile(1.0), 1_000_000);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        a.record(5);
        b.record(500);
        b.record(7);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.min(), 5);
        assert_eq!(a.max(), 500);
        assert_eq!(a.quantile(0.5), 7);
        assert_eq!(Histogram::new().quantile(0.5), 0);
    }
}
