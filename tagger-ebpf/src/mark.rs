//! TC lane marking: a classifier on the local pods' traffic (the host side of pod veths, or a
//! node uplink) that looks a packet's source address up in `POD_ADDRS` and, for a local pod's
//! packet, writes the pod's lane's small index into the bits of `skb->mark` under the
//! operator's `--mark-mask` (`LANE_MARKS`; the other mark bits are kept, and lanes without an
//! entry, base among them, keep the whole mark) and, when the pod's lane has a DSCP, rewrites
//! the DSCP bits (keeping ECN; the IPv4 header checksum is updated). It never drops or
//! redirects: it returns "continue" so the next program or filter runs. Frames are Ethernet,
//! untagged (a VLAN tag's EtherType matches neither IP version, so such frames are left alone).
//!
//! Headers are `network-types` structs, and every offset comes from them (`EthHdr::LEN`,
//! `offset_of!`). Every packet pays one `bpf_skb_load_bytes` for the EtherType and one for the
//! source address, read as words (the header structs are byte arrays, alignment 1: reading the
//! address out of a copied struct would take a load per byte). Only a lane with a DSCP copies
//! the whole IP header, to rewrite the class with the structs' own accessors. Writes go through
//! `bpf_skb_store_bytes` (and `bpf_l3_csum_replace`), which work on non-linear skbs too.

use core::mem::offset_of;

use aya_ebpf::{macros::classifier, programs::TcContext};
use aya_log_ebpf::trace;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use tagger_common::{DSCP_UNSET, PodAddr, v4_mapped};

use crate::{
    debug_log::{self, Level, NO_CTX},
    maps::{LANE_MARKS, POD_ADDRS},
};

/// `TC_ACT_UNSPEC` / `TCX_NEXT`: continue with the next program or filter.
const CONTINUE: i32 = -1;
/// Where the IP header starts: right after the (untagged) Ethernet header.
const IP: usize = EthHdr::LEN;

#[classifier]
pub fn lane_mark(ctx: TcContext) -> i32 {
    let _ = try_mark(&ctx);
    CONTINUE
}

#[inline(always)]
fn try_mark(ctx: &TcContext) -> Result<(), i64> {
    // Compared as loaded (network byte order): `EtherType`'s values are stored that way.
    let ether_type: u16 = ctx.load(offset_of!(EthHdr, ether_type))?;
    if ether_type == EtherType::Ipv4 as u16 {
        mark_v4(ctx)
    } else if ether_type == EtherType::Ipv6 as u16 {
        mark_v6(ctx)
    } else {
        Ok(())
    }
}

#[inline(always)]
fn mark_v4(ctx: &TcContext) -> Result<(), i64> {
    // Map keys hold the address as it is on the wire, read as native words.
    let src: u32 = ctx.load(IP + offset_of!(Ipv4Hdr, src_addr))?;
    let Some(dscp) = mark_source(ctx, &v4_mapped(src)) else { return Ok(()) };
    let ip: Ipv4Hdr = ctx.load(IP)?;
    let mut new = ip;
    new.set_tos(dscp, ip.ecn());
    if new.tos != ip.tos {
        // The header checksum sums 16-bit words; the TOS byte shares its word with
        // version/IHL, so the checksum is updated for that whole word.
        let word = |h: &Ipv4Hdr| u64::from(u16::from_ne_bytes([h.vihl, h.tos]));
        ctx.l3_csum_replace(IP + offset_of!(Ipv4Hdr, check), word(&ip), word(&new), 2)?;
        ctx.store(IP + offset_of!(Ipv4Hdr, tos), &new.tos, 0)?;
    }
    Ok(())
}

#[inline(always)]
fn mark_v6(ctx: &TcContext) -> Result<(), i64> {
    let src: [u32; 4] = ctx.load(IP + offset_of!(Ipv6Hdr, src_addr))?;
    let Some(dscp) = mark_source(ctx, &src) else { return Ok(()) };
    // version(4) | traffic class(8) | flow label(20): the class spans the first two bytes,
    // which are written back together (no checksum covers them).
    let ip: Ipv6Hdr = ctx.load(IP)?;
    let mut new = ip;
    new.set_dscp_ecn(dscp, ip.ecn());
    let class = [new.vcf[0], new.vcf[1]];
    if class != [ip.vcf[0], ip.vcf[1]] {
        ctx.store(IP + offset_of!(Ipv6Hdr, vcf), &class, 0)?;
    }
    Ok(())
}

/// Marks the packet if `src` is a local pod's address; returns the DSCP the pod's lane sets, if
/// it sets one (`None` too for a stranger's packet, which is left alone).
#[inline(always)]
fn mark_source(ctx: &TcContext, src: &[u32; 4]) -> Option<u8> {
    let pod = pod_of(src)?;
    mark_pod(ctx, &pod);
    (pod.dscp != DSCP_UNSET).then_some(pod.dscp)
}

/// Writes the pod's lane's index into the masked bits of the packet's mark. A lane without an
/// entry (base, or one that did not fit the mask: mask 0) leaves the mark as it is.
#[inline(always)]
fn mark_pod(ctx: &TcContext, pod: &PodAddr) {
    // SAFETY: LANE_MARKS is BPF_F_NO_PREALLOC; the value is copied out at once.
    let Some(entry) = (unsafe { LANE_MARKS.get(&pod.lane) }).copied() else { return };
    if entry.mask != 0 {
        // SAFETY: `mark` is a readable field of the __sk_buff context.
        let mark = unsafe { (*ctx.skb.skb).mark };
        let marked = entry.apply(mark);
        ctx.set_mark(marked);
        // Per packet: at `--bpf-log=trace` only.
        if debug_log::enabled(Level::Trace) {
            mark_record(pod.lane, mark, marked, pod.dscp);
        }
    }
}

/// The debug log's record of one marked packet (see `debug_log`).
#[inline(never)]
fn mark_record(lane: u32, mark: u32, marked: u32, dscp: u8) {
    let lane = debug_log::lane_hex(lane);
    trace!(&NO_CTX, "lane mark: lane 0x{:x}: mark {:x} -> {:x}, dscp {}", &lane[..], mark, marked, dscp);
}

#[inline(always)]
fn pod_of(addr: &[u32; 4]) -> Option<PodAddr> {
    // SAFETY: POD_ADDRS is BPF_F_NO_PREALLOC; the value is copied out at once.
    unsafe { POD_ADDRS.get(addr) }.copied()
}
