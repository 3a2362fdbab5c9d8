//! The lane option tagger writes on the SYN of a connection it steered: a TCP experimental
//! option (kind 253) with a 16-bit experiment id, per RFC 6994.
//!
//! ```text
//!  0        1        2        3        4        5        6        7        8
//! +--------+--------+--------+--------+--------+--------+--------+--------+--------+
//! |  253   |   9    |  0x74  |  0x67  |     caller lane id (u32, network order)    | flags  |
//! +--------+--------+--------+--------+--------+--------+--------+--------+--------+
//! ```
//!
//! ExID 0x7467 ("tg", not registered with IANA); flags bit 0: the connection fell back from the
//! caller's lane; bit 1: a routing rule or a canary share sent it to another lane on purpose.
//! Other bits are zero and ignored by readers. The kernel pads the header with NOPs to a
//! multiple of 4 bytes.

/// TCP option kind for experiments (RFC 4727, RFC 6994).
pub const LANE_OPT_KIND: u8 = 253;
/// Length of the option, kind and length bytes included.
pub const LANE_OPT_LEN: u8 = 9;
/// tagger's experiment id, network byte order on the wire.
pub const LANE_OPT_EXID: u16 = 0x7467;
/// Flags bit: the connection fell back from the caller's lane.
pub const LANE_OPT_F_FELL_BACK: u8 = 1;
/// Flags bit: a routing rule or the Service's canary share chose another lane.
pub const LANE_OPT_F_ROUTED: u8 = 2;

/// Encodes the option.
#[must_use]
pub const fn encode_lane_option(lane: u32, flags: u8) -> [u8; LANE_OPT_LEN as usize] {
    let exid = LANE_OPT_EXID.to_be_bytes();
    let l = lane.to_be_bytes();
    [LANE_OPT_KIND, LANE_OPT_LEN, exid[0], exid[1], l[0], l[1], l[2], l[3], flags]
}

/// Decodes the option (its bytes from the kind on); `None` if it is not tagger's.
#[must_use]
pub fn decode_lane_option(opt: &[u8]) -> Option<(u32, u8)> {
    match opt {
        [LANE_OPT_KIND, LANE_OPT_LEN, e0, e1, l0, l1, l2, l3, flags, ..]
            if u16::from_be_bytes([*e0, *e1]) == LANE_OPT_EXID =>
        {
            Some((u32::from_be_bytes([*l0, *l1, *l2, *l3]), *flags))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_round_trips() {
        let o = encode_lane_option(0xdead_beef, LANE_OPT_F_FELL_BACK);
        assert_eq!(o, [253, 9, 0x74, 0x67, 0xde, 0xad, 0xbe, 0xef, 1]);
        assert_eq!(decode_lane_option(&o), Some((0xdead_beef, 1)));
        assert_eq!(decode_lane_option(&[253, 9, 0, 0, 1, 2, 3, 4, 0]), None, "another experiment");
    }
}
