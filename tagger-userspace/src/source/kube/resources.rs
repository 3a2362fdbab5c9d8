//! The objects the kube watchers list and watch: [`crate::model::api`]'s types, the same ones
//! the file source parses, made [`kube::Resource`]s here under their API types' names and
//! paths. Only the fields the model reads are deserialized (see that module). The cluster-wide
//! pod watch asks for metadata only ([`PodMeta`]), as does the Node watch.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::model::api::{EndpointSlice, Node, Pod, Service, lean_meta};

/// Implements [`kube::Resource`] for a type the model reads, as its API type.
macro_rules! resource {
    ($lean:ty, $api:ty, metadata_api: $meta:expr) => {
        impl kube::Resource for $lean {
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

resource!(Service, k8s_openapi::api::core::v1::Service, metadata_api: false);
resource!(EndpointSlice, k8s_openapi::api::discovery::v1::EndpointSlice, metadata_api: false);
resource!(Pod, k8s_openapi::api::core::v1::Pod, metadata_api: false);
// This node's Node object: a metadata-only watch (the model reads its zone label only).
resource!(Node, k8s_openapi::api::core::v1::Node, metadata_api: true);

/// A pod's metadata (requested as `PartialObjectMetadata`): the cluster-wide pod watch reads
/// labels only (backend lanes).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodMeta {
    /// Name, namespace, uid, resource version, labels, `tagger.io/` annotations.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
}

resource!(PodMeta, k8s_openapi::api::core::v1::Pod, metadata_api: true);

#[cfg(test)]
mod tests {
    use kube::Resource;
    use serde_json::json;

    use super::*;

    #[test]
    fn the_lean_types_are_their_api_types_resources() {
        assert_eq!(<EndpointSlice as Resource>::plural(&()), "endpointslices");
        assert_eq!(<EndpointSlice as Resource>::api_version(&()), "discovery.k8s.io/v1");
        assert_eq!(<Service as Resource>::kind(&()), "Service");
        assert_eq!(<Pod as Resource>::plural(&()), "pods");
        assert!(!<Pod as Resource>::metadata_api());
        assert!(<PodMeta as Resource>::metadata_api() && <Node as Resource>::metadata_api());
        let meta: PodMeta = serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": "p", "namespace": "demo", "labels": {"tagger.io/lane": "gray"},
                         "annotations": {"other": "x"}, "managedFields": [{"manager": "kubelet"}]},
        }))
        .unwrap();
        assert_eq!(meta.metadata.labels.unwrap()["tagger.io/lane"], "gray");
        assert_eq!(meta.metadata.annotations, None, "only our annotations are kept");
    }
}
