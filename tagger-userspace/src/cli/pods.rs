//! `tagger pods`: the registered pod cgroups and their lanes.

use serde::Serialize;

use super::{
    args::Format,
    render::{LaneRef, Names, print_json, table},
};
use crate::datapath::Tables;

/// The JSON document of `tagger pods`.
#[derive(Debug, Serialize)]
pub struct PodsReport {
    /// Registered pod cgroups, by cgroup id.
    pub pods: Vec<PodRow>,
}

/// One registered pod cgroup.
#[derive(Debug, Serialize)]
pub struct PodRow {
    /// The pod cgroup's id (its inode on cgroup2).
    pub cgroup_id: u64,
    /// Its depth below the cgroup v2 root.
    pub level: u32,
    /// The pod's lane.
    pub lane: LaneRef,
    /// Namespace, when the agent published it.
    pub namespace: Option<String>,
    /// Pod name, when the agent published it.
    pub name: Option<String>,
}

/// Reads the report.
pub fn collect(tables: &Tables) -> anyhow::Result<PodsReport> {
    let names = Names::read(tables)?;
    let meta = tables.pod_meta()?;
    let pods = tables
        .pods()?
        .into_iter()
        .map(|(id, entry)| {
            let (namespace, name) = meta.get(&id).cloned().unzip();
            PodRow { cgroup_id: id, level: entry.level, lane: names.lane(entry.lane), namespace, name }
        })
        .collect();
    Ok(PodsReport { pods })
}

/// Runs `tagger pods`.
pub fn run(tables: &Tables, format: Format) -> anyhow::Result<()> {
    let report = collect(tables)?;
    match format {
        Format::Json => print_json(&report)?,
        Format::Table => {
            let names = Names::read(tables)?;
            let mut t = table(&["pod", "cgroup id", "level", "lane"], &[1, 2]);
            for p in &report.pods {
                let pod = match (&p.namespace, &p.name) {
                    (Some(ns), Some(name)) => format!("{ns}/{name}"),
                    _ => "(not published)".to_owned(),
                };
                t.add_row(vec![
                    pod,
                    p.cgroup_id.to_string(),
                    p.level.to_string(),
                    names.lane_label(p.lane.id),
                ]);
            }
            println!("{t}");
            println!("{} pod cgroup(s) registered; unregistered callers are base", report.pods.len());
        }
    }
    Ok(())
}
