//! Latency percentiles, the same way in every report: samples in milliseconds go into an HDR
//! histogram (`hdrhistogram`) at microsecond resolution with three significant digits, so a
//! reported percentile is within 0.1% of the sample at that nearest rank, whatever the number
//! of samples, in constant memory. The count, mean and max are kept exactly beside it.

use hdrhistogram::Histogram;

/// Significant decimal digits the histogram keeps (values within 0.1%).
const SIGNIFICANT_DIGITS: u8 = 3;

/// A latency distribution in milliseconds.
#[derive(Clone, Debug)]
pub struct Latencies {
    hist: Histogram<u64>,
    sum_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Self {
        let mut hist =
            Histogram::new(SIGNIFICANT_DIGITS).expect("3 significant digits is a valid setting");
        hist.auto(true);
        Self {
            hist,
            sum_ms: 0.0,
            min_ms: f64::INFINITY,
            max_ms: f64::NEG_INFINITY,
        }
    }

    /// The distribution of `samples`; NaNs and infinities are left out, negatives count as 0.
    pub fn of(samples: impl IntoIterator<Item = f64>) -> Self {
        let mut me = Self::new();
        for s in samples {
            me.record_ms(s);
        }
        me
    }

    /// Adds one sample (milliseconds). NaN and infinite samples are ignored.
    pub fn record_ms(&mut self, ms: f64) {
        if !ms.is_finite() {
            return;
        }
        let ms = ms.max(0.0);
        // `record` grows the histogram as needed (`saturating_record` would clamp to its
        // current range instead); beyond what it can grow to, the sample saturates.
        let us = (ms * 1000.0).round() as u64;
        if self.hist.record(us).is_err() {
            self.hist.saturating_record(us);
        }
        self.sum_ms += ms;
        self.min_ms = self.min_ms.min(ms);
        self.max_ms = self.max_ms.max(ms);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The exact mean; `None` without samples.
    pub fn mean_ms(&self) -> Option<f64> {
        (self.count() > 0).then(|| self.sum_ms / self.count() as f64)
    }

    /// The exact largest sample; `None` without samples.
    pub fn max_ms(&self) -> Option<f64> {
        (self.count() > 0).then_some(self.max_ms)
    }

    /// Percentile `p` (0..=100, clamped) by nearest rank: the smallest sample with at least
    /// `p`% of the samples at or below it, within 0.1%; ranks 1 and `n` (p0, p100, and any
    /// `p` that reaches them) are the smallest and largest samples exactly. `None` without
    /// samples.
    pub fn percentile_ms(&self, p: f64) -> Option<f64> {
        if self.count() == 0 {
            return None;
        }
        let p = if p.is_nan() {
            50.0
        } else {
            p.clamp(0.0, 100.0)
        };
        if p == 0.0 {
            return Some(self.min_ms);
        }
        if p == 100.0 {
            return Some(self.max_ms);
        }
        // The rank, as nearest-rank defines it; decimal `p` is not exact in binary (99.9% of
        // 1000 comes out a hair above 999), so a rank within 1e-9 of an integer is that one.
        let n = self.count();
        let rank = ((p / 100.0 * n as f64 - 1e-9).ceil() as u64).clamp(1, n);
        // The first and last ranks are the exact extremes (a p99 of fewer than 100 samples is
        // the maximum itself, not its bucket).
        if rank == 1 {
            return Some(self.min_ms);
        }
        if rank == n {
            return Some(self.max_ms);
        }
        let mut seen = 0;
        for v in self.hist.iter_recorded() {
            seen += v.count_at_value();
            if seen >= rank {
                let us = self.hist.lowest_equivalent(v.value_iterated_to());
                return Some((us as f64 / 1000.0).clamp(self.min_ms, self.max_ms));
            }
        }
        Some(self.max_ms)
    }
}

/// Percentile `p` of `samples` (see [`Latencies::percentile_ms`]); `None` when empty.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    Latencies::of(samples.iter().copied()).percentile_ms(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() <= b.abs() * 1e-3 + 1e-9)
    }

    #[test]
    fn nearest_rank_on_the_textbook_example() {
        // 15, 20, 35, 40, 50 (ms).
        let v = [15.0, 20.0, 35.0, 40.0, 50.0];
        assert!(close(percentile(&v, 5.0), 15.0)); // rank ceil(0.25) = 1
        assert!(close(percentile(&v, 30.0), 20.0)); // rank ceil(1.5) = 2
        assert!(close(percentile(&v, 40.0), 20.0)); // rank 2 exactly
        assert!(close(percentile(&v, 50.0), 35.0)); // rank ceil(2.5) = 3
        assert!(!close(percentile(&v, 50.0), 40.0));
        assert_eq!(percentile(&v, 100.0), Some(50.0)); // p0 and p100 are exact
        assert_eq!(percentile(&v, 0.0), Some(15.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
    }

    #[test]
    fn ranks_at_the_tail_match_the_definition() {
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        for p in [1.0, 50.0, 90.0, 99.0, 100.0] {
            assert!(close(percentile(&hundred, p), p), "p{p}");
        }
        // 1..=1000: p99 is the 990th value, p99.9 the 999th (the case two hand-written
        // implementations used to disagree on).
        let thousand: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert!(close(percentile(&thousand, 99.0), 990.0));
        assert!(close(percentile(&thousand, 99.9), 999.0));
    }

    #[test]
    fn large_and_fractional_values_stay_within_a_tenth_of_a_percent() {
        let xs: Vec<f64> = (0..10_000).map(|i| 0.25 + f64::from(i) * 1.7371).collect();
        let l = Latencies::of(xs.iter().copied());
        assert_eq!(l.count(), 10_000);
        for p in [10.0, 50.0, 90.0, 99.0, 99.9] {
            let rank = (p / 100.0 * 10_000.0_f64 - 1e-9).ceil() as usize;
            let want = xs[rank - 1];
            assert!(
                close(l.percentile_ms(p), want),
                "p{p}: {:?} vs {want}",
                l.percentile_ms(p)
            );
        }
        assert_eq!(l.max_ms(), Some(xs[9_999]));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((l.mean_ms().expect("mean") - mean).abs() < 1e-9);
    }

    #[test]
    fn bad_samples_are_left_out() {
        let l = Latencies::of([f64::NAN, f64::INFINITY, -3.0, 2.0]);
        assert_eq!(l.count(), 2);
        assert_eq!(l.percentile_ms(0.0), Some(0.0));
        assert_eq!(l.percentile_ms(100.0), Some(2.0));
        assert_eq!(Latencies::new().mean_ms(), None);
    }
}
