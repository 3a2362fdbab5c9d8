//! Lane marking's mark bits: the operator's `--mark-mask` and the small index each lane gets
//! under it. The TC program writes `skb->mark = (skb->mark & !mask) | (index << shift)`, where
//! `shift` is the mask's lowest set bit, so every other bit of the mark (kube-proxy's, the
//! CNI's, a mesh's) is kept. Index 0 means base (no lane): base pods' packets keep their marks.
//!
//! Indices are assigned by the agent to the lanes it marks (those of local pods and those named
//! in the lanes config), 1..=N for N = `mask >> shift`: a lane keeps its index while it stays
//! known on the node (the pinned `TAGGER_LMARK_V1` is read back at start), new lanes take the
//! lowest free index in the order of their ids, and lanes that do not fit are recorded without
//! an index (mask 0), counted and reported. Indices are per node: `tagger lanes` shows them.

use std::collections::{BTreeMap, BTreeSet};

use tagger_common::{BASE_LANE, LaneMark};

/// kube-proxy's mark bits: 0x4000 (`KUBE-MARK-MASQ`) and 0x8000 (`KUBE-MARK-DROP`).
pub const KUBE_PROXY_BITS: u32 = 0x0000_c000;

/// The default `--mark-mask`: see the README's *TC lane marking* for why these bits.
pub const DEFAULT_MARK_MASK: &str = "0x00f0";

/// A validated `--mark-mask`: non-empty, contiguous, clear of kube-proxy's bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkMask(u32);

impl MarkMask {
    /// Validates a mask.
    ///
    /// # Errors
    /// An empty mask, one whose set bits are not contiguous, or one that overlaps 0xc000.
    pub fn new(mask: u32) -> Result<Self, String> {
        if mask == 0 {
            return Err("is empty: it must have at least one bit set".to_owned());
        }
        let shifted = mask >> mask.trailing_zeros();
        if shifted & shifted.wrapping_add(1) != 0 {
            return Err(format!("{mask:#x} is not one contiguous run of bits (e.g. 0x00f0)"));
        }
        if mask & KUBE_PROXY_BITS != 0 {
            return Err(format!(
                "{mask:#x} overlaps kube-proxy's mark bits {KUBE_PROXY_BITS:#06x} (0x4000 masquerade, 0x8000 drop)"
            ));
        }
        Ok(Self(mask))
    }

    /// Parses a hexadecimal mask (`0x00f0` or `f0`).
    ///
    /// # Errors
    /// Not hexadecimal, or not a valid mask ([`MarkMask::new`]).
    pub fn parse(s: &str) -> Result<Self, String> {
        let digits = s.trim().trim_start_matches("0x").trim_start_matches("0X");
        let mask = u32::from_str_radix(digits, 16)
            .map_err(|_| format!("{s:?}: a mask is hexadecimal, e.g. 0x00f0"))?;
        Self::new(mask)
    }

    /// The mask's bits.
    #[must_use]
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Its lowest set bit.
    #[must_use]
    pub fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }

    /// The largest lane index that fits (`mask >> shift`; 1..=this are lanes, 0 is base).
    #[must_use]
    pub fn max_index(self) -> u32 {
        self.0 >> self.shift()
    }

    /// The map entry for lane index `index` (which must fit).
    #[must_use]
    pub fn entry(self, index: u32) -> LaneMark {
        debug_assert!(index >= 1 && index <= self.max_index());
        LaneMark { value: index << self.shift(), mask: self.0 }
    }
}

impl std::str::FromStr for MarkMask {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

/// Which lanes got which index, and which did not fit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Lane id → index (1..=`max_index`).
    pub indices: BTreeMap<u32, u32>,
    /// Lanes left without an index: the mask has no room.
    pub unfit: BTreeSet<u32>,
}

impl Assignment {
    /// The map's desired contents: an entry per lane, mask 0 for the lanes that did not fit.
    #[must_use]
    pub fn entries(&self, mask: MarkMask) -> BTreeMap<u32, LaneMark> {
        let mut out: BTreeMap<u32, LaneMark> =
            self.indices.iter().map(|(&lane, &index)| (lane, mask.entry(index))).collect();
        out.extend(self.unfit.iter().map(|&lane| (lane, LaneMark::default())));
        out
    }
}

/// Assigns indices to `lanes` (base is never indexed): a lane in `held` (its index from the
/// pinned map, computed for this mask) keeps it; the others take the lowest free indices, in
/// the order of their ids; those beyond `mask.max_index()` are unfit.
#[must_use]
pub fn assign(held: &BTreeMap<u32, LaneMark>, lanes: &BTreeSet<u32>, mask: MarkMask) -> Assignment {
    let mut out = Assignment::default();
    let mut used = BTreeSet::new();
    for &lane in lanes.iter().filter(|&&l| l != BASE_LANE) {
        if let Some(e) = held.get(&lane).filter(|e| e.mask == mask.bits()) {
            let index = e.index();
            if (1..=mask.max_index()).contains(&index) && used.insert(index) {
                out.indices.insert(lane, index);
            }
        }
    }
    let mut free = (1..=mask.max_index()).filter(|i| !used.contains(i));
    let new: Vec<u32> =
        lanes.iter().copied().filter(|&l| l != BASE_LANE && !out.indices.contains_key(&l)).collect();
    for lane in new {
        match free.next() {
            Some(index) => {
                out.indices.insert(lane, index);
            }
            None => {
                out.unfit.insert(lane);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_validated() {
        assert_eq!(MarkMask::parse(DEFAULT_MARK_MASK).unwrap().bits(), 0xf0);
        assert_eq!(MarkMask::parse("f00").unwrap().bits(), 0xf00);
        assert_eq!(MarkMask::parse("0x1").unwrap().max_index(), 1);
        assert_eq!(MarkMask::parse("0xff0000").unwrap().shift(), 16);
        for (bad, why) in [
            ("0", "empty"),
            ("0x0", "empty"),
            ("0x4000", "kube-proxy"),
            ("0x8000", "kube-proxy"),
            ("0xff00", "kube-proxy"),
            ("0xffffffff", "kube-proxy"),
            ("0x0f0f", "contiguous"),
            ("0x90", "contiguous"),
            ("0xg0", "hexadecimal"),
            ("", "hexadecimal"),
            ("0x1_0000_0000", "hexadecimal"),
        ] {
            let err = MarkMask::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(MarkMask::new(0xffff_0000).is_ok(), "the upper half is contiguous and clear of 0xc000");
        assert!(MarkMask::new(0x3fff).is_ok());
    }

    #[test]
    fn indices_fit_the_mask_are_sticky_and_unfit_lanes_are_counted() {
        let mask = MarkMask::new(0x30).unwrap(); // 2 bits: indices 1..=3
        let lanes: BTreeSet<u32> = [0, 7, 5, 9].into();
        let a = assign(&BTreeMap::new(), &lanes, mask);
        assert_eq!(a.indices, BTreeMap::from([(5, 1), (7, 2), (9, 3)]), "base gets none; by id");
        assert!(a.unfit.is_empty());
        let entries = a.entries(mask);
        assert_eq!(entries[&7], LaneMark { value: 2 << 4, mask: 0x30 });
        assert_eq!(entries[&7].apply(0xffff_ffff), 0xffff_ffef, "only the masked bits change");

        // Lane 5 leaves, 1 and 2 arrive: 7 and 9 keep theirs, 1 takes the freed index, 2 does
        // not fit.
        let held = entries;
        let lanes: BTreeSet<u32> = [7, 9, 1, 2].into();
        let b = assign(&held, &lanes, mask);
        assert_eq!(b.indices, BTreeMap::from([(7, 2), (9, 3), (1, 1)]));
        assert_eq!(b.unfit, BTreeSet::from([2]));
        assert_eq!(b.entries(mask)[&2], LaneMark::default(), "recorded without an index");

        // Another mask: the held indices (for 0x30) are not reused; all reassigned.
        let wide = MarkMask::new(0xf00).unwrap();
        let c = assign(&b.entries(mask), &lanes, wide);
        assert_eq!(c.indices, BTreeMap::from([(1, 1), (2, 2), (7, 3), (9, 4)]));
        assert!(c.indices.values().all(|&i| i <= wide.max_index()));
        // An unfit lane recorded earlier gets an index once one is free.
        let d = assign(&b.entries(mask), &[2, 9].into(), mask);
        assert_eq!(d.indices, BTreeMap::from([(9, 3), (2, 1)]));
    }
}
