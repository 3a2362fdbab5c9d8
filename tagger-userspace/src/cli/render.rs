//! Output rendering shared by the subcommands: tables (comfy-table), JSON, and the names that
//! make ids readable (lane names, Service names) — all read from the maps the agent published.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use comfy_table::{CellAlignment, ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;
use tagger_common::{BASE_LANE, FrontendKey, LanePolicy, MAX_CHAIN};

use crate::{
    datapath::Tables,
    net::{Proto, frontend_addr},
};

/// A table with the CLI's look; `numeric` columns (by index) are right-aligned.
#[must_use]
pub fn table(header: &[&str], numeric: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    for &i in numeric {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// Prints a value as pretty JSON followed by a newline.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// A lane as the JSON output shows it: the id, and the name when it is known (base is always
/// named; other names come from what the agent published).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LaneRef {
    /// Lane id (FNV-1a of the name; 0 = base).
    pub id: u32,
    /// Lane name, or null when the agent has not published it.
    pub name: Option<String>,
}

/// A Service's names as the agent published them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceName {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Service port name (may be empty).
    pub port_name: String,
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        Ok(())
    }
}

/// Names published by the agent, for turning ids into words.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// Lane id → name.
    pub lanes: BTreeMap<u32, String>,
    /// svc_id → (namespace, name, port name).
    pub services: BTreeMap<u32, (String, String, String)>,
}

impl Names {
    /// Reads the published names.
    pub fn read(tables: &Tables) -> crate::Result<Self> {
        Ok(Self { lanes: tables.lane_names()?, services: tables.service_meta()? })
    }

    /// A lane's JSON form.
    #[must_use]
    pub fn lane(&self, id: u32) -> LaneRef {
        let name = if id == BASE_LANE { Some("base".to_owned()) } else { self.lanes.get(&id).cloned() };
        LaneRef { id, name }
    }

    /// A lane for people: its name, or its id in hex when no name is published.
    #[must_use]
    pub fn lane_label(&self, id: u32) -> String {
        crate::datapath::lane_label(&self.lanes, id)
    }

    /// A Service's names, when published.
    #[must_use]
    pub fn service(&self, svc_id: u32) -> Option<ServiceName> {
        self.services.get(&svc_id).map(|(namespace, name, port_name)| ServiceName {
            namespace: namespace.clone(),
            name: name.clone(),
            port_name: port_name.clone(),
        })
    }

    /// A Service for people: `ns/name:port`, or `svc <id>` when no name is published.
    #[must_use]
    pub fn service_label(&self, svc_id: u32) -> String {
        self.service(svc_id).map_or_else(|| format!("svc {svc_id}"), |s| s.to_string())
    }

    /// A lane chain for people: `gray → base`.
    #[must_use]
    pub fn chain_label(&self, chain: &[u32]) -> String {
        if chain.is_empty() {
            return "(empty: no fallback)".to_owned();
        }
        chain.iter().map(|&l| self.lane_label(l)).collect::<Vec<_>>().join(" → ")
    }
}

pub use crate::datapath::lane_hex;

/// The valid part of a lane policy's chain.
#[must_use]
pub fn policy_chain(policy: &LanePolicy) -> &[u32] {
    let len = usize::try_from(policy.chain_len).unwrap_or(MAX_CHAIN).min(MAX_CHAIN);
    &policy.chain[..len]
}

/// A frontend key as `ip:port/proto` (IPv6 in brackets; an unknown protocol as its number).
#[must_use]
pub fn frontend_label(key: &FrontendKey) -> String {
    let (addr, proto) = frontend_addr(key);
    match proto {
        Some(p) => format!("{addr}/{p}"),
        None => format!("{addr}/{}", key.proto),
    }
}

/// `ip:port/proto` of an address and protocol.
#[must_use]
pub fn destination_label(addr: SocketAddr, proto: Proto) -> String {
    format!("{addr}/{proto}")
}

/// Seconds since the Unix epoch of a time (0 before it).
#[must_use]
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A Unix time as RFC 3339 UTC (`2024-05-01T12:00:00Z`).
#[must_use]
pub fn rfc3339(unix: u64) -> String {
    let days = i64::try_from(unix / 86_400).unwrap_or(i64::MAX);
    let secs = unix % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 → (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, u32::try_from(m).unwrap_or(1), u32::try_from(d).unwrap_or(1))
}

/// A duration for people: `3d4h`, `2h5m`, `4m10s`, `12s`.
#[must_use]
pub fn ago(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{}h", s / 86_400, s / 3600 % 24),
    }
}

#[cfg(test)]
mod tests {
    use tagger_common::lane_id;

    use super::*;
    use crate::net::frontend_key;

    #[test]
    fn lanes_are_named_base_published_or_hex() {
        let mut names = Names::default();
        names.lanes.insert(lane_id("gray"), "gray".into());
        assert_eq!(names.lane(0), LaneRef { id: 0, name: Some("base".into()) });
        assert_eq!(names.lane_label(lane_id("gray")), "gray");
        assert_eq!(names.lane_label(0x1234), "0x00001234");
        assert_eq!(names.lane(0x1234).name, None);
        assert_eq!(names.chain_label(&[lane_id("gray"), 0]), "gray → base");
        assert_eq!(names.chain_label(&[]), "(empty: no fallback)");
    }

    #[test]
    fn services_are_named_when_published() {
        let mut names = Names::default();
        names.services.insert(3, ("demo".into(), "a".into(), "http".into()));
        names.services.insert(4, ("demo".into(), "b".into(), String::new()));
        assert_eq!(names.service_label(3), "demo/a:http");
        assert_eq!(names.service_label(4), "demo/b");
        assert_eq!(names.service_label(5), "svc 5");
    }

    #[test]
    fn frontends_print_as_address_port_proto() {
        let k = frontend_key("10.96.0.10:80".parse().unwrap(), Proto::Tcp);
        assert_eq!(frontend_label(&k), "10.96.0.10:80/tcp");
        let k = frontend_key("[fd00::1]:53".parse().unwrap(), Proto::Udp);
        assert_eq!(frontend_label(&k), "[fd00::1]:53/udp");
    }

    #[test]
    fn times_print_as_rfc3339_and_durations_compactly() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(ago(Duration::from_secs(42)), "42s");
        assert_eq!(ago(Duration::from_secs(250)), "4m10s");
        assert_eq!(ago(Duration::from_mins(125)), "2h5m");
        assert_eq!(ago(Duration::from_hours(76)), "3d4h");
    }
}
