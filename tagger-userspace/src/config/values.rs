//! Traffic shaping settings as users write them — warm-up durations and curves, canary
//! weights — parsed and checked, and turned into the datapath's encodings (tagger-common's
//! `shaping`). Pure functions.
//!
//! Syntax (Service annotations and the lanes config share it):
//!
//! ```text
//! tagger.io/canary: "gray=10"              10% of base callers' new connections → lane gray
//! tagger.io/canary: "gray=2.5%, sticky"    per caller pod: 2.5% of pods send all their connections
//! tagger.io/warmup: "60s"                  slow start over 60 s, aggression 1, minimum weight 10%
//! tagger.io/warmup: "2m, aggression=2, min=5%"
//! ```

use std::{fmt, time::Duration};

use tagger_common::{CANARY_FULL, CURVE_POINTS, MAX_WARMUP_NS, WEIGHT_FULL, WarmEntry};

/// Default minimum weight of a backend that just became ready, percent.
pub const DEFAULT_MIN_PERCENT: f64 = 10.0;
/// Default aggression (1: linear).
pub const DEFAULT_AGGRESSION: f64 = 1.0;
/// Largest accepted aggression (the curve is then a step right after the start).
pub const MAX_AGGRESSION: f64 = 100.0;

/// A shaping value that cannot be used; the message names the value and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShapingError(pub String);

fn err(msg: impl fmt::Display) -> ShapingError {
    ShapingError(msg.to_string())
}

/// Slow start settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Warmup {
    /// How long a newly ready backend's weight takes to reach full.
    pub duration: Duration,
    /// Curve, in thousandths: weight grows along `(t / warmup) ^ (1 / aggression)`; 1000
    /// (1) is linear, larger ramps faster at the start.
    pub aggression_milli: u32,
    /// Weight right after becoming ready, basis points of full.
    pub min_bp: u32,
}

impl Warmup {
    /// Settings from a duration, an aggression factor and a minimum weight in percent.
    #[must_use]
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "validated ranges")]
    pub fn new(duration: Duration, aggression: f64, min_percent: f64) -> Self {
        Self {
            duration,
            aggression_milli: (aggression * 1000.0).round() as u32,
            min_bp: (min_percent * 100.0).round() as u32,
        }
    }

    /// The aggression factor.
    #[must_use]
    pub fn aggression(&self) -> f64 {
        f64::from(self.aggression_milli) / 1000.0
    }

    /// The minimum weight, percent.
    #[must_use]
    pub fn min_percent(&self) -> f64 {
        f64::from(self.min_bp) / 100.0
    }

    /// The datapath entry of a backend that became ready at `ready_ns` (kernel monotonic).
    #[must_use]
    pub fn entry(&self, ready_ns: u64) -> WarmEntry {
        WarmEntry {
            ready_ns,
            warmup_ns: u64::try_from(self.duration.as_nanos()).unwrap_or(u64::MAX).min(MAX_WARMUP_NS),
            curve: warm_curve(self.min_percent(), self.aggression()),
            _pad: [0; 3],
        }
    }
}

/// The curve's points: `min + (1 - min) * (i / 16) ^ (1 / aggression)`, out of
/// [`WEIGHT_FULL`], for `i` in `0..=16`.
#[must_use]
pub fn warm_curve(min_percent: f64, aggression: f64) -> [u16; CURVE_POINTS + 1] {
    let min = (min_percent / 100.0).clamp(0.0, 1.0);
    let a = if aggression.is_finite() && aggression > 0.0 { aggression } else { 1.0 };
    let mut curve = [0u16; CURVE_POINTS + 1];
    for (i, c) in curve.iter_mut().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "i <= 16")]
        let x = i as f64 / CURVE_POINTS as f64;
        let w = min + (1.0 - min) * x.powf(1.0 / a);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "w in [0, 1], so the product is in [0, WEIGHT_FULL]"
        )]
        {
            *c = (w * f64::from(WEIGHT_FULL)).round() as u16;
        }
    }
    curve
}

/// A canary split for base callers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Canary {
    /// The canary lane's name.
    pub lane: String,
    /// Share, basis points (0..=10000).
    pub basis_points: u32,
    /// One choice per caller pod rather than per connection.
    pub sticky: bool,
}

/// Parses a duration: a number with a unit (`ms`, `s`, `m`, `h`), or several (`1m30s`).
/// Zero is allowed (no warm-up); negative or unit-less values are not.
pub fn parse_duration(text: &str) -> Result<Duration, ShapingError> {
    let t = text.trim();
    let bad = |why: &str| {
        err(format_args!("duration {text:?}: {why} (e.g. \"30s\", \"2m\", \"1m30s\", \"500ms\")"))
    };
    if t.is_empty() {
        return Err(bad("empty"));
    }
    if t.starts_with('-') {
        return Err(bad("negative"));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return Err(bad("expected a number"));
        }
        let number: f64 = rest[..num_len].parse().map_err(|_| bad("not a number"))?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(bad("missing unit")),
            _ => return Err(bad("unknown unit")),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(number * unit).map_err(|_| bad("out of range"))?;
    }
    if total.as_nanos() > u128::from(MAX_WARMUP_NS) {
        return Err(bad("longer than 24h"));
    }
    Ok(total)
}

/// Parses a percentage in `0..=100` (`10`, `10%`, `2.5`).
pub fn parse_percent(what: &str, text: &str) -> Result<f64, ShapingError> {
    let t = text.trim();
    let n = t.strip_suffix('%').unwrap_or(t).trim();
    let v: f64 =
        n.parse().map_err(|_| err(format_args!("{what} {text:?}: not a percentage (e.g. 10 or 10%)")))?;
    if !v.is_finite() || v < 0.0 {
        return Err(err(format_args!("{what} {text:?}: negative")));
    }
    if v > 100.0 {
        return Err(err(format_args!("{what} {text:?}: more than 100%")));
    }
    Ok(v)
}

/// Parses an aggression factor: a number in `(0, 100]`.
pub fn parse_aggression(text: &str) -> Result<f64, ShapingError> {
    let v: f64 = text.trim().parse().map_err(|_| err(format_args!("aggression {text:?}: not a number")))?;
    if !v.is_finite() || v <= 0.0 || v > MAX_AGGRESSION {
        return Err(err(format_args!(
            "aggression {text:?}: must be greater than 0 and at most {MAX_AGGRESSION}"
        )));
    }
    Ok(v)
}

/// Parses `DURATION[, aggression=A][, min=P%]`. A zero duration is `None` (no warm-up).
pub fn parse_warmup(text: &str) -> Result<Option<Warmup>, ShapingError> {
    let mut parts = text.split(',').map(str::trim);
    let duration = parse_duration(parts.next().unwrap_or(""))?;
    let (mut aggression, mut min) = (DEFAULT_AGGRESSION, DEFAULT_MIN_PERCENT);
    for part in parts {
        match part.split_once('=').map(|(k, v)| (k.trim(), v)) {
            Some(("aggression", v)) => aggression = parse_aggression(v)?,
            Some(("min", v)) => min = parse_percent("warm-up min", v)?,
            _ => {
                return Err(err(format_args!(
                    "warm-up {text:?}: unknown option {part:?} (aggression=, min=)"
                )));
            }
        }
    }
    Ok((!duration.is_zero()).then(|| Warmup::new(duration, aggression, min)))
}

/// Parses `LANE=PERCENT[, sticky]`. The lane must be a valid lane name other than base.
pub fn parse_canary(text: &str) -> Result<Canary, ShapingError> {
    let mut parts = text.split(',').map(str::trim);
    let first = parts.next().unwrap_or("");
    let Some((lane, percent)) = first.split_once('=') else {
        return Err(err(format_args!("canary {text:?}: expected LANE=PERCENT, e.g. gray=10")));
    };
    let lane = lane.trim();
    if lane.is_empty() || lane == "base" {
        return Err(err(format_args!("canary {text:?}: the canary lane must be a lane other than base")));
    }
    crate::config::labels::validate_label_value(lane)
        .map_err(|e| err(format_args!("canary {text:?}: {e}")))?;
    let percent = parse_percent("canary", percent)?;
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "0 <= percent <= 100")]
    let basis_points = ((percent * 100.0).round() as u32).min(CANARY_FULL);
    let mut sticky = false;
    for part in parts {
        match part {
            "sticky" => sticky = true,
            _ => return Err(err(format_args!("canary {text:?}: unknown option {part:?} (sticky)"))),
        }
    }
    Ok(Canary { lane: lane.to_owned(), basis_points, sticky })
}

#[cfg(test)]
mod tests {
    use tagger_common::warm_weight;

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_mins(2)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        for (bad, why) in [
            ("-5s", "negative"),
            ("30", "missing unit"),
            ("", "empty"),
            ("5x", "unknown unit"),
            ("s", "expected a number"),
            ("25h", "longer than 24h"),
            ("1..2s", "not a number"),
        ] {
            let e = parse_duration(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn canaries() {
        assert_eq!(
            parse_canary("gray=10"),
            Ok(Canary { lane: "gray".into(), basis_points: 1000, sticky: false })
        );
        assert_eq!(
            parse_canary(" gray = 2.5% , sticky "),
            Ok(Canary { lane: "gray".into(), basis_points: 250, sticky: true })
        );
        assert_eq!(parse_canary("gray=100").unwrap().basis_points, 10_000);
        assert_eq!(parse_canary("gray=0").unwrap().basis_points, 0);
        for (bad, why) in [
            ("gray=-1", "negative"),
            ("gray=101", "more than 100%"),
            ("gray=ten", "not a percentage"),
            ("gray", "expected LANE=PERCENT"),
            ("base=10", "other than base"),
            ("gr ay=10", "not a valid label value"),
            ("gray=10,stiky", "unknown option"),
        ] {
            let e = parse_canary(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn warmups() {
        let w = parse_warmup("60s").unwrap().unwrap();
        assert_eq!((w.duration, w.aggression(), w.min_percent()), (Duration::from_mins(1), 1.0, 10.0));
        let w = parse_warmup("2m, aggression=2, min=5%").unwrap().unwrap();
        assert_eq!((w.aggression(), w.min_percent()), (2.0, 5.0));
        assert_eq!(parse_warmup("0s"), Ok(None));
        for (bad, why) in [
            ("60s, aggression=0", "greater than 0"),
            ("60s, aggression=-1", "greater than 0"),
            ("60s, min=150%", "more than 100%"),
            ("60s, speed=2", "unknown option"),
            ("soon", "duration"),
        ] {
            let e = parse_warmup(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn curves_follow_the_formula() {
        let linear = warm_curve(10.0, 1.0);
        assert_eq!(u32::from(linear[0]), (WEIGHT_FULL + 5) / 10);
        assert_eq!(u32::from(linear[16]), WEIGHT_FULL);
        assert!(linear.windows(2).all(|w| w[0] <= w[1]));
        let fast = warm_curve(10.0, 3.0);
        // Higher aggression: heavier early on, same ends.
        assert!(fast[2] > linear[2] && fast[0] == linear[0] && fast[16] == linear[16]);
        // The datapath's interpolation stays within 1% of the exact curve between points.
        let w = Warmup::new(Duration::from_secs(16), 2.0, 10.0);
        let e = w.entry(0);
        for ms in (0..16_000u32).step_by(123) {
            let exact = 0.1 + 0.9 * (f64::from(ms) / 16_000.0).powf(0.5);
            let got = f64::from(warm_weight(&e, u64::from(ms) * 1_000_000)) / f64::from(WEIGHT_FULL);
            let tol = if ms < 1000 { 0.08 } else { 0.01 };
            assert!((got - exact).abs() < tol, "{ms} ms: {got} vs {exact}");
        }
    }

    #[test]
    fn percent_and_aggression() {
        assert_eq!(parse_percent("x", "10%"), Ok(10.0));
        assert!(parse_percent("x", "NaN").is_err());
        assert!(parse_aggression("inf").is_err());
        assert_eq!(parse_aggression("1.5"), Ok(1.5));
    }
}
