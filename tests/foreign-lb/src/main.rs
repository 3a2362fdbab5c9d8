//! A foreign socket load balancer for tagger's tests: what a socket-LB CNI (Cilium's socket LB,
//! Calico eBPF's connect-time LB, Kmesh) does at the cgroup root, reduced to its core.
//! `connect4/6` translate the LB's own VIPs (`FLB_SVC_V1`: VIP:port → one backend) and remember
//! the VIP per socket cookie (`FLB_REV_V1`); `getpeername4/6` show the VIP again. Addresses are
//! four network-order words, IPv4 as `::ffff:a.b.c.d`; ports are the context's `user_port`
//! (network order in the low 16 bits). The test's userspace half (tests/src/foreign_lb.rs)
//! mirrors the layouts.
#![no_std]
#![no_main]
// Map keys are passed by reference: the helpers take pointers, and copies cost BPF stack.
#![expect(clippy::needless_borrows_for_generic_args, reason = "see above")]
// The program entry signature is fixed by the aya macros: the context arrives by value.
#![expect(clippy::needless_pass_by_value, reason = "see above")]

// A host build (clippy over the workspace) takes std's panic handler; the BPF build has its own
// (below). tagger-ebpf gets std on the host through tagger-common.
#[cfg(not(target_arch = "bpf"))]
extern crate std;

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};

/// A socket address: four network-order words (IPv4 mapped) and the port as `user_port` holds it.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    /// The address.
    pub addr: [u32; 4],
    /// The port, network order in the low 16 bits.
    pub port: u32,
}

/// What a translated socket connected to.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Rev {
    /// The VIP the application asked for.
    pub vip: Addr,
    /// The backend it was sent to.
    pub backend: Addr,
}

/// Most backends of one VIP.
pub const MAX_BACKENDS: usize = 16;

/// A VIP's backends: the first `count` of `backends`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pool {
    /// How many of `backends` are used (at least 1).
    pub count: u32,
    /// The backends.
    pub backends: [Addr; MAX_BACKENDS],
}

/// VIP → its backends, one picked at random per connection (as kube-proxy's iptables mode and
/// socket LBs do).
#[map(name = "FLB_SVC_V2")]
static SERVICES: HashMap<Addr, Pool> = HashMap::with_max_entries(256, 0);

/// Socket cookie → (VIP, backend) of translated connections.
#[map(name = "FLB_REV_V1")]
static REVERSE: LruHashMap<u64, Rev> = LruHashMap::with_max_entries(4096, 0);

/// Lets the syscall proceed.
const PROCEED: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn flb_connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, false).unwrap_or(PROCEED)
}

#[cgroup_sock_addr(connect6)]
pub fn flb_connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, true).unwrap_or(PROCEED)
}

#[cgroup_sock_addr(getpeername4)]
pub fn flb_peer4(ctx: SockAddrContext) -> i32 {
    try_peer(&ctx, false).unwrap_or(PROCEED)
}

#[cgroup_sock_addr(getpeername6)]
pub fn flb_peer6(ctx: SockAddrContext) -> i32 {
    try_peer(&ctx, true).unwrap_or(PROCEED)
}

/// A VIP of ours: send the connection to its backend and remember the VIP for `getpeername`.
#[inline(always)]
fn try_connect(ctx: &SockAddrContext, v6: bool) -> Option<i32> {
    let vip = read(ctx.sock_addr, v6);
    // SAFETY: a plain hash map, read at once; Pool is Copy.
    let pool = unsafe { SERVICES.get(&vip) }?;
    // SAFETY: the helper has no preconditions.
    let draw = unsafe { bpf_get_prandom_u32() };
    // Verifier: `checked_rem` has no panic path, and the index is bounds-checked by `get`.
    let i = draw.checked_rem(pool.count)? as usize;
    let backend = *pool.backends.get(i)?;
    write(ctx.sock_addr, v6, &backend);
    // SAFETY: `bpf_get_socket_cookie` accepts a sock_addr context and has no other precondition.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A full table only loses the reverse translation (an LRU evicts instead).
    let _ = REVERSE.insert(&cookie, &Rev { vip, backend }, 0);
    Some(PROCEED)
}

/// A socket we translated whose peer is still our backend: show the VIP.
#[inline(always)]
fn try_peer(ctx: &SockAddrContext, v6: bool) -> Option<i32> {
    // SAFETY: as in `try_connect`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: an LRU hash map; Rev is Copy.
    let rev = *unsafe { REVERSE.get(&cookie) }?;
    if read(ctx.sock_addr, v6) == rev.backend {
        write(ctx.sock_addr, v6, &rev.vip);
    }
    Some(PROCEED)
}

/// The context's user address and port (IPv4 mapped).
#[inline(always)]
fn read(sa: *mut bpf_sock_addr, v6: bool) -> Addr {
    // SAFETY: `sa` is the program's context, valid for the invocation; the verifier allows
    // 4-byte loads of `user_ip4`, each `user_ip6[i]` and `user_port`, and each read is one.
    unsafe {
        let addr = if v6 {
            [
                core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
                core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
            ]
        } else {
            [0, 0, 0xffff_u32.to_be(), core::ptr::read_volatile(&raw const (*sa).user_ip4)]
        };
        Addr { addr, port: core::ptr::read_volatile(&raw const (*sa).user_port) }
    }
}

/// Writes an address and port into the context.
#[inline(always)]
fn write(sa: *mut bpf_sock_addr, v6: bool, to: &Addr) {
    // SAFETY: context as in `read`; the verifier allows 4-byte stores to `user_ip4`,
    // `user_ip6[i]` and `user_port` in connect and getpeername programs.
    unsafe {
        if v6 {
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], to.addr[0]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], to.addr[1]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], to.addr[2]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], to.addr[3]);
        } else {
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, to.addr[3]);
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, to.port);
    }
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
