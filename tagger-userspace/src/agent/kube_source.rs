//! The Kubernetes source: kube-rs watchers with reflector stores for this node's Pods, all
//! Services, all EndpointSlices, and the metadata (labels) of all Pods. After every event the
//! reconciler is woken; it reads the stores whole. A relist (after a 410) is buffered by the
//! reflector until complete, so the reconciler never sees a half-listed cluster and nothing is
//! pruned early.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
    mpsc::Sender,
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{core::v1::Pod, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    core::PartialObjectMeta,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tracing::{info, warn};

use super::{Inputs, Wake, status::AgentStatus};
use crate::model::{ClusterState, LocalPod, ObjectRef};

/// The reflector stores the reconciler reads.
#[derive(Clone)]
pub struct Stores {
    local_pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pod_meta: Store<PartialObjectMeta<Pod>>,
    synced: Arc<[AtomicBool; 4]>,
}

impl Stores {
    /// The cluster as the stores hold it now.
    pub fn inputs(&self) -> Inputs {
        let mut cluster = ClusterState::default();
        for svc in self.services.state() {
            if let Some(r) = ObjectRef::of(&svc.metadata) {
                cluster.services.insert(r, (*svc).clone());
            }
        }
        for slice in self.slices.state() {
            if let Some(r) = ObjectRef::of(&slice.metadata) {
                cluster.slices.insert(r, (*slice).clone());
            }
        }
        for meta in self.pod_meta.state() {
            if let Some(r) = ObjectRef::of(&meta.metadata) {
                cluster.pod_labels.insert(r, meta.labels().clone());
            }
        }
        let local_pods = self.local_pods.state().iter().filter_map(|p| LocalPod::from_pod(p)).collect();
        let synced = self.synced.iter().all(|s| s.load(Ordering::Relaxed));
        Inputs { cluster, local_pods, synced }
    }
}

/// Starts the four watchers; each event wakes the reconciler, which reads the returned stores.
pub fn spawn(
    tasks: &mut tokio::task::JoinSet<()>,
    client: Client,
    node: &str,
    wake: &Sender<Wake>,
    status: &Arc<AgentStatus>,
) -> Stores {
    let (local_pods, w_pods) = reflector::store::<Pod>();
    let (services, w_services) = reflector::store::<Service>();
    let (slices, w_slices) = reflector::store::<EndpointSlice>();
    let (pod_meta, w_meta) = reflector::store::<PartialObjectMeta<Pod>>();
    let stores = Stores {
        local_pods,
        services,
        slices,
        pod_meta,
        synced: Arc::new([
            AtomicBool::new(false),
            AtomicBool::new(false),
            AtomicBool::new(false),
            AtomicBool::new(false),
        ]),
    };
    let local_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let pods =
        watcher(Api::<Pod>::all(client.clone()), local_cfg).default_backoff().modify(strip).reflect(w_pods);
    let svcs = watcher(Api::<Service>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(w_services);
    let eps = watcher(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(w_slices);
    let meta = watcher(Api::<PartialObjectMeta<Pod>>::all(client), watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(w_meta);
    let ctx = Ctx { stores: stores.clone(), wake: wake.clone(), status: Arc::clone(status) };
    tasks.spawn(drive(pods, "pods (this node)", 0, ctx.clone()));
    tasks.spawn(drive(svcs, "services", 1, ctx.clone()));
    tasks.spawn(drive(eps, "endpointslices", 2, ctx.clone()));
    tasks.spawn(drive(meta, "pods (metadata, cluster-wide)", 3, ctx));
    stores
}

/// Drops `managedFields`: they are most of an object's size and never read.
fn strip<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

#[derive(Clone)]
struct Ctx {
    stores: Stores,
    wake: Sender<Wake>,
    status: Arc<AgentStatus>,
}

async fn drive<K, S>(stream: S, what: &'static str, index: usize, ctx: Ctx)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if failing {
                    info!(resource = what, "watch recovered");
                    failing = false;
                }
                match event {
                    // The relist starts: the store keeps the old state until InitDone, and so does
                    // the reconciler.
                    watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                    watcher::Event::InitDone => {
                        if !ctx.stores.synced[index].swap(true, Ordering::Relaxed) {
                            info!(resource = what, "initial list complete");
                        }
                    }
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => {}
                }
                if ctx.stores.synced.iter().all(|s| s.load(Ordering::Relaxed)) {
                    ctx.status.source_synced();
                }
                let _ = ctx.wake.send(Wake::Changed);
            }
            Err(e) => {
                ctx.status.count_watch_restart();
                if !failing {
                    warn!(
                        resource = what,
                        "watch failed, retrying with backoff; the datapath keeps its state: {e}"
                    );
                    failing = true;
                }
            }
        }
    }
}
