//! `tagger stats`: the decision counters, globally by outcome and per (Service, caller lane,
//! backend lane, outcome), once or as a live view with per-second rates.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use serde::Serialize;
use tagger_common::{Outcome, STAT_F_SHADOW, StatKey};

use super::{
    args::{Format, StatsArgs},
    render::{LaneRef, Names, ServiceName, frontend_label, print_json, table},
};
use crate::datapath::Tables;

/// The JSON document of `tagger stats` (one per line with `--watch`).
#[derive(Debug, Serialize)]
pub struct StatsReport {
    /// Seconds since the previous snapshot (null for a single or first snapshot).
    pub interval_seconds: Option<f64>,
    /// Global count per outcome name (every outcome is present).
    pub counters: BTreeMap<&'static str, u64>,
    /// Per-second rate per outcome name since the previous snapshot (null without one).
    pub rates: Option<BTreeMap<&'static str, f64>>,
    /// Shadow decisions (computed, counted, not applied) per outcome name (every outcome is
    /// present).
    pub shadow: BTreeMap<&'static str, u64>,
    /// Per-Service rows, by Service, caller lane, backend lane, outcome.
    pub per_service: Vec<ServiceStatRow>,
    /// Steered connections open now, per (Service, caller lane, backend lane).
    pub active_connections: Vec<ActiveRow>,
    /// Steered connections open now, per backend (`ip:port`).
    pub backend_connections: BTreeMap<String, u64>,
}

/// Open steered connections of one (Service, caller lane, backend lane).
#[derive(Debug, Serialize)]
pub struct ActiveRow {
    /// The Service id.
    pub svc_id: u32,
    /// Names, when published.
    pub service: Option<ServiceName>,
    /// Lane of the calling pods.
    pub caller_lane: LaneRef,
    /// Lane of the backends.
    pub backend_lane: LaneRef,
    /// Connections open now (TCP established, connected UDP).
    pub connections: u64,
}

/// One (Service, caller lane, backend lane, outcome) row.
#[derive(Debug, Serialize)]
pub struct ServiceStatRow {
    /// The Service id.
    pub svc_id: u32,
    /// Names, when published.
    pub service: Option<ServiceName>,
    /// Its frontends, `ip:port/proto`.
    pub frontends: Vec<String>,
    /// Lane of the calling pod.
    pub caller_lane: LaneRef,
    /// Lane of the backend chosen (null when none was: `refused_strict`, `no_backend`).
    pub backend_lane: Option<LaneRef>,
    /// Outcome name.
    pub outcome: &'static str,
    /// A shadow decision: computed and counted, the connection left unchanged.
    pub shadow: bool,
    /// Decisions counted (rows are kept in an LRU map: the least recently used may be evicted).
    pub count: u64,
    /// Per second since the previous snapshot (null without one).
    pub rate_per_second: Option<f64>,
}

/// What the outcome means, for the table.
#[must_use]
pub fn outcome_meaning(o: Outcome) -> &'static str {
    match o {
        Outcome::NotService => "destination is not a Service frontend: untouched",
        Outcome::Steered => "steered to a backend of the caller's own lane",
        Outcome::FellBack => "caller's lane had no backend: steered along its fallback chain",
        Outcome::RefusedStrict => "strict lane or Service, no backend in the lane: connect failed (EPERM)",
        Outcome::NoBackend => "no lane the caller may use has a backend: failed open",
        Outcome::SlotMiss => "backend slot missing (internal): failed open",
        Outcome::FamilyMismatch => "chosen backend's address family unreachable from the socket: failed open",
        Outcome::RevNatFull => "reverse translation entry not written (connection still steered)",
        Outcome::RevNatApplied => "getpeername/recvmsg shown the Service address",
        Outcome::UnknownPod => "caller in no registered pod cgroup: treated as base",
        Outcome::Routed => "a routing rule for (Service, caller lane) chose the backend lane",
        Outcome::Canary => "base caller's connection in the Service's canary share",
        Outcome::InboundFull => "accepted connection not counted per pod: the inbound map was full",
        Outcome::InboundNoSyn => {
            "accepted connection not classified: its SYN was not saved (listener older than tagger)"
        }
        Outcome::Passthrough => {
            "Service needs no lane steering here: left to the cluster's Service implementation"
        }
        Outcome::LeaseExpired => {
            "datapath lease ran out (no agent renewed it): Service connection failed open, untouched"
        }
    }
}

fn outcome_of(n: u32) -> Option<Outcome> {
    let n = n & !STAT_F_SHADOW;
    Outcome::ALL.into_iter().find(|o| *o as u32 == n)
}

/// One reading of the counters.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Global counters.
    pub counters: BTreeMap<Outcome, u64>,
    /// Global counters of shadow decisions.
    pub shadow: BTreeMap<Outcome, u64>,
    /// Per-Service rows.
    pub rows: BTreeMap<StatKey, u64>,
    /// When it was taken.
    pub at: Option<Instant>,
    /// Open steered connections.
    pub gauges: crate::lifecycle::Gauges,
}

impl Snapshot {
    /// Reads the counters.
    pub fn read(tables: &Tables) -> crate::Result<Self> {
        let snap = tables.counters()?;
        let rows = tables.service_stats()?.into_iter().map(|s| (s.key, s.count)).collect();
        let gauges = crate::lifecycle::Gauges::of(&tables.connections()?);
        Ok(Self { counters: snap.by_outcome, shadow: snap.shadow, rows, at: Some(Instant::now()), gauges })
    }
}

fn rate(now: u64, before: u64, secs: f64) -> f64 {
    // A counter only decreases when its LRU row was evicted and re-created: count from zero.
    let delta = if now >= before { now - before } else { now };
    #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
    let delta = delta as f64;
    delta / secs
}

/// The report of `now`, with rates against `before` when given.
#[must_use]
pub fn report(
    names: &Names,
    frontends: &BTreeMap<u32, Vec<String>>,
    now: &Snapshot,
    before: Option<&Snapshot>,
) -> StatsReport {
    let secs = match (before.and_then(|b| b.at), now.at) {
        (Some(b), Some(n)) => Some(n.duration_since(b).as_secs_f64().max(1e-3)),
        _ => None,
    };
    let counters =
        Outcome::ALL.iter().map(|&o| (o.name(), now.counters.get(&o).copied().unwrap_or(0))).collect();
    let shadow = Outcome::ALL.iter().map(|&o| (o.name(), now.shadow.get(&o).copied().unwrap_or(0))).collect();
    let rates = secs.zip(before).map(|(secs, before)| {
        Outcome::ALL
            .iter()
            .map(|&o| {
                let get = |s: &Snapshot| s.counters.get(&o).copied().unwrap_or(0);
                (o.name(), rate(get(now), get(before), secs))
            })
            .collect()
    });
    let mut per_service: Vec<ServiceStatRow> = now
        .rows
        .iter()
        .map(|(key, &count)| {
            let outcome = outcome_of(key.outcome);
            let chose_none = matches!(outcome, Some(Outcome::RefusedStrict | Outcome::NoBackend));
            ServiceStatRow {
                svc_id: key.svc_id,
                service: names.service(key.svc_id),
                frontends: frontends.get(&key.svc_id).cloned().unwrap_or_default(),
                caller_lane: names.lane(key.caller_lane),
                backend_lane: (!chose_none).then(|| names.lane(key.backend_lane)),
                outcome: outcome.map_or("unknown", Outcome::name),
                shadow: key.outcome & STAT_F_SHADOW != 0,
                count,
                rate_per_second: secs
                    .zip(before)
                    .map(|(secs, b)| rate(count, b.rows.get(key).copied().unwrap_or(0), secs)),
            }
        })
        .collect();
    per_service.sort_by(|a, b| {
        let key = |r: &ServiceStatRow| {
            (
                r.service.as_ref().map(ToString::to_string),
                r.svc_id,
                names.lane_label(r.caller_lane.id),
                r.backend_lane.as_ref().map(|l| names.lane_label(l.id)),
                r.outcome,
                r.shadow,
            )
        };
        key(a).cmp(&key(b))
    });
    let active_connections = now
        .gauges
        .per_service_lane
        .iter()
        .map(|(&(svc_id, caller, backend), &connections)| ActiveRow {
            svc_id,
            service: names.service(svc_id),
            caller_lane: names.lane(caller),
            backend_lane: names.lane(backend),
            connections,
        })
        .collect();
    let backend_connections =
        now.gauges.per_backend.iter().map(|(b, &n)| (crate::net::backend_addr(b).to_string(), n)).collect();
    StatsReport {
        interval_seconds: secs,
        counters,
        rates,
        shadow,
        per_service,
        active_connections,
        backend_connections,
    }
}

/// The report as tables.
#[must_use]
pub fn render_tables(names: &Names, r: &StatsReport) -> String {
    let with_rates = r.rates.is_some();
    let mut header = vec!["outcome", "count"];
    if with_rates {
        header.push("rate/s");
    }
    header.push("meaning");
    let mut t = table(&header, if with_rates { &[1, 2] } else { &[1] });
    for o in Outcome::ALL {
        let mut row = vec![o.name().to_owned(), r.counters.get(o.name()).copied().unwrap_or(0).to_string()];
        if let Some(rates) = &r.rates {
            row.push(format!("{:.1}", rates.get(o.name()).copied().unwrap_or(0.0)));
        }
        row.push(outcome_meaning(o).to_owned());
        t.add_row(row);
    }
    let mut out = format!("{t}\n");
    let shadowed: Vec<Outcome> =
        Outcome::ALL.into_iter().filter(|o| r.shadow.get(o.name()).is_some_and(|&n| n > 0)).collect();
    if !shadowed.is_empty() {
        let mut t = table(&["shadow outcome", "count", "meaning"], &[1]);
        for o in shadowed {
            t.add_row(vec![
                o.name().to_owned(),
                r.shadow[o.name()].to_string(),
                format!("would be: {}", outcome_meaning(o)),
            ]);
        }
        let _ =
            writeln!(out, "shadow mode: decisions computed and counted, connections left unchanged\n{t}\n");
    }
    let mut header = vec!["service", "frontend", "caller lane", "backend lane", "outcome", "count"];
    if with_rates {
        header.push("rate/s");
    }
    let mut t = table(&header, if with_rates { &[5, 6] } else { &[5] });
    for row in &r.per_service {
        let mut cells = vec![
            row.service.as_ref().map_or_else(|| format!("svc {}", row.svc_id), ToString::to_string),
            row.frontends.join("\n"),
            names.lane_label(row.caller_lane.id),
            row.backend_lane.as_ref().map_or_else(|| "-".to_owned(), |l| names.lane_label(l.id)),
            if row.shadow { format!("{} (shadow)", row.outcome) } else { row.outcome.to_owned() },
            row.count.to_string(),
        ];
        if with_rates {
            cells.push(format!("{:.1}", row.rate_per_second.unwrap_or(0.0)));
        }
        t.add_row(cells);
    }
    if r.per_service.is_empty() {
        out.push_str("no per-Service decision counted yet\n");
    } else {
        let _ = writeln!(out, "{t}");
    }
    if !r.active_connections.is_empty() {
        let mut t = table(&["service", "caller lane", "backend lane", "open connections"], &[3]);
        for row in &r.active_connections {
            t.add_row(vec![
                row.service.as_ref().map_or_else(|| format!("svc {}", row.svc_id), ToString::to_string),
                names.lane_label(row.caller_lane.id),
                names.lane_label(row.backend_lane.id),
                row.connections.to_string(),
            ]);
        }
        let _ = writeln!(out, "{t}");
        let mut t = table(&["backend", "open connections"], &[1]);
        for (b, n) in &r.backend_connections {
            t.add_row(vec![b.clone(), n.to_string()]);
        }
        let _ = writeln!(out, "{t}");
    }
    out
}

fn frontends_by_svc(tables: &Tables) -> crate::Result<BTreeMap<u32, Vec<String>>> {
    let mut m: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (key, svc) in tables.frontends()? {
        m.entry(svc.svc_id).or_default().push(frontend_label(&key));
    }
    Ok(m)
}

/// Runs `tagger stats`.
pub fn run(tables: &Tables, format: Format, args: &StatsArgs) -> anyhow::Result<()> {
    if args.inbound {
        let r = super::inbound::read(tables)?;
        match format {
            Format::Json => print_json(&r)?,
            Format::Table => print!("{}", super::inbound::render(&Names::read(tables)?, &r)),
        }
        return Ok(());
    }
    if !args.watch {
        let names = Names::read(tables)?;
        let r = report(&names, &frontends_by_svc(tables)?, &Snapshot::read(tables)?, None);
        match format {
            Format::Json => print_json(&r)?,
            Format::Table => print!("{}", render_tables(&names, &r)),
        }
        return Ok(());
    }
    let interval = Duration::from_secs_f64(args.interval);
    let tty = std::io::stdout().is_terminal();
    let mut before: Option<Snapshot> = None;
    let mut shown = 0u64;
    loop {
        // Names and frontends change while we watch: re-read them with every snapshot.
        let names = Names::read(tables)?;
        let now = Snapshot::read(tables)?;
        let r = report(&names, &frontends_by_svc(tables)?, &now, before.as_ref());
        let mut out = std::io::stdout().lock();
        match format {
            Format::Json => writeln!(out, "{}", serde_json::to_string(&r)?)?,
            Format::Table => {
                if tty {
                    // Home the cursor and clear the screen: a redraw in place.
                    write!(out, "\x1b[H\x1b[2J")?;
                }
                writeln!(
                    out,
                    "tagger stats, every {}s{} (Ctrl-C to stop)",
                    args.interval,
                    if before.is_none() { "; rates from the next refresh" } else { "" }
                )?;
                write!(out, "{}", render_tables(&names, &r))?;
                if !tty {
                    writeln!(out)?;
                }
            }
        }
        out.flush()?;
        drop(out);
        shown += 1;
        if args.count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        before = Some(now);
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use tagger_common::lane_id;

    use super::*;

    fn snapshot(steered: u64, row_count: u64, secs_later: u64, base: Instant) -> Snapshot {
        let key = StatKey {
            svc_id: 1,
            caller_lane: lane_id("gray"),
            backend_lane: lane_id("gray"),
            outcome: Outcome::Steered as u32,
        };
        let refused = StatKey {
            svc_id: 1,
            caller_lane: lane_id("gray"),
            backend_lane: 0,
            outcome: Outcome::RefusedStrict as u32,
        };
        let shadow_key = StatKey { outcome: Outcome::FellBack as u32 | STAT_F_SHADOW, ..key };
        Snapshot {
            counters: BTreeMap::from([(Outcome::Steered, steered)]),
            shadow: BTreeMap::from([(Outcome::FellBack, 7)]),
            rows: BTreeMap::from([(key, row_count), (refused, 1), (shadow_key, 7)]),
            at: Some(base + Duration::from_secs(secs_later)),
            gauges: crate::lifecycle::Gauges::default(),
        }
    }

    #[test]
    fn a_single_snapshot_has_counts_and_no_rates() {
        let mut names = Names::default();
        names.lanes.insert(lane_id("gray"), "gray".into());
        names.services.insert(1, ("demo".into(), "a".into(), "http".into()));
        let r = report(&names, &BTreeMap::new(), &snapshot(5, 5, 0, Instant::now()), None);
        assert_eq!(r.counters["steered"], 5);
        assert_eq!(r.counters.len(), Outcome::ALL.len());
        assert!(r.rates.is_none() && r.interval_seconds.is_none());
        let steered = r.per_service.iter().find(|row| row.outcome == "steered").unwrap();
        assert_eq!(steered.caller_lane.name.as_deref(), Some("gray"));
        assert_eq!(steered.backend_lane.as_ref().and_then(|l| l.name.as_deref()), Some("gray"));
        let refused = r.per_service.iter().find(|row| row.outcome == "refused_strict").unwrap();
        assert!(refused.backend_lane.is_none(), "no backend was chosen");
        let text = render_tables(&names, &r);
        assert!(text.contains("demo/a:http") && text.contains("steered"), "{text}");
        assert_eq!(r.shadow["fell_back"], 7);
        let shadow = r.per_service.iter().find(|row| row.shadow).unwrap();
        assert_eq!((shadow.outcome, shadow.count), ("fell_back", 7));
        assert!(!r.per_service.iter().any(|row| row.outcome == "steered" && row.shadow));
        assert!(text.contains("shadow mode") && text.contains("fell_back (shadow)"), "{text}");
        assert!(!text.contains("rate/s"), "{text}");
    }

    #[test]
    fn rates_come_from_successive_snapshots() {
        let names = Names::default();
        let t0 = Instant::now();
        let before = snapshot(10, 4, 0, t0);
        let now = snapshot(30, 8, 2, t0);
        let r = report(&names, &BTreeMap::new(), &now, Some(&before));
        assert!((r.rates.as_ref().unwrap()["steered"] - 10.0).abs() < 1e-9);
        assert!(r.rates.as_ref().unwrap()["fell_back"].abs() < 1e-9);
        let steered = r.per_service.iter().find(|row| row.outcome == "steered").unwrap();
        assert_eq!(steered.rate_per_second, Some(2.0));
        assert!(render_tables(&names, &r).contains("rate/s"));
    }

    #[test]
    fn an_evicted_and_recreated_row_counts_from_zero() {
        assert!((rate(3, 10, 1.0) - 3.0).abs() < 1e-9);
        assert!((rate(15, 10, 2.0) - 2.5).abs() < 1e-9);
    }

    #[test]
    fn every_outcome_has_a_meaning() {
        for o in Outcome::ALL {
            assert!(!outcome_meaning(o).is_empty());
        }
    }
}
