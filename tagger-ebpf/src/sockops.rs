//! Connection tracking. The connect hook leaves a [`SockRecord`] in socket storage; a TCP
//! connection is tracked (copied into `CONNS` by socket cookie) once established and forgotten
//! when it reaches `TCP_CLOSE`; a connected UDP socket is tracked by the connect hook and
//! forgotten when the socket is released. Userspace reads `CONNS` for the active-connection
//! gauges and to reset connections to backends that left their set.
//!
//! Neither program ever changes a connection: they return "proceed" (1) whatever happens.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::generated::{bpf_get_socket_cookie, bpf_sk_storage_get},
    macros::{cgroup_sock, sock_ops},
    programs::{SockContext, SockOpsContext},
};
use tagger_common::{IPPROTO_UDP, SockRecord};

use crate::maps::{CONNS, socks_ptr};

#[sock_ops]
pub fn conn_track(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
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

/// An active connection is established: track it if the connect hook steered it.
#[inline(always)]
fn established(ctx: &SockOpsContext) {
    // SAFETY: `sk` is a context field the verifier lets sock_ops programs read; it may be null.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: lookup only (null value, no flags) of this socket's storage; null when the socket
    // was not steered.
    let record =
        unsafe { bpf_sk_storage_get(socks_ptr(), sk.cast(), core::ptr::null_mut(), 0) }.cast::<SockRecord>();
    if record.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket; SockRecord is Copy.
    let record = unsafe { *record };
    // SAFETY: as in `conn_track`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if CONNS.insert(&cookie, &record, 0).is_ok() {
        #[expect(clippy::cast_possible_wrap, reason = "small flag bits")]
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
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
