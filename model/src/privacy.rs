//! Differential-privacy noise on hidden-state rows (DESIGN.md §11).
//!
//! The device sends one hidden-state row per token position. Before a row leaves the device
//! (and before any wire compression), the Gaussian mechanism here
//! 1. clips the row to L2 norm `C` (`row *= min(1, C / ‖row‖)`), then
//! 2. adds independent `N(0, σ²)` noise to every value.
//!
//! # Sensitivity and calibration
//! The unit of privacy is one released row. Two neighbouring inputs are two rows of norm at
//! most `C` ("replace one"), so the L2 sensitivity is `Δ = 2C`. (Under add/remove-one, which
//! does not fit a fixed-shape row, it would be `C`; we do not use it.) `σ` is calibrated to a
//! per-row `(ε, δ)` by the **analytic Gaussian mechanism** of Balle & Wang (ICML 2018,
//! Theorem 8): the smallest `σ` with
//! `Φ(Δ/(2σ) − εσ/Δ) − e^ε·Φ(−Δ/(2σ) − εσ/Δ) ≤ δ`, found by bisection. It holds for every
//! `ε > 0` and is never worse than the classic `σ = Δ·sqrt(2 ln(1.25/δ))/ε` (valid only for
//! `ε < 1`), which [`Calibration::Classic`] offers for comparison.
//!
//! # Composition
//! Every row is released once (resends after a reconnect resend the same bytes), and a
//! prompt token influences its own row and every later row (causal attention), so a
//! guarantee about the whole prompt is a composition over all `n` rows sent.
//! [`GaussianMechanism::compose`] reports two bounds, and the smaller holds:
//! - basic composition: `(n·ε, n·δ)`;
//! - zero-concentrated DP: each row is `ρ = Δ²/(2σ²)`-zCDP, `n` rows are `nρ`-zCDP, which is
//!   `(nρ + 2·sqrt(nρ·ln(1/δ_total)), δ_total)`-DP; we state it at `δ_total = n·δ`.
//!
//! # Costs and determinism
//! `O(values)` per row: one norm, one scale, one Gaussian draw per value (Box–Muller over a
//! seeded [`StdRng`]). With the same seed and the same rows the output is the same. With
//! `σ = 0` and rows already inside the clip bound the output is bit-identical to the input:
//! nothing is multiplied or added.
//!
//! `Φ` is computed from a rational `erfc` approximation (relative error below `1.2e-7`), in
//! log space for the tail, so `δ` down to about `1e-12` is resolved.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// How `σ` is derived from `(ε, δ)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Calibration {
    /// Balle & Wang 2018, exact for the Gaussian mechanism, any `ε > 0`.
    #[default]
    Analytic,
    /// `σ = Δ·sqrt(2 ln(1.25/δ))/ε`, the textbook bound; only for `ε < 1`.
    Classic,
}

impl Calibration {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Analytic => "analytic Gaussian mechanism (Balle & Wang 2018)",
            Self::Classic => "classic Gaussian mechanism (Dwork & Roth, eps < 1)",
        }
    }
}

/// A per-row privacy target: clip bound and `(ε, δ)`. `ε = ∞` clips without noise.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpConfig {
    pub epsilon: f64,
    pub delta: f64,
    /// L2 bound `C` on each row.
    pub clip: f32,
    #[serde(default)]
    pub calibration: Calibration,
}

impl DpConfig {
    /// Analytic calibration with the given targets (checked by [`GaussianMechanism::new`]).
    pub fn new(epsilon: f64, delta: f64, clip: f32) -> Self {
        Self {
            epsilon,
            delta,
            clip,
            calibration: Calibration::Analytic,
        }
    }
}

/// The privacy spent by `rows` releases of one mechanism. `None` where infinite.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ComposedBudget {
    pub rows: usize,
    /// Basic composition: `rows·ε`.
    pub basic_epsilon: Option<f64>,
    /// Basic composition: `rows·δ` (capped at 1).
    pub basic_delta: f64,
    /// zCDP parameter `rows·Δ²/(2σ²)`.
    pub zcdp_rho: Option<f64>,
    /// The zCDP bound as `(ε, δ)` at `δ = basic_delta`.
    pub zcdp_epsilon: Option<f64>,
    /// The smaller of the two `ε` bounds, at `δ = basic_delta`.
    pub epsilon: Option<f64>,
}

/// A calibrated clip-and-noise mechanism. Immutable; see [`RowNoiser`] for the RNG.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GaussianMechanism {
    cfg: DpConfig,
    sigma: f64,
}

impl GaussianMechanism {
    /// Checks the targets and calibrates `σ`.
    pub fn new(cfg: DpConfig) -> Result<Self> {
        if !(cfg.clip.is_finite() && cfg.clip > 0.0) {
            return Err(ModelError::Input(format!(
                "the clip norm must be a positive number, got {}",
                cfg.clip
            )));
        }
        if !(cfg.delta > 0.0 && cfg.delta < 1.0) {
            return Err(ModelError::Input(format!(
                "delta must be in (0, 1), got {}",
                cfg.delta
            )));
        }
        if cfg.epsilon.is_nan() || cfg.epsilon <= 0.0 {
            return Err(ModelError::Input(format!(
                "epsilon must be positive (or inf for clipping only), got {}",
                cfg.epsilon
            )));
        }
        let sensitivity = 2.0 * f64::from(cfg.clip);
        let sigma = if cfg.epsilon.is_infinite() {
            0.0
        } else {
            match cfg.calibration {
                Calibration::Analytic => analytic_sigma(cfg.epsilon, cfg.delta, sensitivity),
                Calibration::Classic => {
                    if cfg.epsilon >= 1.0 {
                        return Err(ModelError::Input(format!(
                            "the classic Gaussian mechanism needs epsilon < 1, got {}; use the \
                             analytic calibration",
                            cfg.epsilon
                        )));
                    }
                    classic_sigma(cfg.epsilon, cfg.delta, sensitivity)
                }
            }
        };
        Ok(Self { cfg, sigma })
    }

    pub fn config(&self) -> &DpConfig {
        &self.cfg
    }

    /// Standard deviation of the noise added to each value.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// The clip bound `C`.
    pub fn clip(&self) -> f32 {
        self.cfg.clip
    }

    /// L2 sensitivity of one clipped row under replace-one: `2C`.
    pub fn sensitivity(&self) -> f64 {
        2.0 * f64::from(self.cfg.clip)
    }

    /// The budget spent by releasing `rows` rows.
    pub fn compose(&self, rows: usize) -> ComposedBudget {
        let n = rows as f64;
        let basic_delta = (n * self.cfg.delta).min(1.0);
        if rows == 0 {
            return ComposedBudget {
                rows,
                basic_epsilon: Some(0.0),
                basic_delta: 0.0,
                zcdp_rho: Some(0.0),
                zcdp_epsilon: Some(0.0),
                epsilon: Some(0.0),
            };
        }
        let finite = |x: f64| x.is_finite().then_some(x);
        let basic_epsilon = finite(n * self.cfg.epsilon);
        let rho = if self.sigma > 0.0 {
            Some(n * self.sensitivity().powi(2) / (2.0 * self.sigma * self.sigma))
        } else {
            None
        };
        let zcdp_epsilon = match rho {
            Some(r) if basic_delta < 1.0 => Some(r + 2.0 * (r * (1.0 / basic_delta).ln()).sqrt()),
            _ => None,
        };
        let epsilon = match (basic_epsilon, zcdp_epsilon) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        ComposedBudget {
            rows,
            basic_epsilon,
            basic_delta,
            zcdp_rho: rho,
            zcdp_epsilon,
            epsilon,
        }
    }
}

/// A mechanism and the random stream it draws from, counting what it did.
#[derive(Clone, Debug)]
pub struct RowNoiser {
    mech: GaussianMechanism,
    rng: StdRng,
    rows: usize,
    clipped: usize,
}

impl RowNoiser {
    /// A noiser seeded with `seed`, or from the operating system's entropy when `None`
    /// (what a device should do: a known seed lets the server subtract the noise).
    pub fn new(mech: GaussianMechanism, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self {
            mech,
            rng,
            rows: 0,
            clipped: 0,
        }
    }

    pub fn mechanism(&self) -> &GaussianMechanism {
        &self.mech
    }

    /// Rows noised so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Rows whose norm exceeded the bound so far.
    pub fn clipped(&self) -> usize {
        self.clipped
    }

    /// Clips and noises every row of `values` (`[rows, cols]` row-major).
    pub fn apply(&mut self, values: &mut [f32], cols: usize) -> Result<()> {
        if cols == 0 || !values.len().is_multiple_of(cols) {
            return Err(ModelError::Input(format!(
                "{} values do not form rows of {cols}",
                values.len()
            )));
        }
        for row in values.chunks_exact_mut(cols) {
            if clip_row(row, self.mech.clip()) {
                self.clipped += 1;
            }
            add_gaussian(row, self.mech.sigma(), &mut self.rng);
            self.rows += 1;
        }
        Ok(())
    }
}

/// Scales `row` to L2 norm `clip` when it is longer; answers whether it was. A row inside the
/// bound is left untouched (bit for bit).
pub fn clip_row(row: &mut [f32], clip: f32) -> bool {
    let norm = row
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if norm <= f64::from(clip) {
        return false;
    }
    let scale = (f64::from(clip) / norm) as f32;
    row.iter_mut().for_each(|x| *x *= scale);
    // Rounding can leave the norm a hair above the bound; shrink by an ulp-sized margin.
    let after = row
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if after > f64::from(clip) {
        let s = (f64::from(clip) / after * (1.0 - 1e-6)) as f32;
        row.iter_mut().for_each(|x| *x *= s);
    }
    true
}

/// Adds `N(0, sigma²)` to every value of `row`; nothing at all when `sigma` is 0.
pub fn add_gaussian(row: &mut [f32], sigma: f64, rng: &mut impl Rng) {
    if sigma <= 0.0 {
        return;
    }
    let mut pairs = row.chunks_mut(2);
    for pair in &mut pairs {
        let (a, b) = standard_normal_pair(rng);
        pair[0] += (sigma * a) as f32;
        if let Some(x) = pair.get_mut(1) {
            *x += (sigma * b) as f32;
        }
    }
}

/// Two independent standard normal draws (Box–Muller).
pub fn standard_normal_pair(rng: &mut impl Rng) -> (f64, f64) {
    // 1 - U is in (0, 1], so the log is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    let r = (-2.0 * u1.ln()).sqrt();
    let t = std::f64::consts::TAU * u2;
    (r * t.cos(), r * t.sin())
}

/// `σ = Δ·sqrt(2 ln(1.25/δ))/ε` (Dwork & Roth, Theorem A.1; valid for `ε < 1`).
pub fn classic_sigma(epsilon: f64, delta: f64, sensitivity: f64) -> f64 {
    sensitivity * (2.0 * (1.25 / delta).ln()).sqrt() / epsilon
}

/// The `δ` that noise `σ` gives at `ε` for sensitivity `Δ` (Balle & Wang 2018, Theorem 8).
pub fn analytic_delta(epsilon: f64, sigma: f64, sensitivity: f64) -> f64 {
    let a = sensitivity / (2.0 * sigma);
    let b = epsilon * sigma / sensitivity;
    let first = normal_cdf(a - b);
    let second = (epsilon + log_normal_cdf(-a - b)).exp();
    (first - second).max(0.0)
}

/// The smallest `σ` with `analytic_delta(ε, σ, Δ) ≤ δ`, by bisection in log space.
pub fn analytic_sigma(epsilon: f64, delta: f64, sensitivity: f64) -> f64 {
    // δ(σ) falls as σ grows. Bracket the root, then bisect.
    let mut hi = sensitivity;
    while analytic_delta(epsilon, hi, sensitivity) > delta {
        hi *= 2.0;
    }
    let mut lo = hi / 2.0;
    while lo > 1e-12 * sensitivity && analytic_delta(epsilon, lo, sensitivity) <= delta {
        lo /= 2.0;
    }
    for _ in 0..200 {
        let mid = (lo * hi).sqrt();
        if analytic_delta(epsilon, mid, sensitivity) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi / lo < 1.0 + 1e-12 {
            break;
        }
    }
    hi
}

/// `Φ(x)`, the standard normal CDF.
pub fn normal_cdf(x: f64) -> f64 {
    if x < 0.0 {
        log_normal_cdf(x).exp()
    } else {
        1.0 - log_normal_cdf(-x).exp()
    }
}

/// `ln Φ(x)`; accurate far into the lower tail.
pub fn log_normal_cdf(x: f64) -> f64 {
    let z = -x / std::f64::consts::SQRT_2;
    if z >= 0.0 {
        // Φ(x) = erfc(z) / 2 with z ≥ 0.
        (0.5f64).ln() + log_erfc_nonneg(z)
    } else {
        // Φ(x) = 1 - erfc(-z)/2, close to 1.
        (1.0 - 0.5 * log_erfc_nonneg(-z).exp()).ln()
    }
}

/// `ln erfc(z)` for `z ≥ 0` (the rational Chebyshev fit of Press et al., relative error below
/// `1.2e-7` in `erfc`), without underflow.
fn log_erfc_nonneg(z: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t.ln() + poly
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_known_values() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.0) - 0.841_344_746).abs() < 1e-7);
        assert!((normal_cdf(-1.959_963_985) - 0.025).abs() < 1e-8);
        // Deep tail: Φ(-10) = 7.6198530e-24.
        let tail = normal_cdf(-10.0);
        assert!((tail / 7.619_853_0e-24 - 1.0).abs() < 1e-6, "{tail}");
    }

    #[test]
    fn analytic_is_consistent_and_beats_classic() {
        for &(eps, delta) in &[(0.5, 1e-5), (0.9, 1e-6), (2.0, 1e-5), (20.0, 1e-5)] {
            let s = analytic_sigma(eps, delta, 1.0);
            let got = analytic_delta(eps, s, 1.0);
            assert!(got <= delta * (1.0 + 1e-9), "eps {eps}: delta {got}");
            assert!(
                analytic_delta(eps, s * 0.99, 1.0) > delta,
                "eps {eps}: not minimal"
            );
            if eps < 1.0 {
                assert!(s < classic_sigma(eps, delta, 1.0), "eps {eps}");
            }
        }
    }

    #[test]
    fn analytic_delta_matches_the_privacy_loss_integral() {
        // δ(ε) = E_Z[(1 - e^{ε - L})_+] with the privacy loss L ~ N(η, 2η), η = Δ²/(2σ²):
        // integrate it numerically, independently of the closed form.
        let (eps, sigma, sens) = (1.0f64, 3.0f64, 2.0f64);
        let eta = sens * sens / (2.0 * sigma * sigma);
        let sd = (2.0 * eta).sqrt();
        let (lo, hi, steps) = (eta - 12.0 * sd, eta + 12.0 * sd, 200_000);
        let h = (hi - lo) / steps as f64;
        let mut sum = 0.0;
        for i in 0..=steps {
            let l = lo + i as f64 * h;
            let density =
                (-(l - eta).powi(2) / (2.0 * sd * sd)).exp() / (sd * std::f64::consts::TAU.sqrt());
            let w = if i == 0 || i == steps { 0.5 } else { 1.0 };
            sum += w * density * (1.0 - (eps - l).exp()).max(0.0);
        }
        let numeric = sum * h;
        let closed = analytic_delta(eps, sigma, sens);
        assert!(
            (numeric - closed).abs() < 1e-6 * closed.max(1e-6),
            "{numeric} vs {closed}"
        );
    }

    #[test]
    fn bad_targets_are_refused() {
        assert!(GaussianMechanism::new(DpConfig::new(0.0, 1e-5, 1.0)).is_err());
        assert!(GaussianMechanism::new(DpConfig::new(1.0, 0.0, 1.0)).is_err());
        assert!(GaussianMechanism::new(DpConfig::new(1.0, 1e-5, -1.0)).is_err());
        let classic = DpConfig {
            calibration: Calibration::Classic,
            ..DpConfig::new(2.0, 1e-5, 1.0)
        };
        assert!(GaussianMechanism::new(classic).is_err());
        let inf = GaussianMechanism::new(DpConfig::new(f64::INFINITY, 1e-5, 1.0)).expect("ok");
        assert_eq!(inf.sigma(), 0.0);
    }

    #[test]
    fn composition_takes_the_smaller_bound() {
        let m = GaussianMechanism::new(DpConfig::new(1.0, 1e-6, 1.0)).expect("ok");
        let one = m.compose(1);
        assert_eq!(one.basic_epsilon, Some(1.0));
        let many = m.compose(1000);
        assert!((many.basic_delta - 1e-3).abs() < 1e-12);
        let z = many.zcdp_epsilon.expect("finite");
        assert!(z < 1000.0, "zCDP should beat basic over 1000 rows: {z}");
        assert_eq!(many.epsilon, Some(z));
    }
}
