//! `tagger stats --inbound`: the connections this node's pods accepted, by the lane the caller's
//! node wrote on the SYN (the lane option), the pod's own lane, and whether the caller fell back;
//! lane leaks (another lane, no fallback) and untagged connections (no option) stand out.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;
use tagger_common::{
    INBOUND_FELL_BACK, INBOUND_IN_LANE, INBOUND_LEAK, INBOUND_ROUTED, INBOUND_UNKNOWN_LANE, INBOUND_UNTAGGED,
    Outcome, PodAddr, inbound_kind_name,
};

use super::render::{LaneRef, Names, table};
use crate::datapath::{InboundRow, Tables};

/// The JSON document of `tagger stats --inbound`.
#[derive(Debug, Serialize)]
pub struct InboundReport {
    /// Per pod address, caller lane, pod lane and kind.
    pub rows: Vec<InboundReportRow>,
    /// Totals per kind (`in_lane`, `fell_back`, `routed`, `leak`, `untagged`, `unknown_lane`;
    /// every kind is present).
    pub totals: BTreeMap<&'static str, u64>,
    /// Accepted connections not classified: their SYN was not saved (a listener opened before
    /// tagger attached, or syncookies).
    pub not_classified: u64,
    /// Accepted connections not counted per pod: the inbound map was full.
    pub not_counted: u64,
}

/// One row.
#[derive(Debug, Serialize)]
pub struct InboundReportRow {
    /// `namespace/name` of the pod, when the agent published it (null for an address that no
    /// longer belongs to a local pod).
    pub pod: Option<String>,
    /// The pod address the connection was accepted on.
    pub address: String,
    /// The pod's lane when it accepted the connection.
    pub pod_lane: LaneRef,
    /// The caller's lane from the option (null when untagged, and for `unknown_lane`: an id
    /// that is no known lane is not kept).
    pub caller_lane: Option<LaneRef>,
    /// `in_lane`, `fell_back`, `routed`, `leak`, `untagged` or `unknown_lane`.
    pub kind: &'static str,
    /// Connections accepted.
    pub connections: u64,
}

/// Builds the report from the maps' contents.
#[must_use]
pub fn report(
    names: &Names,
    pod_names: &BTreeMap<u64, (String, String)>,
    addrs: &BTreeMap<[u32; 4], PodAddr>,
    rows: &[InboundRow],
    counters: &BTreeMap<Outcome, u64>,
) -> InboundReport {
    let mut totals: BTreeMap<&'static str, u64> = [
        INBOUND_IN_LANE,
        INBOUND_FELL_BACK,
        INBOUND_ROUTED,
        INBOUND_LEAK,
        INBOUND_UNTAGGED,
        INBOUND_UNKNOWN_LANE,
    ]
    .into_iter()
    .map(|k| (inbound_kind_name(k), 0))
    .collect();
    let mut out: Vec<InboundReportRow> = rows
        .iter()
        .map(|r| {
            *totals.entry(inbound_kind_name(r.key.kind)).or_default() += r.count;
            let pod = addrs
                .get(&r.key.addr)
                .and_then(|a| pod_names.get(&a.cgroup))
                .map(|(ns, name)| format!("{ns}/{name}"));
            InboundReportRow {
                pod,
                address: crate::net::words_addr(&r.key.addr).to_string(),
                pod_lane: names.lane(r.key.pod_lane),
                caller_lane: (r.key.kind != INBOUND_UNTAGGED && r.key.kind != INBOUND_UNKNOWN_LANE)
                    .then(|| names.lane(r.key.caller_lane)),
                kind: inbound_kind_name(r.key.kind),
                connections: r.count,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        let key = |r: &InboundReportRow| {
            (r.pod.clone(), r.address.clone(), r.kind, r.caller_lane.as_ref().map(|l| l.id))
        };
        key(a).cmp(&key(b))
    });
    InboundReport {
        rows: out,
        totals,
        not_classified: counters.get(&Outcome::InboundNoSyn).copied().unwrap_or(0),
        not_counted: counters.get(&Outcome::InboundFull).copied().unwrap_or(0),
    }
}

/// Reads the maps and builds the report.
pub fn read(tables: &Tables) -> crate::Result<InboundReport> {
    let names = Names::read(tables)?;
    Ok(report(
        &names,
        &tables.pod_meta()?,
        &tables.pod_addrs()?,
        &tables.inbound()?,
        &tables.counters()?.by_outcome,
    ))
}

/// The report as a table.
#[must_use]
pub fn render(names: &Names, r: &InboundReport) -> String {
    let mut t = table(&["pod", "address", "pod lane", "caller lane", "kind", "connections"], &[5]);
    for row in &r.rows {
        t.add_row(vec![
            row.pod.clone().unwrap_or_else(|| "(gone)".to_owned()),
            row.address.clone(),
            names.lane_label(row.pod_lane.id),
            match (&row.caller_lane, row.kind) {
                (_, "unknown_lane") => "(unknown id)".to_owned(),
                (Some(l), _) => names.lane_label(l.id),
                (None, _) => "-".to_owned(),
            },
            if row.kind == "leak" { "LEAK".to_owned() } else { row.kind.to_owned() },
            row.connections.to_string(),
        ]);
    }
    let mut out = format!("{t}\n");
    let totals: Vec<String> = r.totals.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(out, "totals: {}", totals.join(", "));
    if r.totals.get("leak").is_some_and(|&n| n > 0) {
        let _ = writeln!(
            out,
            "LEAK: a caller of another lane reached the pod without falling back (a path that bypassed \
             tagger's steering, or a misconfigured Service)"
        );
    }
    if r.totals.get("unknown_lane").is_some_and(|&n| n > 0) {
        let _ = writeln!(
            out,
            "unknown_lane: SYNs whose lane option named no known lane (the option is unauthenticated: \
             a client outside tagger sent it, or a lane this node has not learned yet)"
        );
    }
    if r.not_classified > 0 {
        let _ = writeln!(
            out,
            "{} accepted connections not classified: their SYN was not saved (listener opened before \
             tagger attached, or syncookies)",
            r.not_classified
        );
    }
    if r.not_counted > 0 {
        let _ = writeln!(out, "{} accepted connections not counted: the inbound map was full", r.not_counted);
    }
    out
}

#[cfg(test)]
mod tests {
    use tagger_common::{InboundKey, lane_id};

    use super::*;

    #[test]
    fn rows_are_named_classified_and_totalled() {
        let gray = lane_id("gray");
        let addr = crate::net::addr_words("10.1.0.7".parse().unwrap());
        let mut names = Names::default();
        names.lanes.insert(gray, "gray".into());
        let pod_names = BTreeMap::from([(42, ("demo".to_owned(), "b-gray".to_owned()))]);
        let addrs = BTreeMap::from([(addr, PodAddr { cgroup: 42, lane: gray, dscp: 0xff, _pad: [0; 3] })]);
        let row = |caller_lane, kind, count| InboundRow {
            key: InboundKey { addr, caller_lane, pod_lane: gray, kind },
            count,
        };
        let rows = [
            row(gray, INBOUND_IN_LANE, 5),
            row(0, INBOUND_LEAK, 2),
            row(0, INBOUND_UNTAGGED, 3),
            row(lane_id("blue"), INBOUND_FELL_BACK, 1),
            row(0, INBOUND_UNKNOWN_LANE, 6),
        ];
        let counters = BTreeMap::from([(Outcome::InboundNoSyn, 4)]);
        let r = report(&names, &pod_names, &addrs, &rows, &counters);
        assert_eq!(r.totals["in_lane"], 5);
        assert_eq!(r.totals["leak"], 2);
        assert_eq!(r.totals["untagged"], 3);
        assert_eq!(r.totals["fell_back"], 1);
        assert_eq!(r.totals["unknown_lane"], 6);
        assert_eq!(r.not_classified, 4);
        assert!(r.rows.iter().all(|row| row.pod.as_deref() == Some("demo/b-gray")));
        let untagged = r.rows.iter().find(|row| row.kind == "untagged").unwrap();
        assert!(untagged.caller_lane.is_none());
        let unknown = r.rows.iter().find(|row| row.kind == "unknown_lane").unwrap();
        assert!(unknown.caller_lane.is_none());
        let text = render(&names, &r);
        assert!(
            text.contains("LEAK") && text.contains("10.1.0.7") && text.contains("not classified"),
            "{text}"
        );
        assert!(text.contains("(unknown id)") && text.contains("unknown_lane 6"), "{text}");
    }
}
