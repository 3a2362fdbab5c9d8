//! Traffic shaping end to end: the real `tagger-agent` on the file source turns Service
//! annotations and the lanes config into the datapath's shaping entries, and real connections
//! follow them.

use std::{net::SocketAddr, time::Duration};

use tagger::datapath::Tables;
use tagger_common::{Outcome, SVC_F_ROUTED, SVC_F_SHAPED, lane_id};
use tagger_tests::{
    agent::{AgentSandbox, PORT, pod_in_lane, set_size},
    stats::{assert_binomial, mean_linear_warm_share},
};

/// Generous: loading the datapath takes much longer on an emulated 5.10 kernel.
const WAIT: Duration = Duration::from_secs(30);

fn vip() -> SocketAddr {
    "10.96.11.1:80".parse().unwrap()
}

/// The frontend entry of the VIP.
fn frontend_flags(t: &Tables) -> u32 {
    t.frontend(&tagger::net::frontend_key(vip(), tagger::net::Proto::Tcp))
        .ok()
        .flatten()
        .map_or(0, |s| s.flags)
}

fn sandbox() -> AgentSandbox {
    let mut sb = AgentSandbox::new();
    sb.backend("a-base", None);
    sb.backend("a-gray", Some("gray"));
    sb.caller("gw-base", None);
    sb.caller("gw-gray", Some("gray"));
    sb.cluster.service("a", &[vip().ip()], vip().port(), PORT, &["a-base", "a-gray"]);
    sb
}

fn annotate(sb: &mut AgentSandbox, key: &str, value: &str) {
    sb.cluster.services.get_mut("a").unwrap().annotations.insert(key.to_owned(), value.to_owned());
}

fn count(replies: &[String], name: &str) -> usize {
    replies.iter().filter(|r| *r == name).count()
}

#[test]
fn canary_annotation_and_routing_rule_through_the_agent() {
    let mut sb = sandbox();
    annotate(&mut sb, "tagger.io/canary", "gray=30");
    let lanes = sb.write_lanes_config("rules:\n  - {from: gray, namespace: demo, name: a, to: [base]}\n");
    sb.start_agent_on_file(&["--lanes-config", &lanes.to_string_lossy()]);
    let gw_gray = sb.pod_cgroup("gw-gray");
    sb.wait_for("service a shaped and routed", WAIT, |t| {
        pod_in_lane(t, &gw_gray, "gray")
            && set_size(t, vip(), "gray") == Some(1)
            && frontend_flags(t) & (SVC_F_SHAPED | SVC_F_ROUTED) == SVC_F_SHAPED | SVC_F_ROUTED
    });

    // Base callers: 30% to gray, within 4σ of 2000 connections (σ ≈ 1%).
    let n = 2000;
    let got: Vec<String> = sb.call("gw-base", vip(), n).iter().map(|a| a.reply().to_owned()).collect();
    let gray = count(&got, "a-gray");
    assert!((520..=680).contains(&gray), "{gray} of {n} to gray, expected ~600");
    // The rule sends gray callers to base.
    assert_eq!(sb.reached("gw-gray", vip(), 30), ["a-base"]);

    // A bad annotation is counted and the Service handled as without it: no canary.
    annotate(&mut sb, "tagger.io/canary", "gray=150%");
    sb.write_source_file();
    sb.wait_for("canary gone", WAIT, |t| t.shapings().is_ok_and(|s| s.is_empty()));
    assert_eq!(sb.reached("gw-base", vip(), 200), ["a-base"]);
    let log = sb.agent_log();
    assert!(
        log.contains("tagger.io/canary=\"gray=150%\"") && log.contains("more than 100%; ignored"),
        "{log}"
    );
}

#[test]
fn shadow_mode_and_a_bad_shaping_config_through_the_agent() {
    let mut sb = sandbox();
    let lanes = sb.write_lanes_config("lanes:\n  gray:\n    mode: shadow\n");
    sb.start_agent_on_file(&["--lanes-config", &lanes.to_string_lossy()]);
    let gw_gray = sb.pod_cgroup("gw-gray");
    sb.wait_for("gray in shadow", WAIT, |t| {
        pod_in_lane(t, &gw_gray, "gray")
            && set_size(t, vip(), "gray") == Some(1)
            && t.lane_policies().is_ok_and(|p| p.contains_key(&lane_id("gray")))
    });
    let before = sb_counters(&sb);
    // Gray callers in shadow: the destination is left as is, and the node's own Service
    // implementation balances it over every backend (tagger would have sent all 20 to gray).
    assert_eq!(sb.reached("gw-gray", vip(), 20), ["a-base", "a-gray"], "shadow: left to the cluster");
    // Base callers are enforced.
    assert_eq!(sb.reached("gw-base", vip(), 20), ["a-base"]);
    let after = sb_counters(&sb);
    assert_eq!(after.shadow(Outcome::Steered) - before.shadow(Outcome::Steered), 20);
    assert_eq!(after.get(Outcome::Steered) - before.get(Outcome::Steered), 20);

    // A bad value is rejected with a clear message and the previous config stays in force.
    sb.write_lanes_config("lanes:\n  gray:\n    mode: shadow\n    warmup: -5s\n");
    std::thread::sleep(Duration::from_millis(500));
    let log = sb.agent_log();
    assert!(log.contains("lanes config rejected") && log.contains("duration \"-5s\": negative"), "{log}");
    let before = sb_counters(&sb);
    let _ = sb.call("gw-gray", vip(), 3);
    assert_eq!(
        sb_counters(&sb).shadow(Outcome::Steered) - before.shadow(Outcome::Steered),
        3,
        "still shadow"
    );
}

fn sb_counters(sb: &AgentSandbox) -> tagger::datapath::CounterSnapshot {
    let mut out = None;
    sb.wait_for("counters", WAIT, |t| {
        out = t.counters().ok();
        out.is_some()
    });
    out.unwrap()
}

#[test]
fn a_backend_ready_after_start_warms_up_and_one_present_at_start_does_not() {
    let mut sb = sandbox();
    annotate(&mut sb, "tagger.io/warmup", "5s");
    sb.start_agent_on_file(&[]);
    sb.wait_for("service a", WAIT, |t| set_size(t, vip(), "base") == Some(1));
    std::thread::sleep(Duration::from_millis(300));
    let warm = |sb: &AgentSandbox| {
        let mut out = None;
        sb.wait_for("warm entries", WAIT, |t| {
            out = t.warm_entries().ok();
            out.is_some()
        });
        out.unwrap()
    };
    assert!(warm(&sb).is_empty(), "backends present at start are not re-warmed");

    // A second base backend becomes ready: it warms up, from about 10% of the share.
    sb.backend("a-new", None);
    sb.cluster.services.get_mut("a").unwrap().backends.push("a-new".into());
    sb.write_source_file();
    sb.wait_for("a-new warming", WAIT, |t| {
        set_size(t, vip(), "base") == Some(2) && t.warm_entries().is_ok_and(|w| w.len() == 1)
    });
    let entry = *warm(&sb).values().next().unwrap();
    assert_eq!(entry.warmup_ns, 5_000_000_000);
    // An agent restart keeps the warm-up where it was (the entry is adopted, not reset or
    // dropped).
    sb.agent.as_mut().unwrap().terminate();
    sb.start_agent_on_file(&[]);
    std::thread::sleep(Duration::from_millis(500));
    sb.wait_for("agent back", WAIT, |t| set_size(t, vip(), "base") == Some(2));
    assert_eq!(warm(&sb).values().next(), Some(&entry), "{}", sb.agent_log());
    let age = tagger::sys::monotonic_now_ns().saturating_sub(entry.ready_ns);
    assert!(age < 2_000_000_000, "ready time is the agent's observation, on the kernel clock: {age} ns ago");
    // The share of the new backend over the first connections is bounded by the ramp's mean
    // over the time they took; once the warm-up is over it is half.
    let since_ready = |e: &tagger_common::WarmEntry| {
        #[expect(clippy::cast_precision_loss, reason = "seconds for a bound")]
        let secs = tagger::sys::monotonic_now_ns().saturating_sub(e.ready_ns) as f64 / 1e9;
        secs
    };
    let from = since_ready(&entry);
    let early: Vec<String> = sb.call("gw-base", vip(), 400).iter().map(|a| a.reply().to_owned()).collect();
    let bound = mean_linear_warm_share(from, since_ready(&entry), 5.0, 0.1);
    let early = count(&early, "a-new");
    #[expect(clippy::cast_precision_loss, reason = "test counts")]
    let early_share = early as f64 / 400.0;
    assert!(
        early_share <= bound + 4.0 * (bound * (1.0 - bound) / 400.0).sqrt(),
        "early {early}/400 from {from:.2}s, bound {bound:.3}"
    );
    std::thread::sleep(Duration::from_secs(5).saturating_sub(Duration::from_secs_f64(since_ready(&entry))));
    let late: Vec<String> = sb.call("gw-base", vip(), 1000).iter().map(|a| a.reply().to_owned()).collect();
    assert_binomial("after the warm-up", count(&late, "a-new"), 1000, 0.5, 4.0);
    // The agent drops the entry once the warm-up is over, and the warm-up flag with it.
    sb.wait_for("warm-up over", WAIT, |t| {
        t.warm_entries().is_ok_and(|w| w.is_empty()) && t.shapings().is_ok_and(|s| s.is_empty())
    });
}
