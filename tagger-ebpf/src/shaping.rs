//! The datapath half of traffic shaping (tagger-common's `shaping` holds the layouts and the
//! arithmetic): the canary draw, shadow mode and the warm-up weighted pick. Each runs only
//! behind a flag the connect path already holds, so unshaped Services pay nothing.

use aya_ebpf::helpers::generated::{bpf_get_current_cgroup_id, bpf_get_prandom_u32, bpf_ktime_get_ns};
use tagger_common::{
    BASE_LANE, Backend, BackendSet, CANARY_FULL, LaneTables, Outcome, Resolution, SHAPE_F_STICKY,
    SHAPE_F_WARMUP, Service, SlotKey, SvcShaping, WarmKey, accepts, resolve_shaped, sticky_draw, warm_weight,
};

use crate::maps::{BACKEND_SLOTS, Tables, WARM};

/// Candidates drawn by the warm-up pick before it settles for a uniform pick. With `K` tries
/// and mean weight `w̄`, the uniform remainder is `(1 - w̄)^K` of the picks: with one warm and
/// one fresh backend (w̄ >= 0.55) under 0.2%, so shares follow the weights closely.
const WARM_TRIES: u32 = 8;

/// The calling task as the datapath sees it.
#[derive(Clone, Copy)]
pub struct Caller {
    /// Lane id.
    pub lane: u32,
    /// The registered pod cgroup it runs in (0: none, a base caller).
    pub pod: u64,
    /// `DatapathConfig::flags`.
    pub cfg_flags: u32,
}

impl Caller {
    /// The caller as a client: its pod cgroup, or for an unregistered caller its own cgroup,
    /// so that one is still all-in or all-out of a sticky canary and has its own affinity.
    #[inline(always)]
    pub fn identity(&self) -> u64 {
        if self.pod != 0 {
            self.pod
        } else {
            // SAFETY: the helper only reads the current task's cgroup.
            unsafe { bpf_get_current_cgroup_id() }
        }
    }
}

#[inline(always)]
fn prandom() -> u32 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_get_prandom_u32() }
}

/// The lane decision, with the Service's canary share for base callers.
#[inline(always)]
pub fn resolve(tables: &Tables, svc: &Service, caller: &Caller, shaping: Option<&SvcShaping>) -> Resolution {
    resolve_shaped(tables, svc, caller.lane, shaping, |s| {
        if s.flags & SHAPE_F_STICKY == 0 {
            return prandom() % CANARY_FULL;
        }
        sticky_draw(caller.identity(), svc.svc_id)
    })
}

/// Whether the caller's decisions are shadow (computed and counted, not applied).
#[inline(always)]
pub fn is_shadow(tables: &Tables, caller: &Caller) -> bool {
    tagger_common::is_shadow(caller.cfg_flags, || tables.lane_policy(caller.lane))
}

/// What a resolution means for the connection: the set to pick from (empty when there is
/// none), the backend lane ([`BASE_LANE`] when none was chosen) and the outcome. Every field is
/// set on every path: values left undefined on some path are what the verifier rejects once
/// the compiler carries them across a helper call ("!read_ok").
#[inline(always)]
pub fn decision(resolution: &Resolution, caller_lane: u32) -> (BackendSet, u32, Outcome) {
    match *resolution {
        Resolution::Own { set } => (set, caller_lane, Outcome::Steered),
        Resolution::FellBack { lane, set, .. } => (set, lane, Outcome::FellBack),
        Resolution::Routed { lane, set, .. } => (set, lane, Outcome::Routed),
        Resolution::Canary { lane, set } => (set, lane, Outcome::Canary),
        Resolution::RefusedStrict => (BackendSet::default(), BASE_LANE, Outcome::RefusedStrict),
        Resolution::NoBackend => (BackendSet::default(), BASE_LANE, Outcome::NoBackend),
    }
}

/// A pick weighted by warm-up: a random slot is accepted with probability its backend's
/// weight (warm backends have no entry and are accepted at once), at most [`WARM_TRIES`]
/// times; with its slot. `None` (every candidate declined, or a slot vanished under a replacement): the
/// caller picks uniformly.
#[inline(always)]
pub fn pick_warm(
    shaping: Option<&SvcShaping>,
    svc_id: u32,
    lane: u32,
    set: &BackendSet,
) -> Option<(Backend, u32)> {
    if !matches!(shaping, Some(s) if s.flags & SHAPE_F_WARMUP != 0) {
        return None;
    }
    let count = set.count;
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // Verifier: at most WARM_TRIES iterations, whatever the maps hold.
    let mut tries = 0;
    while tries < WARM_TRIES {
        tries += 1;
        // `checked_rem`: no division-by-zero panic path for the verifier to reject.
        let slot = prandom().checked_rem(count)?;
        let key = SlotKey { svc_id, lane, generation: set.generation, slot };
        // SAFETY: BACKEND_SLOTS is BPF_F_NO_PREALLOC; Backend is Copy.
        let backend = (unsafe { BACKEND_SLOTS.get(&key) }).copied()?;
        let warm = WarmKey { svc_id, port: backend.port, _pad: 0, addr: backend.addr };
        // SAFETY: WARM is BPF_F_NO_PREALLOC; the entry is read at once.
        match unsafe { WARM.get(&warm) } {
            None => return Some((backend, slot)),
            Some(entry) => {
                if accepts(warm_weight(entry, now), prandom()) {
                    return Some((backend, slot));
                }
            }
        }
    }
    None
}
