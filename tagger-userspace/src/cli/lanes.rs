//! `tagger lanes`: every lane the datapath knows of (from policies, pods, backend sets and
//! published names), with its id and policy.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use tagger_common::{BASE_LANE, LanePolicy, resolve::lane_is_strict};

use super::{
    args::Format,
    render::{LaneRef, Names, lane_hex, policy_chain, print_json, table},
};
use crate::datapath::Tables;

/// The JSON document of `tagger lanes`.
#[derive(Debug, Serialize)]
pub struct LanesReport {
    /// Base first, then by name (unnamed lanes last, by id).
    pub lanes: Vec<LaneRow>,
}

/// One lane.
#[derive(Debug, Serialize)]
pub struct LaneRow {
    /// Id and name.
    pub lane: LaneRef,
    /// The id as `0x…` (what the table shows for unnamed lanes).
    pub id_hex: String,
    /// What a caller of this lane does when a Service has no ready backend in it.
    pub policy: PolicyView,
    /// Registered pod cgroups in the lane.
    pub pods: usize,
    /// Backend sets (Services with a set for the lane, empty or not).
    pub backend_sets: usize,
    /// Lane marking (`--mark-interfaces`): the lane's index under `--mark-mask` and the mark
    /// bits its pods' packets get; null when the lane is not marked (base, or marking off).
    pub mark: Option<MarkView>,
}

/// A lane's mark bits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MarkView {
    /// 1..=mask>>shift; null when the lane did not fit the mask (its packets are not marked).
    pub index: Option<u32>,
    /// `index << shift` as `0x…` (null when unfit).
    pub value: Option<String>,
    /// The mask as `0x…` (null when unfit).
    pub mask: Option<String>,
}

/// The view of a lane's entry in the lane-marks map.
#[must_use]
pub fn mark_view(entry: &tagger_common::LaneMark) -> MarkView {
    if entry.mask == 0 {
        return MarkView { index: None, value: None, mask: None };
    }
    MarkView {
        index: Some(entry.index()),
        value: Some(format!("{:#x}", entry.value)),
        mask: Some(format!("{:#x}", entry.mask)),
    }
}

/// The mark column: `3 (0x30/0xf0)`, `none: --mark-mask full`, or `-`.
#[must_use]
pub fn mark_label(view: Option<&MarkView>) -> String {
    match view {
        None => "-".to_owned(),
        Some(MarkView { index: Some(i), value: Some(v), mask: Some(m) }) => format!("{i} ({v}/{m})"),
        Some(_) => "none: does not fit --mark-mask".to_owned(),
    }
}

/// A lane's policy, as the datapath applies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyView {
    /// Whether the lane has an entry in the lanes map (false: the default applies).
    pub configured: bool,
    /// No fallback: a connect that finds no backend in the lane fails (EPERM).
    pub strict: bool,
    /// Lanes tried in order when the lane has no ready backend (`[base]` by default; empty for
    /// base, which never leaves base, and for strict lanes).
    pub fallback: Vec<LaneRef>,
}

/// The policy the datapath applies to callers of `lane` (mirrors `resolve_lane`'s defaults).
#[must_use]
pub fn policy_view(names: &Names, lane: u32, policy: Option<&LanePolicy>) -> PolicyView {
    let strict = lane_is_strict(policy);
    let fallback = match policy {
        _ if lane == BASE_LANE || strict => Vec::new(),
        None => vec![names.lane(BASE_LANE)],
        Some(p) => policy_chain(p).iter().map(|&l| names.lane(l)).collect(),
    };
    PolicyView { configured: policy.is_some(), strict, fallback }
}

/// The policy for people: `gray → base`, `strict`, `[base] (default)`.
#[must_use]
pub fn policy_label(names: &Names, lane: u32, view: &PolicyView) -> String {
    if lane == BASE_LANE {
        return "no fallback: base callers stay in base (fail open)".to_owned();
    }
    if view.strict {
        return "strict: no fallback (connect fails with EPERM)".to_owned();
    }
    let chain: Vec<u32> = view.fallback.iter().map(|l| l.id).collect();
    let chain = names.chain_label(&chain);
    if view.configured { chain } else { format!("{chain} (default)") }
}

/// Reads the report.
pub fn collect(tables: &Tables) -> anyhow::Result<LanesReport> {
    let names = Names::read(tables)?;
    let policies = tables.lane_policies()?;
    let mut pods: BTreeMap<u32, usize> = BTreeMap::new();
    for entry in tables.pods()?.values() {
        *pods.entry(entry.lane).or_default() += 1;
    }
    let mut sets: BTreeMap<u32, usize> = BTreeMap::new();
    for key in tables.backend_sets()?.keys() {
        *sets.entry(key.lane).or_default() += 1;
    }
    let mut ids: BTreeSet<u32> = BTreeSet::from([BASE_LANE]);
    ids.extend(policies.keys());
    for p in policies.values() {
        ids.extend(policy_chain(p));
    }
    ids.extend(pods.keys());
    ids.extend(sets.keys());
    ids.extend(names.lanes.keys());
    let marks = tables.lane_marks()?;
    ids.extend(marks.keys());
    let mut lanes: Vec<LaneRow> = ids
        .into_iter()
        .map(|id| LaneRow {
            lane: names.lane(id),
            id_hex: lane_hex(id),
            policy: policy_view(&names, id, policies.get(&id)),
            pods: pods.get(&id).copied().unwrap_or(0),
            backend_sets: sets.get(&id).copied().unwrap_or(0),
            mark: marks.get(&id).map(mark_view),
        })
        .collect();
    lanes.sort_by_key(|l| lane_order(&l.lane));
    Ok(LanesReport { lanes })
}

/// Base first, then named lanes by name, then unnamed ones by id.
#[must_use]
pub fn lane_order(l: &LaneRef) -> (u8, String, u32) {
    match (&l.name, l.id) {
        (_, BASE_LANE) => (0, String::new(), 0),
        (Some(n), id) => (1, n.clone(), id),
        (None, id) => (2, String::new(), id),
    }
}

/// Runs `tagger lanes`.
pub fn run(tables: &Tables, format: Format) -> anyhow::Result<()> {
    let report = collect(tables)?;
    match format {
        Format::Json => print_json(&report)?,
        Format::Table => {
            let names = Names::read(tables)?;
            let mut t = table(
                &[
                    "lane",
                    "id",
                    "when a Service has no backend in the lane",
                    "pods",
                    "backend sets",
                    "mark index",
                ],
                &[3, 4],
            );
            for l in &report.lanes {
                t.add_row(vec![
                    l.lane.name.clone().unwrap_or_else(|| "(unnamed)".to_owned()),
                    l.id_hex.clone(),
                    policy_label(&names, l.lane.id, &l.policy),
                    l.pods.to_string(),
                    l.backend_sets.to_string(),
                    mark_label(l.mark.as_ref()),
                ]);
            }
            println!("{t}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tagger_common::{LANE_F_STRICT, lane_id};

    use super::*;

    fn names() -> Names {
        let mut n = Names::default();
        for l in ["gray", "feature-x"] {
            n.lanes.insert(lane_id(l), l.to_owned());
        }
        n
    }

    #[test]
    fn default_policy_is_base_and_base_never_falls_back() {
        let n = names();
        let gray = policy_view(&n, lane_id("gray"), None);
        assert_eq!(gray.fallback, vec![n.lane(0)]);
        assert!(!gray.configured && !gray.strict);
        assert_eq!(policy_label(&n, lane_id("gray"), &gray), "base (default)");
        let base = policy_view(&n, 0, None);
        assert!(base.fallback.is_empty());
        assert!(policy_label(&n, 0, &base).starts_with("no fallback"));
    }

    #[test]
    fn chains_and_strict_lanes() {
        let n = names();
        let mut p = LanePolicy { chain_len: 2, ..LanePolicy::default() };
        p.chain[0] = lane_id("gray");
        let v = policy_view(&n, lane_id("feature-x"), Some(&p));
        assert_eq!(policy_label(&n, lane_id("feature-x"), &v), "gray → base");
        p.flags = LANE_F_STRICT;
        let v = policy_view(&n, lane_id("feature-x"), Some(&p));
        assert!(v.strict && v.fallback.is_empty());
        assert!(policy_label(&n, lane_id("feature-x"), &v).starts_with("strict"));
    }

    #[test]
    fn mark_column() {
        let v = mark_view(&tagger_common::LaneMark { value: 0x30, mask: 0xf0 });
        assert_eq!(v.index, Some(3));
        assert_eq!(mark_label(Some(&v)), "3 (0x30/0xf0)");
        let unfit = mark_view(&tagger_common::LaneMark::default());
        assert!(mark_label(Some(&unfit)).contains("does not fit"));
        assert_eq!(mark_label(None), "-");
    }

    #[test]
    fn lanes_sort_base_then_names_then_ids() {
        let mut v = [
            LaneRef { id: 9, name: None },
            LaneRef { id: 5, name: Some("gray".into()) },
            LaneRef { id: 0, name: Some("base".into()) },
            LaneRef { id: 7, name: Some("alpha".into()) },
        ];
        v.sort_by_key(lane_order);
        let ids: Vec<u32> = v.iter().map(|l| l.id).collect();
        assert_eq!(ids, [0, 7, 5, 9]);
    }
}
