//! Lean wire forms of the objects the agent watches. Only the fields the model reads are
//! deserialized; everything else (`managedFields`, `kubectl.kubernetes.io/last-applied-
//! configuration` and other annotations, pod specs, endpoint topology, ...) is skipped while
//! parsing, so a list page of 500 objects costs a fraction of the API types. Each object is
//! turned into its API type one at a time for the model's decoding ([`ServiceInput::new`],
//! [`SliceInput::new`], [`LocalPod::from_pod`]), the same decoding the file source uses.
//!
//! [`ServiceInput::new`]: crate::model::ServiceInput::new
//! [`SliceInput::new`]: crate::model::SliceInput::new
//! [`LocalPod::from_pod`]: crate::model::LocalPod::from_pod

use std::{borrow::Cow, collections::BTreeMap, fmt};

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, ObjectReference, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort,
            ServiceSpec, SessionAffinityConfig,
        },
        discovery::v1::{
            Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone,
        },
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, Visitor},
};

/// The annotations the model reads start with this.
const ANNOTATION_PREFIX: &str = "tagger.io/";

/// Implements [`kube::Resource`] for a wire type, as its API type.
macro_rules! resource {
    ($wire:ty, $api:ty, metadata_api: $meta:expr) => {
        impl kube::Resource for $wire {
            type DynamicType = ();
            type Scope = <$api as k8s_openapi::Resource>::Scope;

            fn kind((): &()) -> Cow<'_, str> {
                <$api as k8s_openapi::Resource>::KIND.into()
            }
            fn group((): &()) -> Cow<'_, str> {
                <$api as k8s_openapi::Resource>::GROUP.into()
            }
            fn version((): &()) -> Cow<'_, str> {
                <$api as k8s_openapi::Resource>::VERSION.into()
            }
            fn api_version((): &()) -> Cow<'_, str> {
                <$api as k8s_openapi::Resource>::API_VERSION.into()
            }
            fn plural((): &()) -> Cow<'_, str> {
                <$api as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
            }
            fn metadata_api() -> bool {
                $meta
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A Service.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WireService {
    /// Name, namespace, resource version, labels, `tagger.io/` annotations.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<WireServiceSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct WireServiceSpec {
    #[serde(default, rename = "type")]
    type_: Option<String>,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Option<Vec<String>>,
    #[serde(default)]
    ports: Option<Vec<WirePort>>,
    #[serde(default, rename = "internalTrafficPolicy")]
    internal_traffic_policy: Option<String>,
    #[serde(default, rename = "trafficDistribution")]
    traffic_distribution: Option<String>,
    #[serde(default, rename = "sessionAffinity")]
    session_affinity: Option<String>,
    #[serde(default, rename = "sessionAffinityConfig")]
    session_affinity_config: Option<WireAffinityConfig>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
struct WireAffinityConfig {
    #[serde(default, rename = "clientIP")]
    client_ip: Option<WireClientIp>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireClientIp {
    #[serde(default)]
    timeout_seconds: Option<i32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct WirePort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<i32>,
    #[serde(default)]
    protocol: Option<String>,
}

resource!(WireService, Service, metadata_api: false);

impl From<WireService> for Service {
    fn from(w: WireService) -> Self {
        Service {
            metadata: w.metadata,
            spec: w.spec.map(|s| ServiceSpec {
                type_: s.type_,
                cluster_ip: s.cluster_ip,
                cluster_ips: s.cluster_ips,
                ports: s.ports.map(|ports| {
                    ports
                        .into_iter()
                        .map(|p| ServicePort {
                            name: p.name,
                            // Required by the API; a missing one is out of range for the model.
                            port: p.port.unwrap_or(0),
                            protocol: p.protocol,
                            ..ServicePort::default()
                        })
                        .collect()
                }),
                internal_traffic_policy: s.internal_traffic_policy,
                traffic_distribution: s.traffic_distribution,
                session_affinity: s.session_affinity,
                session_affinity_config: s.session_affinity_config.map(|c| SessionAffinityConfig {
                    client_ip: c.client_ip.map(|ip| ClientIPConfig { timeout_seconds: ip.timeout_seconds }),
                }),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }
}

/// An EndpointSlice.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireSlice {
    /// Name, namespace, resource version, labels, `tagger.io/` annotations.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    address_type: String,
    #[serde(default)]
    endpoints: Option<Vec<WireEndpoint>>,
    #[serde(default)]
    ports: Option<Vec<WirePort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEndpoint {
    #[serde(default)]
    addresses: Option<Vec<String>>,
    #[serde(default)]
    conditions: Option<WireConditions>,
    #[serde(default)]
    target_ref: Option<WireTarget>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    hints: Option<WireHints>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
struct WireConditions {
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireHints {
    #[serde(default)]
    for_zones: Option<Vec<WireName>>,
    #[serde(default)]
    for_nodes: Option<Vec<WireName>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct WireName {
    #[serde(default)]
    name: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct WireTarget {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

resource!(WireSlice, EndpointSlice, metadata_api: false);

impl From<WireSlice> for EndpointSlice {
    fn from(w: WireSlice) -> Self {
        EndpointSlice {
            metadata: w.metadata,
            address_type: w.address_type,
            endpoints: w
                .endpoints
                .unwrap_or_default()
                .into_iter()
                .map(|e| Endpoint {
                    addresses: e.addresses.unwrap_or_default(),
                    conditions: e.conditions.map(|c| EndpointConditions {
                        ready: c.ready,
                        terminating: c.terminating,
                        serving: c.serving,
                    }),
                    node_name: e.node_name,
                    zone: e.zone,
                    hints: e.hints.map(|h| EndpointHints {
                        for_zones: h
                            .for_zones
                            .map(|z| z.into_iter().map(|z| ForZone { name: z.name }).collect()),
                        for_nodes: h
                            .for_nodes
                            .map(|n| n.into_iter().map(|n| ForNode { name: n.name }).collect()),
                    }),
                    target_ref: e.target_ref.map(|t| ObjectReference {
                        kind: t.kind,
                        namespace: t.namespace,
                        name: t.name,
                        ..ObjectReference::default()
                    }),
                    ..Endpoint::default()
                })
                .collect(),
            ports: w.ports.map(|ports| {
                ports
                    .into_iter()
                    .map(|p| EndpointPort {
                        name: p.name,
                        port: p.port,
                        protocol: p.protocol,
                        ..EndpointPort::default()
                    })
                    .collect()
            }),
        }
    }
}

/// A pod of this node: its identity, labels, QoS class, addresses and whether it is on the host
/// network.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WirePod {
    /// Name, namespace, uid, resource version, labels, `tagger.io/` annotations.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<WirePodSpec>,
    #[serde(default)]
    status: Option<WirePodStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WirePodSpec {
    #[serde(default)]
    host_network: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WirePodStatus {
    #[serde(default)]
    qos_class: Option<String>,
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Option<Vec<WirePodIp>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct WirePodIp {
    #[serde(default)]
    ip: String,
}

resource!(WirePod, Pod, metadata_api: false);

impl From<WirePod> for Pod {
    fn from(w: WirePod) -> Self {
        Pod {
            metadata: w.metadata,
            spec: Some(PodSpec { host_network: w.spec.and_then(|s| s.host_network), ..PodSpec::default() }),
            status: w.status.map(|s| PodStatus {
                qos_class: s.qos_class,
                pod_ip: s.pod_ip,
                pod_ips: s.pod_ips.map(|ips| ips.into_iter().map(|p| PodIP { ip: p.ip }).collect()),
                ..PodStatus::default()
            }),
        }
    }
}

/// A pod's metadata (requested as `PartialObjectMetadata`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WirePodMeta {
    /// Name, namespace, uid, resource version, labels, `tagger.io/` annotations.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
}

resource!(WirePodMeta, Pod, metadata_api: true);

/// This node's metadata (a metadata-only watch: the agent reads its zone label only).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WireNodeMeta {
    /// Name, resource version, labels.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
}

resource!(WireNodeMeta, k8s_openapi::api::core::v1::Node, metadata_api: true);

/// Object metadata with the fields the agent reads.
fn lean_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        uid: Option<String>,
        #[serde(default)]
        resource_version: Option<String>,
        #[serde(default)]
        labels: Option<BTreeMap<String, String>>,
        #[serde(default)]
        annotations: Option<OwnAnnotations>,
    }
    let m = Option::<Meta>::deserialize(d)?;
    Ok(m.map(|m| ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        annotations: m.annotations.map(|a| a.0).filter(|a| !a.is_empty()),
        ..ObjectMeta::default()
    })
    .unwrap_or_default())
}

/// The `tagger.io/` annotations; the others' values are skipped without being stored.
struct OwnAnnotations(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for OwnAnnotations {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Annotations;
        impl<'de> Visitor<'de> for Annotations {
            type Value = OwnAnnotations;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of annotations")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(OwnKey(key)) = map.next_key()? {
                    match key {
                        Some(key) => {
                            out.insert(key, map.next_value::<String>()?);
                        }
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(OwnAnnotations(out))
            }
        }
        d.deserialize_map(Annotations)
    }
}

/// An annotation key, kept only when it is one of ours.
struct OwnKey(Option<String>);

impl<'de> Deserialize<'de> for OwnKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Key;
        impl Visitor<'_> for Key {
            type Value = OwnKey;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an annotation key")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(OwnKey(v.starts_with(ANNOTATION_PREFIX).then(|| v.to_owned())))
            }
        }
        d.deserialize_str(Key)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{LocalPod, ObjectRef, ServiceInput, SliceInput};

    #[test]
    fn services_decode_like_the_api_type() {
        let value = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "a", "namespace": "demo", "resourceVersion": "7", "uid": "u",
                "annotations": {
                    "tagger.io/strict": "true",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": [1, 2, 3]}",
                },
                "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
            },
            "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00::1"], "type": "ClusterIP",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                               {"port": 53, "protocol": "UDP"}, {"name": "x", "port": 7, "protocol": "SCTP"}],
                     "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}},
            "status": {"loadBalancer": {}},
        });
        let api: Service = serde_json::from_value(value.clone()).unwrap();
        let wire: WireService = serde_json::from_value(value).unwrap();
        assert_eq!(wire.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(
            wire.metadata.annotations,
            Some(BTreeMap::from([("tagger.io/strict".to_owned(), "true".to_owned())])),
            "only our annotations are kept"
        );
        let key = ObjectRef::new("demo", "a");
        let decoded = ServiceInput::new(&key, &Service::from(wire));
        assert_eq!(decoded, ServiceInput::new(&key, &api));
        let affinity = decoded.spec.unwrap().shaping.affinity;
        assert_eq!(affinity, Some(crate::model::SessionAffinity { timeout_s: 60 }));
        let headless: WireService =
            serde_json::from_value(json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None"}}))
                .unwrap();
        let key = ObjectRef::new("default", "h");
        assert!(ServiceInput::new(&key, &Service::from(headless)).spec.is_none());
    }

    #[test]
    fn slices_decode_like_the_api_type() {
        let value = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "a-1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "a"},
                         "annotations": null},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true, "serving": true},
                 "targetRef": {"kind": "Pod", "name": "p1", "namespace": "demo", "uid": "x"},
                 "nodeName": "n1", "zone": "z"},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"], "conditions": {"terminating": true}},
                {"addresses": ["10.0.0.5"], "conditions": {"ready": false, "serving": true, "terminating": true},
                 "nodeName": "n2", "zone": "z2",
                 "hints": {"forZones": [{"name": "z2"}], "forNodes": [{"name": "n2"}]}},
                {"addresses": ["10.0.0.4"], "targetRef": {"kind": "Pod", "name": "p4", "namespace": "other"}},
                {"addresses": ["bogus"]},
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "none"}],
        });
        let api: EndpointSlice = serde_json::from_value(value.clone()).unwrap();
        let wire: WireSlice = serde_json::from_value(value).unwrap();
        let key = ObjectRef::new("demo", "a-1");
        let decoded = SliceInput::new(&key, &EndpointSlice::from(wire));
        assert_eq!(decoded, SliceInput::new(&key, &api));
        // 10.0.0.2 is not ready; 10.0.0.3 is terminating with `serving` unset, which reads as
        // serving (as kube-proxy reads it); "bogus" is no address.
        let ips: Vec<String> = decoded.endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.3", "10.0.0.5", "10.0.0.4"]);
        assert_eq!(
            decoded.endpoints.iter().map(|e| e.terminating).collect::<Vec<_>>(),
            [false, true, true, false]
        );
        assert_eq!(decoded.endpoints[2].place.as_ref().unwrap().for_zones[0].as_ref(), "z2");
        assert_eq!(decoded.service, Some(ObjectRef::new("demo", "a")));
    }

    #[test]
    fn pods_decode_like_the_api_type() {
        let value = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "demo", "uid": "0b6f", "labels": {"tagger.io/lane": "gray"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "qosClass": "Burstable", "podIP": "10.1.0.7",
                       "podIPs": [{"ip": "10.1.0.7"}, {"ip": "fd00::7"}]},
        });
        let api: Pod = serde_json::from_value(value.clone()).unwrap();
        let wire: WirePod = serde_json::from_value(value.clone()).unwrap();
        let local = LocalPod::from_pod(&Pod::from(wire));
        assert_eq!(local, LocalPod::from_pod(&api));
        assert_eq!(local.unwrap().ips.len(), 2);
        let host: WirePod = serde_json::from_value(json!({
            "metadata": {"name": "h", "namespace": "demo", "uid": "0b70"},
            "spec": {"hostNetwork": true}, "status": {"podIP": "192.0.2.1"},
        }))
        .unwrap();
        assert_eq!(LocalPod::from_pod(&Pod::from(host)).unwrap().ips, Vec::<std::net::IpAddr>::new());
        let meta: WirePodMeta = serde_json::from_value(value).unwrap();
        assert_eq!(meta.metadata.labels, api.metadata.labels);
        assert!(<WirePodMeta as kube::Resource>::metadata_api());
        assert_eq!(<WireSlice as kube::Resource>::plural(&()), "endpointslices");
        assert_eq!(<WireSlice as kube::Resource>::api_version(&()), "discovery.k8s.io/v1");
    }
}
