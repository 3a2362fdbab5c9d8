//! TC lane marking: a classifier on the local pods' traffic (the host side of pod veths, or a
//! node uplink) that looks a packet's source address up in `POD_ADDRS` and, for a local pod's
//! packet, writes the pod's lane's small index into the bits of `skb->mark` under the
//! operator's `--mark-mask` (`LANE_MARKS`; the other mark bits are kept, and lanes without an
//! entry, base among them, keep the whole mark) and, when the pod's lane has a DSCP, rewrites
//! the DSCP bits (keeping ECN; the IPv4 header checksum is updated). It never drops or
//! redirects: it returns "continue" so the next program or filter runs. Frames are Ethernet.

use aya_ebpf::{macros::classifier, programs::TcContext};
use tagger_common::{DSCP_UNSET, PodAddr, v4_mapped};

use crate::maps::{LANE_MARKS, POD_ADDRS};

/// `TC_ACT_UNSPEC` / `TCX_NEXT`: continue with the next program or filter.
const CONTINUE: i32 = -1;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Offset of the IPv4 header checksum in the IP header.
const IP4_CSUM: usize = 10;

#[classifier]
pub fn lane_mark(ctx: TcContext) -> i32 {
    let _ = try_mark(&ctx);
    CONTINUE
}

#[inline(always)]
fn try_mark(ctx: &TcContext) -> Result<(), i64> {
    let proto = u16::from_be(ctx.load::<u16>(12)?);
    match proto {
        ETH_P_IP => {
            let src: u32 = ctx.load(ETH_HLEN + 12)?;
            let Some(pod) = pod_of(&v4_mapped(src)) else { return Ok(()) };
            set_mark(ctx, pod.lane);
            if pod.dscp != DSCP_UNSET {
                // The first 16-bit word: version/IHL, then TOS (DSCP << 2 | ECN).
                let old: [u8; 2] = ctx.load(ETH_HLEN)?;
                let tos = (pod.dscp << 2) | (old[1] & 0x03);
                if tos != old[1] {
                    let new = [old[0], tos];
                    ctx.l3_csum_replace(
                        ETH_HLEN + IP4_CSUM,
                        u64::from(u16::from_ne_bytes(old)),
                        u64::from(u16::from_ne_bytes(new)),
                        2,
                    )?;
                    ctx.store(ETH_HLEN + 1, &tos, 0)?;
                }
            }
        }
        ETH_P_IPV6 => {
            let src: [u32; 4] = ctx.load(ETH_HLEN + 8)?;
            let Some(pod) = pod_of(&src) else { return Ok(()) };
            set_mark(ctx, pod.lane);
            if pod.dscp != DSCP_UNSET {
                // version(4) | traffic class(8) | flow label(20): the class spans two bytes.
                let old: [u8; 2] = ctx.load(ETH_HLEN)?;
                let class = ((old[0] & 0x0f) << 4) | (old[1] >> 4);
                let class = (pod.dscp << 2) | (class & 0x03);
                let new = [(old[0] & 0xf0) | (class >> 4), ((class & 0x0f) << 4) | (old[1] & 0x0f)];
                if new != old {
                    ctx.store(ETH_HLEN, &new, 0)?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Writes the lane's index into the masked bits of the packet's mark. A lane without an
/// entry (base, or one that did not fit the mask: mask 0) leaves the mark as it is.
#[inline(always)]
fn set_mark(ctx: &TcContext, lane: u32) {
    // SAFETY: LANE_MARKS is BPF_F_NO_PREALLOC; the value is copied out at once.
    let Some(entry) = (unsafe { LANE_MARKS.get(&lane) }).copied() else { return };
    if entry.mask != 0 {
        // SAFETY: `mark` is a readable field of the __sk_buff context.
        let mark = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark(entry.apply(mark));
    }
}

#[inline(always)]
fn pod_of(addr: &[u32; 4]) -> Option<PodAddr> {
    // SAFETY: POD_ADDRS is BPF_F_NO_PREALLOC; the value is copied out at once.
    unsafe { POD_ADDRS.get(addr) }.copied()
}
