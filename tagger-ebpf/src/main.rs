//! tagger's datapath: cgroup socket-address programs that steer each new connection (or UDP
//! datagram) from a pod to a Service frontend toward a backend of the pod's lane, and translate
//! the backend's address back to the Service's for `getpeername` and `recvmsg`.
//!
//! Every program is a thin entry calling a `try_*` function. Socket hooks never block traffic on
//! an internal miss: they return "proceed" (1) and count why. The only deliberate refusal is a
//! strict lane or Service without a backend, which returns 0 and the application sees `EPERM`.
#![no_std]
#![no_main]
// Map keys are passed by reference: the helpers take pointers, and copies cost BPF stack.
#![expect(clippy::needless_borrows_for_generic_args, reason = "see above")]
// The program entry signature is fixed by the aya macros: the context arrives by value.
#![expect(clippy::needless_pass_by_value, reason = "see above")]

mod affinity;
mod debug_log;
mod maps;
mod mark;
mod shaping;
mod sockops;

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use tagger_common::{
    BASE_LANE, Backend, FAMILY_V6, FrontendKey, IPPROTO_UDP, LEASE_NEVER, LaneTables, Outcome, RevNatKey,
    RevNatValue, SOCK_F_FELL_BACK, SOCK_F_ROUTED, SlotKey, SockRecord, is_v4_mapped, lease_expired,
    passthrough_edge_counted, shaping_of, svc_is_passthrough, v4_mapped,
};

use crate::{
    debug_log::{Level, NO_CTX},
    maps::{
        BACKEND_SLOTS, CONFIG, CONNS, FRONTENDS, LEASE, PODS, REVNAT, SOCKS, Tables, count, count_edge,
        count_service, count_shadow, insert_revnat,
    },
};

/// Return value that lets the syscall proceed.
const PROCEED: i32 = 1;
/// Return value that fails the syscall with `EPERM`.
const REFUSE: i32 = 0;

/// Which syscall the program is attached to, to decide what it may do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// `connect()`: remembers the socket for `getpeername`.
    Connect,
    /// `sendmsg()` on an unconnected UDP socket: remembers the backend for replies.
    Sendmsg,
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    try_steer(&ctx, false, Hook::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    try_steer(&ctx, true, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    try_steer(&ctx, false, Hook::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    try_steer(&ctx, true, Hook::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    try_reverse(&ctx, false, Peer::Datagram)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    try_reverse(&ctx, true, Peer::Datagram)
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    try_reverse(&ctx, false, Peer::Connected)
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    try_reverse(&ctx, true, Peer::Connected)
}

/// Whose address a reverse-translating hook shows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// `getpeername`: the socket is connected, so its record is in socket storage, or (after a
    /// spill, see [`CONNECT_SPILLED`]) in the reverse table.
    Connected,
    /// `recvmsg`: a connected UDP socket has its record; an unconnected one keys the reverse
    /// table by the datagram's source.
    Datagram,
}

/// Non-zero once a `connect` could not create its socket's storage (memory, or the socket's
/// option-memory limit) and wrote its reverse translation into `TAGGER_RNAT_V1` instead. Until
/// then `getpeername` never looks there: a miss in that table, full and large on a busy node,
/// costs about 450 ns of cache misses, against 50 ns for the whole hook without it, and every
/// `getpeername` of a socket tagger did not steer (Go's `net.Dial` calls it on each connection)
/// would pay it. A global (the object's `.bss`), not a map: it is set once and never cleared,
/// and programs of a newer build start from zero (see docs/ARCHITECTURE.md).
static mut CONNECT_SPILLED: u32 = 0;

/// Reads the user address of the context as four network-order words (IPv4 mapped).
#[inline(always)]
fn user_addr(sa: *mut bpf_sock_addr, v6: bool) -> [u32; 4] {
    // SAFETY: `sa` is the program's context pointer, valid for the whole invocation. The
    // verifier allows 4-byte loads of `user_ip4` and of each `user_ip6[i]`; each read below is
    // exactly one such load.
    unsafe {
        if v6 {
            [
                core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
            ]
        } else {
            v4_mapped(core::ptr::read_volatile(&raw const (*sa).user_ip4))
        }
    }
}

/// Writes an address (IPv4 mapped or IPv6) and port into the context.
#[inline(always)]
fn set_user_addr(sa: *mut bpf_sock_addr, v6: bool, addr: &[u32; 4], port: u16) {
    // SAFETY: context pointer as in `user_addr`; the verifier allows 4-byte stores to
    // `user_ip4`, `user_ip6[i]` and `user_port` in these program types.
    unsafe {
        if v6 {
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], addr[0]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], addr[1]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], addr[2]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], addr[3]);
        } else {
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, addr[3]);
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(port));
    }
}

#[inline(always)]
fn user_port(sa: *mut bpf_sock_addr) -> u16 {
    // SAFETY: context pointer as in `user_addr`; a 4-byte load of `user_port`, whose low 16
    // bits hold the port in network byte order.
    #[expect(clippy::cast_possible_truncation, reason = "the port is the low 16 bits")]
    unsafe {
        core::ptr::read_volatile(&raw const (*sa).user_port) as u16
    }
}

/// The calling task: the lane of the deepest registered pod cgroup among its ancestors (base,
/// with pod 0, when it is in none).
#[inline(always)]
fn find_caller() -> shaping::Caller {
    let mut caller = shaping::Caller { lane: BASE_LANE, pod: 0, cfg_flags: 0 };
    let Some(cfg) = CONFIG.get(0) else {
        return caller;
    };
    caller.cfg_flags = cfg.flags;
    let min = cfg.pod_level_min;
    let mut level = cfg.pod_level_max;
    // Verifier: the loop runs at most MAX_CGROUP_LEVEL + 1 times whatever the map holds.
    let mut budget = tagger_common::MAX_CGROUP_LEVEL + 1;
    while budget > 0 && level >= min && level > 0 {
        budget -= 1;
        #[expect(clippy::cast_possible_wrap, reason = "level <= MAX_CGROUP_LEVEL")]
        // SAFETY: the helper only reads the current task's cgroup; it returns 0 for a level
        // deeper than the task's own.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id != 0 {
            // SAFETY: PODS is a BPF_F_NO_PREALLOC hash map, so a found element is not reused
            // while we read it; PodEntry is Copy.
            if let Some(pod) = unsafe { PODS.get(&id) } {
                caller.lane = pod.lane;
                caller.pod = id;
                return caller;
            }
        }
        level -= 1;
    }
    caller
}

/// Picks a backend from a set, at random; with its slot. A slot that vanished under a concurrent
/// replacement is retried once against the set's current generation.
#[inline(always)]
fn pick(
    tables: &Tables,
    svc_id: u32,
    lane: u32,
    count_in_set: u32,
    generation: u32,
) -> Option<(Backend, u32)> {
    // SAFETY: the helper has no preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    // `checked_rem`: the set is never empty here, but the verifier must not see a panic path.
    let key = SlotKey { svc_id, lane, generation, slot: r.checked_rem(count_in_set)? };
    // SAFETY: BACKEND_SLOTS is BPF_F_NO_PREALLOC; Backend is Copy.
    if let Some(b) = unsafe { BACKEND_SLOTS.get(&key) } {
        return Some((*b, key.slot));
    }
    // The set was replaced since it was read and its old generation's slots are gone (the agent
    // deletes them 250 ms after the swap, or at once when the slots map is full): read it
    // again. A slow reader racing a fast writer may need more than one look.
    for _ in 0..PICK_RETRIES {
        let set = tables.backend_set(svc_id, lane)?;
        let key = SlotKey { svc_id, lane, generation: set.generation, slot: r.checked_rem(set.count)? };
        // SAFETY: as above.
        if let Some(b) = unsafe { BACKEND_SLOTS.get(&key) } {
            return Some((*b, key.slot));
        }
    }
    None
}

/// Re-reads of a backend set replaced while a connection picked from it.
const PICK_RETRIES: u32 = 3;

/// Whether an agent still vouches for the maps: the lease has not run out. Asked only for
/// Service traffic (after the frontend lookup hit), so other connections pay nothing; a lease
/// that never expires costs one array lookup and no clock read.
#[inline(always)]
fn lease_valid() -> bool {
    // An array's index 0 always exists; should the lookup fail anyway, nobody vouches.
    let Some(lease) = LEASE.get(0) else {
        return false;
    };
    let deadline = lease.deadline_ns;
    if deadline == LEASE_NEVER {
        return true;
    }
    // SAFETY: the helper has no preconditions; it reads CLOCK_MONOTONIC, the clock the agent
    // writes the deadline on.
    !lease_expired(deadline, unsafe { bpf_ktime_get_ns() })
}

#[inline(always)]
fn try_steer(ctx: &SockAddrContext, v6: bool, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    let addr = user_addr(sa, v6);
    let port = user_port(sa);
    // SAFETY: context pointer; a 4-byte load of `protocol`, readable in these program types.
    #[expect(clippy::cast_possible_truncation, reason = "IPPROTO_* fit in u8")]
    let proto = unsafe { core::ptr::read_volatile(&raw const (*sa).protocol) } as u8;
    let key = FrontendKey { addr, port, proto, _pad: 0 };
    // SAFETY: FRONTENDS is BPF_F_NO_PREALLOC; Service is Copy.
    let Some(svc) = (unsafe { FRONTENDS.get(&key) }).copied() else {
        count(Outcome::NotService);
        return PROCEED;
    };
    if svc_is_passthrough(&svc) {
        count(Outcome::Passthrough);
        // A lane caller reaching a Service with base backends only: where its lane falls back,
        // counted for the coverage report. Base callers (the everyday case) are not.
        let who = find_caller();
        if passthrough_edge_counted(who.lane) {
            count_edge(who.pod, svc.svc_id, who.lane, BASE_LANE, Outcome::Passthrough);
        }
        log_decision(svc.svc_id, &who, BASE_LANE, Outcome::Passthrough);
        return PROCEED;
    }
    // Before anything else that steers: an expired lease means maps nobody maintains, which
    // must not override the cluster's own Service implementation (fail open, destination
    // untouched). After the passthrough check, which leaves the connection alone anyway: those
    // Services pay no lease check and are not counted as stopped by it.
    if !lease_valid() {
        count(Outcome::LeaseExpired);
        if debug_log::enabled(Level::Debug) {
            lease_record(svc.svc_id);
        }
        return PROCEED;
    }
    let who = find_caller();
    if who.pod == 0 {
        count(Outcome::UnknownPod);
    }
    let caller = who.lane;
    let pod_cgroup = who.pod;
    let tables = Tables;
    let shaping = shaping_of(&tables, &svc);
    let resolution = shaping::resolve(&tables, &svc, &who, shaping.as_ref());
    let (set, lane, outcome) = shaping::decision(&resolution, caller);
    if shaping::is_shadow(&tables, &who) {
        // Counted apart from applied decisions; the destination is left unchanged.
        count_shadow(svc.svc_id, caller, lane, outcome);
        if debug_log::enabled(Level::Debug) {
            shadow_record(svc.svc_id, caller, lane, outcome);
        }
        return PROCEED;
    }
    match outcome {
        Outcome::RefusedStrict => {
            count_decision(&who, svc.svc_id, lane, outcome);
            return REFUSE;
        }
        Outcome::NoBackend => {
            count_decision(&who, svc.svc_id, lane, outcome);
            return PROCEED;
        }
        _ => {}
    }
    // Affinity applies within the resolved lane: the caller's remembered backend while it is
    // still a member of this set (no warm-up draw for it), else a fresh pick.
    let sticky = affinity::Sticky::of(svc, &who, lane);
    // Statements, not `or_else` closures: LLVM may outline a closure (a BPF-to-BPF call per
    // connection) when the hook grows, as the debug log's call sites made it do.
    let mut picked = sticky.as_ref().and_then(|s| s.remembered(&tables, set));
    if picked.is_none() {
        picked = shaping::pick_warm(shaping.as_ref(), svc.svc_id, lane, &set);
    }
    if picked.is_none() {
        picked = pick(&tables, svc.svc_id, lane, set.count, set.generation);
    }
    let Some((backend, slot)) = picked else {
        count(Outcome::SlotMiss);
        log_decision(svc.svc_id, &who, lane, Outcome::SlotMiss);
        return PROCEED;
    };
    // An IPv4 socket cannot reach an IPv6 backend, nor can an IPv6 socket that addressed a
    // mapped IPv4 Service reach one; the reverse cases are equally unreachable.
    let backend_v6 = backend.family == FAMILY_V6;
    if backend_v6 != (v6 && !is_v4_mapped(&addr)) {
        count(Outcome::FamilyMismatch);
        log_decision(svc.svc_id, &who, lane, Outcome::FamilyMismatch);
        return PROCEED;
    }
    set_user_addr(sa, v6, &backend.addr, backend.port);
    if let Some(s) = &sticky {
        s.remember(&backend, slot);
    }
    let record = SockRecord {
        vip: addr,
        backend,
        vport: port,
        proto,
        flags: match outcome {
            Outcome::FellBack => SOCK_F_FELL_BACK,
            Outcome::Routed | Outcome::Canary => SOCK_F_ROUTED,
            _ => 0,
        },
        svc_id: svc.svc_id,
        caller_lane: caller,
        backend_lane: lane,
        _pad: 0,
        pod_cgroup,
    };
    remember(ctx, hook, &record);
    count_decision(&who, svc.svc_id, lane, outcome);
    PROCEED
}

/// Counts an applied decision: globally, per Service and lanes, and as the caller's edge; and
/// logs it.
#[inline(always)]
fn count_decision(who: &shaping::Caller, svc_id: u32, backend_lane: u32, outcome: Outcome) {
    count(outcome);
    count_service(svc_id, who.lane, backend_lane, outcome);
    count_edge(who.pod, svc_id, who.lane, backend_lane, outcome);
    log_decision(svc_id, who, backend_lane, outcome);
}

/// The debug log's record of what became of a connection (or datagram) to a Service frontend
/// once its caller is known (see `debug_log`: nothing when the log is off).
#[inline(always)]
fn log_decision(svc_id: u32, who: &shaping::Caller, backend_lane: u32, outcome: Outcome) {
    if debug_log::enabled(Level::Debug) {
        decision_record(svc_id, who.lane, who.pod, backend_lane, outcome);
    }
}

#[inline(never)]
fn decision_record(svc_id: u32, caller_lane: u32, pod_cgroup: u64, backend_lane: u32, outcome: Outcome) {
    let (caller, backend) = (debug_log::lane_hex(caller_lane), debug_log::lane_hex(backend_lane));
    debug!(
        &NO_CTX,
        "service {}: caller lane 0x{:x} (pod cgroup {}) -> backend lane 0x{:x}: {}",
        svc_id,
        &caller[..],
        pod_cgroup,
        &backend[..],
        outcome.name()
    );
}

/// A decision of shadow mode: counted, never applied.
#[inline(never)]
fn shadow_record(svc_id: u32, caller_lane: u32, backend_lane: u32, outcome: Outcome) {
    let (caller, backend) = (debug_log::lane_hex(caller_lane), debug_log::lane_hex(backend_lane));
    debug!(
        &NO_CTX,
        "service {}: caller lane 0x{:x} -> backend lane 0x{:x}: {} in shadow mode (counted, not applied)",
        svc_id,
        &caller[..],
        &backend[..],
        outcome.name()
    );
}

/// A connection to a steered Service while no agent vouches for the maps.
#[inline(never)]
fn lease_record(svc_id: u32) {
    debug!(&NO_CTX, "service {}: lease_expired, destination left unchanged", svc_id);
}

/// Records what the socket must keep seeing. A connected socket keeps its record in socket
/// storage (freed with the socket; no shared-table insert on the connect path), and a connected
/// UDP socket is tracked at once (TCP is tracked by sockops when established). An unconnected
/// UDP `sendmsg` may address many Services from one socket: keyed by socket and backend in the
/// LRU reverse table.
#[inline(always)]
fn remember(ctx: &SockAddrContext, hook: Hook, record: &SockRecord) {
    if hook == Hook::Connect {
        let mut init = *record;
        // SAFETY: the helper takes the context's socket, valid for the invocation; the returned
        // pointer is this socket's storage (or null) and is written once, at once.
        let stored = unsafe { SOCKS.get_or_insert_ptr_mut(ctx, Some(&mut init)) };
        if !stored.is_null() {
            // A socket connecting again (UDP may) replaces its record.
            // SAFETY: non-null storage of this socket, sized for a SockRecord.
            unsafe { *stored = *record };
            if record.proto == IPPROTO_UDP {
                track_udp(ctx, record);
            }
            return;
        }
        // SAFETY: a 4-byte store to the object's global data; a racing store writes the same
        // value.
        unsafe { core::ptr::write_volatile(&raw mut CONNECT_SPILLED, 1) };
    }
    // SAFETY: `bpf_get_socket_cookie` accepts a sock_addr context and has no other precondition.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = RevNatKey { cookie, addr: record.backend.addr, port: record.backend.port, _pad: [0; 6] };
    let value = RevNatValue { addr: record.vip, port: record.vport, _pad: 0, svc_id: record.svc_id };
    if insert_revnat(&key, &value).is_err() {
        count(Outcome::RevNatFull);
    }
}

/// Tracks a connected UDP socket until it is released (see `sockops::conn_release`).
#[inline(always)]
fn track_udp(ctx: &SockAddrContext, record: &SockRecord) {
    // SAFETY: as in `remember`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = CONNS.insert(&cookie, record, 0);
}

/// `getpeername` and `recvmsg`: show the Service address instead of the backend's.
#[inline(always)]
fn try_reverse(ctx: &SockAddrContext, v6: bool, peer: Peer) -> i32 {
    let sa = ctx.sock_addr;
    let addr = user_addr(sa, v6);
    let port = user_port(sa);
    // SAFETY: no creation (null value, no flags); the pointer is this socket's storage or null,
    // read at once.
    let stored = unsafe { SOCKS.get_ptr_mut(ctx) };
    if !stored.is_null() {
        // SAFETY: non-null storage of this socket; SockRecord is Copy.
        let record = unsafe { *stored };
        if record.backend.addr == addr && record.backend.port == port {
            set_user_addr(sa, v6, &record.vip, record.vport);
            count(Outcome::RevNatApplied);
            return PROCEED;
        }
    }
    // SAFETY: a 4-byte load of the object's global data.
    if peer == Peer::Connected && unsafe { core::ptr::read_volatile(&raw const CONNECT_SPILLED) } == 0 {
        return PROCEED;
    }
    // SAFETY: as in `remember`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = RevNatKey { cookie, addr, port, _pad: [0; 6] };
    // SAFETY: REVNAT is an LRU hash; RevNatValue is Copy and read at once.
    let Some(vip) = (unsafe { REVNAT.get(&key) }).copied() else {
        return PROCEED;
    };
    set_user_addr(sa, v6, &vip.addr, vip.port);
    count(Outcome::RevNatApplied);
    PROCEED
}

// Only for the BPF target: a host build (clippy over the workspace) links std, which has one.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
