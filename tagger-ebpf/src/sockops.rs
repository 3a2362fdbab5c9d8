//! Connection tracking. The connect hook leaves a [`SockRecord`] in socket storage; a TCP
//! connection is tracked (copied into `CONNS` by socket cookie) once established and forgotten
//! when it reaches `TCP_CLOSE`; a connected UDP socket is tracked by the connect hook and
//! forgotten when the socket is released. Userspace reads `CONNS` for the active-connection
//! gauges and to reset connections to backends that left their set.
//!
//! On the SYN of a steered TCP connection, `conn_track` also writes the lane option
//! (`tagger_common::wire`): the caller's lane id and whether the connection fell back.
//!
//! Neither program ever refuses a connection: they return "proceed" (1) whatever happens.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::generated::{bpf_get_socket_cookie, bpf_reserve_hdr_opt, bpf_sk_storage_get, bpf_store_hdr_opt},
    macros::{cgroup_sock, sock_ops},
    programs::{SockContext, SockOpsContext},
};
use tagger_common::{
    IPPROTO_UDP, SOCK_F_FELL_BACK, SockRecord,
    wire::{LANE_OPT_F_FELL_BACK, LANE_OPT_LEN, encode_lane_option},
};

use crate::maps::{CONNS, socks_ptr};

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
    let flags = if record.flags & SOCK_F_FELL_BACK != 0 { LANE_OPT_F_FELL_BACK } else { 0 };
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
