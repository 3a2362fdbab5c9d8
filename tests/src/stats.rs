//! Statistical assertions for tests that measure shares of real connections.

/// Asserts that `count` of `n` is within `sigmas` binomial standard deviations of `p`.
pub fn assert_binomial(what: &str, count: usize, n: usize, p: f64, sigmas: f64) {
    #[expect(clippy::cast_precision_loss, reason = "test counts")]
    let (count, n) = (count as f64, n as f64);
    let sd = (n * p * (1.0 - p)).sqrt();
    let dev = (count - n * p).abs();
    assert!(
        dev <= sigmas * sd,
        "{what}: {count} of {n} ({:.4}), expected {p:.4} ± {sigmas}σ (σ = {:.4})",
        count / n,
        sd / n
    );
}

/// Share of connections the datapath sends to a backend of warm-up weight `w` (0..=1) when
/// the only other backend is warm: bounded rejection sampling, 8 draws, then uniform (see
/// tagger-ebpf's `shaping::pick_warm`).
#[must_use]
pub fn warm_pick_share(w: f64) -> f64 {
    let tries = 8;
    let q = (1.0 - w) / 2.0;
    (0..tries).map(|k| q.powi(k) * w / 2.0).sum::<f64>() + q.powi(tries) / 2.0
}

/// The mean of [`warm_pick_share`] from `from` to `to` seconds after a backend became ready,
/// for a linear warm-up (aggression 1) of `warmup` seconds from `min` (0..=1): the share a batch
/// of connections spread over that span should show, whatever its duration.
#[must_use]
pub fn mean_linear_warm_share(from: f64, to: f64, warmup: f64, min: f64) -> f64 {
    let steps = 1000;
    (0..steps)
        .map(|i| {
            let t = from + (to - from) * (f64::from(i) + 0.5) / f64::from(steps);
            warm_pick_share((min + (1.0 - min) * t / warmup).min(1.0))
        })
        .sum::<f64>()
        / f64::from(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares() {
        assert!((warm_pick_share(1.0) - 0.5).abs() < 1e-12);
        assert!((warm_pick_share(0.1) - 0.0917).abs() < 1e-3);
        let whole = mean_linear_warm_share(0.0, 4.0, 4.0, 0.1);
        assert!((0.33..0.35).contains(&whole), "{whole}");
        assert!(mean_linear_warm_share(0.0, 0.1, 4.0, 0.1) < 0.11);
        assert!(mean_linear_warm_share(0.0, 400.0, 4.0, 0.1) > 0.49);
    }
}
