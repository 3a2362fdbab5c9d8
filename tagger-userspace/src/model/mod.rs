//! The model: from Kubernetes objects to the datapath contents they call for, as pure
//! functions — no kernel, no network, no API calls — so every rule is unit-tested and the
//! reconciler ([`crate::reconcile`]) only has to diff.
//!
//! - [`services`]: Services and EndpointSlices (plus the lane labels of backend pods) → Service
//!   frontends and per-lane backend sets.
//! - [`pods`]: the pods of this node → their lanes, and where kubelet puts their cgroups.
//! - [`api`]: the Kubernetes objects as both sources parse them (only the fields read here).
//! - [`objects`]: the compact form the model decodes those objects into, and the changes
//!   sources report.
//! - [`index`]: the cluster as the agent keeps it, with the desired Services maintained
//!   incrementally (only the Services a change affects are recomputed).
//! - [`topology`]: which of a lane's serving endpoints new connections go to
//!   (`internalTrafficPolicy`, terminating endpoints, `trafficDistribution`, zone hints).
//! - [`steering`]: which frontends tagger steers on this node and which it leaves to the
//!   cluster, and why.
//! - [`ids`]: stable `svc_id`s for frontends.
//! - [`warnings`]: what was skipped or corrected, counted by kind.
//!
//! The I/O around it (watching, reading files, finding which cgroup exists) belongs to the
//! agent; its outputs are the inputs here.

pub mod api;
pub mod ids;
pub mod incremental;
pub mod index;
pub mod lane;
pub mod lane_marks;
pub mod lanes;
pub mod objects;
pub mod pods;
pub mod services;
pub mod shaping;
pub mod state;
pub mod steering;
#[cfg(test)]
pub(crate) mod testing;
pub mod topology;
pub mod warnings;

use std::fmt;

use self::api::ObjectMeta;

pub use self::{
    ids::FrontendIds,
    index::{ClusterIndex, ServiceDelta, ServiceIndex, ServicesOut},
    objects::{
        Change, Kind, Labels, Object, ServiceInput, ServiceShaping, SessionAffinity, SliceInput, Topology,
    },
    pods::{DesiredPod, DesiredPods, LocalPod, QosClass, desired_pods, pod_cgroup_candidates, pod_entries},
    services::{FrontendOrigin, Limits, MAX_SET_SIZE},
    topology::Node,
    warnings::{WarningKind, Warnings},
};

/// A namespaced object's identity. Orders by namespace, then name, which is the order in
/// which every deterministic choice of the model is made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectRef {
    /// A reference from its parts.
    #[must_use]
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    /// The reference of an object from its metadata; `None` without a name. A missing
    /// namespace is `default`, as kubectl does for files that omit it.
    #[must_use]
    pub fn of(meta: &ObjectMeta) -> Option<Self> {
        let name = meta.name.as_ref()?;
        Some(Self::new(meta.namespace.as_deref().unwrap_or("default"), name.clone()))
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ref_from_meta() {
        let meta =
            ObjectMeta { name: Some("web".into()), namespace: Some("shop".into()), ..ObjectMeta::default() };
        assert_eq!(ObjectRef::of(&meta), Some(ObjectRef::new("shop", "web")));
        let meta = ObjectMeta { name: Some("web".into()), ..ObjectMeta::default() };
        assert_eq!(ObjectRef::of(&meta).unwrap().to_string(), "default/web");
        assert_eq!(ObjectRef::of(&ObjectMeta::default()), None);
        assert!(ObjectRef::new("a", "z") < ObjectRef::new("b", "a"));
    }
}
