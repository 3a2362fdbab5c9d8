//! The datapath half of traffic shaping (tagger-common's `shaping` holds the layouts and the
//! arithmetic): the canary draw, shadow mode and the warm-up weighted pick. Each runs only
//! behind a flag the connect path already holds, so unshaped Services pay nothing.

use aya_ebpf::helpers::generated::{bpf_get_current_cgroup_id, bpf_get_prandom_u32, bpf_ktime_get_ns};
use tagger_common::{
    Backend, BackendSet, CANARY_FULL, LaneTables, Resolution, SHAPE_F_STICKY, SHAPE_F_WARMUP, Service,
    SlotKey, SvcShaping, WarmKey, accepts, resolve_shaped, sticky_draw, warm_weight,
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
        // An unregistered caller is keyed by its own cgroup, so it is still all-in or all-out.
        let pod = if caller.pod != 0 {
            caller.pod
        } else {
            // SAFETY: the helper only reads the current task's cgroup.
            unsafe { bpf_get_current_cgroup_id() }
        };
        sticky_draw(pod, svc.svc_id)
    })
}

/// Whether the caller's decisions are shadow (computed and counted, not applied).
#[inline(always)]
pub fn is_shadow(tables: &Tables, caller: &Caller) -> bool {
    tagger_common::is_shadow(caller.cfg_flags, || tables.lane_policy(caller.lane))
}

/// A pick weighted by warm-up: a random slot is accepted with probability its backend's
/// weight (warm backends have no entry and are accepted at once), at most [`WARM_TRIES`]
/// times. `None` (every candidate declined, or a slot vanished under a replacement): the
/// caller picks uniformly.
#[inline(always)]
pub fn pick_warm(shaping: Option<&SvcShaping>, svc_id: u32, lane: u32, set: &BackendSet) -> Option<Backend> {
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
        let key = SlotKey { svc_id, lane, generation: set.generation, slot: prandom().checked_rem(count)? };
        // SAFETY: BACKEND_SLOTS is BPF_F_NO_PREALLOC; Backend is Copy.
        let backend = (unsafe { BACKEND_SLOTS.get(&key) }).copied()?;
        let warm = WarmKey { svc_id, port: backend.port, _pad: 0, addr: backend.addr };
        // SAFETY: WARM is BPF_F_NO_PREALLOC; the entry is read at once.
        match unsafe { WARM.get(&warm) } {
            None => return Some(backend),
            Some(entry) => {
                if accepts(warm_weight(entry, now), prandom()) {
                    return Some(backend);
                }
            }
        }
    }
    None
}
