//! Step pacing: what the engine learns from its own step times, for stall-free batching.
//!
//! [`StepCostFit`] fits `seconds ≈ a + r · rows` over recent steps, with exponentially
//! decaying weights so that it follows the machine (other load, thermal limits) and the
//! workload (context lengths grow). Its `a / r`, the step's fixed cost expressed in rows, is
//! what the scheduler needs to size the prompt chunk that rides along with decodes
//! ([`tandem_scheduler::SchedulerConfig::prefill_slack`]): a step of `d` decodes costs about
//! `r · (d + a / r)`, so `slack · (d + a / r)` more rows lengthen it by `slack`.
//!
//! Costs: O(1) per step, no allocation.

/// A weighted least-squares line through `(rows, seconds)` with decaying weights.
#[derive(Clone, Debug)]
pub(crate) struct StepCostFit {
    /// Weight kept by each older observation per new one, in (0, 1].
    decay: f64,
    w: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
}

/// The fit answers only once its observations' row counts spread this much (standard
/// deviation in rows): from identical steps a slope cannot be told from an intercept.
const MIN_SPREAD_ROWS: f64 = 1.0;
/// An answer needs this much weight (about this many recent steps).
const MIN_WEIGHT: f64 = 3.0;
/// The largest fixed cost reported, in rows (a GPU's flat step time would otherwise give an
/// overhead of thousands of rows, which the batch limits cap anyway).
const MAX_OVERHEAD_ROWS: f64 = 4096.0;

impl StepCostFit {
    /// `decay`: the weight each observation keeps per later one (0.98 remembers about the last
    /// 50 steps). Values outside (0, 1] are clamped into it.
    pub(crate) fn new(decay: f64) -> Self {
        let decay = if decay.is_finite() {
            decay.clamp(1e-3, 1.0)
        } else {
            1.0
        };
        Self {
            decay,
            w: 0.0,
            sx: 0.0,
            sy: 0.0,
            sxx: 0.0,
            sxy: 0.0,
        }
    }

    /// Adds one step: `rows` positions computed in `seconds`. Non-finite or negative times
    /// are ignored.
    pub(crate) fn observe(&mut self, rows: usize, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let (x, y) = (rows as f64, seconds);
        let d = self.decay;
        self.w = self.w * d + 1.0;
        self.sx = self.sx * d + x;
        self.sy = self.sy * d + y;
        self.sxx = self.sxx * d + x * x;
        self.sxy = self.sxy * d + x * y;
    }

    /// `(a, r)`: seconds per step and seconds per row, once the data can tell them apart and
    /// the slope is positive.
    pub(crate) fn line(&self) -> Option<(f64, f64)> {
        if self.w < MIN_WEIGHT {
            return None;
        }
        let mx = self.sx / self.w;
        let my = self.sy / self.w;
        let var = self.sxx / self.w - mx * mx;
        if var < MIN_SPREAD_ROWS * MIN_SPREAD_ROWS {
            return None;
        }
        let r = (self.sxy / self.w - mx * my) / var;
        if !(r.is_finite() && r > 0.0) {
            return None;
        }
        Some((my - r * mx, r))
    }

    /// The step's fixed cost in rows, `a / r`, clamped to `[0, 4096]`; `None` while
    /// [`Self::line`] has no answer.
    pub(crate) fn overhead_rows(&self) -> Option<f64> {
        let (a, r) = self.line()?;
        Some((a / r).clamp(0.0, MAX_OVERHEAD_ROWS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_line_from_exact_points() {
        let mut f = StepCostFit::new(1.0);
        for rows in [1, 16, 64, 20, 300] {
            f.observe(rows, 0.030 + 0.005 * rows as f64);
        }
        let (a, r) = f.line().expect("spread rows");
        assert!((a - 0.030).abs() < 1e-9, "{a}");
        assert!((r - 0.005).abs() < 1e-12, "{r}");
        let o = f.overhead_rows().expect("overhead");
        assert!((o - 6.0).abs() < 1e-6, "{o}");
    }

    #[test]
    fn identical_steps_or_too_few_give_no_answer() {
        let mut f = StepCostFit::new(0.98);
        f.observe(16, 0.1);
        f.observe(64, 0.3);
        assert_eq!(f.line(), None, "two steps are not enough weight");
        let mut g = StepCostFit::new(0.98);
        for _ in 0..50 {
            g.observe(16, 0.1);
        }
        assert_eq!(g.overhead_rows(), None, "no spread in rows");
        g.observe(3, f64::NAN);
        g.observe(17, -1.0);
        assert_eq!(g.overhead_rows(), None, "bad times are ignored");
    }

    #[test]
    fn a_falling_line_gives_no_answer_and_a_flat_one_is_capped() {
        let mut f = StepCostFit::new(1.0);
        for rows in [1, 10, 100] {
            f.observe(rows, 1.0 - 0.001 * rows as f64);
        }
        assert_eq!(f.overhead_rows(), None, "negative slope");
        let mut g = StepCostFit::new(1.0);
        for rows in [1, 10, 100] {
            g.observe(rows, 1.0 + 1e-9 * rows as f64);
        }
        assert_eq!(g.overhead_rows(), Some(MAX_OVERHEAD_ROWS));
    }

    #[test]
    fn decay_follows_a_change_of_machine_speed() {
        let mut f = StepCostFit::new(0.9);
        for i in 0..200 {
            let rows = 1 + (i % 7) * 10;
            f.observe(rows, 0.010 + 0.001 * rows as f64);
        }
        // The machine halves its per-row speed; the fixed cost stays.
        for i in 0..200 {
            let rows = 1 + (i % 7) * 10;
            f.observe(rows, 0.010 + 0.002 * rows as f64);
        }
        let (_, r) = f.line().expect("line");
        assert!((r - 0.002).abs() < 1e-6, "{r}");
        let o = f.overhead_rows().expect("overhead");
        assert!((o - 5.0).abs() < 1e-3, "{o}");
    }
}
