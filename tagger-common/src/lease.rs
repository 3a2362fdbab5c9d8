//! The datapath lease: how long the programs keep steering without an agent vouching for the
//! maps.
//!
//! The agent renews the lease on every complete reconcile pass and every few seconds between
//! them ([`renew_interval_ns`]). Once the kernel's monotonic clock passes the deadline, the
//! steering hooks leave every Service connection untouched (counted as
//! [`Outcome::LeaseExpired`](crate::Outcome)), so a datapath nobody maintains — agent deleted,
//! crash-looping, or an upgrade that never completed its first pass — falls back to the
//! cluster's own Service implementation instead of overriding it from frozen maps. Sockets
//! already steered keep their reverse translation.
//!
//! Clock: `bpf_ktime_get_ns`, which is `CLOCK_MONOTONIC` in userspace (system-wide, not
//! advanced during suspend; the same in every container that does not use a time namespace).

/// Array of one [`Lease`].
pub const MAP_LEASE: &str = "TAGGER_LEASE_V1";

/// [`Lease::deadline_ns`] of a lease that never expires (`--datapath-lease 0`).
pub const LEASE_NEVER: u64 = u64::MAX;

/// Longest interval between two renewals of an armed lease, ns: the agent renews at least this
/// often, and more often for a short lease (see [`renew_interval_ns`]).
pub const RENEW_INTERVAL_MAX_NS: u64 = 2_000_000_000;

/// Renewals per lease duration, at least: a renewal delayed by one interval (a slow pass)
/// still leaves three quarters of the lease.
pub const RENEWALS_PER_LEASE: u64 = 4;

/// The lease as the agent last wrote it. A fresh map holds zeros: never armed, so the programs
/// steer nothing until an agent has completed a pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    /// `CLOCK_MONOTONIC` ns from which the programs stop steering. 0: never armed;
    /// [`LEASE_NEVER`]: never expires.
    pub deadline_ns: u64,
    /// `CLOCK_MONOTONIC` ns of the last renewal (0: never). For operators only.
    pub renewed_ns: u64,
    /// The duration the agent renews for, ns; 0: the lease never expires. For operators only.
    pub duration_ns: u64,
}

/// What a lease means at one instant (for operators; the programs only compare the deadline).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// No agent has completed a pass on this datapath yet: nothing is steered.
    NeverArmed,
    /// Steering; expires in `remaining_ns` unless renewed.
    Armed {
        /// Time left, ns.
        remaining_ns: u64,
    },
    /// Not renewed in time: nothing is steered since `since_ns` ago.
    Expired {
        /// Time since the deadline, ns.
        since_ns: u64,
    },
    /// `--datapath-lease 0`: steering never expires.
    Disabled,
}

impl Lease {
    /// The lease renewed at `now_ns` for `duration_ns` (0: never expires). Saturates rather
    /// than wrapping, so an absurd duration means "never" rather than "long ago".
    #[must_use]
    pub const fn renewed(now_ns: u64, duration_ns: u64) -> Self {
        let deadline_ns = if duration_ns == 0 { LEASE_NEVER } else { now_ns.saturating_add(duration_ns) };
        Self { deadline_ns, renewed_ns: now_ns, duration_ns }
    }

    /// Whether the programs stop steering at `now_ns`. The whole check the datapath makes.
    #[inline(always)]
    #[must_use]
    pub const fn is_expired(&self, now_ns: u64) -> bool {
        lease_expired(self.deadline_ns, now_ns)
    }

    /// The lease at `now_ns`, for operators.
    #[must_use]
    pub const fn state(&self, now_ns: u64) -> LeaseState {
        if self.deadline_ns == LEASE_NEVER {
            LeaseState::Disabled
        } else if self.deadline_ns == 0 {
            LeaseState::NeverArmed
        } else if self.is_expired(now_ns) {
            LeaseState::Expired { since_ns: now_ns - self.deadline_ns }
        } else {
            LeaseState::Armed { remaining_ns: self.deadline_ns - now_ns }
        }
    }
}

impl LeaseState {
    /// Whether the programs steer in this state.
    #[must_use]
    pub const fn steers(self) -> bool {
        matches!(self, LeaseState::Armed { .. } | LeaseState::Disabled)
    }

    /// Stable snake-case name (CLI JSON): `never_armed`, `armed`, `expired`, `disabled`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            LeaseState::NeverArmed => "never_armed",
            LeaseState::Armed { .. } => "armed",
            LeaseState::Expired { .. } => "expired",
            LeaseState::Disabled => "disabled",
        }
    }
}

/// Whether a lease with `deadline_ns` has run out at `now_ns`: a never-armed lease (0) has,
/// [`LEASE_NEVER`] never does (`bpf_ktime_get_ns` would need 584 years of uptime).
#[inline(always)]
#[must_use]
pub const fn lease_expired(deadline_ns: u64, now_ns: u64) -> bool {
    now_ns >= deadline_ns
}

/// How often the agent renews a lease of `duration_ns`: every [`RENEW_INTERVAL_MAX_NS`], or a
/// [`RENEWALS_PER_LEASE`]th of a shorter lease; 0 (never expires) needs no periodic renewal
/// and gets the longest interval.
#[must_use]
pub const fn renew_interval_ns(duration_ns: u64) -> u64 {
    if duration_ns == 0 {
        return RENEW_INTERVAL_MAX_NS;
    }
    let quarter = duration_ns / RENEWALS_PER_LEASE;
    if quarter < RENEW_INTERVAL_MAX_NS { quarter } else { RENEW_INTERVAL_MAX_NS }
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, three `u64`: every bit pattern is valid, no padding.
unsafe impl aya::Pod for Lease {}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn layout_has_no_padding() {
        assert_eq!(core::mem::size_of::<Lease>(), 24);
    }

    #[test]
    fn a_fresh_map_is_never_armed_and_steers_nothing() {
        let fresh = Lease::default();
        assert!(fresh.is_expired(0));
        assert!(fresh.is_expired(1_000 * S));
        assert_eq!(fresh.state(5 * S), LeaseState::NeverArmed);
        assert!(!LeaseState::NeverArmed.steers());
    }

    #[test]
    fn an_armed_lease_steers_until_its_deadline_and_not_from_it() {
        let l = Lease::renewed(100 * S, 120 * S);
        assert_eq!(l.deadline_ns, 220 * S);
        assert_eq!(l.renewed_ns, 100 * S);
        assert!(!l.is_expired(100 * S));
        assert!(!l.is_expired(220 * S - 1));
        assert!(l.is_expired(220 * S), "the deadline itself is past the lease");
        assert_eq!(l.state(190 * S), LeaseState::Armed { remaining_ns: 30 * S });
        assert_eq!(l.state(250 * S), LeaseState::Expired { since_ns: 30 * S });
        assert!(l.state(190 * S).steers());
        assert!(!l.state(250 * S).steers());
    }

    #[test]
    fn renewing_moves_the_deadline_from_now() {
        let first = Lease::renewed(10 * S, 3 * S);
        assert!(first.is_expired(14 * S));
        let again = Lease::renewed(12 * S, 3 * S);
        assert!(!again.is_expired(14 * S));
        assert_eq!(again.deadline_ns, 15 * S);
    }

    #[test]
    fn zero_never_expires_and_overflow_saturates_to_never() {
        let off = Lease::renewed(7 * S, 0);
        assert_eq!(off.deadline_ns, LEASE_NEVER);
        assert!(!off.is_expired(u64::MAX - 1));
        assert_eq!(off.state(u64::MAX - 1), LeaseState::Disabled);
        assert!(LeaseState::Disabled.steers());
        let huge = Lease::renewed(u64::MAX - S, 2 * S);
        assert_eq!(huge.deadline_ns, LEASE_NEVER);
    }

    #[test]
    fn renewal_interval_is_a_quarter_of_short_leases_and_at_most_two_seconds() {
        assert_eq!(renew_interval_ns(120 * S), 2 * S);
        assert_eq!(renew_interval_ns(8 * S), 2 * S);
        assert_eq!(renew_interval_ns(2 * S), S / 2);
        assert_eq!(renew_interval_ns(S), S / 4);
        assert_eq!(renew_interval_ns(0), 2 * S);
        for d in [S, 2 * S, 3 * S, 60 * S, 120 * S, 3600 * S] {
            assert!(renew_interval_ns(d) * RENEWALS_PER_LEASE <= d, "{d}");
        }
    }

    #[test]
    fn state_names_are_stable() {
        let names = [
            LeaseState::NeverArmed.name(),
            LeaseState::Armed { remaining_ns: 1 }.name(),
            LeaseState::Expired { since_ns: 1 }.name(),
            LeaseState::Disabled.name(),
        ];
        assert_eq!(names, ["never_armed", "armed", "expired", "disabled"]);
    }
}
