//! The differential-privacy mechanism on hidden-state rows: calibration, clipping, noise
//! scale, determinism, and that zero noise changes nothing.

use tandem_model::privacy::{
    analytic_sigma, classic_sigma, clip_row, Calibration, DpConfig, GaussianMechanism, RowNoiser,
};

fn rows(n: usize, cols: usize, scale: f32) -> Vec<f32> {
    // Deterministic, varied values (some rows long, some short).
    (0..n * cols)
        .map(|i| {
            let r = (i / cols) as f32;
            scale * (1.0 + r % 5.0) * (((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        })
        .collect()
}

fn norm(row: &[f32]) -> f64 {
    row.iter()
        .map(|&x| f64::from(x).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn empirical_noise_std_matches_sigma() {
    // Rows of zeros are inside any clip bound, so what comes out is the noise alone.
    let cfg = DpConfig::new(2.0, 1e-5, 1.5);
    let mech = GaussianMechanism::new(cfg).expect("mechanism");
    let sigma = mech.sigma();
    assert!(sigma > 0.0);
    let (n, cols) = (400, 251); // odd width exercises the unpaired Box–Muller draw
    let mut values = vec![0.0f32; n * cols];
    let mut noiser = RowNoiser::new(mech, Some(7));
    noiser.apply(&mut values, cols).expect("apply");
    assert_eq!(noiser.rows(), n);
    assert_eq!(noiser.clipped(), 0);
    let count = values.len() as f64;
    let mean = values.iter().map(|&x| f64::from(x)).sum::<f64>() / count;
    let var = values
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / (count - 1.0);
    let std = var.sqrt();
    // 100,400 samples: the sample std's relative standard error is 1/sqrt(2N) ≈ 0.22%; allow
    // 1.5% (about 7 standard errors) and a mean within 5 standard errors of 0.
    assert!(
        (std / sigma - 1.0).abs() < 0.015,
        "empirical std {std} vs sigma {sigma}"
    );
    assert!(
        mean.abs() < 5.0 * sigma / count.sqrt(),
        "mean {mean} is not centred"
    );
    // The tails are Gaussian too: about 4.55% of draws beyond 2 sigma.
    let beyond = values
        .iter()
        .filter(|&&x| f64::from(x).abs() > 2.0 * sigma)
        .count() as f64
        / count;
    assert!((beyond - 0.0455).abs() < 0.004, "tail mass {beyond}");
}

#[test]
fn sigma_follows_the_calibration() {
    let clip = 3.0f32;
    let mech = GaussianMechanism::new(DpConfig::new(0.5, 1e-5, clip)).expect("ok");
    assert_eq!(mech.sensitivity(), 6.0);
    assert!((mech.sigma() - analytic_sigma(0.5, 1e-5, 6.0)).abs() < 1e-12);
    let classic = GaussianMechanism::new(DpConfig {
        calibration: Calibration::Classic,
        ..DpConfig::new(0.5, 1e-5, clip)
    })
    .expect("ok");
    assert!((classic.sigma() - classic_sigma(0.5, 1e-5, 6.0)).abs() < 1e-12);
    assert!(mech.sigma() < classic.sigma());
    // Less budget, more noise.
    let tighter = GaussianMechanism::new(DpConfig::new(0.25, 1e-5, clip)).expect("ok");
    assert!(tighter.sigma() > mech.sigma());
}

#[test]
fn clipping_bounds_every_row() {
    let cols = 64;
    let mut values = rows(50, cols, 0.3);
    let clip = 2.0f32;
    let before: Vec<f64> = values.chunks(cols).map(norm).collect();
    assert!(before.iter().any(|&n| n > 2.0) && before.iter().any(|&n| n < 2.0));
    let mut clipped = 0;
    for row in values.chunks_mut(cols) {
        let was = norm(row);
        let direction: Vec<f64> = row.iter().map(|&x| f64::from(x) / was).collect();
        if clip_row(row, clip) {
            clipped += 1;
            // Clipping scales, it does not turn.
            let now = norm(row);
            for (x, d) in row.iter().zip(&direction) {
                assert!((f64::from(*x) / now - d).abs() < 1e-5);
            }
            assert!((now - 2.0).abs() < 1e-4, "clipped to {now}");
        }
        assert!(norm(row) <= f64::from(clip), "norm {} > {clip}", norm(row));
    }
    assert_eq!(clipped, before.iter().filter(|&&n| n > 2.0).count());
}

#[test]
fn clip_only_holds_the_bound_through_the_noiser() {
    let cols = 32;
    let mut values = rows(40, cols, 10.0);
    let mech = GaussianMechanism::new(DpConfig::new(f64::INFINITY, 1e-5, 1.0)).expect("ok");
    let mut noiser = RowNoiser::new(mech, Some(1));
    noiser.apply(&mut values, cols).expect("apply");
    assert!(noiser.clipped() > 0);
    for row in values.chunks(cols) {
        assert!(norm(row) <= 1.0);
    }
}

#[test]
fn zero_noise_inside_the_bound_is_bit_identical() {
    let cols = 48;
    let original = rows(30, cols, 0.5);
    let max_norm = original.chunks(cols).map(norm).fold(0.0, f64::max);
    let mut values = original.clone();
    // ε = ∞: σ = 0; a bound above every row: no clipping. Nothing may change, not even -0.0.
    let mech = GaussianMechanism::new(DpConfig::new(f64::INFINITY, 1e-5, (max_norm * 2.0) as f32))
        .expect("ok");
    assert_eq!(mech.sigma(), 0.0);
    let mut values_with_zero = original.clone();
    values_with_zero[0] = -0.0;
    let mut noiser = RowNoiser::new(mech, Some(3));
    noiser.apply(&mut values, cols).expect("apply");
    noiser.apply(&mut values_with_zero, cols).expect("apply");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&values), bits(&original));
    assert_eq!(values_with_zero[0].to_bits(), (-0.0f32).to_bits());
}

#[test]
fn same_seed_same_noise_other_seed_other_noise() {
    let cols = 16;
    let mech = GaussianMechanism::new(DpConfig::new(1.0, 1e-5, 1.0)).expect("ok");
    let run = |seed| {
        let mut v = rows(8, cols, 0.1);
        RowNoiser::new(mech, Some(seed))
            .apply(&mut v, cols)
            .expect("apply");
        v
    };
    assert_eq!(run(11), run(11));
    assert_ne!(run(11), run(12));
}

#[test]
fn ragged_input_is_refused() {
    let mech = GaussianMechanism::new(DpConfig::new(1.0, 1e-5, 1.0)).expect("ok");
    let mut noiser = RowNoiser::new(mech, Some(0));
    assert!(noiser.apply(&mut [0.0; 5], 2).is_err());
    assert!(noiser.apply(&mut [0.0; 4], 0).is_err());
}
