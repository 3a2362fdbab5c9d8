//! How far a random split's count may stray by chance. When each of `n` requests independently
//! goes one way with probability `p` (nginx's `split_clients` on a random request id, an
//! ingress's canary weight), the number that went that way follows the binomial distribution
//! Binomial(n, p). A check that wants "about 10 %" must accept what chance gives a correct split
//! and still refuse a wrong one; [`Band`] is that acceptance band, with the exact probabilities
//! to say how often either happens.

/// The counts accepted for `n` trials of probability `p`: the mean ± `sigmas` standard
/// deviations, rounded inwards to whole counts.
#[derive(Clone, Debug, PartialEq)]
pub struct Band {
    /// Number of trials (requests).
    pub n: u64,
    /// Probability of a hit per trial.
    pub p: f64,
    /// Half-width of the band in standard deviations.
    pub sigmas: f64,
    /// Lowest accepted count.
    pub lo: u64,
    /// Highest accepted count.
    pub hi: u64,
}

impl Band {
    /// The band mean ± `sigmas`·σ for Binomial(`n`, `p`).
    ///
    /// # Panics
    /// Unless 0 < `p` < 1.
    #[must_use]
    pub fn new(n: u64, p: f64, sigmas: f64) -> Self {
        assert!(p > 0.0 && p < 1.0, "p = {p} is not a probability strictly between 0 and 1");
        let mean = mean(n, p);
        let half = sigmas * sd(n, p);
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "clamped to 0..=n")]
        let (lo, hi) = ((mean - half).ceil().max(0.0) as u64, ((mean + half).floor() as u64).min(n));
        Self { n, p, sigmas, lo, hi }
    }

    /// The expected count, n·p.
    #[must_use]
    pub fn mean(&self) -> f64 {
        mean(self.n, self.p)
    }

    /// The standard deviation, √(n·p·(1−p)).
    #[must_use]
    pub fn sd(&self) -> f64 {
        sd(self.n, self.p)
    }

    /// Whether `count` is accepted.
    #[must_use]
    pub fn contains(&self, count: u64) -> bool {
        (self.lo..=self.hi).contains(&count)
    }

    /// The exact probability that a count drawn from Binomial(n, `q`) lands in the band: with
    /// `q` = `p`, one minus the chance that a correct split fails the check; with another `q`,
    /// the chance that a wrong split passes it.
    #[must_use]
    pub fn probability_inside(&self, q: f64) -> f64 {
        (self.lo..=self.hi).map(|k| pmf(self.n, q, k)).sum()
    }
}

fn mean(n: u64, p: f64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "request counts are far below 2^52")]
    let n = n as f64;
    n * p
}

fn sd(n: u64, p: f64) -> f64 {
    (mean(n, p) * (1.0 - p)).sqrt()
}

/// P(X = k) for X ~ Binomial(n, q), computed in log space (q^n underflows for large n).
fn pmf(n: u64, q: f64, k: u64) -> f64 {
    if !(q > 0.0 && q < 1.0) {
        // A certain outcome: all hits (q = 1) or none (q = 0).
        return if (q >= 1.0 && k == n) || (q <= 0.0 && k == 0) { 1.0 } else { 0.0 };
    }
    #[expect(clippy::cast_precision_loss, reason = "request counts are far below 2^52")]
    let (nf, kf) = (n as f64, k as f64);
    (kf.mul_add(q.ln(), (nf - kf) * (-q).ln_1p()) + ln_choose(n, k)).exp()
}

/// ln C(n, k), summed term by term (n is a request count: a few thousand at most).
fn ln_choose(n: u64, k: u64) -> f64 {
    let k = k.min(n - k);
    #[expect(clippy::cast_precision_loss, reason = "request counts are far below 2^52")]
    (0..k).map(|i| ((n - i) as f64).ln() - ((i + 1) as f64).ln()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenth_of_a_thousand_within_four_sigma() {
        let band = Band::new(1000, 0.1, 4.0);
        assert!((band.mean() - 100.0).abs() < 1e-9);
        assert!((band.sd() - 90f64.sqrt()).abs() < 1e-9);
        // 100 ± 4·9.487 = 62.05 … 137.95, rounded inwards.
        assert_eq!((band.lo, band.hi), (63, 137));
        assert!(band.contains(63) && band.contains(137) && !band.contains(62) && !band.contains(138));
    }

    #[test]
    fn probabilities_are_the_binomial_ones() {
        // Binomial(4, 1/2): P(1 ≤ X ≤ 3) = (4 + 6 + 4) / 16.
        let band = Band { n: 4, p: 0.5, sigmas: 0.0, lo: 1, hi: 3 };
        assert!((band.probability_inside(0.5) - 14.0 / 16.0).abs() < 1e-12);
        // The whole range holds all the probability, also where q^n underflows in linear space.
        let all = Band { n: 5000, p: 0.1, sigmas: 0.0, lo: 0, hi: 5000 };
        assert!((all.probability_inside(0.1) - 1.0).abs() < 1e-9);
        assert!((all.probability_inside(0.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn the_band_passes_a_correct_split_and_refuses_wrong_ones() {
        // Reference values summed independently with log-gamma (Python's math.lgamma).
        let band = Band::new(2000, 0.1, 4.0);
        assert_eq!((band.lo, band.hi), (147, 253));
        let close = |got: f64, want: f64| (got - want).abs() <= want * 1e-6;
        let fails_correct = 1.0 - band.probability_inside(0.1);
        assert!(close(fails_correct, 7.399_995e-5), "{fails_correct}");
        assert!(close(band.probability_inside(0.05), 3.563_087e-6), "a 5 % split passes");
        assert!(close(band.probability_inside(0.15), 1.484_059e-3), "a 15 % split passes");
        let thousand = Band::new(1000, 0.1, 4.0);
        assert!(close(1.0 - thousand.probability_inside(0.1), 9.288_249e-5));
    }
}
