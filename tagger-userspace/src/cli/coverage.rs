//! `tagger lanes coverage`: the lane coverage report (see [`crate::coverage`]) from this node's
//! pins or, with `--prometheus`, from the whole cluster; as tables, JSON or a graphviz graph.

use std::{fmt::Write as _, path::Path};

use super::{
    args::{CoverageArgs, Output},
    render::{print_json, table},
};
use crate::coverage::{self, CoverageReport, LaneEdge, Verdict, prometheus::Endpoint};

/// Runs `lanes coverage`.
///
/// # Errors
/// Unreadable pins, or a Prometheus that cannot be asked (named).
pub fn run(bpffs: &Path, output: Output, args: &CoverageArgs) -> anyhow::Result<()> {
    let report = if let Some(url) = &args.prometheus {
        let endpoint = Endpoint::parse(url)?;
        let observed = coverage::prometheus::observe(&endpoint, args.window.as_deref())?;
        let window = args.window.as_deref().map_or_else(String::new, |w| format!(", last {w}"));
        coverage::report(&format!("prometheus {url}{window}"), observed)
    } else {
        let dp = super::open::open_read_only(bpffs)?;
        let observed = coverage::pins::observe(dp.tables())?;
        coverage::report(&format!("node pins {}", bpffs.display()), observed)
    };
    match output {
        Output::Json => print_json(&report)?,
        Output::Dot => print!("{}", coverage::dot::render(&report)),
        Output::Table => print!("{}", render(&report)),
    }
    Ok(())
}

/// The report for people.
#[must_use]
pub fn render(r: &CoverageReport) -> String {
    let mut out = format!("Lane coverage ({})\n", r.source);
    if r.lanes.is_empty() {
        out.push_str("\nNo lane other than base has callers or backends.\n");
    }
    for lane in &r.lanes {
        let _ = writeln!(out, "\n{}", lane.summary);
        if !lane.edges.is_empty() {
            let _ = writeln!(out, "{}", edges_table(&lane.edges, &format!("{} caller", lane.lane)));
        }
        for s in &lane.stops {
            let mark = if s.breaks { "✘ break:" } else { "· fallback:" };
            let _ = writeln!(out, "  {mark} {}", s.message);
        }
        for l in &lane.leaks {
            let _ = writeln!(
                out,
                "  ✘ leak: {} connections of lane {} reached {}'s {} pods without falling back or being routed",
                l.connections, lane.lane, l.receiver, l.pod_lane
            );
        }
        if !lane.not_reached.is_empty() {
            let names = lane.not_reached.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            let _ = writeln!(out, "  · not reached by any {} caller: {names}", lane.lane);
        }
    }
    if !r.base_edges.is_empty() {
        let _ = writeln!(out, "\nbase callers (where a lane that stopped continues)");
        let _ = writeln!(out, "{}", edges_table(&r.base_edges, "base caller"));
    }
    out
}

fn edges_table(edges: &[LaneEdge], caller: &str) -> comfy_table::Table {
    let mut t = table(&[caller, "Service", "connections", "lane"], &[2]);
    for e in edges {
        let n: u64 = e.verdicts.values().sum();
        let flag = if e.verdicts.keys().any(|v| *v != Verdict::Held) { " ⚠" } else { "" };
        t.add_row([
            format!("{} ({})", e.caller, e.caller.kind.name()),
            e.service.to_string(),
            n.to_string(),
            format!("{}{flag}", e.summary),
        ]);
    }
    t
}
