//! What the sources hand the reconciler: the cluster as the watchers (or the file) see it.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;

use crate::model::{ClusterState, LocalPod, ObjectRef};

/// The reconciler's inputs.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Services, EndpointSlices and backend pod labels, cluster-wide.
    pub cluster: ClusterState,
    /// Pods scheduled on this node.
    pub local_pods: Vec<LocalPod>,
    /// A complete list of every resource has been seen (initial list or relist): only then may
    /// anything be removed from the datapath.
    pub synced: bool,
}

impl Inputs {
    /// Adds a pod: its labels (for backend lanes) and, when it runs on `node`, as a local pod.
    pub fn add_pod(&mut self, pod: &Pod, node: &str) {
        let Some(object) = ObjectRef::of(&pod.metadata) else { return };
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            && let Some(local) = LocalPod::from_pod(pod)
        {
            self.local_pods.push(local);
        }
        self.cluster.pod_labels.insert(object, pod.metadata.labels.clone().unwrap_or_default());
    }
}

/// Where the reconciler reads its inputs from.
#[derive(Clone)]
pub enum InputsHandle {
    /// A snapshot kept up to date by a source task (the file source).
    Shared(Arc<Mutex<Inputs>>),
    /// The watchers' reflector stores, read whole at each pass (so a burst of events costs one
    /// read).
    Kube(super::kube_source::Stores),
}

impl InputsHandle {
    /// The current inputs.
    pub fn snapshot(&self) -> Inputs {
        match self {
            InputsHandle::Shared(m) => m.lock().expect("inputs lock").clone(),
            InputsHandle::Kube(stores) => stores.inputs(),
        }
    }
}
