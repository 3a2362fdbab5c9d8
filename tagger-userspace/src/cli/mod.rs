//! The `tagger` CLI: shows what the datapath on this node does, from its pinned maps.
//!
//! ```text
//! tagger [--bpffs DIR] [-o table|json] status [--agent-addr HOST:PORT]
//!                                       pods | services | lanes
//!                                       lanes coverage [--prometheus URL [--window 15m]]   (-o table|json|dot)
//!                                       stats [--watch [--interval SECS] [--count N]]
//!                                       explain --pod <ns/name|cgroup-id|cgroup-path> <ip:port[/proto]>
//! ```
//!
//! The maps are opened only through [`Datapath::open_read_only`](crate::datapath::Datapath):
//! every descriptor carries `BPF_F_RDONLY`, so the kernel refuses any write through them and the
//! CLI can never change the datapath. It works while the agent is down. Names (pods, Services,
//! lanes) come from the metadata maps the agent publishes; without them ids are shown (lane ids
//! as `0x…` in tables).
//!
//! # JSON output (`-o json`)
//!
//! One pretty-printed document per invocation (with `stats --watch`, one compact document per
//! line and refresh). Fields are snake_case and only ever added to. Conventions:
//! - a **lane** is `{"id": <u32>, "name": <string|null>}`; the id is FNV-1a of the name (base is
//!   `{"id": 0, "name": "base"}`), the name is null when the agent has not published it;
//! - a **Service** is `{"namespace", "name", "port_name"}` or null when not published;
//! - addresses are strings: frontends `"ip:port/proto"`, backends `"ip:port"` (IPv6 in brackets);
//! - outcomes are the datapath's stable names ([`Outcome::name`](tagger_common::Outcome::name)):
//!   `not_service`, `steered`, `fell_back`, `refused_strict`, `no_backend`, `slot_miss`,
//!   `family_mismatch`, `revnat_full`, `revnat_applied`, `unknown_pod`;
//! - a **policy** is `{"configured": bool, "strict": bool, "fallback": [lane…]}` (the chain the
//!   datapath walks; `[base]` when not configured, empty for base and strict lanes).
//!
//! Documents, by subcommand (see each struct for every field):
//! - `status` ([`status::StatusReport`]): `{bpffs, healthy, programs: [{program, link_pin,
//!   pinned, pinned_since_unix, pinned_since, link_id, program_id, cgroup_id, cgroup_path,
//!   attach_type, error}], maps: [{map, pin, pinned, entries, capacity, fill_ratio}],
//!   maps_error, config: {pod_level_min, pod_level_max}, agent: {address, reachable, ready,
//!   detail}, attach: {cgroup_path, level, at_cgroup_root, others, others_before_tagger, note,
//!   hooks: [{program, attach_type, error, programs: [{order, program_id, name, prog_type,
//!   attached_at, attach_flags, tagger}]}]} | null}` (every program on tagger's hooks at its
//!   cgroup and above, in run order: [`hooks::AttachReport`]);
//! - `pods` ([`pods::PodsReport`]): `{pods: [{cgroup_id, level, lane, namespace, name}]}`;
//! - `services` ([`services::ServicesReport`]): `{services: [{svc_id, frontends: [string],
//!   service, flags: ["strict"], strict, lanes: [{lane, generation, count, backends: [string],
//!   if_empty: policy}]}], lane_policies: [{lane, policy}]}`;
//! - `lanes` ([`lanes::LanesReport`]): `{lanes: [{lane, id_hex, policy, pods, backend_sets}]}`;
//! - `lanes coverage` ([`crate::coverage::CoverageReport`]): `{source, lanes: [{lane, edges:
//!   [{caller, service, verdicts: {verdict: count}, backend_lanes: {lane: count}, summary}],
//!   stops: [{service, only_fallback, continued_in, has_lane_backends, lane_capable_callees,
//!   breaks, message}], leaks: [{receiver, pod_lane, connections}], not_reached, summary}],
//!   base_edges, observed: {edges, arrivals, lane_backends}}`; here lanes are names (strings)
//!   and callers, receivers and Services are `{kind: service|workload, namespace, name}`;
//! - `stats` ([`stats::StatsReport`]): `{interval_seconds, counters: {outcome: count},
//!   rates: {outcome: per_second} | null, per_service: [{svc_id, service, frontends,
//!   caller_lane, backend_lane (null when no backend was chosen), outcome, count,
//!   rate_per_second}]}`;
//! - `stats --inbound` ([`inbound::InboundReport`]): `{rows: [{pod, address, pod_lane,
//!   caller_lane (null when untagged), kind, connections}], totals: {kind: count},
//!   not_classified, not_counted}`;
//! - `explain` ([`explain::Explanation`]): `{caller: {query, found_by, cgroup_path,
//!   cgroup_level, registered, pod_cgroup_id, pod_level, namespace, name, lane, note},
//!   destination, frontend: {svc_id, service, strict} | null, own_set: {lane, count} | null,
//!   lane_strict, fallback: [{step, set: {lane, count}, chosen}], outcome, backend_lane,
//!   backends: [{address, reachable}], affinity: {timeout_seconds, remembered, idle_seconds,
//!   held} | null, steps: [{check, result}]}`.
//!
//! # Exit codes
//! 0 on success; 1 on an error (message on stderr, naming the pin path that is missing or
//! unreadable), and from `status` when a program link or map pin is missing; 2 on a usage error.

pub mod args;
pub mod caller;
pub mod coverage;
pub mod explain;
pub mod hooks;
pub mod inbound;
pub mod lanes;
pub mod links;
pub mod open;
pub mod pods;
pub mod render;
pub mod services;
pub mod stats;
pub mod status;

use std::process::ExitCode;

use clap::Parser as _;

pub use self::args::{Cli, Command, Format, LanesArgs, LanesView, Output};

/// Entry point of the `tagger` binary.
#[must_use]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tagger: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one invocation; `Ok(false)` means "answered, but unhealthy" (exit 1 without an error).
pub fn run(cli: &Cli) -> anyhow::Result<bool> {
    let dir = cli.bpffs.as_path();
    // `status` reports a partly installed datapath; everything else needs all maps.
    let open = || open::open_read_only(dir);
    if let Command::Lanes(LanesArgs { view: Some(LanesView::Coverage(args)) }) = &cli.command {
        coverage::run(dir, cli.output, args)?;
        return Ok(true);
    }
    let Some(format) = cli.output.plain() else {
        anyhow::bail!("-o dot is only for `tagger lanes coverage`; use -o table or -o json here");
    };
    match &cli.command {
        Command::Status(args) => return status::run(dir, format, args, cli.cgroup_root.as_deref()),
        Command::Pods => pods::run(open()?.tables(), format)?,
        Command::Services => services::run(open()?.tables(), format)?,
        Command::Lanes(_) => lanes::run(open()?.tables(), format)?,
        Command::Stats(args) => stats::run(open()?.tables(), format, args)?,
        Command::Explain(args) => {
            explain::run(open()?.tables(), format, args, cli.cgroup_root.as_deref())?;
        }
    }
    Ok(true)
}
