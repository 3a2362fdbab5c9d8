//! The Kubernetes source: kube-rs watchers for this node's Pods, all Services, all
//! EndpointSlices, and the metadata (labels) of all Pods. Each object is decoded into the
//! model's compact form as it arrives, on the watcher's task, and queued as a [`Change`] for
//! the reconciler; no API object is kept.
//!
//! A (re)list is queued as it is received (`ListBegin`, the objects, `ListEnd`): the reconciler
//! stages the listed objects and swaps them in whole at the end, so nothing is pruned before a
//! complete relist (after a `410 Gone`) and nothing is computed from a half-listed cluster.

pub mod line_limit;
mod resources;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::Sender,
    },
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tracing::{info, warn};

use self::line_limit::LineTooLong;
use self::resources::PodMeta;
use super::{
    Report, Wake,
    queue::{Inputs, send},
    tasks::Tasks,
};
use crate::model::{
    Change, Kind, Labels, LocalPod, Object, ObjectRef,
    api::{EndpointSlice, Node, Pod, Service},
};

/// Starts the four watchers; their changes go to the returned queue, and each wakes the
/// reconciler. `lane_keys` are the lane label keys: pods' other labels are dropped at once.
pub fn spawn(
    tasks: &mut Tasks,
    client: Client,
    api_timeout: u32,
    node: &str,
    lane_keys: &[String],
    wake: &Sender<Wake>,
    status: &Arc<dyn Report>,
) -> Arc<Mutex<Inputs>> {
    let inputs = Arc::new(Mutex::new(Inputs::default()));
    let ctx = Ctx {
        inputs: Arc::clone(&inputs),
        wake: wake.clone(),
        status: Arc::clone(status),
        synced: Arc::new([const { AtomicBool::new(false) }; Kind::ALL.len()]),
    };
    let keys: Arc<[String]> = lane_keys.into();

    // Each watcher lists and watches a lean form of its objects (`model::api`), decoded into the
    // model's compact form object by object. Lists use resourceVersion=0 ("any"), served by the
    // API server from its watch cache in one response, as kubelet and kube-proxy do: an agent on
    // every node must not send quorum reads to etcd on each (re)list. The watch that follows
    // brings anything newer.
    let cfg = move || watcher::Config::default().any_semantic().timeout(api_timeout);
    let local_cfg = cfg().fields(&format!("spec.nodeName={node}"));
    let api = Api::<Pod>::all(client.clone());
    let pods = move || watcher(api.clone(), local_cfg.clone()).backoff(RelistBackoff::default());
    let local_keys = Arc::clone(&keys);
    tasks.spawn(
        format!("{} watcher", Kind::LocalPod),
        drive(pods, Kind::LocalPod, ctx.clone(), move |pod: Pod| {
            let mut local = LocalPod::from_pod(&pod)?;
            local.labels.retain(|k, _| local_keys.contains(k));
            Some(Object::LocalPod(local))
        }),
    );

    let api = Api::<Service>::all(client.clone());
    let services = move || watcher(api.clone(), cfg()).backoff(RelistBackoff::default());
    tasks.spawn(
        format!("{} watcher", Kind::Service),
        drive(services, Kind::Service, ctx.clone(), |svc: Service| Object::service(&svc)),
    );

    let api = Api::<EndpointSlice>::all(client.clone());
    let slices = move || watcher(api.clone(), cfg()).backoff(RelistBackoff::default());
    tasks.spawn(
        format!("{} watcher", Kind::Slice),
        drive(slices, Kind::Slice, ctx.clone(), |slice: EndpointSlice| Object::slice(&slice)),
    );

    tasks.spawn("API server probe", probe_api(client.clone(), Arc::clone(status)));

    // This node's Node object, metadata only, for its zone (Services' topology preferences).
    let api = Api::<Node>::all(client.clone());
    let node_cfg = cfg().fields(&format!("metadata.name={node}"));
    let nodes = move || watcher(api.clone(), node_cfg.clone()).backoff(RelistBackoff::default());
    tasks.spawn(
        format!("{} watcher", Kind::Node),
        drive(nodes, Kind::Node, ctx.clone(), |node: Node| Some(Object::node(&node))),
    );

    // Metadata only (`PartialObjectMetadata`).
    let api = Api::<PodMeta>::all(client);
    let meta = move || watcher(api.clone(), cfg()).backoff(RelistBackoff::default());
    tasks.spawn(
        format!("{} watcher", Kind::Pod),
        drive(meta, Kind::Pod, ctx, move |meta: PodMeta| {
            let key = ObjectRef::of(&meta.metadata)?;
            let labels: Labels = meta
                .metadata
                .labels
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| keys.contains(k))
                .collect();
            Some(Object::Pod(key, labels))
        }),
    );
    inputs
}

/// How often the API server's reachability is checked (a watch error marks it unreachable at
/// once; a quiet watch says nothing either way).
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a probe may take.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Checks `GET /version` every [`PROBE_EVERY`]: readiness and `tagger_agent_api_reachable` follow
/// it, and transitions are logged once.
async fn probe_api(client: Client, status: Arc<dyn Report>) {
    loop {
        let ok = matches!(tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()).await, Ok(Ok(_)));
        mark_api(status.as_ref(), ok);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Records whether the API server answers; logs each change once (a watch error or the probe,
/// whichever notices first).
fn mark_api(status: &dyn Report, ok: bool) {
    let was = status.set_api_reachable(ok);
    if was && !ok {
        warn!("the Kubernetes API server does not answer; the datapath serves its last state");
    } else if !was && ok {
        info!("the Kubernetes API server answers again");
    }
}

/// Most events handled as one batch.
const BATCH: usize = 512;

#[derive(Clone)]
struct Ctx {
    inputs: Arc<Mutex<Inputs>>,
    wake: Sender<Wake>,
    status: Arc<dyn Report>,
    synced: Arc<[AtomicBool; Kind::ALL.len()]>,
}

/// First pause after a watch error (before the watch is resumed or the kind listed again).
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest pause, before jitter.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Errors this far apart start the back-off over.
const BACKOFF_RESET_AFTER: Duration = Duration::from_mins(2);

/// The pauses between attempts after watch errors: [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`],
/// each plus up to half again of random jitter (so the agents of every node do not relist in
/// step), started over once no error came for [`BACKOFF_RESET_AFTER`].
///
/// kube-runtime's default back-off starts over at every event received: after a `410 Gone` the
/// relist itself delivers events, so a watch that fails again at once (an API server whose
/// history is always compacted past the list, a proxy that drops each watch) would have every
/// node relist everything about once a second, forever. This one ignores those resets: only
/// two minutes without an error do.
#[derive(Debug, Default)]
pub struct RelistBackoff {
    attempt: u32,
    last_error: Option<Instant>,
}

impl RelistBackoff {
    /// The pause after the `attempt`-th consecutive error (0-based), with `jitter` in [0, 1).
    pub fn delay(attempt: u32, jitter: f64) -> Duration {
        let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
        let base = BACKOFF_MIN.saturating_mul(factor).min(BACKOFF_MAX);
        base.mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 2.0)
    }
}

impl Iterator for RelistBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if self.last_error.is_some_and(|at| now.duration_since(at) > BACKOFF_RESET_AFTER) {
            self.attempt = 0;
        }
        self.last_error = Some(now);
        let delay = Self::delay(self.attempt, jitter());
        self.attempt = self.attempt.saturating_add(1);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for RelistBackoff {
    /// Ignored: see the type's documentation.
    fn reset(&mut self) {}
}

/// A number in [0, 1), different in every call and every process (std's random hash keys).
fn jitter() -> f64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let bits = std::collections::hash_map::RandomState::new().build_hasher().finish();
    #[allow(clippy::cast_precision_loss)]
    let unit = (bits >> 11) as f64 / (1u64 << 53) as f64;
    unit
}

/// Runs the watchers `watch` makes: each one's events go to [`drive_one`]; one that stopped
/// on a response line over the limit is replaced by a new one, which lists afresh, after a
/// [`RelistBackoff`] pause (growing while the replacements keep failing).
async fn drive<K, S>(watch: impl Fn() -> S, kind: Kind, ctx: Ctx, decode: impl Fn(K) -> Option<Object>)
where
    K: kube::Resource,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut backoff = RelistBackoff::default();
    while drive_one(watch(), kind, &ctx, &decode).await {
        tokio::time::sleep(backoff.next().unwrap_or(BACKOFF_MAX)).await;
    }
}

/// Turns one watcher's events into changes. Events already received are handled as one batch
/// (a list page's objects, a burst of updates): one queueing and one wake for all of them.
/// Returns `true` when the watcher must be replaced: a response line was over the limit
/// ([`LineTooLong`]). Its watch would resume at the same resourceVersion and meet the same
/// event again for as long as the API server keeps it; a new watcher lists instead, and the
/// list no longer has the object once it is fixed or deleted.
async fn drive_one<K, S>(stream: S, kind: Kind, ctx: &Ctx, decode: &impl Fn(K) -> Option<Object>) -> bool
where
    K: kube::Resource,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut stream = std::pin::pin!(stream.ready_chunks(BATCH));
    let mut failing = false;
    while let Some(events) = stream.next().await {
        let mut changes = Vec::with_capacity(events.len());
        let mut listed = false;
        for event in events {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    ctx.status.count_watch_restart();
                    if is_line_too_long(&e) {
                        warn!(resource = %kind, "{e}; listing again with a new watcher");
                        mark_api(ctx.status.as_ref(), false);
                        return true;
                    }
                    if !failing {
                        warn!(resource = %kind, "watch failed, retrying with backoff; the datapath keeps its state: {e}");
                        failing = true;
                        mark_api(ctx.status.as_ref(), false);
                    }
                    continue;
                }
            };
            if failing {
                info!(resource = %kind, "watch recovered");
                failing = false;
            }
            let change = match event {
                watcher::Event::Init => Change::ListBegin(kind),
                watcher::Event::InitApply(obj) => match decode(obj) {
                    Some(object) => Change::Listed(object),
                    None => continue,
                },
                watcher::Event::InitDone => {
                    listed = true;
                    Change::ListEnd(kind)
                }
                watcher::Event::Apply(obj) => match decode(obj) {
                    Some(object) => Change::Applied(object),
                    None => continue,
                },
                watcher::Event::Delete(obj) => match ObjectRef::of(obj.meta()) {
                    Some(key) => Change::Deleted(kind, key),
                    None => continue,
                },
            };
            changes.push(change);
        }
        if !changes.is_empty() {
            send(&ctx.inputs, &ctx.wake, changes);
        }
        if listed {
            if !ctx.synced[kind.index()].swap(true, Ordering::Relaxed) {
                info!(resource = %kind, "initial list complete");
            }
            if Kind::REQUIRED.iter().all(|k| ctx.synced[k.index()].load(Ordering::Relaxed)) {
                ctx.status.source_synced();
            }
        }
    }
    false
}

/// Whether a response line over the limit is somewhere in `e`'s chain (an `io::Error` hides
/// its payload from `source()`, so it is looked into too).
fn is_line_too_long(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<LineTooLong>() {
            return true;
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref)
            && is_line_too_long(inner)
        {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relist_pauses_double_to_a_cap_with_jitter_on_top() {
        let secs = |attempt, jitter| RelistBackoff::delay(attempt, jitter).as_secs_f64();
        let plain: Vec<u64> = (0..8).map(|a| RelistBackoff::delay(a, 0.0).as_secs()).collect();
        assert_eq!(plain, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert!((secs(2, 0.999_999) - 6.0).abs() < 1e-3, "jitter adds up to half");
        assert_eq!(RelistBackoff::delay(u32::MAX, 0.0), BACKOFF_MAX);
        // Even with the most jitter, each pause is longer than the one before, up to the cap.
        for a in 0..4 {
            assert!(secs(a, 0.999) < secs(a + 1, 0.0));
        }
        // Events between errors (what kube-runtime resets on) do not start it over.
        let mut b = RelistBackoff::default();
        assert!(b.next().unwrap() < BACKOFF_MIN * 2);
        kube::runtime::utils::Backoff::reset(&mut b);
        assert!(b.next().unwrap() >= BACKOFF_MIN * 2);
        let jitters: std::collections::BTreeSet<u64> = (0..16).map(|_| jitter().to_bits()).collect();
        assert!(jitters.len() > 1 && (0..16).all(|_| (0.0..1.0).contains(&jitter())));
    }
}
