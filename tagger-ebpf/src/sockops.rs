//! Connection tracking. The connect hook leaves a [`SockRecord`] in socket storage; a TCP
//! connection is tracked (copied into `CONNS` by socket cookie) once established and forgotten
//! when it reaches `TCP_CLOSE`; a connected UDP socket is tracked by the connect hook and
//! forgotten when the socket is released. Userspace reads `CONNS` for the active-connection
//! gauges and to reset connections to backends that left their set.
//!
//! On the SYN of a steered TCP connection, `conn_track` also writes the lane option
//! (`tagger_common::wire`): the caller's lane id and whether the connection fell back.
//!
//! The passive side: every listener opened in a pod cgroup keeps the SYN of the connections it
//! accepts (`TCP_SAVE_SYN`, set when `listen()` runs); once such a connection is established on
//! a local pod's address (`POD_ADDRS`), its SYN's lane option is read and the connection is
//! counted in `INBOUND` by (pod address, caller lane, pod lane, kind: in lane, fell back, lane
//! leak, untagged, or unknown lane: an id that is no known lane, counted without its id).
//!
//! Neither program ever refuses a connection: they return "proceed" (1) whatever happens.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::generated::{
        bpf_get_socket_cookie, bpf_load_hdr_opt, bpf_reserve_hdr_opt, bpf_setsockopt, bpf_sk_storage_get,
        bpf_store_hdr_opt,
    },
    macros::{cgroup_sock, sock_ops},
    programs::{SockContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use tagger_common::{
    IPPROTO_UDP, InboundKey, Outcome, SOCK_F_FELL_BACK, SOCK_F_ROUTED, SockRecord, inbound_kind_name,
    inbound_row, v4_mapped,
    wire::{
        LANE_OPT_EXID, LANE_OPT_F_FELL_BACK, LANE_OPT_F_ROUTED, LANE_OPT_KIND, LANE_OPT_LEN,
        decode_lane_option, encode_lane_option,
    },
};

use crate::{
    debug_log::{self, Level, NO_CTX},
    maps::{CONNS, INBOUND, LANE_NAMES, POD_ADDRS, count, socks_ptr},
};

/// `SOL_TCP`.
const SOL_TCP: i32 = 6;
/// `TCP_SAVE_SYN`.
const TCP_SAVE_SYN: i32 = 27;
/// `AF_INET6`.
const AF_INET6: u32 = 10;
/// `BPF_LOAD_HDR_OPT_TCP_SYN`: search the saved SYN, not the current packet.
const LOAD_FROM_SYN: u64 = 1;
/// `ENOENT`: no SYN was saved for this connection.
const ENOENT: i64 = 2;

#[sock_ops]
pub fn conn_track(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        // A steered socket sends its SYN: ask for the header-option callbacks.
        BPF_SOCK_OPS_TCP_CONNECT_CB if !record_of(&ctx).is_null() => {
            #[expect(clippy::cast_possible_wrap, reason = "small flag bits")]
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB if is_syn(&ctx) => {
            // SAFETY: the helper takes this program's context.
            let _ = unsafe { bpf_reserve_hdr_opt(ctx.ops, u32::from(LANE_OPT_LEN), 0) };
        }
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB if is_syn(&ctx) => write_lane_option(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => save_syns(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => count_inbound(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // SAFETY: `bpf_get_socket_cookie` accepts a sock_ops context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = CONNS.remove(&cookie);
        }
        _ => {}
    }
    1
}

/// The socket's steering record, or null when the connect hook did not steer it.
#[inline(always)]
fn record_of(ctx: &SockOpsContext) -> *mut SockRecord {
    // SAFETY: `sk` is a context field the verifier lets sock_ops programs read; it may be null.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return core::ptr::null_mut();
    }
    // SAFETY: lookup only (null value, no flags) of this socket's storage.
    unsafe { bpf_sk_storage_get(socks_ptr(), sk.cast(), core::ptr::null_mut(), 0) }.cast::<SockRecord>()
}

/// Whether the packet being built is a SYN (the option goes on the SYN only).
#[inline(always)]
fn is_syn(ctx: &SockOpsContext) -> bool {
    // SAFETY: `skb_tcp_flags` is a context field readable in the header-option callbacks.
    let flags = unsafe { (*ctx.ops).skb_tcp_flags };
    flags & 0x02 != 0
}

/// Writes the lane option (see `tagger_common::wire`) into the SYN's reserved space.
#[inline(always)]
fn write_lane_option(ctx: &SockOpsContext) {
    let record = record_of(ctx);
    if record.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket; SockRecord is Copy.
    let record = unsafe { *record };
    let mut flags = 0;
    if record.flags & SOCK_F_FELL_BACK != 0 {
        flags |= LANE_OPT_F_FELL_BACK;
    }
    if record.flags & SOCK_F_ROUTED != 0 {
        flags |= LANE_OPT_F_ROUTED;
    }
    let opt = encode_lane_option(record.caller_lane, flags);
    // SAFETY: the helper copies `LANE_OPT_LEN` bytes from this stack buffer of that size.
    let _ = unsafe { bpf_store_hdr_opt(ctx.ops, opt.as_ptr().cast(), u32::from(LANE_OPT_LEN), 0) };
}

/// An active connection is established: track it if the connect hook steered it, and stop the
/// header-option callbacks (the option is on the SYN only).
#[inline(always)]
fn established(ctx: &SockOpsContext) {
    let record = record_of(ctx);
    if record.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket; SockRecord is Copy.
    let record = unsafe { *record };
    // SAFETY: as in `conn_track`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut flags = ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
    if CONNS.insert(&cookie, &record, 0).is_ok() {
        flags |= BPF_SOCK_OPS_STATE_CB_FLAG;
    }
    #[expect(clippy::cast_possible_wrap, reason = "small flag bits")]
    let _ = ctx.set_cb_flags(flags as i32);
}

/// A socket starts listening: keep the SYN of each connection it accepts, so that the lane
/// option can be read once the connection is established.
#[inline(always)]
fn save_syns(ctx: &SockOpsContext) {
    let mut on: i32 = 1;
    // SAFETY: `bpf_setsockopt` on this program's context, reading 4 bytes (the length passed)
    // from a stack i32.
    let _ = unsafe { bpf_setsockopt(ctx.ops.cast(), SOL_TCP, TCP_SAVE_SYN, (&raw mut on).cast(), 4) };
}

/// A connection to a listener in a pod cgroup is established: count it by its SYN's lane option
/// when it was accepted on a local pod's address.
#[inline(always)]
fn count_inbound(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    // SAFETY: context fields of sock_ops, each read with one 4-byte load at a constant offset,
    // as the verifier requires. All are read unconditionally (then selected) so that the
    // compiler cannot merge two loads into one at a computed offset.
    let (family, ip4, ip6) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ops).family),
            core::ptr::read_volatile(&raw const (*ops).local_ip4),
            [
                core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
            ],
        )
    };
    // IPv4 connections accepted by a dual-stack listener have a v4-mapped local address.
    let addr = if family == AF_INET6 { ip6 } else { v4_mapped(ip4) };
    // SAFETY: POD_ADDRS is BPF_F_NO_PREALLOC; the value is copied out at once.
    let Some(pod) = (unsafe { POD_ADDRS.get(&addr) }).copied() else {
        return;
    };
    let exid = LANE_OPT_EXID.to_be_bytes();
    // Search key for an experimental option: kind, "kind-length" of the magic (2 + 2), magic.
    let mut opt = [0u8; LANE_OPT_LEN as usize];
    opt[0] = LANE_OPT_KIND;
    opt[1] = 4;
    opt[2] = exid[0];
    opt[3] = exid[1];
    // SAFETY: the helper writes at most `LANE_OPT_LEN` bytes into this stack buffer of that size.
    let found =
        unsafe { bpf_load_hdr_opt(ctx.ops, opt.as_mut_ptr().cast(), u32::from(LANE_OPT_LEN), LOAD_FROM_SYN) };
    if found == -ENOENT {
        count(Outcome::InboundNoSyn);
        if debug_log::enabled(Level::Debug) {
            inbound_record(pod.lane, 0, None);
        }
        return;
    }
    let option = if found == i64::from(LANE_OPT_LEN) { decode_lane_option(&opt) } else { None };
    // The option is unauthenticated: an id that is not a known lane (one the agent named in
    // LANE_NAMES) gets no row of its own, only the pod's one unknown-lane row.
    // SAFETY: LANE_NAMES is BPF_F_NO_PREALLOC; only the presence of the entry is used.
    let (caller_lane, kind) =
        inbound_row(option, pod.lane, |lane| unsafe { LANE_NAMES.get(&lane) }.is_some());
    if debug_log::enabled(Level::Debug) {
        inbound_record(pod.lane, caller_lane, Some(kind));
    }
    let key = InboundKey { addr, caller_lane, pod_lane: pod.lane, kind };
    if let Some(c) = INBOUND.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of this CPU; programs do not migrate while running.
        unsafe { *c += 1 };
    } else if INBOUND.insert(&key, &1, 0).is_err() {
        count(Outcome::InboundFull);
    }
}

/// The debug log's record of an inbound connection's classification (`kind`: an `INBOUND_*`
/// kind; `None`: no SYN was saved, not classified).
#[inline(never)]
fn inbound_record(pod_lane: u32, caller_lane: u32, kind: Option<u32>) {
    let (pod, caller) = (debug_log::lane_hex(pod_lane), debug_log::lane_hex(caller_lane));
    let kind = kind.map_or("no saved SYN, not classified", inbound_kind_name);
    debug!(&NO_CTX, "inbound to pod lane 0x{:x}: caller lane 0x{:x}: {}", &pod[..], &caller[..], kind);
}

/// A socket is released: forget a tracked connected UDP socket (TCP is forgotten at close).
#[cgroup_sock(sock_release)]
pub fn conn_release(ctx: SockContext) -> i32 {
    // SAFETY: context pointer; a 4-byte load of `protocol`, readable in cgroup sock programs.
    let proto = unsafe { core::ptr::read_volatile(&raw const (*ctx.sock).protocol) };
    if proto == u32::from(IPPROTO_UDP) {
        // SAFETY: `bpf_get_socket_cookie` accepts a cgroup sock context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = CONNS.remove(&cookie);
    }
    1
}
