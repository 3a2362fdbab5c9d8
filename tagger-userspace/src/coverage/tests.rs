use std::collections::BTreeMap;

use super::*;

fn edge(caller: Peer, lane: &str, svc: &str, backend_lane: &str, outcome: &str, n: u64) -> Edge {
    Edge {
        caller,
        caller_lane: lane.into(),
        service: Peer::service("demo", svc),
        backend_lane: backend_lane.into(),
        outcome: outcome.into(),
        connections: n,
    }
}

fn svc(name: &str) -> Peer {
    Peer::service("demo", name)
}

fn backends(rows: &[(&str, &[&str])]) -> BTreeMap<Peer, BTreeMap<String, u64>> {
    rows.iter().map(|(s, lanes)| (svc(s), lanes.iter().map(|l| ((*l).to_owned(), 1)).collect())).collect()
}

/// The demo's node: gw-gray → a (gray) → b (base only, left to the cluster) → c (gray exists).
fn demo() -> Observed {
    let gw = Peer::workload("demo", "gw-gray");
    Observed {
        edges: vec![
            edge(gw.clone(), "gray", "a", "gray", "steered", 20),
            edge(svc("a"), "gray", "b", "base", "passthrough", 20),
            edge(svc("b"), "base", "c", "base", "steered", 40),
            edge(Peer::workload("demo", "gw-base"), "base", "a", "base", "steered", 20),
        ],
        arrivals: vec![Arrival {
            receiver: svc("c"),
            pod_lane: "gray".into(),
            caller_lane: "base".into(),
            kind: "leak".into(),
            connections: 2,
        }],
        lane_backends: backends(&[("a", &["base", "gray"]), ("b", &["base"]), ("c", &["base", "gray"])]),
    }
}

/// The lane's edge to a Service.
fn to<'a>(lane: &'a LaneCoverage, service: &str) -> &'a LaneEdge {
    lane.edges.iter().find(|e| e.service == svc(service)).expect(service)
}

#[test]
fn the_demo_lane_stops_at_b() {
    let r = report("test", demo());
    assert_eq!(r.lanes.len(), 1);
    let gray = &r.lanes[0];
    assert_eq!(gray.lane, "gray");
    assert_eq!(gray.summary, "lane gray: gray stops at demo/b");
    assert_eq!(gray.edges.len(), 2);
    assert_eq!(to(gray, "a").summary, "held");
    assert_eq!(to(gray, "b").summary, "fell back to base");
    let [stop] = gray.stops.as_slice() else { panic!("{:?}", gray.stops) };
    assert!(stop.breaks && stop.only_fallback && !stop.has_lane_backends);
    assert_eq!(stop.lane_capable_callees, vec![svc("c")]);
    assert_eq!(
        stop.message,
        "lane gray: callers reach demo/b only in base (no gray backend); demo/b calls demo/c, which has gray \
         backends: gray stops at demo/b"
    );
    assert!(gray.leaks.is_empty(), "the leak is of lane base into c's gray pods");
    assert_eq!(r.base_edges.len(), 2, "b → c and gw-base → a");
    assert!(gray.not_reached.contains(&svc("c")), "no gray caller reached c");
}

#[test]
fn a_fallback_with_nothing_downstream_is_not_a_break() {
    let mut o = demo();
    o.lane_backends.get_mut(&svc("c")).unwrap().remove("gray");
    let r = report("test", o);
    let gray = &r.lanes[0];
    assert_eq!(gray.summary, "lane gray: gray holds wherever a gray version exists");
    let [stop] = gray.stops.as_slice() else { panic!() };
    assert!(!stop.breaks);
    assert!(stop.message.ends_with("nothing demo/b calls has a gray version, so nothing is lost downstream"));
}

#[test]
fn partly_held_edges_and_not_ready_backends_are_named() {
    let mut o = demo();
    o.edges.push(edge(svc("a"), "gray", "b", "gray", "steered", 5));
    o.lane_backends.get_mut(&svc("b")).unwrap().insert("gray".into(), 1);
    let gray = &report("test", o).lanes[0];
    assert_eq!(to(gray, "b").summary, "partly: 5 held, 20 fell back");
    let [stop] = gray.stops.as_slice() else { panic!() };
    assert!(!stop.only_fallback && stop.has_lane_backends && stop.breaks);
    assert!(stop.message.contains("some callers reach demo/b in base (its gray backends were not ready)"));
}

#[test]
fn leaks_refusals_and_lanes_without_callers() {
    let mut o = demo();
    o.arrivals.push(Arrival {
        receiver: svc("c"),
        pod_lane: "base".into(),
        caller_lane: "gray".into(),
        kind: "leak".into(),
        connections: 3,
    });
    o.edges.push(edge(svc("a"), "gray", "d", "gray", "refused_strict", 1));
    o.lane_backends.insert(svc("e"), [("blue".to_owned(), 2)].into());
    let r = report("test", o);
    let lanes: Vec<&str> = r.lanes.iter().map(|l| l.lane.as_str()).collect();
    assert_eq!(lanes, ["blue", "gray"]);
    assert_eq!(r.lanes[0].summary, "lane blue: no blue caller seen");
    let gray = &r.lanes[1];
    assert_eq!(gray.leaks, vec![Leak { receiver: svc("c"), pod_lane: "base".into(), connections: 3 }]);
    assert!(gray.summary.ends_with("; 3 connections leaked into other lanes"), "{}", gray.summary);
    assert!(gray.edges.iter().any(|e| e.summary == "refused"));
}

#[test]
fn normalizing_merges_rows_from_several_nodes() {
    let mut o = demo();
    o.edges.push(edge(Peer::workload("demo", "gw-gray"), "gray", "a", "gray", "steered", 7));
    o.edges.push(edge(svc("x"), "gray", "a", "gray", "steered", 0));
    let n = o.normalized();
    assert_eq!(n.edges.len(), 4);
    assert_eq!(n.edges.iter().find(|e| e.caller.name == "gw-gray").unwrap().connections, 27);
    assert_eq!(n.clone().normalized(), n, "idempotent");
}

#[test]
fn series_labels_round_trip() {
    for e in demo().edges {
        assert_eq!(series::EdgeLabels::of(&e).edge(e.connections), Some(e));
    }
    for a in demo().arrivals {
        assert_eq!(series::ArrivalLabels::of(&a).arrival(a.connections), Some(a));
    }
}

#[test]
fn the_graph_marks_the_break() {
    let dot = dot::render(&report("node pins /x", demo()));
    assert!(dot.starts_with("digraph lane_coverage {"), "{dot}");
    assert!(
        dot.contains(r##""service:demo/b" [label="demo/b\nbase\ngray stops here", color="#c0392b""##),
        "{dot}"
    );
    assert!(dot.contains(r#""workload:demo/gw-gray" [label="demo/gw-gray", shape=ellipse]"#), "{dot}");
    assert!(
        dot.contains(r#""service:demo/a" -> "service:demo/b" [label="gray: fell back to base (20)""#),
        "{dot}"
    );
    assert!(dot.contains(r#""service:demo/b" -> "service:demo/c" [label="base (40)""#), "{dot}");
}

#[test]
fn workloads_from_generated_names() {
    for (pod, workload) in [
        ("web-7d4b9c8f5d-x2x4q", "web"),
        ("my-api-5f6c7b8d9-bxkzq", "my-api"),
        ("node-agent-x2x4q", "node-agent"),
        ("db-0", "db"),
        ("db-12", "db"),
        ("gw-gray", "gw-gray"),
        ("a-base", "a-base"),
        ("web-aaaaa", "web-aaaaa"),
        ("plain", "plain"),
        ("-x2x4q", "-x2x4q"),
        ("web-7d4b9c8f5d", "web-7d4b9c8f5d"),
    ] {
        assert_eq!(workload_of(pod), workload, "{pod}");
    }
}
