//! Traffic shaping at connect time: canary weight (sticky or not), routing rules, warm-up
//! (slow start) and shadow mode. Map names, layouts and the integer arithmetic that both the
//! kernel programs and the CLI's `explain` run.
//!
//! Cost: every feature hangs off a bit that is already in hand on the fast path — a
//! [`Service::flags`](crate::Service) bit ([`SVC_F_SHAPED`], [`SVC_F_ROUTED`]) or a
//! [`DatapathConfig::flags`](crate::DatapathConfig) bit ([`CFG_F_SHADOW`],
//! [`CFG_F_SHADOW_LANES`]) — so a Service that uses none of them costs no extra map lookup.

use crate::{BASE_LANE, BackendSet, LanePolicy};

/// svc_id (`u32`) → [`SvcShaping`]; read only for frontends with [`SVC_F_SHAPED`].
pub const MAP_SHAPING: &str = "TAGGER_SHAPE_V1";
/// [`RouteKey`] → [`LanePolicy`]: a routing rule's target chain for (Service, caller lane);
/// read only for frontends with [`SVC_F_ROUTED`].
pub const MAP_ROUTES: &str = "TAGGER_ROUTE_V1";
/// [`WarmKey`] → [`WarmEntry`]: backends still warming up; read only for Services whose
/// [`SvcShaping`] has [`SHAPE_F_WARMUP`].
pub const MAP_WARM: &str = "TAGGER_WARM_V1";

/// Capacity of [`MAP_ROUTES`].
pub const MAX_ROUTES: u32 = 65_536;
/// Capacity of [`MAP_WARM`]: backends warming at the same time, node-wide.
pub const MAX_WARM: u32 = 65_536;

/// `Service::flags`: the Service has a [`SvcShaping`] entry (canary and/or warm-up).
pub const SVC_F_SHAPED: u32 = 1 << 1;
/// `Service::flags`: some caller lane has a routing rule for this Service in [`MAP_ROUTES`].
pub const SVC_F_ROUTED: u32 = 1 << 2;

/// `LanePolicy::flags`: callers of this lane are in shadow mode (needs
/// [`CFG_F_SHADOW_LANES`] to be looked at).
pub const LANE_F_SHADOW: u32 = 1 << 1;

/// `DatapathConfig::flags`: every decision is shadow (computed and counted, not applied).
pub const CFG_F_SHADOW: u32 = 1 << 0;
/// `DatapathConfig::flags`: some lane has [`LANE_F_SHADOW`]; the caller lane's policy is read.
pub const CFG_F_SHADOW_LANES: u32 = 1 << 1;

/// Global counters: a shadow decision of outcome `o` is counted at `SHADOW_OFFSET + o`.
pub const SHADOW_OFFSET: u32 = 16;
/// Statistics rows: `StatKey::outcome` of a shadow decision carries this bit.
pub const STAT_F_SHADOW: u32 = 1 << 8;

/// `SvcShaping::flags`: a canary share of base callers goes to `canary_lane`.
pub const SHAPE_F_CANARY: u32 = 1 << 0;
/// `SvcShaping::flags`: the canary choice is a function of the caller pod, not of the
/// connection.
pub const SHAPE_F_STICKY: u32 = 1 << 1;
/// `SvcShaping::flags`: some backends may be warming up; look them up in [`MAP_WARM`].
pub const SHAPE_F_WARMUP: u32 = 1 << 2;

/// A canary weight of 100%, in basis points.
pub const CANARY_FULL: u32 = 10_000;

/// A Service's shaping settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcShaping {
    /// `SHAPE_F_*` bits.
    pub flags: u32,
    /// Lane id of the canary backends.
    pub canary_lane: u32,
    /// Share of base callers' connections sent to the canary lane, basis points (0..=10000).
    pub canary_bp: u32,
    /// Zero.
    pub _pad: u32,
}

/// A routing rule's key: (Service frontend, caller lane).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    /// `Service::svc_id`.
    pub svc_id: u32,
    /// Lane id of the caller.
    pub caller_lane: u32,
}

/// A warming backend of one Service frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WarmKey {
    /// `Service::svc_id`.
    pub svc_id: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// Zero.
    pub _pad: u16,
    /// Backend address, network order words (IPv4 mapped).
    pub addr: [u32; 4],
}

/// Points of a warm-up curve, besides its start.
pub const CURVE_POINTS: usize = 16;
/// Full weight: a warm backend, accepted at once.
pub const WEIGHT_FULL: u32 = 1 << 15;

/// When a backend became ready and how its weight grows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WarmEntry {
    /// When the backend became ready, kernel monotonic clock (`bpf_ktime_get_ns`,
    /// `CLOCK_MONOTONIC`), nanoseconds.
    pub ready_ns: u64,
    /// Warm-up duration, nanoseconds (at most [`MAX_WARMUP_NS`]).
    pub warmup_ns: u64,
    /// The weight (out of [`WEIGHT_FULL`]) at `ready + i * warmup / 16`, non-decreasing;
    /// linearly interpolated in between.
    pub curve: [u16; CURVE_POINTS + 1],
    /// Zero.
    pub _pad: [u16; 3],
}

/// Longest warm-up: keeps the interpolation's products within 64 bits.
pub const MAX_WARMUP_NS: u64 = 24 * 3600 * 1_000_000_000;

/// The weight (out of [`WEIGHT_FULL`]) of a warming backend at `now_ns`: the curve
/// interpolated at `now - ready`; full once the warm-up is over. Integer arithmetic only.
#[inline(always)]
#[must_use]
pub fn warm_weight(entry: &WarmEntry, now_ns: u64) -> u32 {
    let warmup = entry.warmup_ns;
    if warmup == 0 || warmup > MAX_WARMUP_NS {
        return WEIGHT_FULL;
    }
    // A ready time ahead of the clock (a skewed conversion) counts as just ready.
    let elapsed = now_ns.saturating_sub(entry.ready_ns);
    if elapsed >= warmup {
        return WEIGHT_FULL;
    }
    // elapsed < warmup <= 24 h: elapsed * 16 and rem * 65536 stay below 2^63.
    let scaled = elapsed * CURVE_POINTS as u64;
    let idx = scaled / warmup;
    let frac = (scaled % warmup) * 65_536 / warmup;
    // Verifier: idx < CURVE_POINTS makes both curve indexes provably in bounds.
    if idx >= CURVE_POINTS as u64 {
        return WEIGHT_FULL;
    }
    #[expect(clippy::cast_possible_truncation, reason = "idx < CURVE_POINTS")]
    let idx = idx as usize;
    let lo = u64::from(entry.curve[idx]);
    let hi = u64::from(entry.curve[idx + 1]);
    let w = if hi > lo { lo + (((hi - lo) * frac) >> 16) } else { lo };
    #[expect(clippy::cast_possible_truncation, reason = "w <= u16::MAX")]
    let w = w as u32;
    if w > WEIGHT_FULL { WEIGHT_FULL } else { w }
}

/// Whether a draw (uniform in `0..2^32`) accepts a candidate of weight `w`.
#[inline(always)]
#[must_use]
pub const fn accepts(weight: u32, draw: u32) -> bool {
    (draw & (WEIGHT_FULL - 1)) < weight
}

/// A caller pod's stable position in `0..10000` for a Service's sticky canary: a 64-bit mix
/// (splitmix64's finaliser) of the pod cgroup id and the svc_id.
#[inline(always)]
#[must_use]
pub const fn sticky_draw(pod_cgroup: u64, svc_id: u32) -> u32 {
    let mut z = pod_cgroup ^ ((svc_id as u64) << 32 | svc_id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    #[expect(clippy::cast_possible_truncation, reason = "below CANARY_FULL")]
    {
        (z % CANARY_FULL as u64) as u32
    }
}

/// Whether a base caller's connection (or pod, when sticky) with `draw` in `0..10000` is in
/// the canary share.
#[inline(always)]
#[must_use]
pub const fn in_canary(shaping: &SvcShaping, draw: u32) -> bool {
    shaping.flags & SHAPE_F_CANARY != 0 && draw < shaping.canary_bp
}

/// The canary decision for a base caller: the canary lane and its set when the draw falls in
/// the share and the lane has ready backends (none: the connection goes the default way).
#[inline(always)]
pub fn canary_set<T: crate::LaneTables>(
    tables: &T,
    svc_id: u32,
    shaping: &SvcShaping,
    caller_lane: u32,
    draw: u32,
) -> Option<(u32, BackendSet)> {
    if caller_lane != BASE_LANE || !in_canary(shaping, draw) {
        return None;
    }
    match tables.backend_set(svc_id, shaping.canary_lane) {
        Some(set) if set.count > 0 => Some((shaping.canary_lane, set)),
        _ => None,
    }
}

/// Whether a caller is in shadow mode, given the config flags and (looked up only when
/// [`CFG_F_SHADOW_LANES`] is set) its lane policy.
#[inline(always)]
pub fn is_shadow(cfg_flags: u32, lane_policy: impl FnOnce() -> Option<LanePolicy>) -> bool {
    if cfg_flags & CFG_F_SHADOW != 0 {
        return true;
    }
    cfg_flags & CFG_F_SHADOW_LANES != 0 && matches!(lane_policy(), Some(p) if p.flags & LANE_F_SHADOW != 0)
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY (all impls below): `#[repr(C)]`, `Copy`, integers and integer arrays only, with
    // explicit padding fields, so every bit pattern is valid and no implicit padding exists.
    unsafe impl aya::Pod for super::SvcShaping {}
    unsafe impl aya::Pod for super::RouteKey {}
    unsafe impl aya::Pod for super::WarmKey {}
    unsafe impl aya::Pod for super::WarmEntry {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::mem::size_of;

    use super::*;

    fn linear(min: u16) -> WarmEntry {
        let mut curve = [0u16; CURVE_POINTS + 1];
        for (i, c) in curve.iter_mut().enumerate() {
            let full = WEIGHT_FULL as usize;
            *c = u16::try_from(min as usize + (full - min as usize) * i / CURVE_POINTS).unwrap();
        }
        WarmEntry { ready_ns: 1_000, warmup_ns: 16_000, curve, _pad: [0; 3] }
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<SvcShaping>(), 16);
        assert_eq!(size_of::<RouteKey>(), 8);
        assert_eq!(size_of::<WarmKey>(), 24);
        assert_eq!(size_of::<WarmEntry>(), 16 + 2 * (CURVE_POINTS + 1) + 6);
    }

    #[test]
    fn warm_weight_interpolates_and_saturates() {
        let e = linear(3277);
        assert_eq!(warm_weight(&e, 0), 3277, "before ready: minimum");
        assert_eq!(warm_weight(&e, 1_000), 3277);
        assert_eq!(warm_weight(&e, 1_000 + 8_000), e.curve[8].into());
        // Half-way between points 0 and 1.
        let mid = warm_weight(&e, 1_000 + 500);
        assert!((i64::from(mid) - i64::from(u16::midpoint(e.curve[0], e.curve[1]))).abs() <= 1, "{mid}");
        assert_eq!(warm_weight(&e, 17_000), WEIGHT_FULL);
        assert_eq!(warm_weight(&e, u64::MAX), WEIGHT_FULL);
        let mut prev = 0;
        for t in (0..20_000).step_by(37) {
            let w = warm_weight(&e, t);
            assert!(w >= prev && w <= WEIGHT_FULL, "monotonic at {t}");
            prev = w;
        }
        let off = WarmEntry { warmup_ns: 0, ..e };
        assert_eq!(warm_weight(&off, 1_000), WEIGHT_FULL);
    }

    #[test]
    fn long_warmups_do_not_overflow() {
        let mut e = linear(0);
        e.warmup_ns = MAX_WARMUP_NS;
        e.ready_ns = 0;
        let w = warm_weight(&e, MAX_WARMUP_NS - 1);
        assert!(w >= WEIGHT_FULL - 3, "{w}");
        assert_eq!(warm_weight(&e, MAX_WARMUP_NS / 2), u32::from(e.curve[8]));
    }

    #[test]
    fn accepts_with_probability_weight() {
        let n = 1u32 << 16;
        let hits = (0..n).filter(|d| accepts(WEIGHT_FULL / 4, d.wrapping_mul(0x9e37_79b9))).count();
        assert_eq!(hits, (n / 4) as usize);
        assert!(accepts(WEIGHT_FULL, u32::MAX));
        assert!(!accepts(0, 0));
    }

    #[test]
    fn sticky_draw_is_stable_and_uniform() {
        assert_eq!(sticky_draw(12345, 7), sticky_draw(12345, 7));
        // Consecutive cgroup ids (inode numbers are) spread evenly over 0..10000.
        let n = 20_000u64;
        let below = (0..n).filter(|i| sticky_draw(4000 + i, 7) < 1000).count();
        // 10% of 20,000 = 2000, within 10%.
        assert!((1800..=2200).contains(&below), "{below}");
        assert!((0..n).all(|i| sticky_draw(i, 3) < CANARY_FULL));
    }

    #[test]
    fn shadow_flags() {
        let shadow_lane = LanePolicy { flags: LANE_F_SHADOW, ..LanePolicy::default() };
        assert!(is_shadow(CFG_F_SHADOW, || panic!("not looked up")));
        assert!(!is_shadow(0, || panic!("not looked up")));
        assert!(is_shadow(CFG_F_SHADOW_LANES, || Some(shadow_lane)));
        assert!(!is_shadow(CFG_F_SHADOW_LANES, || Some(LanePolicy::default())));
        assert!(!is_shadow(CFG_F_SHADOW_LANES, || None));
    }
}
