//! A faithful fake Kubernetes API server, so that tests exercise kube-rs's real watchers.
//!
//! It speaks real HTTP/1.1 on `127.0.0.1` and real Kubernetes JSON, and serves Pods, Services,
//! `discovery.k8s.io/v1` EndpointSlices (plus ConfigMaps, Nodes and Namespaces) with the API
//! server's list and watch semantics:
//!
//! - every change gets a `metadata.resourceVersion` from one global, monotonically increasing
//!   counter (etcd's revision); objects get a `uid`, `creationTimestamp` and `generation`;
//! - LIST: `limit`/`continue` paging over a consistent snapshot, `resourceVersion` and
//!   `resourceVersionMatch` (`NotOlderThan`, `Exact`), `labelSelector` (equality- and set-based)
//!   and `fieldSelector` (`metadata.name`, `metadata.namespace`, and per type e.g.
//!   `spec.nodeName` for Pods); `410 Gone` for compacted resource versions and stale continue
//!   tokens;
//! - WATCH (`watch=true`): chunked newline-delimited `WatchEvent`s resumed after the requested
//!   `resourceVersion` from a bounded history, synthetic `ADDED` events for `resourceVersion`
//!   unset or `0`, `allowWatchBookmarks` (periodic and on demand), `sendInitialEvents` (streaming
//!   lists, ending with the `k8s.io/initial-events-end` bookmark), `timeoutSeconds`, and an
//!   `ERROR` event with a `410 Expired` `Status` for a resource version older than the history;
//! - metadata-only responses (`PartialObjectMetadata`/`PartialObjectMetadataList`) when the
//!   `Accept` header asks for them, as kube's `metadata_watcher` does;
//! - discovery documents (`/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`, `/version`).
//!
//! Tests change the cluster and inject faults through synchronous, thread-safe methods:
//! [`FakeApiServer::apply`], [`FakeApiServer::delete`], [`FakeApiServer::compact`],
//! [`FakeApiServer::drop_watches`], [`FakeApiServer::send_bookmarks`] and
//! [`FakeApiServer::set_reachability`] (refused connections or a blackhole), and observe the
//! clients through [`FakeApiServer::stats`] and [`FakeApiServer::requests`].
//!
//! ```no_run
//! use tagger_tests::fake_api::FakeApiServer;
//!
//! let server = FakeApiServer::start();
//! server.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig")).unwrap();
//! server.apply(&serde_json::json!({
//!     "apiVersion": "v1",
//!     "kind": "Pod",
//!     "metadata": {"name": "web-1", "namespace": "default", "labels": {"tagger.io/lane": "gray"}},
//!     "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "busybox"}]},
//! }));
//! server.drop_watches();
//! ```

mod http;
mod resources;
mod selector;
mod socket;
mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

pub use resources::{RESOURCE_TYPES, ResourceType};
pub use store::ResourceStats;

use http::Command;
use store::Store;

/// Whether and how clients can reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reachability {
    /// Normal service.
    #[default]
    Reachable,
    /// As a stopped API server: the listening socket is closed (new connections get
    /// `ECONNREFUSED`) and every open connection, watches included, is reset.
    Refused,
    /// As a network blackhole: connections are still accepted but no request is answered, and
    /// open watch streams are frozen (neither events nor the end of the stream get through), so
    /// clients notice only through their own timeouts. When reachability comes back, waiting
    /// requests are answered and frozen streams resume, as after a healed partition.
    Blackholed,
}

/// The kind of a request, as recorded in [`RequestRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// LIST of a collection.
    List,
    /// WATCH of a collection (`watch=true`).
    Watch,
    /// GET of one object.
    Get,
    /// A discovery document (`/api`, `/apis`, `/version`, ...).
    Discovery,
    /// Anything else (answered `404` or `405`).
    Other,
}

/// One request the server answered (or is about to answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// URL path, e.g. `/api/v1/pods`.
    pub path: String,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
    /// The `Accept` header.
    pub accept: Option<String>,
    /// What the request does.
    pub verb: Verb,
    /// When it arrived.
    pub at: std::time::Instant,
    /// Plural name of the resource type addressed, e.g. `pods`.
    pub resource: Option<&'static str>,
}

impl RequestRecord {
    /// The first value of a query parameter.
    #[must_use]
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// State shared by the test's handle and the server thread.
pub(crate) struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<RequestRecord>>,
    /// Current reachability; connections and watch streams follow it.
    net: tokio::sync::watch::Sender<Reachability>,
    /// Bumped to reset every open connection.
    kill: tokio::sync::watch::Sender<u64>,
    address: SocketAddr,
    /// Makes the server's sockets (in its network namespace).
    binder: socket::Binder,
}

impl Shared {
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn record(&self, record: RequestRecord) {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner).push(record);
    }
}

/// Options of a [`FakeApiServer`].
#[derive(Debug, Clone)]
pub struct FakeApiServerBuilder {
    history_limit: usize,
    bookmark_interval: Option<Duration>,
    initial_resource_version: u64,
}

impl Default for FakeApiServerBuilder {
    fn default() -> Self {
        Self {
            history_limit: 10_000,
            bookmark_interval: Some(Duration::from_mins(1)),
            initial_resource_version: 1_000,
        }
    }
}

impl FakeApiServerBuilder {
    /// How many change events are kept for watches to resume from (default 10,000); older
    /// resource versions get `410 Gone`, as after an etcd compaction.
    #[must_use]
    pub fn history_limit(mut self, events: usize) -> Self {
        self.history_limit = events;
        self
    }

    /// How often watches that allow bookmarks get one (default every 60 s, as the real API
    /// server; `None` for on-demand bookmarks only, see [`FakeApiServer::send_bookmarks`]).
    #[must_use]
    pub fn bookmark_interval(mut self, interval: Option<Duration>) -> Self {
        self.bookmark_interval = interval;
        self
    }

    /// The resource version of the empty cluster (default 1,000; must not be 0, which means
    /// "any" in the API).
    #[must_use]
    pub fn initial_resource_version(mut self, rv: u64) -> Self {
        self.initial_resource_version = rv.max(1);
        self
    }

    /// Starts the server on `127.0.0.1` and an ephemeral port, on a thread of its own with its
    /// own tokio runtime (so it serves plain `#[test]`s and `#[tokio::test]`s alike).
    #[must_use]
    pub fn start(self) -> FakeApiServer {
        self.start_on(socket::Binder { netns: None })
    }

    /// Starts the server on `127.0.0.1` of the network namespace `netns` (a pod network a
    /// container is started in): its sockets are created there, the server runs as usual.
    #[must_use]
    pub fn start_in_netns(self, netns: &std::path::Path) -> FakeApiServer {
        let ns = std::fs::File::open(netns).expect("open the network namespace");
        self.start_on(socket::Binder { netns: Some(ns) })
    }

    fn start_on(self, binder: socket::Binder) -> FakeApiServer {
        let listener = binder.bind(SocketAddr::from(([127, 0, 0, 1], 0)), true).expect("bind 127.0.0.1:0");
        let address = listener.local_addr().expect("local address of the listener");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(self.history_limit, self.initial_resource_version)),
            requests: Mutex::new(Vec::new()),
            net: tokio::sync::watch::Sender::new(Reachability::Reachable),
            kill: tokio::sync::watch::Sender::new(0),
            address,
            binder,
        });
        let (commands, command_rx) = unbounded_channel();
        let server_shared = Arc::clone(&shared);
        let bookmark_interval = self.bookmark_interval;
        let thread = std::thread::Builder::new()
            .name(format!("fake-api-{}", address.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime for the fake API server");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("register the listener with tokio");
                    if let Some(interval) = bookmark_interval {
                        tokio::spawn(bookmark_ticker(Arc::downgrade(&server_shared), interval));
                    }
                    http::accept_loop(server_shared, listener, command_rx).await;
                });
            })
            .expect("spawn the fake API server thread");
        FakeApiServer { shared, commands, thread: Some(thread) }
    }
}

async fn bookmark_ticker(shared: Weak<Shared>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.store().send_bookmarks();
    }
}

/// A running fake API server; dropping it stops the server and closes every connection.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    commands: UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer").field("address", &self.shared.address).finish_non_exhaustive()
    }
}

/// Finds a served type by kind, plural or `plural.group`, or fails the test.
fn resource(name: &str) -> &'static ResourceType {
    ResourceType::lookup(name).unwrap_or_else(|| {
        let served: Vec<&str> = RESOURCE_TYPES.iter().map(|t| t.plural).collect();
        panic!("the fake API server does not serve {name:?} (it serves {served:?})")
    })
}

impl FakeApiServer {
    /// Starts a server with the default options (see [`FakeApiServerBuilder`]).
    #[must_use]
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// Options for a server.
    #[must_use]
    pub fn builder() -> FakeApiServerBuilder {
        FakeApiServerBuilder::default()
    }

    /// The address the server listens on (`127.0.0.1:<port>`).
    #[must_use]
    pub fn address(&self) -> SocketAddr {
        self.shared.address
    }

    /// `http://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.address)
    }

    /// A kubeconfig document for this server: plain HTTP, no authentication, namespace
    /// `default`, context `fake`.
    #[must_use]
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {url}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
users:
- name: fake
  user: {{}}
preferences: {{}}
",
            url = self.url()
        )
    }

    /// Writes [`Self::kubeconfig`] to `path` (for `KUBECONFIG`).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// A kube client configuration for this server.
    #[must_use]
    pub fn config(&self) -> kube::Config {
        let url = self.url().parse().expect("the server URL is a valid URI");
        kube::Config::new(url)
    }

    /// A kube client for this server. Call it inside a tokio runtime (the client spawns a task).
    #[must_use]
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("a kube client for the fake API server")
    }

    /// Creates or updates an object (`serde_json::Value` or a k8s-openapi type, with
    /// `apiVersion` and `kind`); returns it as stored. An update keeps `uid` and
    /// `creationTimestamp`, bumps `generation` when anything but metadata and status changed,
    /// and gets a new `resourceVersion` and a `MODIFIED` event; an update that changes nothing
    /// is a no-op, as on the real API server. A missing namespace is `default`.
    ///
    /// # Panics
    /// If the object does not serialize, has no name, or is of a type the server does not serve.
    pub fn apply<T: Serialize + ?Sized>(&self, object: &T) -> Value {
        let value = serde_json::to_value(object).expect("the object serializes to JSON");
        let stored = self.shared.store().apply(value).unwrap_or_else(|e| panic!("FakeApiServer::apply: {e}"));
        (*stored).clone()
    }

    /// Changes a stored object in place (atomically) and stores the result as [`Self::apply`]
    /// does. `resource` is a kind (`Pod`), a plural (`pods`) or `plural.group`; `namespace` is
    /// ignored for cluster-scoped types.
    ///
    /// # Panics
    /// If there is no such object.
    pub fn update(
        &self,
        resource_name: &str,
        namespace: &str,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> Value {
        let resource = resource(resource_name);
        let mut store = self.shared.store();
        let mut object = store.get(resource, namespace, name).map_or_else(
            || panic!("FakeApiServer::update: no {resource_name} {namespace}/{name}"),
            |o| (*o).clone(),
        );
        change(&mut object);
        let stored = store.apply(object).unwrap_or_else(|e| panic!("FakeApiServer::update: {e}"));
        (*stored).clone()
    }

    /// Deletes an object; watches get a `DELETED` event with its last state. Returns that
    /// state, or `None` if there was no such object.
    pub fn delete(&self, resource_name: &str, namespace: &str, name: &str) -> Option<Value> {
        let resource = resource(resource_name);
        self.shared.store().delete(resource, namespace, name).map(|o| (*o).clone())
    }

    /// The stored object, if any.
    #[must_use]
    pub fn get(&self, resource_name: &str, namespace: &str, name: &str) -> Option<Value> {
        let resource = resource(resource_name);
        self.shared.store().get(resource, namespace, name).map(|o| (*o).clone())
    }

    /// Every stored object of a type, in list order.
    #[must_use]
    pub fn objects(&self, resource_name: &str) -> Vec<Value> {
        let resource = resource(resource_name);
        self.shared.store().objects(resource).iter().map(|o| (**o).clone()).collect()
    }

    /// The current resource version (that of the last change).
    #[must_use]
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// The oldest resource version watches can still resume from.
    #[must_use]
    pub fn compacted_resource_version(&self) -> u64 {
        self.shared.store().compacted()
    }

    /// Forgets the change history, as an etcd compaction: a watch from an earlier resource
    /// version gets an `ERROR` event with `410 Expired`, and so do exact lists and continue
    /// tokens from before. Open watches are not affected.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Breaks every open watch stream abruptly (the chunked body never ends, the connection is
    /// closed), as a restarting API server or load balancer would.
    pub fn drop_watches(&self) {
        self.shared.store().close_watches(true);
    }

    /// Ends every open watch stream cleanly, as when its `timeoutSeconds` expires.
    pub fn end_watches(&self) {
        self.shared.store().close_watches(false);
    }

    /// `true`: every watch from a resource version gets an `ERROR` event with `410 Expired` at
    /// once, as from an API server whose history is always compacted past what the client
    /// listed (the client relists, and its next watch fails again). `false`: as before.
    pub fn expire_watches(&self, expire: bool) {
        self.shared.store().expire_watches = expire;
    }

    /// Sends a `BOOKMARK` with the current resource version to every watch that allows them.
    pub fn send_bookmarks(&self) {
        self.shared.store().send_bookmarks();
    }

    /// Makes the server reachable, refusing, or blackholed (see [`Reachability`]); in effect
    /// when this returns.
    ///
    /// # Panics
    /// If the server thread does not answer, or the port cannot be bound again.
    pub fn set_reachability(&self, reachability: Reachability) {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        self.commands
            .send(Command::SetReachability(reachability, ack))
            .expect("the fake API server thread is running");
        done.recv_timeout(Duration::from_secs(10))
            .expect("the fake API server thread answers")
            .unwrap_or_else(|e| panic!("FakeApiServer::set_reachability: {e}"));
    }

    /// `true`: refuse connections ([`Reachability::Refused`]); `false`: serve again.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.set_reachability(if unreachable { Reachability::Refused } else { Reachability::Reachable });
    }

    /// `true`: blackhole ([`Reachability::Blackholed`]); `false`: serve again.
    pub fn set_blackholed(&self, blackholed: bool) {
        self.set_reachability(if blackholed { Reachability::Blackholed } else { Reachability::Reachable });
    }

    /// The current reachability.
    #[must_use]
    pub fn reachability(&self) -> Reachability {
        *self.shared.net.borrow()
    }

    /// Request and watch counters of a resource type.
    #[must_use]
    pub fn stats(&self, resource_name: &str) -> ResourceStats {
        self.shared.store().stats(resource(resource_name))
    }

    /// Watch streams currently open, over all types.
    #[must_use]
    pub fn open_watches(&self) -> u64 {
        let store = self.shared.store();
        RESOURCE_TYPES.iter().map(|t| store.stats(t).open_watches).sum()
    }

    /// Every request answered so far, oldest first.
    #[must_use]
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.requests.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
/// For async tests, whose watchers run on the same runtime (a blocking wait would starve them).
pub async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
