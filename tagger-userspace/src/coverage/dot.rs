//! The report as a graphviz graph (`tagger lanes coverage -o dot | dot -Tsvg`): callers and
//! Services as nodes (with the lanes they have backends in), each lane's edges coloured by how
//! the lane fared, base edges grey, and the Services where a lane stops outlined in red.

use std::{collections::BTreeMap, fmt::Write as _};

use super::{CoverageReport, LaneEdge, Peer, PeerKind, Verdict};

/// Colour of an edge by its worst verdict.
fn colour(e: &LaneEdge) -> &'static str {
    let has = |v| e.verdicts.contains_key(&v);
    if has(Verdict::Refused) || has(Verdict::LeftToCluster) {
        "#c0392b"
    } else if has(Verdict::FellBack) {
        "#e67e22"
    } else if has(Verdict::Routed) {
        "#2980b9"
    } else {
        "#27ae60"
    }
}

fn id(p: &Peer) -> String {
    quote(&format!("{}:{p}", p.kind.name()))
}

/// A graphviz string literal.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Renders the graph.
#[must_use]
pub fn render(r: &CoverageReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph lane_coverage {{");
    let _ = writeln!(out, "  rankdir=LR;");
    let _ = writeln!(out, "  label={};", quote(&format!("tagger lane coverage ({})", r.source)));
    let _ = writeln!(out, "  labelloc=t; fontname=\"Helvetica\";");
    let _ = writeln!(out, "  node [fontname=\"Helvetica\", shape=box, style=rounded];");
    let _ = writeln!(out, "  edge [fontname=\"Helvetica\", fontsize=10];");
    // Nodes: every peer once; where a lane stops, outlined and labelled.
    let mut nodes = BTreeMap::<&Peer, Vec<String>>::new();
    let all_edges = r.lanes.iter().flat_map(|l| &l.edges).chain(&r.base_edges);
    for e in all_edges {
        nodes.entry(&e.caller).or_default();
        nodes.entry(&e.service).or_default();
    }
    for lane in &r.lanes {
        for s in lane.stops.iter().filter(|s| s.breaks) {
            nodes.entry(&s.service).or_default().push(format!("{} stops here", lane.lane));
        }
    }
    for (peer, notes) in &nodes {
        let shape = if peer.kind == PeerKind::Workload { ", shape=ellipse" } else { "" };
        let mut label = peer.to_string();
        if let Some(lanes) = r.observed.lane_backends.get(peer) {
            label.push_str("\\n");
            label.push_str(&lanes.keys().cloned().collect::<Vec<_>>().join(" · "));
        }
        for n in notes {
            label.push_str("\\n");
            label.push_str(n);
        }
        let stop =
            if notes.is_empty() { "" } else { ", color=\"#c0392b\", penwidth=2.5, fontcolor=\"#c0392b\"" };
        let _ = writeln!(out, "  {} [label=\"{}\"{shape}{stop}];", id(peer), label.replace('"', "\\\""));
    }
    for lane in &r.lanes {
        for e in &lane.edges {
            let n: u64 = e.verdicts.values().sum();
            let _ = writeln!(
                out,
                "  {} -> {} [label={}, color=\"{}\", fontcolor=\"{}\", penwidth=2];",
                id(&e.caller),
                id(&e.service),
                quote(&format!("{}: {} ({n})", lane.lane, e.summary)),
                colour(e),
                colour(e),
            );
        }
    }
    for e in &r.base_edges {
        let n: u64 = e.verdicts.values().sum();
        let _ = writeln!(
            out,
            "  {} -> {} [label={}, color=\"#95a5a6\", fontcolor=\"#7f8c8d\", style=dashed];",
            id(&e.caller),
            id(&e.service),
            quote(&format!("base ({n})")),
        );
    }
    let _ = writeln!(out, "}}");
    out
}
