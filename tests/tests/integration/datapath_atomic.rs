//! Backend sets change atomically: a connect racing a replacement sees the old set or the new
//! one, never a mix and never an empty window.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tagger::{
    datapath::SLOT_GRACE,
    net::{Proto, backend},
};
use tagger_common::{Outcome, lane_id};
use tagger_tests::{client::LoopClient, scenario::Sandbox};

#[test]
fn backend_set_replaced_thousands_of_times_while_connecting_never_fails() {
    let mut sb = Sandbox::new();
    let addrs: Vec<SocketAddr> = ["r-a", "r-b", "r-c", "r-d"].iter().map(|n| sb.backend(n).0).collect();
    let vip: SocketAddr = "10.96.2.1:80".parse().unwrap();
    // Sets of different sizes: a reader mixing one generation's count with another's slots
    // would find a missing slot, fail open to the (unroutable) VIP, and the client would see it.
    let set_one = vec![backend(addrs[0])];
    let set_three: Vec<_> = addrs[1..].iter().map(|a| backend(*a)).collect();
    sb.service(vip, Proto::Tcp, 1, 0, &[("gray", &[addrs[0]])]);
    let gray = sb.caller("gray", Some("gray"));

    let client = LoopClient::start(&gray.cgroup, &gray.pod.ns, vip);
    let stop = AtomicBool::new(false);
    let lane = lane_id("gray");
    let tables = sb.dp.dp.tables_mut();
    let n = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut n = 0u32;
            // At least 2,000 replacements, and keep going while the client runs.
            while (n < 2000 || !stop.load(Ordering::Relaxed)) && n < 50_000 {
                let set = if n.is_multiple_of(2) { &set_three } else { &set_one };
                tables.replace_backends(1, lane, set).expect("replace");
                n += 1;
            }
            n
        });
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer thread")
    });
    let summary = client.finish();
    assert!(n >= 2000, "only {n} replacements");
    assert!(summary.ok > 100, "too few connections to mean anything: {summary:?}");
    assert_eq!(summary.failed, 0, "connections failed during {n} replacements: {summary:?}");
    let tables = sb.dp.dp.tables_mut();
    assert_eq!(tables.counters().unwrap().get(Outcome::SlotMiss), 0);
    // Old generations are deleted once their grace period is over: only the live set's slots
    // remain.
    std::thread::sleep(SLOT_GRACE);
    tables.reap_retired(false);
    let live = tables.backend_set(1, lane).unwrap().unwrap().count as usize;
    assert_eq!(tables.slot_entries(), live);
    eprintln!("{n} replacements, {} connections, 0 failed", summary.ok);
}

#[test]
fn replaced_slots_outlive_their_set_for_the_grace_period_only() {
    let mut sb = Sandbox::new();
    let (a, _) = sb.backend("g-a");
    let (b, _) = sb.backend("g-b");
    let lane = lane_id("gray");
    let t = sb.dp.dp.tables_mut();
    t.replace_backends(7, lane, &[backend(a)]).unwrap();
    let first = t.backend_set(7, lane).unwrap().unwrap().generation;
    t.replace_backends(7, lane, &[backend(b)]).unwrap();
    // The replaced generation is still readable right after the switch...
    assert_eq!(t.slot_entries(), 2, "old slot kept during the grace period");
    // ...and a set removed and re-created meanwhile does not reuse a generation in grace.
    t.remove_backend_set(7, lane).unwrap();
    t.replace_backends(7, lane, &[backend(a), backend(b)]).unwrap();
    let again = t.backend_set(7, lane).unwrap().unwrap();
    assert!(again.generation > first + 1, "{again:?}");
    std::thread::sleep(SLOT_GRACE);
    assert_eq!(t.reap_retired(false), 2);
    assert_eq!(t.backends(7, lane).unwrap(), vec![backend(a), backend(b)], "the live set is intact");
    assert_eq!(t.slot_entries(), 2);

    // Slots a stopped process left in their grace period are found as strays by the next one.
    t.replace_backends(7, lane, &[backend(a)]).unwrap();
    let mut next = tagger::datapath::Datapath::open(sb.dp.dir()).unwrap();
    assert_eq!(next.tables_mut().remove_stray_slots().unwrap(), 2, "the two slots of the replaced set");
    assert_eq!(next.tables().backends(7, lane).unwrap(), vec![backend(a)]);
    assert_eq!(next.tables().slot_entries(), 1);
}
