//! The agent's half of the datapath lease (`tagger_common::lease`): the reconciler arms it at
//! its first complete pass — not before, so an agent (or an upgrade) that never gets that far
//! vouches for nothing — and renews it on every later pass and every few seconds between them.

use std::time::{Duration, Instant};

use tagger_common::{Lease, LeaseState, renew_interval_ns};
use tracing::{info, warn};

use crate::{datapath::Tables, sys::monotonic_now_ns};

/// Default `--datapath-lease` (see the README for the reasoning).
pub const DEFAULT_LEASE: &str = "2m";

/// Shortest lease other than 0 ("never"): a shorter one would expire between two renewals of a
/// busy agent.
pub const MIN_LEASE: Duration = Duration::from_secs(1);

/// Parses `--datapath-lease`: `0` (never expires) or a duration of at least [`MIN_LEASE`] and
/// at most 24 h (`90s`, `2m`, `1h`).
pub fn parse_lease(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let d = crate::config::values::parse_duration(text).map_err(|e| e.to_string())?;
    if !d.is_zero() && d < MIN_LEASE {
        return Err(format!(
            "{text:?} is shorter than {}s: the lease would run out between renewals; use 0 for a lease that never expires",
            MIN_LEASE.as_secs()
        ));
    }
    Ok(d)
}

/// The lease duration in ns, as the datapath stores it (0: never expires).
fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Renews the datapath lease for the reconciler.
#[derive(Debug)]
pub struct LeaseKeeper {
    /// `--datapath-lease` (zero: never expires).
    duration: Duration,
    /// When this agent last wrote the lease (`None`: not armed yet by this agent).
    renewed: Option<Instant>,
    /// Why renewals stopped for good, if they did.
    stopped: Option<String>,
}

impl LeaseKeeper {
    /// A keeper that has armed nothing yet.
    #[must_use]
    pub fn new(duration: Duration) -> Self {
        Self { duration, renewed: None, stopped: None }
    }

    /// Time until the next periodic renewal: `None` until the first complete pass armed the lease
    /// (nothing to renew before that), or once renewals stopped.
    #[must_use]
    pub fn until_due(&self) -> Option<Duration> {
        if self.stopped.is_some() {
            return None;
        }
        let every = Duration::from_nanos(renew_interval_ns(duration_ns(self.duration)));
        self.renewed.map(|at| every.saturating_sub(at.elapsed()))
    }

    /// Arms or renews the lease: `deadline = now + duration`. Logs when it re-arms a lease that
    /// had run out (steering resumes) or arms a fresh one. Nothing once renewals stopped.
    ///
    /// # Errors
    /// The lease map could not be written (counted by the caller as a failed write).
    pub fn renew(&mut self, tables: &mut Tables) -> crate::Result<()> {
        if self.stopped.is_some() {
            return Ok(());
        }
        let now = monotonic_now_ns();
        let before = tables.lease().map(|l| l.state(now));
        tables.set_lease(Lease::renewed(now, duration_ns(self.duration)))?;
        let first = self.renewed.is_none();
        self.renewed = Some(Instant::now());
        let lease = describe(self.duration);
        match before {
            Ok(LeaseState::Expired { since_ns }) => info!(
                expired_for_s = Duration::from_nanos(since_ns).as_secs(),
                lease = %lease,
                "datapath lease re-armed: it had expired {:.1}s ago and nothing was steered since; steering resumes",
                Duration::from_nanos(since_ns).as_secs_f64()
            ),
            Ok(LeaseState::NeverArmed) => {
                info!(lease = %lease, "datapath lease armed: steering starts (a fresh datapath)");
            }
            Ok(state) if first => info!(lease = %lease, previous = state.name(), "datapath lease taken over"),
            Ok(_) => {}
            Err(e) => warn!("reading the datapath lease before renewing it: {e}"),
        }
        Ok(())
    }

    /// Stops renewing for good (the lease then runs out, and steering stops): the links run
    /// programs this agent does not maintain the maps of.
    pub fn stop(&mut self, why: &str) {
        warn!(
            lease = %describe(self.duration),
            "datapath lease no longer renewed: {why}; steering stops when it runs out"
        );
        self.stopped = Some(why.to_owned());
    }
}

/// `--datapath-lease` for logs.
fn describe(d: Duration) -> String {
    if d.is_zero() { "never expires".to_owned() } else { format!("{}s", d.as_secs_f64()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_flag_values() {
        assert_eq!(parse_lease("0"), Ok(Duration::ZERO));
        assert_eq!(parse_lease("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_lease(DEFAULT_LEASE), Ok(Duration::from_mins(2)));
        assert_eq!(parse_lease("2500ms"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_lease("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_lease("500ms").unwrap_err().contains("shorter than 1s"));
        assert!(parse_lease("90").unwrap_err().contains("missing unit"));
        assert!(parse_lease("-5s").unwrap_err().contains("negative"));
        assert!(parse_lease("25h").unwrap_err().contains("24h"));
    }

    #[test]
    fn nothing_is_due_before_the_first_pass_or_after_a_stop() {
        let mut k = LeaseKeeper::new(Duration::from_secs(2));
        assert_eq!(k.until_due(), None);
        k.renewed = Some(Instant::now());
        let due = k.until_due().expect("due once armed");
        assert!(due <= Duration::from_millis(500), "a quarter of a 2 s lease: {due:?}");
        k.stopped = Some("test".into());
        assert_eq!(k.until_due(), None);
    }

    #[test]
    fn a_long_lease_is_renewed_every_two_seconds() {
        let mut k = LeaseKeeper::new(Duration::from_mins(2));
        k.renewed = Some(Instant::now().checked_sub(Duration::from_secs(5)).expect("uptime"));
        assert_eq!(k.until_due(), Some(Duration::ZERO), "overdue");
        k.renewed = Some(Instant::now());
        assert!(k.until_due().expect("armed") > Duration::from_millis(1500));
    }
}
