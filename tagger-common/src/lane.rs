//! Lane identity: the stable numeric id every node derives from a lane's name.

/// The base lane: pods without a lane label, and the default end of every fallback chain.
pub const BASE_LANE: u32 = 0;

/// Names that mean the base lane when used as a label value.
const BASE_NAMES: [&str; 2] = ["", "base"];

/// The lane id of a lane name: 32-bit FNV-1a of its UTF-8 bytes, with 0 reserved for base.
///
/// A pure function of the name, so every node (and the CLI) agrees on it without coordination.
/// `""` and `"base"` are the base lane. A name whose hash is 0 maps to 1, which keeps 0
/// meaning base.
#[must_use]
pub const fn lane_id(name: &str) -> u32 {
    let bytes = name.as_bytes();
    if is_base_name(bytes) {
        return BASE_LANE;
    }
    let hash = fnv1a(bytes);
    if hash == BASE_LANE { 1 } else { hash }
}

/// 32-bit FNV-1a of `bytes`: lane ids, and the agent's order-independent choices of which
/// backends or endpoints to keep over a limit.
#[must_use]
pub const fn fnv1a(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

const fn is_base_name(bytes: &[u8]) -> bool {
    let mut n = 0;
    while n < BASE_NAMES.len() {
        let candidate = BASE_NAMES[n].as_bytes();
        if candidate.len() == bytes.len() {
            let mut i = 0;
            let mut same = true;
            while i < bytes.len() {
                if candidate[i] != bytes[i] {
                    same = false;
                }
                i += 1;
            }
            if same {
                return true;
            }
        }
        n += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_names_are_lane_zero() {
        assert_eq!(lane_id(""), BASE_LANE);
        assert_eq!(lane_id("base"), BASE_LANE);
    }

    #[test]
    fn lane_id_is_fnv1a_and_stable() {
        // Reference values of 32-bit FNV-1a; they must never change, or nodes running
        // different versions would disagree on lane ids.
        assert_eq!(lane_id("a"), 0xe40c_292c);
        assert_eq!(lane_id("foobar"), 0xbf9c_f968);
        assert_eq!(lane_id("gray"), lane_id("gray"));
        assert_ne!(lane_id("gray"), lane_id("grey"));
        assert_ne!(lane_id("gray"), BASE_LANE);
    }

    #[test]
    fn lane_id_is_usable_in_const_context() {
        const GRAY: u32 = lane_id("gray");
        assert_eq!(GRAY, lane_id("gray"));
    }
}
