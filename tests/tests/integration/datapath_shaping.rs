//! Traffic shaping on the real kernel: canary share (per connection and sticky per pod),
//! routing rules, shadow mode and warm-up, each measured on thousands of real connections and
//! asserted within binomial bounds.

use std::{net::SocketAddr, time::Instant};

use tagger::{
    config::values::Warmup,
    net::{Proto, backend},
    sys::monotonic_now_ns,
};
use tagger_common::{
    BASE_LANE, CFG_F_SHADOW, CFG_F_SHADOW_LANES, LANE_F_SHADOW, LANE_F_STRICT, LanePolicy, Outcome, RouteKey,
    SHAPE_F_CANARY, SHAPE_F_STICKY, SHAPE_F_WARMUP, SVC_F_ROUTED, SVC_F_SHAPED, SVC_F_STRICT, SvcShaping,
    WEIGHT_FULL, WarmKey, lane_id, warm_weight,
};
use tagger_tests::{
    cgroup::TestCgroup,
    client::{Attempt, Mode, attempts},
    scenario::{Sandbox, replies},
    stats::{assert_binomial, mean_linear_warm_share, warm_pick_share},
};

const VIP: &str = "10.96.0.10:80";

fn vip() -> SocketAddr {
    VIP.parse().unwrap()
}

fn chain(lanes: &[&str], flags: u32) -> LanePolicy {
    let mut p = LanePolicy { flags, chain_len: u32::try_from(lanes.len()).unwrap(), ..LanePolicy::default() };
    for (i, l) in lanes.iter().enumerate() {
        p.chain[i] = lane_id(l);
    }
    p
}

fn count_of(attempts: &[Attempt], reply: &str) -> usize {
    replies(attempts).get(reply).copied().unwrap_or(0)
}

#[test]
fn canary_sends_ten_percent_of_base_callers_connections_to_gray() {
    let mut sb = Sandbox::new();
    let (base1, _) = sb.backend("k-base");
    let (gray1, _) = sb.backend("k-gray");
    sb.service(vip(), Proto::Tcp, 1, SVC_F_SHAPED, &[("base", &[base1]), ("gray", &[gray1])]);
    let shaping =
        SvcShaping { flags: SHAPE_F_CANARY, canary_lane: lane_id("gray"), canary_bp: 1000, _pad: 0 };
    sb.dp.dp.tables_mut().set_shaping(1, &shaping).unwrap();
    let base = sb.caller("base", Some("base"));
    let n = 10_000;
    let got = sb.call(&base, Mode::Tcp, vip(), n);
    let gray = count_of(&got, "k-gray");
    assert_eq!(gray + count_of(&got, "k-base"), n, "{:?}", replies(&got));
    assert_binomial("canary share", gray, n, 0.10, 4.0);
    let c = sb.dp.dp.tables().counters().unwrap();
    assert_eq!(c.get(Outcome::Canary), gray as u64, "{c:?}");

    // Gray callers are untouched by the canary: all gray.
    let gray_caller = sb.caller("gray", Some("gray"));
    assert_eq!(count_of(&sb.call(&gray_caller, Mode::Tcp, vip(), 200), "k-gray"), 200);

    // A canary lane without ready backends: every base connection stays in base.
    sb.dp.dp.tables_mut().replace_backends(1, lane_id("gray"), &[]).unwrap();
    assert_eq!(count_of(&sb.call(&base, Mode::Tcp, vip(), 500), "k-base"), 500);
}

#[test]
fn sticky_canary_puts_each_pod_wholly_in_or_out() {
    let mut sb = Sandbox::new();
    let (base1, _) = sb.backend("s-base");
    let (gray1, _) = sb.backend("s-gray");
    sb.service(vip(), Proto::Tcp, 1, SVC_F_SHAPED, &[("base", &[base1]), ("gray", &[gray1])]);
    let shaping = SvcShaping {
        flags: SHAPE_F_CANARY | SHAPE_F_STICKY,
        canary_lane: lane_id("gray"),
        canary_bp: 1000,
        _pad: 0,
    };
    sb.dp.dp.tables_mut().set_shaping(1, &shaping).unwrap();
    // Many base pods: pod-level cgroups registered in base, sharing one network namespace.
    let net = sb.caller("net", None);
    let pods = 400;
    let per_pod = 8;
    let mut in_canary = 0;
    for i in 0..pods {
        let cgroup = sb.cgroup.child(&format!("kubepods.slice/kubepods-besteffort.slice/podsticky{i}"));
        let cg = TestCgroup::resolve(&cgroup);
        sb.dp.dp.tables_mut().register_pod(cg.id, cg.pod_entry(BASE_LANE)).unwrap();
        let got = attempts(&cgroup, &net.pod.ns, Mode::Tcp, vip(), per_pod);
        let gray = count_of(&got, "s-gray");
        assert!(gray == 0 || gray == per_pod, "pod {i} split its connections: {:?}", replies(&got));
        if gray == per_pod {
            in_canary += 1;
        }
    }
    assert_binomial("share of pods in the canary", in_canary, pods, 0.10, 4.0);
    assert!(in_canary > 0, "no pod in the canary at all");
}

#[test]
fn routing_rules_override_the_callers_chain() {
    let mut sb = Sandbox::new();
    let (base1, _) = sb.backend("r-base");
    let (gray1, _) = sb.backend("r-gray");
    let (blue1, _) = sb.backend("r-blue");
    let sets: &[(&str, &[SocketAddr])] = &[("base", &[base1]), ("gray", &[gray1]), ("blue", &[blue1])];
    sb.service(vip(), Proto::Tcp, 1, SVC_F_ROUTED, sets);
    let vip2: SocketAddr = "10.96.0.11:80".parse().unwrap();
    sb.service(vip2, Proto::Tcp, 2, 0, sets);
    let t = sb.dp.dp.tables_mut();
    t.set_route(RouteKey { svc_id: 1, caller_lane: lane_id("gray") }, &chain(&["blue", "base"], 0)).unwrap();
    t.set_route(RouteKey { svc_id: 1, caller_lane: BASE_LANE }, &chain(&["gray"], 0)).unwrap();
    let gray = sb.caller("gray", Some("gray"));
    let base = sb.caller("base", Some("base"));
    let feature = sb.caller("fx", Some("feature-x"));

    // The rule wins over the caller's own lane; other Services keep the default.
    assert_eq!(replies(&sb.call(&gray, Mode::Tcp, vip(), 40)).into_keys().collect::<Vec<_>>(), ["r-blue"]);
    assert_eq!(replies(&sb.call(&gray, Mode::Tcp, vip2, 40)).into_keys().collect::<Vec<_>>(), ["r-gray"]);
    // Base callers may be routed too; lanes without a rule keep their chain (default: base).
    assert_eq!(replies(&sb.call(&base, Mode::Tcp, vip(), 40)).into_keys().collect::<Vec<_>>(), ["r-gray"]);
    assert_eq!(replies(&sb.call(&feature, Mode::Tcp, vip(), 40)).into_keys().collect::<Vec<_>>(), ["r-base"]);
    // The rule's chain goes on to its next step when blue empties.
    sb.dp.dp.tables_mut().replace_backends(1, lane_id("blue"), &[]).unwrap();
    assert_eq!(replies(&sb.call(&gray, Mode::Tcp, vip(), 40)).into_keys().collect::<Vec<_>>(), ["r-base"]);
    // A strict rule whose lanes have no backends refuses.
    sb.dp
        .dp
        .tables_mut()
        .set_route(RouteKey { svc_id: 1, caller_lane: lane_id("gray") }, &chain(&["blue"], LANE_F_STRICT))
        .unwrap();
    for a in sb.call(&gray, Mode::Tcp, vip(), 5) {
        assert!(matches!(a, Attempt::Err { errno: libc::EPERM, .. }), "{a:?}");
    }
    let c = sb.dp.dp.tables().counters().unwrap();
    assert_eq!(c.get(Outcome::Routed), 120, "{c:?}");
    assert_eq!(c.get(Outcome::FellBack), 40, "feature-x: its default chain, {c:?}");
}

#[test]
fn shadow_mode_changes_nothing_on_the_wire_and_counts_apart() {
    let mut sb = Sandbox::new();
    let (base1, _) = sb.backend("h-base");
    let (gray1, _) = sb.backend("h-gray");
    // The "Service address" is the base backend's own address, so a connection the datapath
    // leaves unchanged reaches h-base, and a steered one reaches h-gray.
    sb.service(base1, Proto::Tcp, 1, 0, &[("gray", &[gray1])]);
    let strict_vip = gray1;
    sb.service(strict_vip, Proto::Tcp, 2, SVC_F_STRICT, &[("base", &[base1])]);
    let gray = sb.caller("gray", Some("gray"));
    let blue = sb.caller("blue", Some("blue"));
    assert_eq!(count_of(&sb.call(&gray, Mode::Tcp, base1, 20), "h-gray"), 20, "enforced: steered");

    sb.dp.dp.tables_mut().set_config_flags(CFG_F_SHADOW).unwrap();
    let before = sb.dp.dp.tables().counters().unwrap();
    let n = 50;
    assert_eq!(count_of(&sb.call(&gray, Mode::Tcp, base1, n), "h-base"), n, "shadow: unchanged");
    // A strict refusal in shadow: counted, and the connect goes through unchanged.
    assert_eq!(count_of(&sb.call(&gray, Mode::Tcp, strict_vip, n), "h-gray"), n, "shadow: not refused");
    let after = sb.dp.dp.tables().counters().unwrap();
    for o in [Outcome::Steered, Outcome::RefusedStrict, Outcome::FellBack] {
        assert_eq!(after.get(o), before.get(o), "{o:?}: applied counters unchanged");
    }
    assert_eq!(after.shadow(Outcome::Steered) - before.shadow(Outcome::Steered), n as u64);
    assert_eq!(after.shadow(Outcome::RefusedStrict) - before.shadow(Outcome::RefusedStrict), n as u64);
    let rows = sb.dp.dp.tables().service_stats().unwrap();
    let shadow_rows: u64 =
        rows.iter().filter(|r| r.key.outcome & tagger_common::STAT_F_SHADOW != 0).map(|r| r.count).sum();
    assert_eq!(shadow_rows, 2 * n as u64, "{rows:?}");

    // Per lane: gray in shadow, blue enforced.
    let t = sb.dp.dp.tables_mut();
    t.set_config_flags(CFG_F_SHADOW_LANES).unwrap();
    t.set_lane_policy(lane_id("gray"), &chain(&["base"], LANE_F_SHADOW)).unwrap();
    t.replace_backends(1, lane_id("blue"), &[backend(gray1)]).unwrap();
    assert_eq!(count_of(&sb.call(&gray, Mode::Tcp, base1, 20), "h-base"), 20, "gray lane in shadow");
    assert_eq!(count_of(&sb.call(&blue, Mode::Tcp, base1, 20), "h-gray"), 20, "blue lane enforced");
}

fn warm_sandbox(name: &str) -> (Sandbox, tagger_tests::scenario::Caller, SocketAddr) {
    let mut sb = Sandbox::new();
    let (old, _) = sb.backend(&format!("{name}-old"));
    let (new, _) = sb.backend(&format!("{name}-new"));
    sb.service(vip(), Proto::Tcp, 1, SVC_F_SHAPED, &[("base", &[old, new])]);
    let shaping = SvcShaping { flags: SHAPE_F_WARMUP, ..SvcShaping::default() };
    sb.dp.dp.tables_mut().set_shaping(1, &shaping).unwrap();
    let caller = sb.caller("c", Some("base"));
    (sb, caller, new)
}

fn warm_key(addr: SocketAddr) -> WarmKey {
    let b = backend(addr);
    WarmKey { svc_id: 1, port: b.port, _pad: 0, addr: b.addr }
}

#[test]
fn warmup_weight_follows_the_curve_and_aggression_changes_it() {
    let (mut sb, caller, new) = warm_sandbox("w");
    // A long warm-up, so the weight is constant (within 0.5%) during each batch: the assertion
    // is on the curve, not on timing.
    let secs: u32 = 1000;
    let n = 4000;
    for (aggression, fraction) in [(1.0, 0.0), (1.0, 0.25), (3.0, 0.25), (1.0, 0.6)] {
        let warmup = Warmup::new(std::time::Duration::from_secs(secs.into()), aggression, 10.0);
        let now = monotonic_now_ns();
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "test values")]
        let ago = (fraction * f64::from(secs) * 1e9) as u64;
        // Saturating: on a freshly booted machine (uptime below `ago`) the weight is simply
        // further along; the expectation below uses the weight actually in force.
        let entry = warmup.entry(now.saturating_sub(ago));
        sb.dp.dp.tables_mut().set_warm(warm_key(new), &entry).unwrap();
        let w = f64::from(warm_weight(&entry, now)) / f64::from(WEIGHT_FULL);
        let got = sb.call(&caller, Mode::Tcp, vip(), n);
        let share = warm_pick_share(w);
        assert_binomial(
            &format!("aggression {aggression} at {fraction}: weight {w:.3}"),
            count_of(&got, "w-new"),
            n,
            share,
            4.0,
        );
    }
    // Linear at a quarter: weight 0.325, share ~0.25; aggression 3: weight 0.667, share ~0.40.
    assert!(warm_pick_share(0.325) < 0.26 && warm_pick_share(0.667) > 0.39);
    // The entry removed (warm-up over): an even split.
    sb.dp.dp.tables_mut().remove_warm(warm_key(new)).unwrap();
    let got = sb.call(&caller, Mode::Tcp, vip(), n);
    assert_binomial("warm", count_of(&got, "w-new"), n, 0.5, 4.0);
}

#[test]
fn warmup_share_rises_over_the_window_and_ends_near_half() {
    let (mut sb, caller, new) = warm_sandbox("v");
    let window = 6.0;
    let warmup = Warmup::new(std::time::Duration::from_secs_f64(window), 1.0, 10.0);
    let start = Instant::now();
    sb.dp.dp.tables_mut().set_warm(warm_key(new), &warmup.entry(monotonic_now_ns())).unwrap();
    let n = 1000;
    let early = count_of(&sb.call(&caller, Mode::Tcp, vip(), n), "v-new");
    let early_secs = start.elapsed().as_secs_f64();
    // The batch is spread over [0, early_secs] (however long it took): its share is at most the
    // mean over that span (connections come no earlier than the entry was written).
    let bound = mean_linear_warm_share(0.0, early_secs, window, 0.1);
    #[expect(clippy::cast_precision_loss, reason = "test counts")]
    let (early_share, nf) = (early as f64 / n as f64, n as f64);
    let sd = (bound * (1.0 - bound) / nf).sqrt();
    assert!(
        early_share <= bound + 4.0 * sd,
        "early share {early_share} over {early_secs:.2}s, bound {bound:.3}"
    );
    std::thread::sleep(std::time::Duration::from_secs_f64(window).saturating_sub(start.elapsed()));
    let late = count_of(&sb.call(&caller, Mode::Tcp, vip(), 2000), "v-new");
    assert_binomial("after the warm-up", late, 2000, 0.5, 4.0);
    #[expect(clippy::cast_precision_loss, reason = "test counts")]
    let late_share = late as f64 / 2000.0;
    if early_secs < window / 2.0 {
        assert!(
            late_share > early_share + 0.1,
            "rose from {early_share} (in {early_secs:.2}s) to {late_share}"
        );
    }
}
