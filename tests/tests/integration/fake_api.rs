//! The fake Kubernetes API server driven by kube-rs's real clients: `watcher`, reflector stores
//! and `metadata_watcher`, through pagination, selectors, bookmarks, dropped watches, `410 Gone`
//! and network outages.
//!
//! Every wait is bounded, so a regression fails the test instead of hanging the suite.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, VersionMatch};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event, watcher};
use kube::runtime::{WatchStreamExt, reflector};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tagger_tests::fake_api::{FakeApiServer, Reachability, Verb, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Upper bound of any single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

fn pod(namespace: &str, name: &str, node: &str, lane: Option<&str>) -> Value {
    let mut labels = serde_json::Map::new();
    labels.insert("app".into(), json!("web"));
    if let Some(lane) = lane {
        labels.insert("tagger.io/lane".into(), json!(lane));
    }
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1"},
    });
    if !node.is_empty() {
        pod["spec"]["nodeName"] = json!(node);
    }
    pod
}

fn service(namespace: &str, name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    })
}

fn endpoint_slice(namespace: &str, service: &str, ip: &str, pod: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-abcde"),
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [ip],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod},
        }],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

/// What a watcher emitted, reduced to what the tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    /// Name and lane label.
    Apply(String, Option<String>),
    Delete(String),
    Error(String),
}

/// Runs a watcher stream on its own task and hands what it emits to the test.
struct Recorder {
    rx: mpsc::UnboundedReceiver<Seen>,
    seen: Vec<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    fn new<K, S>(stream: S) -> Self
    where
        K: Resource + Send + 'static,
        S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                let seen = match item {
                    Ok(Event::Init) => Seen::Init,
                    Ok(Event::InitApply(o)) => Seen::InitApply(o.name_any()),
                    Ok(Event::InitDone) => Seen::InitDone,
                    Ok(Event::Apply(o)) => {
                        Seen::Apply(o.name_any(), o.labels().get("tagger.io/lane").cloned())
                    }
                    Ok(Event::Delete(o)) => Seen::Delete(o.name_any()),
                    Err(e) => Seen::Error(e.to_string()),
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        Self { rx, seen: Vec::new(), task }
    }

    /// Waits until `done` holds for the events seen since the last call; returns them.
    async fn until(&mut self, what: &str, done: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(&self.seen) {
            let Ok(next) = tokio::time::timeout_at(deadline, self.rx.recv()).await else {
                panic!("timed out waiting for {what}; seen: {:?}", self.seen);
            };
            let Some(seen) = next else {
                panic!("the watcher stream ended while waiting for {what}; seen: {:?}", self.seen);
            };
            self.seen.push(seen);
        }
        std::mem::take(&mut self.seen)
    }

    /// Waits for the given event.
    async fn expect(&mut self, wanted: &Seen) -> Vec<Seen> {
        self.until(&format!("{wanted:?}"), |seen| seen.contains(wanted)).await
    }

    /// Waits for a complete initial list (`Init`, `InitApply`s, `InitDone`); returns the names.
    async fn initial_list(&mut self) -> Vec<String> {
        listed(&self.expect(&Seen::InitDone).await)
    }

    /// Asserts that nothing arrives for `quiet`.
    async fn expect_quiet(&mut self, quiet: Duration) {
        if let Ok(Some(seen)) = tokio::time::timeout(quiet, self.rx.recv()).await {
            panic!("expected no watcher event, got {seen:?}");
        }
    }
}

/// The names of the last complete initial list in `seen`, sorted.
fn listed(seen: &[Seen]) -> Vec<String> {
    let start = seen.iter().rposition(|s| *s == Seen::Init).unwrap_or_else(|| panic!("no Init: {seen:?}"));
    let end = seen[start..]
        .iter()
        .position(|s| *s == Seen::InitDone)
        .unwrap_or_else(|| panic!("no InitDone after Init: {seen:?}"));
    let mut names: Vec<String> = seen[start..start + end]
        .iter()
        .filter_map(|s| match s {
            Seen::InitApply(name) => Some(name.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names
}

fn names<K: ResourceExt>(objects: impl IntoIterator<Item = impl std::ops::Deref<Target = K>>) -> Vec<String> {
    let mut names: Vec<String> = objects.into_iter().map(|o| o.name_any()).collect();
    names.sort();
    names
}

async fn assert_eventually(what: &str, condition: impl FnMut() -> bool) {
    assert!(eventually(WAIT, condition).await, "timed out waiting for {what}");
}

/// Watch requests the server has answered for `resource`, in order.
fn watch_requests(server: &FakeApiServer, resource: &str) -> Vec<tagger_tests::fake_api::RequestRecord> {
    server.requests().into_iter().filter(|r| r.verb == Verb::Watch && r.resource == Some(resource)).collect()
}

fn rv_of(object: &Value) -> String {
    object["metadata"]["resourceVersion"].as_str().expect("stored objects have a resourceVersion").to_owned()
}

#[tokio::test]
async fn watcher_sees_initial_list_and_changes() {
    let server = FakeApiServer::start();
    server.apply(&pod("default", "a", "node-a", None));
    server.apply(&pod("default", "b", "node-a", Some("gray")));
    server.apply(&pod("other", "c", "node-b", None));
    let api: Api<Pod> = Api::all(server.client());
    let mut rec = Recorder::new(watcher(api, watcher::Config::default()));

    assert_eq!(rec.initial_list().await, ["a", "b", "c"]);
    assert_eventually("the watch", || server.stats("pods").open_watches == 1).await;

    server.apply(&pod("default", "d", "node-a", None));
    rec.expect(&Seen::Apply("d".into(), None)).await;
    server.update("pods", "default", "a", |p| {
        p["metadata"]["labels"]["tagger.io/lane"] = json!("gray");
    });
    rec.expect(&Seen::Apply("a".into(), Some("gray".into()))).await;
    server.delete("Pod", "other", "c").expect("c exists");
    rec.expect(&Seen::Delete("c".into())).await;

    // What kube's watcher really sends: one paged list, then a watch from the list's version.
    let requests = server.requests();
    let list = requests.iter().find(|r| r.verb == Verb::List).expect("a list");
    assert_eq!(list.path, "/api/v1/pods");
    assert_eq!(list.param("limit"), Some("500"));
    assert_eq!(list.param("resourceVersion"), None);
    let watch = requests.iter().find(|r| r.verb == Verb::Watch).expect("a watch");
    assert_eq!(watch.param("watch"), Some("true"));
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    assert_eq!(watch.param("timeoutSeconds"), Some("290"));
    assert_eq!(watch.param("sendInitialEvents"), None);
    let stats = server.stats("pods");
    assert_eq!((stats.initial_list_requests, stats.watch_requests), (1, 1));
}

#[tokio::test]
async fn objects_are_real_kubernetes_json() {
    let server = FakeApiServer::start();
    let rv_before = server.resource_version();
    let stored = server.apply(&pod("default", "a", "node-a", None));
    let meta = &stored["metadata"];
    assert!(meta["uid"].as_str().is_some_and(|u| u.len() == 36));
    assert!(meta["creationTimestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(rv_of(&stored), (rv_before + 1).to_string());

    // Re-applying the same object is a no-op; a change keeps uid and bumps the version.
    assert_eq!(server.apply(&pod("default", "a", "node-a", None)), stored);
    let changed = server.apply(&pod("default", "a", "node-a", Some("gray")));
    assert_eq!(changed["metadata"]["uid"], meta["uid"]);
    assert_eq!(rv_of(&changed), (rv_before + 2).to_string());

    // Typed objects go in as well, and typed clients read them back.
    let svc: Service = serde_json::from_value(service("default", "web", "10.96.0.10")).unwrap();
    server.apply(&svc);
    server.apply(&endpoint_slice("default", "web", "10.0.0.7", "a"));
    let client = server.client();
    let svc = Api::<Service>::namespaced(client.clone(), "default").get("web").await.unwrap();
    assert_eq!(svc.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
    let slices = Api::<EndpointSlice>::all(client.clone()).list(&ListParams::default()).await.unwrap();
    assert_eq!(slices.items.len(), 1);
    assert_eq!(slices.items[0].endpoints[0].addresses, ["10.0.0.7"]);
    let err = Api::<Pod>::namespaced(client, "default").get("nope").await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 404), "404 Status expected");
}

#[tokio::test]
async fn list_resource_version_semantics() {
    let server = FakeApiServer::start();
    let a = rv_of(&server.apply(&pod("default", "a", "node-a", None)));
    server.apply(&pod("default", "b", "node-a", None));
    server.update("pods", "default", "a", |p| p["metadata"]["labels"]["tagger.io/lane"] = json!("gray"));
    let api: Api<Pod> = Api::all(server.client());
    let lane = |p: &Pod| p.labels().get("tagger.io/lane").cloned();

    // Exact: the state at that version, b not yet created and a not yet relabelled.
    let exact = api.list(&ListParams::default().at(&a).matching(VersionMatch::Exact)).await.unwrap();
    assert_eq!(names::<Pod>(exact.items.iter()), ["a"]);
    assert_eq!(lane(&exact.items[0]), None);
    assert_eq!(exact.metadata.resource_version.as_deref(), Some(a.as_str()));
    // NotOlderThan and Any ("0"): the current state.
    let current = server.resource_version().to_string();
    for lp in
        [ListParams::default().at(&a).matching(VersionMatch::NotOlderThan), ListParams::default().match_any()]
    {
        let list = api.list(&lp).await.unwrap();
        assert_eq!(names::<Pod>(list.items.iter()), ["a", "b"]);
        assert_eq!(list.metadata.resource_version.as_deref(), Some(current.as_str()));
    }

    // After a compaction: 410 for Exact, and for NotOlderThan with a limit (served by etcd).
    server.compact();
    for lp in [
        ListParams::default().at(&a).matching(VersionMatch::Exact),
        ListParams::default().at(&a).matching(VersionMatch::NotOlderThan).limit(10),
    ] {
        match api.list(&lp).await {
            Err(kube::Error::Api(gone)) => assert_eq!((gone.code, gone.reason.as_str()), (410, "Expired")),
            other => panic!("expected 410 Expired, got {:?}", other.map(|l| l.items.len())),
        }
    }
    let list = api.list(&ListParams::default().at(&a).matching(VersionMatch::NotOlderThan)).await.unwrap();
    assert_eq!(list.items.len(), 2, "served from the cache without a limit");
}

#[tokio::test]
async fn pagination_over_1200_objects() {
    let server = FakeApiServer::start();
    for i in 0..1_200 {
        server.apply(&pod(&format!("ns-{}", i % 3), &format!("pod-{i:04}"), "node-a", None));
    }
    let api: Api<Pod> = Api::all(server.client());
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api.clone(), watcher::Config::default()));
    let mut rec = Recorder::new(stream);
    assert_eq!(rec.initial_list().await.len(), 1_200);
    tokio::time::timeout(WAIT, reader.wait_until_ready()).await.unwrap().unwrap();
    assert_eq!(reader.state().len(), 1_200);
    let stats = server.stats("pods");
    assert_eq!(stats.list_requests, 3, "500 + 500 + 200");
    assert_eq!(stats.initial_list_requests, 1);
    let continues =
        server.requests().iter().filter(|r| r.verb == Verb::List && r.param("continue").is_some()).count();
    assert_eq!(continues, 2);

    // Pages form one consistent snapshot even when objects change between pages.
    let first = api.list(&ListParams::default().limit(500)).await.unwrap();
    let token = first.metadata.continue_.clone().expect("more pages");
    assert_eq!(first.metadata.remaining_item_count, Some(700));
    server.delete("pods", "ns-2", "pod-1199");
    server.apply(&pod("ns-2", "pod-9999", "node-a", None));
    let mut all = names::<Pod>(first.items.iter());
    let mut lp = ListParams::default().limit(500);
    lp.continue_token = Some(token);
    loop {
        let page = api.list(&lp).await.unwrap();
        assert_eq!(page.metadata.resource_version, first.metadata.resource_version);
        all.extend(page.items.iter().map(ResourceExt::name_any));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => lp.continue_token = Some(token),
            _ => break,
        }
    }
    assert_eq!(all.len(), 1_200);
    assert!(all.iter().any(|n| n == "pod-1199") && !all.iter().any(|n| n == "pod-9999"));

    // The live watch saw both changes, and the store follows.
    rec.expect(&Seen::Apply("pod-9999".into(), None)).await;
    assert_eventually("the store to follow", || reader.state().len() == 1_200).await;
    assert!(reader.state().iter().all(|p| p.name_any() != "pod-1199"));

    // A continue token from before a compaction is gone.
    let first = api.list(&ListParams::default().limit(500)).await.unwrap();
    server.apply(&pod("ns-0", "after-compaction", "node-a", None));
    server.compact();
    let mut lp = ListParams::default().limit(500);
    lp.continue_token = first.metadata.continue_;
    match api.list(&lp).await {
        Err(kube::Error::Api(gone)) => assert_eq!((gone.code, gone.reason.as_str()), (410, "Expired")),
        Err(e) => panic!("expected 410 Expired, got {e}"),
        Ok(page) => panic!("expected 410 Expired, got a page of {}", page.items.len()),
    }
}

#[tokio::test]
async fn field_and_label_selectors() {
    let server = FakeApiServer::start();
    server.apply(&pod("default", "here-1", "node-a", None));
    server.apply(&pod("kube-system", "here-2", "node-a", Some("gray")));
    server.apply(&pod("default", "there", "node-b", None));
    server.apply(&pod("default", "pending", "", None));
    let api: Api<Pod> = Api::all(server.client());
    let config = watcher::Config::default().fields("spec.nodeName=node-a");
    let mut rec = Recorder::new(watcher(api, config));
    assert_eq!(rec.initial_list().await, ["here-1", "here-2"]);

    // Changes elsewhere are filtered out; a pod scheduled onto the node enters the selection.
    server.update("pods", "default", "there", |p| p["metadata"]["labels"]["x"] = json!("y"));
    server.update("pods", "default", "pending", |p| p["spec"]["nodeName"] = json!("node-a"));
    let seen = rec.expect(&Seen::Apply("pending".into(), None)).await;
    assert!(!seen.iter().any(|s| matches!(s, Seen::Apply(n, _) if n == "there")), "{seen:?}");
    let list = server.requests().into_iter().find(|r| r.verb == Verb::List).unwrap();
    assert_eq!(list.param("fieldSelector"), Some("spec.nodeName=node-a"));

    // Label selectors, namespaced paths, and the API server's refusal of unknown field labels.
    let gray: Api<Pod> = Api::namespaced(server.client(), "kube-system");
    let listed =
        gray.list(&ListParams::default().labels("tagger.io/lane in (gray,blue),app=web")).await.unwrap();
    assert_eq!(names::<Pod>(listed.items.iter()), ["here-2"]);
    let err = gray.list(&ListParams::default().fields("spec.bogus=1")).await.unwrap_err();
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 400), "{err:?}");
}

#[tokio::test]
async fn metadata_watcher_sees_labels() {
    let server = FakeApiServer::start();
    server.apply(&pod("default", "a", "node-a", Some("gray")));
    server.apply(&pod("default", "b", "node-b", None));
    // kube 5's way of watching metadata only: an `Api` of `PartialObjectMeta`.
    let api: Api<PartialObjectMeta<Pod>> = Api::all(server.client());
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api.clone(), watcher::Config::default()));
    let mut rec = Recorder::new(stream);
    assert_eq!(rec.initial_list().await, ["a", "b"]);
    let lane = |name: &str| {
        reader
            .state()
            .iter()
            .find(|m| m.name_any() == name)
            .and_then(|m| m.labels().get("tagger.io/lane").cloned())
    };
    assert_eq!(lane("a").as_deref(), Some("gray"));

    server.update("pods", "default", "b", |p| {
        p["metadata"]["labels"]["tagger.io/lane"] = json!("blue");
    });
    rec.expect(&Seen::Apply("b".into(), Some("blue".into()))).await;
    assert_eq!(lane("b").as_deref(), Some("blue"));
    server.delete("pods", "default", "a");
    rec.expect(&Seen::Delete("a".into())).await;
    assert_eventually("the store to drop a", || reader.state().len() == 1).await;

    let requests = server.requests();
    let list = requests.iter().find(|r| r.verb == Verb::List).unwrap();
    assert_eq!(
        list.accept.as_deref(),
        Some("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1")
    );
    let watch = requests.iter().find(|r| r.verb == Verb::Watch).unwrap();
    assert_eq!(watch.accept.as_deref(), Some("application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"));
    // The answer really is a PartialObjectMetadataList.
    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.types.kind, "PartialObjectMetadataList");
    assert_eq!(list.types.api_version, "meta.k8s.io/v1");
    assert_eq!(list.items[0].types.as_ref().unwrap().kind, "PartialObjectMetadata");
}

#[tokio::test]
#[expect(deprecated, reason = "the agent may still use kube's older metadata_watcher")]
async fn deprecated_metadata_watcher_works_too() {
    let server = FakeApiServer::start();
    server.apply(&pod("default", "a", "node-a", Some("gray")));
    let api: Api<Pod> = Api::all(server.client());
    let mut rec = Recorder::new(kube::runtime::metadata_watcher(api, watcher::Config::default()));
    assert_eq!(rec.initial_list().await, ["a"]);
    server.update("pods", "default", "a", |p| {
        p["metadata"]["labels"]["tagger.io/lane"] = json!("blue");
    });
    rec.expect(&Seen::Apply("a".into(), Some("blue".into()))).await;
}

#[tokio::test]
async fn bookmarks_do_not_break_anything() {
    let server = FakeApiServer::builder().bookmark_interval(Some(Duration::from_millis(50))).start();
    server.apply(&pod("default", "a", "node-a", None));
    let api: Api<Pod> = Api::all(server.client());
    let mut rec = Recorder::new(watcher(api, watcher::Config::default()));
    assert_eq!(rec.initial_list().await, ["a"]);
    for i in 0..20 {
        server.apply(&pod("default", &format!("p{i}"), "node-a", None));
        server.apply(&service("default", &format!("s{i}"), "10.96.0.1"));
        server.send_bookmarks();
    }
    let seen = rec.expect(&Seen::Apply("p19".into(), None)).await;
    assert_eq!(seen.len(), 20, "one Apply per pod, nothing else: {seen:?}");

    // The watcher moved its resource version forward with the bookmark (past the services'
    // changes), so the resumed watch starts there.
    server.send_bookmarks();
    let bookmark_rv = server.resource_version().to_string();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.drop_watches();
    assert_eventually("the resumed watch", || watch_requests(&server, "pods").len() == 2).await;
    let resumed = watch_requests(&server, "pods").pop().unwrap();
    assert_eq!(resumed.param("resourceVersion"), Some(bookmark_rv.as_str()));
    assert_eq!(server.stats("pods").initial_list_requests, 1);
    rec.expect_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn streaming_list_gets_initial_events() {
    let server = FakeApiServer::start();
    server.apply(&pod("default", "a", "node-a", None));
    server.apply(&pod("default", "b", "node-a", None));
    let api: Api<Pod> = Api::all(server.client());
    let mut rec = Recorder::new(watcher(api, watcher::Config::default().streaming_lists()));
    assert_eq!(rec.initial_list().await, ["a", "b"]);
    server.apply(&pod("default", "c", "node-a", None));
    rec.expect(&Seen::Apply("c".into(), None)).await;
    let watch = watch_requests(&server, "pods").remove(0);
    assert_eq!(watch.param("sendInitialEvents"), Some("true"));
    assert_eq!(watch.param("resourceVersionMatch"), Some("NotOlderThan"));
    assert_eq!(server.stats("pods").list_requests, 0);
}

#[tokio::test]
async fn dropped_watch_resumes_without_relist() {
    let server = FakeApiServer::start();
    server.apply(&pod("default", "a", "node-a", None));
    let api: Api<Pod> = Api::all(server.client());
    let mut rec = Recorder::new(watcher(api, watcher::Config::default()).default_backoff());
    assert_eq!(rec.initial_list().await, ["a"]);
    let b = server.apply(&pod("default", "b", "node-a", None));
    rec.expect(&Seen::Apply("b".into(), None)).await;

    // Changes made while no watch is open are replayed from the history.
    server.drop_watches();
    server.update("pods", "default", "a", |p| p["metadata"]["labels"]["tagger.io/lane"] = json!("gray"));
    server.delete("pods", "default", "b");
    let seen = rec.expect(&Seen::Delete("b".into())).await;
    assert!(seen.contains(&Seen::Apply("a".into(), Some("gray".into()))), "{seen:?}");
    assert!(!seen.contains(&Seen::Init), "no relist: {seen:?}");

    let watches = watch_requests(&server, "pods");
    assert_eq!(watches.len(), 2);
    assert_eq!(watches[1].param("resourceVersion"), Some(rv_of(&b).as_str()));
    let stats = server.stats("pods");
    assert_eq!((stats.initial_list_requests, stats.open_watches), (1, 1));
}

/// Opens a raw watch, lets `close` end it, and returns everything the server sent.
async fn raw_watch_closed_by(server: &FakeApiServer, close: impl FnOnce(&FakeApiServer)) -> String {
    let rv = server.resource_version();
    let mut raw = tokio::net::TcpStream::connect(server.address()).await.unwrap();
    let request = format!(
        "GET /api/v1/pods?watch=1&resourceVersion={rv} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n"
    );
    raw.write_all(request.as_bytes()).await.unwrap();
    assert_eventually("the raw watch", || server.open_watches() == 1).await;
    server.apply(&pod("default", "x", "node-a", None));
    let mut received = Vec::new();
    let mut buffer = [0; 4096];
    while !String::from_utf8_lossy(&received).contains(r#""type":"ADDED""#) {
        let n = tokio::time::timeout(WAIT, raw.read(&mut buffer)).await.unwrap().unwrap();
        assert_ne!(n, 0, "the watch closed early: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buffer[..n]);
    }
    close(server);
    tokio::time::timeout(WAIT, raw.read_to_end(&mut received)).await.unwrap().unwrap();
    String::from_utf8(received).unwrap()
}

#[tokio::test]
async fn dropped_watches_break_the_chunked_body() {
    let server = FakeApiServer::start();
    let ended = raw_watch_closed_by(&server, FakeApiServer::end_watches).await;
    assert!(ended.starts_with("HTTP/1.1 200 OK\r\n"), "{ended}");
    assert!(ended.contains("transfer-encoding: chunked"), "{ended}");
    assert!(ended.contains(r#"{"type":"ADDED","object":{"apiVersion":"v1","kind":"Pod","#), "{ended}");
    assert!(ended.ends_with("\r\n0\r\n\r\n"), "a clean end has the last chunk: {ended}");

    server.delete("pods", "default", "x");
    let dropped = raw_watch_closed_by(&server, FakeApiServer::drop_watches).await;
    assert!(dropped.contains(r#""type":"ADDED""#), "{dropped}");
    assert!(!dropped.ends_with("0\r\n\r\n"), "a dropped watch has no last chunk: {dropped}");
}

#[tokio::test]
async fn compaction_while_disconnected_forces_relist() {
    let server = FakeApiServer::start();
    for name in ["a", "b", "c"] {
        server.apply(&pod("default", name, "node-a", None));
    }
    let api: Api<Pod> = Api::all(server.client());
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default()).default_backoff());
    let mut rec = Recorder::new(stream);
    assert_eq!(rec.initial_list().await, ["a", "b", "c"]);
    assert_eventually("the watch", || server.open_watches() == 1).await;

    // The API server goes away; meanwhile objects change and history is compacted.
    server.set_reachability(Reachability::Refused);
    server.delete("pods", "default", "b");
    server.apply(&pod("default", "d", "node-a", None));
    server.compact();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.set_reachability(Reachability::Reachable);

    // The resumed watch gets 410 Expired; the watcher relists and the store drops b.
    let seen = rec.expect(&Seen::InitDone).await;
    assert!(
        seen.iter().any(|s| matches!(s, Seen::Error(e) if e.contains("too old resource version"))),
        "{seen:?}"
    );
    assert_eq!(listed(&seen), ["a", "c", "d"]);
    assert_eventually("the store to drop b", || names::<Pod>(reader.state()) == ["a", "c", "d"]).await;
    assert_eq!(server.stats("pods").initial_list_requests, 2);
    let expired = watch_requests(&server, "pods")
        .into_iter()
        .filter(|w| {
            w.param("resourceVersion")
                .is_some_and(|rv| rv.parse::<u64>().unwrap() < server.compacted_resource_version())
        })
        .count();
    assert!(expired >= 1, "a watch from before the compaction was answered");
}

#[tokio::test]
async fn compaction_and_dropped_watch_gives_410() {
    let server = FakeApiServer::start();
    server.apply(&pod("default", "a", "node-a", None));
    let api: Api<Pod> = Api::all(server.client());
    let mut rec = Recorder::new(watcher(api, watcher::Config::default()));
    assert_eq!(rec.initial_list().await, ["a"]);
    assert_eventually("the watch", || server.open_watches() == 1).await;
    server.apply(&pod("default", "b", "node-a", None));
    rec.expect(&Seen::Apply("b".into(), None)).await;
    // Without a bookmark the pod watcher only knows b's version; a change of another type and
    // a compaction put that version out of the history.
    server.apply(&service("default", "web", "10.96.0.10"));
    server.compact();
    server.drop_watches();
    assert_eq!(rec.initial_list().await, ["a", "b"]);
    assert_eq!(server.stats("pods").initial_list_requests, 2);
}

#[tokio::test]
async fn refused_connections_then_restore() {
    let server = FakeApiServer::start();
    server.apply(&pod("default", "a", "node-a", None));
    let api: Api<Pod> = Api::all(server.client());
    let mut rec = Recorder::new(watcher(api, watcher::Config::default()).default_backoff());
    assert_eq!(rec.initial_list().await, ["a"]);
    assert_eventually("the watch", || server.open_watches() == 1).await;

    server.set_unreachable(true);
    assert_eventually("the watch to be reset", || server.open_watches() == 0).await;
    server.apply(&pod("default", "b", "node-a", None));
    let refused = std::net::TcpStream::connect(server.address()).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    rec.until("an error", |s| s.iter().any(|s| matches!(s, Seen::Error(_)))).await;

    server.set_unreachable(false);
    let seen = rec.expect(&Seen::Apply("b".into(), None)).await;
    assert!(!seen.contains(&Seen::Init), "history allows a resume without relist: {seen:?}");
    assert_eq!(server.stats("pods").initial_list_requests, 1);
}

#[tokio::test]
async fn short_blackhole_freezes_the_stream() {
    let server = FakeApiServer::start();
    server.apply(&pod("default", "a", "node-a", None));
    let api: Api<Pod> = Api::all(server.client());
    let mut rec = Recorder::new(watcher(api, watcher::Config::default()).default_backoff());
    assert_eq!(rec.initial_list().await, ["a"]);
    assert_eventually("the watch", || server.open_watches() == 1).await;

    server.set_blackholed(true);
    server.apply(&pod("default", "b", "node-a", None));
    // New connections are accepted, but requests get no answer.
    let mut raw = tokio::net::TcpStream::connect(server.address()).await.expect("accepted");
    raw.write_all(b"GET /version HTTP/1.1\r\nHost: fake\r\n\r\n").await.unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(1), raw.read(&mut answer)).await;
    assert!(read.is_err(), "a blackholed server answered: {read:?}");
    rec.expect_quiet(Duration::from_millis(200)).await;

    server.set_blackholed(false);
    rec.expect(&Seen::Apply("b".into(), None)).await;
    let n = tokio::time::timeout(WAIT, raw.read(&mut answer)).await.unwrap().unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "the waiting request is answered");
    // The same stream carried on: no new watch, no relist.
    assert_eq!(server.stats("pods").watch_requests, 1);
    assert_eq!(server.stats("pods").initial_list_requests, 1);
}

#[tokio::test]
async fn long_blackhole_then_restore_recovers() {
    let server = FakeApiServer::start();
    server.apply(&pod("default", "a", "node-a", None));
    server.apply(&pod("default", "b", "node-a", None));
    let api: Api<Pod> = Api::all(server.client());
    // Server-side timeout 1 s: kube gives up on a silent stream after 1 + 5 s.
    let config = watcher::Config::default().timeout(1);
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, config).default_backoff());
    let mut rec = Recorder::new(stream);
    assert_eq!(rec.initial_list().await, ["a", "b"]);

    server.set_blackholed(true);
    let watches_before = server.stats("pods").watch_requests;
    server.delete("pods", "default", "a");
    server.apply(&pod("default", "c", "node-a", None));
    // Nothing gets through, and the server does not end the frozen stream either.
    rec.expect_quiet(Duration::from_millis(7_500)).await;
    server.set_blackholed(false);

    let seen = rec.expect(&Seen::Apply("c".into(), None)).await;
    assert!(seen.contains(&Seen::Delete("a".into())), "{seen:?}");
    assert_eventually("the store to follow", || names::<Pod>(reader.state()) == ["b", "c"]).await;
    assert!(
        server.stats("pods").watch_requests > watches_before,
        "the client abandoned the frozen stream and watched again"
    );
}

#[tokio::test]
async fn kubeconfig_and_discovery() {
    let server = FakeApiServer::start();
    let dir = std::env::temp_dir().join(tagger_tests::unique_name("kubeconfig"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config");
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    let client = kube::Client::try_from(config).unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "33"));

    let discovery = kube::Discovery::new(client).run().await.unwrap();
    let mut resources = BTreeMap::new();
    for group in discovery.groups() {
        for (resource, _) in group.recommended_resources() {
            resources.insert(resource.plural.clone(), resource.api_version.clone());
        }
    }
    assert_eq!(resources.get("pods").map(String::as_str), Some("v1"));
    assert_eq!(resources.get("endpointslices").map(String::as_str), Some("discovery.k8s.io/v1"));
}
