//! A described cluster for agent tests: pods (with node, labels, UID, QoS), Services and which
//! pods back them, rendered as ordinary Kubernetes objects (Pod, Service, EndpointSlice JSON) for
//! the file source or the fake API server.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::{Value, json};

/// Namespace of every object.
pub const NAMESPACE: &str = "demo";

/// A pod of the described cluster.
#[derive(Clone, Debug)]
pub struct PodDesc {
    /// Name.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.nodeName`.
    pub node: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Pod IPs.
    pub ips: Vec<IpAddr>,
    /// `status.qosClass`.
    pub qos: &'static str,
    /// Endpoint readiness.
    pub ready: bool,
    /// Being deleted: its endpoint is `terminating`, and `serving` while `ready`.
    pub terminating: bool,
    /// The zone its EndpointSlice entries state (`zone`, and `hints.forZones` when the Service
    /// has zone hints).
    pub zone: Option<String>,
}

/// A Service of the described cluster.
#[derive(Clone, Debug)]
pub struct ServiceDesc {
    /// Name.
    pub name: String,
    /// ClusterIPs (first is `spec.clusterIP`).
    pub cluster_ips: Vec<IpAddr>,
    /// Service port.
    pub port: u16,
    /// Port the backends listen on.
    pub target_port: u16,
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    /// Backend pod names.
    pub backends: Vec<String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// `spec.internalTrafficPolicy`.
    pub internal_traffic_policy: Option<&'static str>,
    /// `spec.trafficDistribution`.
    pub traffic_distribution: Option<&'static str>,
    /// Whether its EndpointSlices carry zone hints (each endpoint hinted for its own zone).
    pub zone_hints: bool,
}

/// The cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterDesc {
    /// Pods by name.
    pub pods: BTreeMap<String, PodDesc>,
    /// Services by name.
    pub services: BTreeMap<String, ServiceDesc>,
    /// Node objects by name, with their `topology.kubernetes.io/zone` label.
    pub nodes: BTreeMap<String, Option<String>>,
}

/// A UID derived from a name (stable, valid, unique per name).
#[must_use]
pub fn uid_for(name: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        (h >> 20) & 0xfff,
        h & 0xffff_ffff_ffff
    )
}

impl ClusterDesc {
    /// Adds or replaces a pod.
    pub fn pod(&mut self, name: &str, node: &str, lane: Option<&str>, ips: &[IpAddr]) -> &mut PodDesc {
        let mut labels = BTreeMap::from([("app".to_owned(), name.to_owned())]);
        if let Some(lane) = lane {
            labels.insert("tagger.io/lane".to_owned(), lane.to_owned());
        }
        self.pods.insert(
            name.to_owned(),
            PodDesc {
                name: name.to_owned(),
                uid: uid_for(name),
                node: node.to_owned(),
                labels,
                ips: ips.to_vec(),
                qos: "Burstable",
                ready: true,
                terminating: false,
                zone: None,
            },
        );
        self.pods.get_mut(name).expect("just inserted")
    }

    /// Adds or replaces a Service.
    pub fn service(
        &mut self,
        name: &str,
        cluster_ips: &[IpAddr],
        port: u16,
        target_port: u16,
        backends: &[&str],
    ) {
        self.services.insert(
            name.to_owned(),
            ServiceDesc {
                name: name.to_owned(),
                cluster_ips: cluster_ips.to_vec(),
                port,
                target_port,
                protocol: "TCP",
                backends: backends.iter().map(|b| (*b).to_owned()).collect(),
                annotations: BTreeMap::new(),
                internal_traffic_policy: None,
                traffic_distribution: None,
                zone_hints: false,
            },
        );
    }

    /// Sets (or with `None` removes) a pod's lane label.
    pub fn set_lane(&mut self, pod: &str, lane: Option<&str>) {
        let p = self.pods.get_mut(pod).expect("pod");
        match lane {
            Some(l) => p.labels.insert("tagger.io/lane".to_owned(), l.to_owned()),
            None => p.labels.remove("tagger.io/lane"),
        };
    }

    /// Every object: Pods, Services, and one EndpointSlice per Service and address family.
    #[must_use]
    pub fn objects(&self) -> Vec<Value> {
        let mut out: Vec<Value> = self.pods.values().map(pod_json).collect();
        for (name, zone) in &self.nodes {
            let labels: BTreeMap<&str, &str> =
                zone.iter().map(|z| ("topology.kubernetes.io/zone", z.as_str())).collect();
            out.push(
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}),
            );
        }
        for svc in self.services.values() {
            out.push(service_json(svc));
            for family in ["IPv4", "IPv6"] {
                out.push(self.slice_json(svc, family));
            }
        }
        out
    }

    fn slice_json(&self, svc: &ServiceDesc, family: &str) -> Value {
        let endpoints: Vec<Value> = svc
            .backends
            .iter()
            .filter_map(|b| self.pods.get(b))
            .filter_map(|p| {
                let ip = p.ips.iter().find(|ip| (family == "IPv4") == ip.is_ipv4())?;
                Some(json!({
                    "addresses": [ip.to_string()],
                    "conditions": {
                        "ready": p.ready && !p.terminating,
                        "serving": p.ready,
                        "terminating": p.terminating,
                    },
                    "zone": p.zone,
                    "hints": match (&p.zone, svc.zone_hints) {
                        (Some(z), true) => json!({"forZones": [{"name": z}]}),
                        _ => Value::Null,
                    },
                    "nodeName": p.node,
                    "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": p.name, "uid": p.uid},
                }))
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-{}", svc.name, family.to_ascii_lowercase()),
                "namespace": NAMESPACE,
                "labels": {"kubernetes.io/service-name": svc.name, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            },
            "addressType": family,
            "endpoints": endpoints,
            "ports": [{"name": "main", "port": svc.target_port, "protocol": svc.protocol}],
        })
    }

    /// The objects as a multi-document YAML file, as `kubectl get -o yaml` would print them
    /// one by one.
    #[must_use]
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        for o in self.objects() {
            out.push_str("---\n");
            out.push_str(&serde_saphyr::to_string(&o).expect("yaml"));
        }
        out
    }
}

fn pod_json(p: &PodDesc) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": p.name, "namespace": NAMESPACE, "uid": p.uid, "labels": p.labels},
        "spec": {"nodeName": p.node, "containers": [{"name": "main", "image": "tagger-test"}]},
        "status": {
            "phase": "Running",
            "qosClass": p.qos,
            "podIP": p.ips.first().map(ToString::to_string),
            "podIPs": p.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
        },
    })
}

fn service_json(s: &ServiceDesc) -> Value {
    let ips: Vec<String> = s.cluster_ips.iter().map(ToString::to_string).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": s.name, "namespace": NAMESPACE, "annotations": s.annotations},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ips.first(),
            "clusterIPs": ips,
            "ports": [{"name": "main", "port": s.port, "targetPort": s.target_port, "protocol": s.protocol}],
            "internalTrafficPolicy": s.internal_traffic_policy,
            "trafficDistribution": s.traffic_distribution,
        },
    })
}
