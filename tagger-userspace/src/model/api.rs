//! The Kubernetes objects as tagger reads them: Pod, Service, EndpointSlice and Node with only
//! the fields the model decodes, under the names and shapes the API uses (so a field here reads
//! like its `k8s-openapi` counterpart).
//!
//! Both sources parse into these types: the kube watchers straight from the API server's JSON,
//! the file source from its YAML documents. The model's decoders ([`super::ServiceInput::new`],
//! [`super::SliceInput::new`], [`super::LocalPod::from_pod`]) take them, so an object reaches
//! the model through one conversion whichever source brought it.
//!
//! Everything else is skipped while parsing (`managedFields`, other annotations such as
//! `kubectl.kubernetes.io/last-applied-configuration`, pod specs, ...): a list page of 500
//! objects costs a fraction of the full API types. A `null` reads as the field's absence, as
//! the API server treats it.

use std::{collections::BTreeMap, fmt};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{
    Deserialize, Deserializer,
    de::{DeserializeOwned, IgnoredAny, MapAccess, Visitor},
};

/// The annotations the model reads start with this.
const ANNOTATION_PREFIX: &str = "tagger.io/";

/// A Service.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Service {
    /// Name, namespace, resource version, labels, `tagger.io/` annotations.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    /// The spec.
    #[serde(default)]
    pub spec: Option<ServiceSpec>,
}

/// What the model reads of a Service's spec.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `type` (`ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalName`).
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    /// `clusterIP`.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// `clusterIPs`.
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    /// `ports`.
    #[serde(default)]
    pub ports: Option<Vec<ServicePort>>,
    /// `internalTrafficPolicy`.
    #[serde(default)]
    pub internal_traffic_policy: Option<String>,
    /// `trafficDistribution`.
    #[serde(default)]
    pub traffic_distribution: Option<String>,
    /// `sessionAffinity`.
    #[serde(default)]
    pub session_affinity: Option<String>,
    /// `sessionAffinityConfig`.
    #[serde(default)]
    pub session_affinity_config: Option<SessionAffinityConfig>,
}

/// A Service port.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ServicePort {
    /// `name`.
    #[serde(default)]
    pub name: Option<String>,
    /// `port`; required by the API, read as 0 (out of range for the model) when missing.
    #[serde(default, deserialize_with = "nullable")]
    pub port: i32,
    /// `protocol`.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// `sessionAffinityConfig`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct SessionAffinityConfig {
    /// `clientIP`.
    #[serde(default, rename = "clientIP")]
    pub client_ip: Option<ClientIPConfig>,
}

/// `sessionAffinityConfig.clientIP`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientIPConfig {
    /// `timeoutSeconds`.
    #[serde(default)]
    pub timeout_seconds: Option<i32>,
}

/// An EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    /// Name, namespace, resource version, labels, `tagger.io/` annotations.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    /// `addressType` (`IPv4`, `IPv6`, `FQDN`).
    #[serde(default, deserialize_with = "nullable")]
    pub address_type: String,
    /// `endpoints`.
    #[serde(default, deserialize_with = "nullable")]
    pub endpoints: Vec<Endpoint>,
    /// `ports`.
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
}

/// An endpoint of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `addresses`.
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<String>,
    /// `conditions`.
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    /// `targetRef`.
    #[serde(default)]
    pub target_ref: Option<ObjectReference>,
    /// `nodeName`.
    #[serde(default)]
    pub node_name: Option<String>,
    /// `zone`.
    #[serde(default)]
    pub zone: Option<String>,
    /// `hints`.
    #[serde(default)]
    pub hints: Option<EndpointHints>,
}

/// An endpoint's `conditions`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct EndpointConditions {
    /// `ready`.
    #[serde(default)]
    pub ready: Option<bool>,
    /// `serving`.
    #[serde(default)]
    pub serving: Option<bool>,
    /// `terminating`.
    #[serde(default)]
    pub terminating: Option<bool>,
}

/// An endpoint's topology `hints`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointHints {
    /// `forZones`.
    #[serde(default)]
    pub for_zones: Option<Vec<ForZone>>,
    /// `forNodes`.
    #[serde(default)]
    pub for_nodes: Option<Vec<ForNode>>,
}

/// A zone hint.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ForZone {
    /// `name`.
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
}

/// A node hint.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ForNode {
    /// `name`.
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
}

/// An endpoint's `targetRef`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ObjectReference {
    /// `kind`.
    #[serde(default)]
    pub kind: Option<String>,
    /// `namespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// `name`.
    #[serde(default)]
    pub name: Option<String>,
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct EndpointPort {
    /// `name`.
    #[serde(default)]
    pub name: Option<String>,
    /// `port` (unset: all ports).
    #[serde(default)]
    pub port: Option<i32>,
    /// `protocol`.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// A Pod: its identity and labels, the node it runs on, whether it is on the host network,
/// its QoS class and addresses.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Pod {
    /// Name, namespace, uid, resource version, labels, `tagger.io/` annotations.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    /// The spec.
    #[serde(default)]
    pub spec: Option<PodSpec>,
    /// The status.
    #[serde(default)]
    pub status: Option<PodStatus>,
}

/// What the model reads of a pod's spec.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// `nodeName`.
    #[serde(default)]
    pub node_name: Option<String>,
    /// `hostNetwork`.
    #[serde(default)]
    pub host_network: Option<bool>,
}

/// What the model reads of a pod's status.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// `qosClass`.
    #[serde(default)]
    pub qos_class: Option<String>,
    /// `podIP`.
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    /// `podIPs`.
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIP>>,
}

/// An entry of `status.podIPs`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct PodIP {
    /// `ip`.
    #[serde(default, deserialize_with = "nullable")]
    pub ip: String,
}

/// A Node, or any object of which only the metadata is read (the model reads a Node's zone
/// label).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Node {
    /// Name, resource version, labels.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
}

/// A field whose `null` reads as its default, as for an absent one.
fn nullable<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Object metadata with the fields the model reads.
///
/// # Errors
/// When the metadata is not an object, or one of those fields has the wrong type.
pub fn lean_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
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
    use crate::model::{LocalPod, ObjectRef, ServiceInput, SessionAffinity, SliceInput};

    /// Parses `value` as the lean type and as the full API type, and checks that the lean one
    /// holds every field the model reads of the full one.
    fn both<T: DeserializeOwned, A: DeserializeOwned>(value: &serde_json::Value) -> (T, A) {
        let lean = serde_json::from_value(value.clone()).unwrap();
        let full = serde_json::from_value(value.clone()).unwrap();
        (lean, full)
    }

    #[test]
    fn services_keep_what_the_model_reads() {
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
                     "internalTrafficPolicy": "Local", "trafficDistribution": "PreferClose",
                     "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}},
            "status": {"loadBalancer": {}},
        });
        let (lean, full): (Service, k8s_openapi::api::core::v1::Service) = both(&value);
        assert_eq!(lean.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(lean.metadata.uid, full.metadata.uid);
        assert_eq!(
            lean.metadata.annotations,
            Some(BTreeMap::from([("tagger.io/strict".to_owned(), "true".to_owned())])),
            "only our annotations are kept"
        );
        assert!(lean.metadata.managed_fields.is_none());
        let (spec, api) = (lean.spec.as_ref().unwrap(), full.spec.unwrap());
        assert_eq!(
            (&spec.type_, &spec.cluster_ip, &spec.cluster_ips),
            (&api.type_, &api.cluster_ip, &api.cluster_ips)
        );
        let ports = |p: &[ServicePort]| {
            p.iter().map(|p| (p.name.clone(), p.port, p.protocol.clone())).collect::<Vec<_>>()
        };
        let api_ports: Vec<_> =
            api.ports.unwrap().into_iter().map(|p| (p.name, p.port, p.protocol)).collect();
        assert_eq!(ports(spec.ports.as_deref().unwrap()), api_ports);
        assert_eq!(spec.internal_traffic_policy, api.internal_traffic_policy);
        assert_eq!(spec.traffic_distribution, api.traffic_distribution);
        assert_eq!(spec.session_affinity, api.session_affinity);
        assert_eq!(
            spec.session_affinity_config.as_ref().unwrap().client_ip.as_ref().unwrap().timeout_seconds,
            Some(60)
        );

        let key = ObjectRef::new("demo", "a");
        let decoded = ServiceInput::new(&key, &lean);
        let decoded_spec = decoded.spec.unwrap();
        assert_eq!(decoded_spec.shaping.affinity, Some(SessionAffinity { timeout_s: 60 }));
        assert_eq!(decoded_spec.ips.len(), 2);
        assert_eq!(decoded_spec.ports.len(), 2, "SCTP is skipped");
        assert_eq!(decoded_spec.flags, tagger_common::SVC_F_STRICT);
        assert!(decoded_spec.topology.node_local && decoded_spec.topology.prefer_zone);

        let headless: Service =
            serde_json::from_value(json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None"}}))
                .unwrap();
        assert!(ServiceInput::new(&ObjectRef::new("default", "h"), &headless).spec.is_none());
    }

    #[test]
    fn slices_keep_what_the_model_reads() {
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
        let (lean, full): (EndpointSlice, k8s_openapi::api::discovery::v1::EndpointSlice) = both(&value);
        assert_eq!(lean.address_type, full.address_type);
        assert_eq!(lean.metadata.labels, full.metadata.labels);
        assert_eq!(lean.endpoints.len(), full.endpoints.len());
        for (l, f) in lean.endpoints.iter().zip(&full.endpoints) {
            assert_eq!(l.addresses, f.addresses);
            let c = f.conditions.as_ref();
            let lc = l.conditions.as_ref();
            assert_eq!(
                (lc.and_then(|c| c.ready), lc.and_then(|c| c.serving), lc.and_then(|c| c.terminating)),
                (c.and_then(|c| c.ready), c.and_then(|c| c.serving), c.and_then(|c| c.terminating))
            );
            let t = f.target_ref.as_ref();
            let lt = l.target_ref.as_ref();
            assert_eq!(lt.and_then(|t| t.name.clone()), t.and_then(|t| t.name.clone()));
            assert_eq!(lt.and_then(|t| t.namespace.clone()), t.and_then(|t| t.namespace.clone()));
            assert_eq!((&l.node_name, &l.zone), (&f.node_name, &f.zone));
        }
        let key = ObjectRef::new("demo", "a-1");
        let decoded = SliceInput::new(&key, &lean);
        // 10.0.0.2 is not ready; 10.0.0.3 is terminating with `serving` unset, which reads as
        // serving (as kube-proxy reads it); "bogus" is no address.
        let ips: Vec<String> = decoded.endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.3", "10.0.0.5", "10.0.0.4"]);
        assert_eq!(
            decoded.endpoints.iter().map(|e| e.terminating).collect::<Vec<_>>(),
            [false, true, true, false]
        );
        let place = decoded.endpoints[2].place.as_ref().unwrap();
        assert_eq!((place.for_zones[0].as_ref(), place.for_nodes[0].as_ref()), ("z2", "n2"));
        assert_eq!(decoded.endpoints[3].pod, Some(ObjectRef::new("other", "p4")));
        assert_eq!(decoded.service, Some(ObjectRef::new("demo", "a")));
        assert_eq!(decoded.ports.len(), 1, "a port without a number is unrestricted");
    }

    #[test]
    fn pods_keep_what_the_model_reads() {
        let value = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "demo", "uid": "0b6f", "labels": {"tagger.io/lane": "gray"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "qosClass": "Burstable", "podIP": "10.1.0.7",
                       "podIPs": [{"ip": "10.1.0.7"}, {"ip": "fd00::7"}]},
        });
        let (lean, full): (Pod, k8s_openapi::api::core::v1::Pod) = both(&value);
        assert_eq!(lean.metadata.labels, full.metadata.labels);
        assert_eq!(lean.spec.as_ref().unwrap().node_name, full.spec.unwrap().node_name);
        let local = LocalPod::from_pod(&lean).unwrap();
        assert_eq!(
            (local.uid.as_str(), local.namespace.as_str(), local.name.as_str()),
            ("0b6f", "demo", "p")
        );
        assert_eq!(local.ips.len(), 2);
        assert_eq!(local.qos, crate::model::QosClass::Burstable);
        let host: Pod = serde_json::from_value(json!({
            "metadata": {"name": "h", "namespace": "demo", "uid": "0b70"},
            "spec": {"hostNetwork": true}, "status": {"podIP": "192.0.2.1"},
        }))
        .unwrap();
        assert_eq!(LocalPod::from_pod(&host).unwrap().ips, Vec::<std::net::IpAddr>::new());
        assert_eq!(LocalPod::from_pod(&Pod::default()), None);
    }

    #[test]
    fn null_reads_as_absent() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": null, "addressType": null, "endpoints": [{"addresses": null}], "ports": null,
        }))
        .unwrap();
        assert_eq!(slice.endpoints, [Endpoint::default()]);
        let port: ServicePort = serde_json::from_value(json!({"port": null})).unwrap();
        assert_eq!(port.port, 0);
        assert!(serde_json::from_value::<Service>(json!({"spec": {"ports": 3}})).is_err());
    }
}
