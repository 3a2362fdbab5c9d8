//! Builders of Kubernetes objects for tests.

pub mod fuzz;
pub mod reference;

use std::collections::BTreeMap;

use super::{
    ObjectRef,
    api::{
        Endpoint, EndpointPort, EndpointSlice, ObjectMeta, ObjectReference, Service, ServicePort, ServiceSpec,
    },
};

/// The label linking an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service with cluster IPs and (name, port, protocol) ports.
pub(crate) fn service(
    ns: &str,
    name: &str,
    ips: &[&str],
    ports: &[(&str, i32, &str)],
) -> (ObjectRef, Service) {
    let svc = Service {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some(ns.into()), ..ObjectMeta::default() },
        spec: Some(ServiceSpec {
            cluster_ip: ips.first().map(|s| (*s).to_owned()),
            cluster_ips: Some(ips.iter().map(|s| (*s).to_owned()).collect()),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, proto)| ServicePort {
                        name: (!n.is_empty()).then(|| (*n).to_owned()),
                        port: *p,
                        protocol: Some((*proto).to_owned()),
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
    };
    (ObjectRef::new(ns, name), svc)
}

/// An EndpointSlice of `service` with (name, port, protocol) ports.
pub(crate) fn slice(
    ns: &str,
    name: &str,
    service: &str,
    address_type: &str,
    ports: &[(&str, i32, &str)],
    endpoints: Vec<Endpoint>,
) -> (ObjectRef, EndpointSlice) {
    let slice = EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())])),
            ..ObjectMeta::default()
        },
        address_type: address_type.into(),
        endpoints,
        ports: Some(
            ports
                .iter()
                .map(|(n, p, proto)| EndpointPort {
                    name: (!n.is_empty()).then(|| (*n).to_owned()),
                    port: Some(*p),
                    protocol: Some((*proto).to_owned()),
                })
                .collect(),
        ),
    };
    (ObjectRef::new(ns, name), slice)
}

/// A ready-unset endpoint of a pod (in the slice's namespace) or of nothing.
pub(crate) fn endpoint(ip: &str, pod: Option<&str>) -> Endpoint {
    Endpoint {
        addresses: vec![ip.into()],
        target_ref: pod.map(|p| ObjectReference {
            kind: Some("Pod".into()),
            name: Some(p.into()),
            ..ObjectReference::default()
        }),
        ..Endpoint::default()
    }
}
