use tagger_common::{SVC_F_STRICT, SetKey, lane_id};

use super::*;
use crate::model::{
    FrontendIds,
    api::{Endpoint, EndpointConditions, EndpointHints, EndpointSlice, ForZone, Service as ApiService},
    testing::reference::{
        ClusterState, DesiredServices, desired_services, desired_services_on, desired_services_within,
    },
    topology::Node,
};
use crate::{
    config::labels::default_lane_keys,
    model::{
        objects::STRICT_ANNOTATION,
        testing::{endpoint, service, slice},
    },
    net::{Proto, backend_addr, frontend_key},
};

fn with_conditions(mut ep: Endpoint, ready: Option<bool>, terminating: Option<bool>) -> Endpoint {
    ep.conditions = Some(EndpointConditions { ready, terminating, serving: None });
    ep
}

fn lane_label(lane: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("tagger.io/lane".to_owned(), lane.to_owned())])
}

#[derive(Default)]
struct Cluster(ClusterState);

impl Cluster {
    fn svc(mut self, s: (ObjectRef, ApiService)) -> Self {
        self.0.services.insert(s.0, s.1);
        self
    }
    fn slice(mut self, s: (ObjectRef, EndpointSlice)) -> Self {
        self.0.slices.insert(s.0, s.1);
        self
    }
    fn pod(mut self, ns: &str, name: &str, lane: &str) -> Self {
        self.0.pod_labels.insert(ObjectRef::new(ns, name), lane_label(lane));
        self
    }
    fn desired(&self) -> DesiredServices {
        desired_services(&self.0, &default_lane_keys(), &mut FrontendIds::new())
    }
    fn desired_on(&self, node: &str, zone: Option<&str>) -> DesiredServices {
        let node = Node { name: Some(node.into()), zone: zone.map(Into::into) };
        desired_services_on(&self.0, &default_lane_keys(), &mut FrontendIds::new(), &Limits::DATAPATH, &node)
    }
}

/// The held backends of one frontend: lane id → addresses as text.
fn held_of(d: &DesiredServices, addr: &str, proto: Proto) -> BTreeMap<u32, Vec<String>> {
    let svc = d.frontends.get(&fk(addr, proto)).unwrap_or_else(|| panic!("no frontend {addr}/{proto}"));
    d.held
        .range(SetKey { svc_id: svc.svc_id, lane: 0 }..=SetKey { svc_id: svc.svc_id, lane: u32::MAX })
        .map(|(k, v)| (k.lane, v.iter().map(|b| backend_addr(b).to_string()).collect()))
        .collect()
}

/// An endpoint with conditions, node, zone and zone hints.
fn placed(ip: &str, pod: &str, state: &str, node: &str, zone: &str, hints: &[&str]) -> Endpoint {
    let mut ep = endpoint(ip, Some(pod));
    ep.conditions = Some(match state {
        "ready" => EndpointConditions { ready: Some(true), serving: Some(true), terminating: Some(false) },
        "terminating" => {
            EndpointConditions { ready: Some(false), serving: Some(true), terminating: Some(true) }
        }
        _ => EndpointConditions { ready: Some(false), serving: Some(false), terminating: Some(true) },
    });
    ep.node_name = Some(node.into());
    ep.zone = Some(zone.into());
    if !hints.is_empty() {
        ep.hints = Some(EndpointHints {
            for_zones: Some(hints.iter().map(|z| ForZone { name: (*z).into() }).collect()),
            for_nodes: None,
        });
    }
    ep
}

fn with_spec(
    mut s: (ObjectRef, ApiService),
    itp: Option<&str>,
    distribution: Option<&str>,
) -> (ObjectRef, ApiService) {
    let spec = s.1.spec.as_mut().unwrap();
    spec.internal_traffic_policy = itp.map(Into::into);
    spec.traffic_distribution = distribution.map(Into::into);
    s
}

#[test]
fn a_lane_of_terminating_endpoints_serves_until_a_ready_one_exists() {
    let c = |gray_state: &str| {
        Cluster::default()
            .svc(service("ns", "s", &["10.96.0.1"], &[("", 80, "TCP")]))
            .slice(slice(
                "ns",
                "s-1",
                "s",
                "IPv4",
                &[("", 80, "TCP")],
                vec![
                    placed("10.0.0.1", "b1", "ready", "n1", "z1", &[]),
                    placed("10.0.0.2", "g1", "terminating", "n1", "z1", &[]),
                    placed("10.0.0.3", "g2", gray_state, "n2", "z1", &[]),
                    placed("10.0.0.4", "b2", "terminating", "n2", "z1", &[]),
                    placed("10.0.0.5", "b3", "gone", "n2", "z1", &[]),
                ],
            ))
            .pod("ns", "b1", "")
            .pod("ns", "g1", "gray")
            .pod("ns", "g2", "gray")
            .pod("ns", "b2", "")
            .pod("ns", "b3", "")
            .desired()
    };
    // gray has a ready endpoint: the terminating one is held (keeps its connections, gets no
    // new ones); base's terminating one too; a not-serving one is nowhere.
    let d = c("ready");
    assert_eq!(
        sets_of(&d, "10.96.0.1:80", Proto::Tcp),
        BTreeMap::from([(0, vec!["10.0.0.1:80".to_owned()]), (gray(), vec!["10.0.0.3:80".to_owned()]),])
    );
    assert_eq!(
        held_of(&d, "10.96.0.1:80", Proto::Tcp),
        BTreeMap::from([(0, vec!["10.0.0.4:80".to_owned()]), (gray(), vec!["10.0.0.2:80".to_owned()]),])
    );
    // Both gray endpoints terminating: gray is served by both (not by a fallback to base).
    let d = c("terminating");
    assert_eq!(sets_of(&d, "10.96.0.1:80", Proto::Tcp)[&gray()], ["10.0.0.2:80", "10.0.0.3:80"]);
    assert!(!held_of(&d, "10.96.0.1:80", Proto::Tcp).contains_key(&gray()));
}

#[test]
fn internal_traffic_policy_local_keeps_each_lane_on_this_node() {
    let c = Cluster::default()
        .svc(with_spec(service("ns", "dns", &["10.96.0.10"], &[("", 53, "UDP")]), Some("Local"), None))
        .slice(slice(
            "ns",
            "dns-1",
            "dns",
            "IPv4",
            &[("", 53, "UDP")],
            vec![
                placed("10.0.0.1", "b1", "ready", "n1", "z1", &[]),
                placed("10.0.0.2", "b2", "ready", "n2", "z1", &[]),
                placed("10.0.0.3", "g1", "ready", "n2", "z1", &[]),
            ],
        ))
        .pod("ns", "b1", "")
        .pod("ns", "b2", "")
        .pod("ns", "g1", "gray");
    let d = c.desired_on("n1", None);
    // Gray has no endpoint on n1: no gray set (gray callers fall back to base, on this node).
    assert_eq!(
        sets_of(&d, "10.96.0.10:53", Proto::Udp),
        BTreeMap::from([(0, vec!["10.0.0.1:53".to_owned()])])
    );
    assert_eq!(
        held_of(&d, "10.96.0.10:53", Proto::Udp),
        BTreeMap::from([(0, vec!["10.0.0.2:53".to_owned()]), (gray(), vec!["10.0.0.3:53".to_owned()]),])
    );
    let d = c.desired_on("n2", None);
    assert_eq!(
        sets_of(&d, "10.96.0.10:53", Proto::Udp),
        BTreeMap::from([(0, vec!["10.0.0.2:53".to_owned()]), (gray(), vec!["10.0.0.3:53".to_owned()]),])
    );
    // Nothing on n3: no set at all, the connection is left to the cluster (which drops it).
    assert!(sets_of(&c.desired_on("n3", None), "10.96.0.10:53", Proto::Udp).is_empty());
}

#[test]
fn zone_hints_and_prefer_close_narrow_within_the_lane() {
    let eps = |hints: bool| {
        let h = |z: &'static str| if hints { vec![z] } else { vec![] };
        vec![
            placed("10.0.0.1", "g1", "ready", "n1", "z1", &h("z1")),
            placed("10.0.0.2", "g2", "ready", "n2", "z2", &h("z2")),
            placed("10.0.0.3", "b1", "ready", "n3", "z2", &h("z2")),
        ]
    };
    let with = |hints: bool, distribution: Option<&str>| {
        Cluster::default()
            .svc(with_spec(service("ns", "s", &["10.96.0.1"], &[("", 80, "TCP")]), None, distribution))
            .slice(slice("ns", "s-1", "s", "IPv4", &[("", 80, "TCP")], eps(hints)))
            .pod("ns", "g1", "gray")
            .pod("ns", "g2", "gray")
            .pod("ns", "b1", "")
    };
    // Hints: gray callers in z1 get gray's z1 endpoint; base has no z1 endpoint, so all of base.
    let d = with(true, None).desired_on("n9", Some("z1"));
    assert_eq!(
        sets_of(&d, "10.96.0.1:80", Proto::Tcp),
        BTreeMap::from([(0, vec!["10.0.0.3:80".to_owned()]), (gray(), vec!["10.0.0.1:80".to_owned()]),])
    );
    assert_eq!(held_of(&d, "10.96.0.1:80", Proto::Tcp)[&gray()], ["10.0.0.2:80"]);
    // PreferClose without hints: the endpoints' zones.
    let d = with(false, Some("PreferClose")).desired_on("n9", Some("z2"));
    assert_eq!(sets_of(&d, "10.96.0.1:80", Proto::Tcp)[&gray()], ["10.0.0.2:80"]);
    // No preference and no hints, or the zone unknown: every ready endpoint.
    let d = with(false, None).desired_on("n9", Some("z2"));
    assert_eq!(sets_of(&d, "10.96.0.1:80", Proto::Tcp)[&gray()], ["10.0.0.1:80", "10.0.0.2:80"]);
    let d = with(true, Some("PreferClose")).desired_on("n9", None);
    assert_eq!(sets_of(&d, "10.96.0.1:80", Proto::Tcp)[&gray()], ["10.0.0.1:80", "10.0.0.2:80"]);
}

fn fk(addr: &str, proto: Proto) -> FrontendKey {
    frontend_key(addr.parse().unwrap(), proto)
}

/// The sets of one frontend: lane id → backend addresses as text.
fn sets_of(d: &DesiredServices, addr: &str, proto: Proto) -> BTreeMap<u32, Vec<String>> {
    let svc = d.frontends.get(&fk(addr, proto)).unwrap_or_else(|| panic!("no frontend {addr}/{proto}"));
    d.sets
        .range(SetKey { svc_id: svc.svc_id, lane: 0 }..=SetKey { svc_id: svc.svc_id, lane: u32::MAX })
        .map(|(k, v)| (k.lane, v.iter().map(|b| backend_addr(b).to_string()).collect()))
        .collect()
}

fn gray() -> u32 {
    lane_id("gray")
}

#[test]
fn one_service_with_lanes() {
    let c = Cluster::default()
        .svc(service("shop", "web", &["10.96.0.10"], &[("http", 80, "TCP")]))
        .slice(slice(
            "shop",
            "web-abc",
            "web",
            "IPv4",
            &[("http", 8080, "TCP")],
            vec![
                endpoint("10.0.1.2", Some("web-gray")),
                endpoint("10.0.1.1", Some("web-base")),
                endpoint("10.0.2.1", None),
            ],
        ))
        .pod("shop", "web-gray", "gray")
        .pod("shop", "web-base", "");
    let d = c.desired();
    assert_eq!(d.frontends.len(), 1);
    let svc = d.frontends[&fk("10.96.0.10:80", Proto::Tcp)];
    assert_eq!((svc.svc_id, svc.flags), (1, 0));
    assert_eq!(
        d.origins[&1],
        FrontendOrigin {
            service: ObjectRef::new("shop", "web"),
            port_name: "http".into(),
            shaping: super::ServiceShaping::default(),
        }
    );
    assert_eq!(
        sets_of(&d, "10.96.0.10:80", Proto::Tcp),
        BTreeMap::from([
            (0, vec!["10.0.1.1:8080".to_owned(), "10.0.2.1:8080".to_owned()]),
            (gray(), vec!["10.0.1.2:8080".to_owned()]),
        ])
    );
    assert!(d.warnings.is_empty(), "{:?}", d.warnings);
}

#[test]
fn dual_stack_uses_the_matching_family() {
    let c = Cluster::default()
        .svc(service("ns", "s", &["10.96.0.1", "fd00::1"], &[("", 53, "UDP"), ("", 53, "TCP")]))
        .slice(slice(
            "ns",
            "s-v4",
            "s",
            "IPv4",
            &[("", 5353, "UDP"), ("", 5353, "TCP")],
            vec![endpoint("10.0.0.1", None)],
        ))
        .slice(slice(
            "ns",
            "s-v6",
            "s",
            "IPv6",
            &[("", 5353, "UDP"), ("", 5353, "TCP")],
            vec![endpoint("fd01::1", None)],
        ));
    let d = c.desired();
    assert_eq!(d.frontends.len(), 4);
    assert_eq!(sets_of(&d, "10.96.0.1:53", Proto::Udp)[&0], ["10.0.0.1:5353"]);
    assert_eq!(sets_of(&d, "10.96.0.1:53", Proto::Tcp)[&0], ["10.0.0.1:5353"]);
    assert_eq!(sets_of(&d, "[fd00::1]:53", Proto::Udp)[&0], ["[fd01::1]:5353"]);
    assert_eq!(sets_of(&d, "[fd00::1]:53", Proto::Tcp)[&0], ["[fd01::1]:5353"]);
    let ids: BTreeSet<u32> = d.frontends.values().map(|s| s.svc_id).collect();
    assert_eq!(ids.len(), 4, "one svc_id per frontend");
    assert_eq!(d.origins.keys().copied().collect::<BTreeSet<_>>(), ids);
    assert!(d.origins.values().all(|o| o.service == ObjectRef::new("ns", "s") && o.port_name.is_empty()));
}

#[test]
fn cluster_ip_field_is_the_fallback() {
    let (r, mut s) = service("ns", "s", &["10.96.0.1"], &[("", 80, "TCP")]);
    s.spec.as_mut().unwrap().cluster_ips = None;
    let d = Cluster::default().svc((r, s)).desired();
    assert!(d.frontends.contains_key(&fk("10.96.0.1:80", Proto::Tcp)));
}

#[test]
fn services_with_nothing_to_steer_are_counted() {
    let (r, mut external) = service("ns", "ext", &[], &[("", 80, "TCP")]);
    external.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
    let (r2, mut no_spec) = service("ns", "nospec", &[], &[]);
    no_spec.spec = None;
    let c = Cluster::default()
        .svc(service("ns", "headless", &["None"], &[("", 80, "TCP")]))
        .svc((r, external))
        .svc((r2, no_spec))
        .svc(service("ns", "pending", &[], &[("", 80, "TCP")]))
        .svc(service("ns", "portless", &["10.96.0.2"], &[]))
        .svc(service("ns", "sctp", &["10.96.0.3"], &[("a", 80, "SCTP"), ("b", 81, "TCP"), ("c", 82, "QUIC")]))
        .svc(service("ns", "badport", &["10.96.0.4"], &[("", 0, "TCP"), ("", 70000, "UDP")]))
        .svc(service("ns", "badip", &["10.96.0.300"], &[("", 80, "TCP")]));
    let d = c.desired();
    assert_eq!(d.frontends.keys().copied().collect::<Vec<_>>(), vec![fk("10.96.0.3:81", Proto::Tcp)]);
    let w = &d.warnings;
    assert_eq!(w.count(WarningKind::HeadlessServiceSkipped), 1);
    assert_eq!(w.count(WarningKind::ExternalNameSkipped), 1);
    assert_eq!(w.count(WarningKind::NoClusterIp), 2);
    assert_eq!(w.count(WarningKind::ServiceWithoutPorts), 1);
    assert_eq!(w.count(WarningKind::SctpPortSkipped), 1);
    assert_eq!(w.count(WarningKind::UnknownProtocol), 1);
    assert_eq!(w.count(WarningKind::InvalidPort), 2);
    assert_eq!(w.count(WarningKind::InvalidAddress), 1);
}

#[test]
fn strict_annotation() {
    let mk = |name: &str, value: Option<&str>| {
        let (r, mut s) = service("ns", name, &[&format!("10.96.0.{}", name.len())], &[("", 80, "TCP")]);
        s.metadata.annotations =
            value.map(|v| BTreeMap::from([(STRICT_ANNOTATION.to_owned(), v.to_owned())]));
        (r, s)
    };
    let d = Cluster::default()
        .svc(mk("a", Some("true")))
        .svc(mk("bb", Some("false")))
        .svc(mk("ccc", Some("yes")))
        .svc(mk("dddd", None))
        .desired();
    let flags = |ip: &str| d.frontends[&fk(&format!("{ip}:80"), Proto::Tcp)].flags;
    assert_eq!(flags("10.96.0.1"), SVC_F_STRICT);
    assert_eq!(flags("10.96.0.2"), 0);
    assert_eq!(flags("10.96.0.3"), 0);
    assert_eq!(flags("10.96.0.4"), 0);
    assert_eq!(d.warnings.count(WarningKind::InvalidAnnotation), 1);
}

#[test]
fn only_ready_non_terminating_endpoints() {
    let eps = vec![
        with_conditions(endpoint("10.0.0.1", None), None, None),
        with_conditions(endpoint("10.0.0.2", None), Some(true), None),
        with_conditions(endpoint("10.0.0.3", None), Some(false), None),
        with_conditions(endpoint("10.0.0.4", None), Some(true), Some(true)),
        with_conditions(endpoint("10.0.0.5", None), None, Some(true)),
        with_conditions(endpoint("10.0.0.6", None), Some(true), Some(false)),
        endpoint("10.0.0.7", None),
    ];
    let d = Cluster::default()
        .svc(service("ns", "s", &["10.96.0.1"], &[("", 80, "TCP")]))
        .slice(slice("ns", "s-1", "s", "IPv4", &[("", 80, "TCP")], eps))
        .desired();
    assert_eq!(
        sets_of(&d, "10.96.0.1:80", Proto::Tcp)[&0],
        ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.6:80", "10.0.0.7:80"]
    );
}

#[test]
fn ports_resolve_by_name_and_protocol() {
    let c = Cluster::default()
        .svc(service(
            "ns",
            "s",
            &["10.96.0.1"],
            &[("http", 80, "TCP"), ("metrics", 9090, "TCP"), ("dns", 53, "UDP")],
        ))
        .slice(slice(
            "ns",
            "s-1",
            "s",
            "IPv4",
            &[("metrics", 9100, "TCP"), ("http", 8080, "TCP"), ("dns", 5353, "TCP")],
            vec![endpoint("10.0.0.1", None)],
        ))
        // Pods of another version serve http on another port: per-slice resolution.
        .slice(slice("ns", "s-2", "s", "IPv4", &[("http", 8081, "TCP")], vec![endpoint("10.0.0.2", None)]));
    let d = c.desired();
    assert_eq!(sets_of(&d, "10.96.0.1:80", Proto::Tcp)[&0], ["10.0.0.1:8080", "10.0.0.2:8081"]);
    assert_eq!(sets_of(&d, "10.96.0.1:9090", Proto::Tcp)[&0], ["10.0.0.1:9100"]);
    assert!(sets_of(&d, "10.96.0.1:53", Proto::Udp).is_empty(), "a TCP slice port does not serve a UDP port");
}

#[test]
fn unnamed_ports_match_none_and_empty() {
    let (r, mut s) = slice("ns", "s-1", "s", "IPv4", &[("", 8080, "TCP")], vec![endpoint("10.0.0.1", None)]);
    s.ports.as_mut().unwrap()[0].name = Some(String::new());
    s.ports.as_mut().unwrap()[0].protocol = None; // the API's default is TCP
    let d = Cluster::default()
        .svc(service("ns", "s", &["10.96.0.1"], &[("", 80, "TCP")]))
        .slice((r, s))
        .desired();
    assert_eq!(sets_of(&d, "10.96.0.1:80", Proto::Tcp)[&0], ["10.0.0.1:8080"]);
}

#[test]
fn slices_belong_to_their_service_and_namespace() {
    let (r, mut unlabelled) =
        slice("ns", "x", "s", "IPv4", &[("", 80, "TCP")], vec![endpoint("10.0.0.9", None)]);
    unlabelled.metadata.labels = None;
    let d = Cluster::default()
        .svc(service("ns", "s", &["10.96.0.1"], &[("", 80, "TCP")]))
        .slice(slice("other", "s-1", "s", "IPv4", &[("", 80, "TCP")], vec![endpoint("10.0.0.2", None)]))
        .slice(slice("ns", "t-1", "t", "IPv4", &[("", 80, "TCP")], vec![endpoint("10.0.0.3", None)]))
        .slice((r, unlabelled))
        .desired();
    assert!(sets_of(&d, "10.96.0.1:80", Proto::Tcp).is_empty());
    assert_eq!(d.frontends.len(), 1, "a Service without backends keeps its frontend");
}

#[test]
fn fqdn_slices_and_bad_addresses() {
    let eps = vec![
        endpoint("fd00::1", None),
        endpoint("not-an-ip", None),
        Endpoint { addresses: vec!["10.0.0.1".into(), "10.0.0.99".into()], ..Endpoint::default() },
        Endpoint::default(),
    ];
    let d = Cluster::default()
        .svc(service("ns", "s", &["10.96.0.1"], &[("", 80, "TCP")]))
        .slice(slice("ns", "s-1", "s", "IPv4", &[("", 80, "TCP")], eps))
        .slice(slice("ns", "s-2", "s", "FQDN", &[("", 80, "TCP")], vec![endpoint("example.com", None)]))
        .desired();
    assert_eq!(sets_of(&d, "10.96.0.1:80", Proto::Tcp)[&0], ["10.0.0.1:80"], "the first address only");
    assert_eq!(d.warnings.count(WarningKind::FqdnSliceSkipped), 1);
    assert_eq!(d.warnings.count(WarningKind::InvalidAddress), 2);
}

#[test]
fn duplicate_endpoints_are_counted_once_each_and_used_once() {
    let c = Cluster::default()
        .svc(service("ns", "s", &["10.96.0.1"], &[("a", 80, "TCP"), ("b", 81, "TCP")]))
        .slice(slice(
            "ns",
            "s-1",
            "s",
            "IPv4",
            &[("a", 80, "TCP"), ("b", 81, "TCP")],
            vec![endpoint("10.0.0.1", Some("p1")), endpoint("10.0.0.2", Some("p2"))],
        ))
        .slice(slice(
            "ns",
            "s-2",
            "s",
            "IPv4",
            &[("a", 80, "TCP"), ("b", 81, "TCP")],
            vec![
                // The same address claimed by another pod in another lane: the first wins.
                endpoint("10.0.0.1", Some("p3")),
                endpoint("10.0.0.2", Some("p2")),
                endpoint("10.0.0.2", Some("p2")),
            ],
        ))
        .pod("ns", "p1", "gray")
        .pod("ns", "p2", "gray")
        .pod("ns", "p3", "blue");
    let d = c.desired();
    assert_eq!(
        d.warnings.count(WarningKind::DuplicateEndpoint),
        3,
        "once per extra occurrence, not per port"
    );
    for port in [80, 81] {
        let sets = sets_of(&d, &format!("10.96.0.1:{port}"), Proto::Tcp);
        assert_eq!(sets.keys().copied().collect::<Vec<_>>(), vec![gray()]);
        assert_eq!(sets[&gray()], [format!("10.0.0.1:{port}"), format!("10.0.0.2:{port}")]);
    }
}

#[test]
fn backend_lanes_from_pod_labels() {
    let mut foreign = endpoint("10.0.0.4", Some("p4"));
    foreign.target_ref.as_mut().unwrap().namespace = Some("other".into());
    let mut node = endpoint("10.0.0.5", Some("n"));
    node.target_ref.as_mut().unwrap().kind = Some("Node".into());
    let c = Cluster::default()
        .svc(service("ns", "s", &["10.96.0.1"], &[("", 80, "TCP")]))
        .svc(service("ns", "t", &["10.96.0.2"], &[("", 80, "TCP")]))
        .slice(slice(
            "ns",
            "s-1",
            "s",
            "IPv4",
            &[("", 80, "TCP")],
            vec![
                endpoint("10.0.0.1", Some("bad")),
                endpoint("10.0.0.2", Some("ghost")),
                endpoint("10.0.0.3", Some("mse")),
                foreign,
                node,
            ],
        ))
        .slice(slice("ns", "t-1", "t", "IPv4", &[("", 80, "TCP")], vec![endpoint("10.0.0.1", Some("bad"))]))
        .pod("ns", "bad", "-gray")
        .pod("other", "p4", "blue")
        .pod("ns", "n", "blue");
    let mut c = c;
    c.0.pod_labels.insert(
        ObjectRef::new("ns", "mse"),
        BTreeMap::from([("alicloud.service.tag".into(), "gray".into())]),
    );
    let d = c.desired();
    assert_eq!(
        sets_of(&d, "10.96.0.1:80", Proto::Tcp),
        BTreeMap::from([
            (0, vec!["10.0.0.1:80".to_owned(), "10.0.0.2:80".to_owned(), "10.0.0.5:80".to_owned()]),
            (gray(), vec!["10.0.0.3:80".to_owned()]),
            (lane_id("blue"), vec!["10.0.0.4:80".to_owned()]),
        ])
    );
    assert_eq!(d.warnings.count(WarningKind::InvalidLaneLabel), 1, "one warning per pod, not per Service");
    assert_eq!(d.warnings.count(WarningKind::UnknownBackendPod), 1);
}

#[test]
fn lanes_without_backends_have_no_set() {
    let base = Cluster::default()
        .svc(service("ns", "s", &["10.96.0.1"], &[("", 80, "TCP")]))
        .pod("ns", "g", "gray")
        .pod("ns", "b", "base");
    let both = base.0.clone();
    let mut both = Cluster(both).slice(slice(
        "ns",
        "s-1",
        "s",
        "IPv4",
        &[("", 80, "TCP")],
        vec![endpoint("10.0.0.1", Some("g")), endpoint("10.0.0.2", Some("b"))],
    ));
    assert_eq!(sets_of(&both.desired(), "10.96.0.1:80", Proto::Tcp).len(), 2);
    both.0.slices.values_mut().next().unwrap().endpoints[0].conditions =
        Some(EndpointConditions { ready: Some(false), ..EndpointConditions::default() });
    assert_eq!(
        sets_of(&both.desired(), "10.96.0.1:80", Proto::Tcp).keys().copied().collect::<Vec<_>>(),
        vec![0]
    );
}

#[test]
fn set_size_is_capped_deterministically() {
    let eps: Vec<Endpoint> =
        (0..1100u32).map(|i| endpoint(&format!("10.1.{}.{}", i / 250, i % 250 + 1), None)).collect();
    let mut reversed = eps.clone();
    reversed.reverse();
    // Two slices, each within the per-slice limit (`MAX_SLICE_ENDPOINTS`): the set's cap is
    // what cuts.
    let mk = |mut eps: Vec<Endpoint>| {
        let second = eps.split_off(eps.len() / 2);
        Cluster::default()
            .svc(service("ns", "s", &["10.96.0.1"], &[("", 80, "TCP")]))
            .slice(slice("ns", "s-1", "s", "IPv4", &[("", 80, "TCP")], eps))
            .slice(slice("ns", "s-2", "s", "IPv4", &[("", 80, "TCP")], second))
            .desired()
    };
    let d = mk(eps);
    let set = &sets_of(&d, "10.96.0.1:80", Proto::Tcp)[&0];
    assert_eq!(set.len(), MAX_SET_SIZE);
    assert_eq!(d.warnings.count(WarningKind::Capacity), 1);
    assert!(
        d.warnings.examples()[0].1.contains("76 backends over the per-set limit"),
        "{:?}",
        d.warnings.examples()
    );
    assert_eq!(&sets_of(&mk(reversed), "10.96.0.1:80", Proto::Tcp)[&0], set, "independent of input order");
    let kept_last_subnet = set.iter().filter(|a| a.starts_with("10.1.4.")).count();
    assert!(kept_last_subnet > 0, "the cut is not by address");
    let raw = &d.sets[&SetKey { svc_id: 1, lane: 0 }];
    assert!(raw.windows(2).all(|w| w[0] < w[1]), "sets stay sorted");
}

#[test]
fn capacity_keeps_whole_services() {
    let limits = Limits { frontends: 3, sets: 10, backends: 10, set_size: 1024 };
    let c = Cluster::default()
        .svc(service("a", "one", &["10.96.0.1"], &[("x", 1, "TCP"), ("y", 2, "TCP")]))
        .svc(service("b", "two", &["10.96.0.2"], &[("x", 1, "TCP"), ("y", 2, "TCP")]))
        .svc(service("c", "three", &["10.96.0.3"], &[("x", 1, "TCP")]));
    let mut ids = FrontendIds::new();
    let d = desired_services_within(&c.0, &default_lane_keys(), &mut ids, &limits);
    let ips: BTreeSet<String> =
        d.frontends.keys().map(|k| crate::net::frontend_addr(k).0.ip().to_string()).collect();
    assert_eq!(ips, BTreeSet::from(["10.96.0.1".to_owned(), "10.96.0.3".to_owned()]));
    assert_eq!(d.warnings.count(WarningKind::Capacity), 1);
    assert_eq!(ids.len(), 3, "no id for a dropped Service");

    // The backend total is a limit too.
    let limits = Limits { frontends: 100, sets: 100, backends: 2, set_size: 1024 };
    let c = Cluster::default()
        .svc(service("a", "big", &["10.96.0.1"], &[("", 1, "TCP")]))
        .slice(slice(
            "a",
            "big-1",
            "big",
            "IPv4",
            &[("", 1, "TCP")],
            vec![endpoint("10.0.0.1", None), endpoint("10.0.0.2", None), endpoint("10.0.0.3", None)],
        ))
        .svc(service("b", "small", &["10.96.0.2"], &[("", 1, "TCP")]))
        .slice(slice("b", "small-1", "small", "IPv4", &[("", 1, "TCP")], vec![endpoint("10.0.0.4", None)]));
    let d = desired_services_within(&c.0, &default_lane_keys(), &mut FrontendIds::new(), &limits);
    assert_eq!(d.frontends.len(), 1);
    assert_eq!(d.sets.values().map(Vec::len).sum::<usize>(), 1);
    // And the set total.
    let limits = Limits { frontends: 100, sets: 0, backends: 100, set_size: 1024 };
    let d = desired_services_within(&c.0, &default_lane_keys(), &mut FrontendIds::new(), &limits);
    assert!(d.frontends.is_empty());
    assert_eq!(d.warnings.count(WarningKind::Capacity), 2);
}

#[test]
fn a_frontend_belongs_to_one_service() {
    let d = Cluster::default()
        .svc(service("a", "first", &["10.96.0.1"], &[("", 80, "TCP"), ("", 80, "TCP")]))
        .svc(service("b", "second", &["10.96.0.1"], &[("", 80, "TCP"), ("", 81, "TCP")]))
        .desired();
    assert_eq!(d.frontends.len(), 2);
    assert_eq!(d.frontends[&fk("10.96.0.1:80", Proto::Tcp)].svc_id, 1);
    assert_eq!(d.warnings.count(WarningKind::DuplicateFrontend), 2);
}

#[test]
fn ids_are_stable_across_recomputation() {
    let mut c = Cluster::default().svc(service("a", "x", &["10.96.0.1"], &[("", 80, "TCP")])).svc(service(
        "b",
        "y",
        &["10.96.0.2"],
        &[("", 80, "TCP")],
    ));
    let mut ids = FrontendIds::new();
    let keys = default_lane_keys();
    let first = desired_services(&c.0, &keys, &mut ids);
    assert_eq!(desired_services(&c.0, &keys, &mut ids), first, "a pure function of its inputs");
    // A Service sorted before the others appears: the others keep their ids.
    c = c.svc(service("0", "new", &["10.96.0.3"], &[("", 80, "TCP")]));
    let second = desired_services(&c.0, &keys, &mut ids);
    for (k, s) in &first.frontends {
        assert_eq!(second.frontends[k], *s);
    }
    assert_eq!(second.frontends[&fk("10.96.0.3:80", Proto::Tcp)].svc_id, 3);
    // After a restart the ids come back from the pinned map.
    let mut restarted = FrontendIds::from_existing(second.frontends.iter().map(|(k, s)| (*k, s.svc_id)));
    assert_eq!(desired_services(&c.0, &keys, &mut restarted), second);
}
