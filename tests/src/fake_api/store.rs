//! The object store behind the fake API server: a versioned key-value store with a bounded event
//! history, the list and watch semantics of the real API server on top of it, and the registry
//! of open watches.
//!
//! Everything runs under one mutex (see [`super::Shared`]): an object change, the events it sends
//! to every open watch, and the start of a new watch are atomic with respect to each other, so a
//! watch never misses or duplicates an event.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Serialize, Serializer, ser::SerializeMap as _};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::resources::{RESOURCE_TYPES, ResourceType};
use super::selector::{FieldSelector, LabelSelector};

/// `(type index, namespace, name)`: the order of keys is the order of list results, as etcd's
/// `/registry/<resource>/<namespace>/<name>` keys give.
pub(crate) type ObjectKey = (usize, String, String);

/// An error answered as a `Status` object, with the HTTP code, reason and message that the real
/// API server uses for the same condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into() }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// The `410 Gone` of a resource version older than the compacted history.
    pub(crate) fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// The `meta.k8s.io/v1` `Status` object.
    pub(crate) fn to_status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

/// How objects are rendered in responses, chosen by the request's `Accept` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Representation {
    /// The whole object.
    Full,
    /// `PartialObjectMetadata` (or `...List`) of the given `meta.k8s.io` API version.
    Metadata { api_version: String },
}

impl Representation {
    /// The object as it appears in a watch event or a single GET.
    pub(crate) fn render(&self, object: &Value) -> Value {
        match self {
            Self::Full => object.clone(),
            Self::Metadata { api_version } => json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": api_version,
                "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
            }),
        }
    }
}

/// A stored object as it appears in the `items` of a list, serialized straight from the store
/// (no copy of the object): the real API server leaves `kind` and `apiVersion` out of the items
/// of a typed list.
struct ListItem<'a> {
    object: &'a Value,
    representation: &'a Representation,
}

impl Serialize for ListItem<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match (self.representation, self.object.as_object()) {
            (Representation::Full, Some(fields)) => {
                let mut map = serializer.serialize_map(None)?;
                for (key, value) in
                    fields.iter().filter(|(k, _)| !matches!(k.as_str(), "kind" | "apiVersion"))
                {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
            (Representation::Full, None) => self.object.serialize(serializer),
            (Representation::Metadata { api_version }, _) => {
                let mut map = serializer.serialize_map(Some(3))?;
                map.serialize_entry("kind", "PartialObjectMetadata")?;
                map.serialize_entry("apiVersion", api_version)?;
                match self.object.get("metadata") {
                    Some(metadata) => map.serialize_entry("metadata", metadata)?,
                    None => map.serialize_entry("metadata", &Map::new())?,
                }
                map.end()
            }
        }
    }
}

/// A LIST response, serialized once into the response body.
#[derive(Serialize)]
struct ListBody<'a> {
    kind: String,
    #[serde(rename = "apiVersion")]
    api_version: String,
    metadata: Map<String, Value>,
    items: Vec<ListItem<'a>>,
}

/// What a list or watch selects: one resource type, optionally one namespace, and selectors.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub(crate) resource: &'static ResourceType,
    pub(crate) namespace: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let namespace_ok = self
            .namespace
            .as_deref()
            .is_none_or(|ns| object.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns));
        namespace_ok && self.labels.matches(object) && self.fields.matches(object)
    }
}

/// The parameters of a LIST request.
#[derive(Debug, Clone)]
pub(crate) struct ListQuery {
    pub(crate) filter: Filter,
    pub(crate) limit: Option<usize>,
    pub(crate) continue_token: Option<String>,
    pub(crate) resource_version: Option<String>,
    pub(crate) resource_version_match: Option<String>,
    pub(crate) representation: Representation,
}

/// The parameters of a WATCH request.
#[derive(Debug, Clone)]
pub(crate) struct WatchQuery {
    pub(crate) filter: Filter,
    pub(crate) resource_version: Option<String>,
    pub(crate) resource_version_match: Option<String>,
    pub(crate) bookmarks: bool,
    pub(crate) send_initial_events: Option<bool>,
    pub(crate) representation: Representation,
}

/// A message to the HTTP side of one watch stream.
#[derive(Debug)]
pub(crate) enum WatchMsg {
    /// One newline-terminated watch event.
    Line(Bytes),
    /// End the stream cleanly (terminating chunk).
    End,
    /// Break the connection without ending the chunked body, as a dying load balancer would.
    Abort,
}

/// A started watch: its events arrive on `events`; `id` names its registration, which the HTTP
/// side removes with [`Store::unregister`] when the stream goes away.
pub(crate) struct WatchStart {
    pub(crate) events: UnboundedReceiver<WatchMsg>,
    /// `None` for a watch that was answered with an error event only.
    pub(crate) id: Option<u64>,
}

/// Request and watch counters of one resource type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceStats {
    /// LIST requests answered (every page counts).
    pub list_requests: u64,
    /// LIST requests without a `continue` token: each one starts a (re)list.
    pub initial_list_requests: u64,
    /// WATCH requests answered, including those answered with `410 Expired`.
    pub watch_requests: u64,
    /// GET requests of a single object.
    pub get_requests: u64,
    /// Watch streams currently open on the server side.
    pub open_watches: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, kept in the history so that watches can resume after it.
#[derive(Debug)]
struct HistoryEvent {
    rv: u64,
    key: ObjectKey,
    event_type: EventType,
    /// New state; for a deletion, the last state with the deletion's resource version.
    object: Arc<Value>,
    /// State before the change (`None` for an addition).
    previous: Option<Arc<Value>>,
}

struct Watch {
    id: u64,
    filter: Filter,
    representation: Representation,
    bookmarks: bool,
    tx: UnboundedSender<WatchMsg>,
}

impl Watch {
    fn send_event(&self, event_type: &str, object: &Value) {
        self.send_line(event_type, &self.representation.render(object));
    }

    /// Sends `{"type":...,"object":...}` and a newline, `type` first as the API server writes it
    /// (so clients find the tag before the object).
    fn send_line(&self, event_type: &str, object: &Value) {
        let mut line = format!(r#"{{"type":"{event_type}","object":"#).into_bytes();
        serde_json::to_writer(&mut line, object).expect("JSON values always serialize");
        line.extend_from_slice(b"}\n");
        // The receiver is gone when the client left; the registration goes with it.
        let _ = self.tx.send(WatchMsg::Line(Bytes::from(line)));
    }

    fn send_bookmark(&self, rv: u64, initial_events_end: bool) {
        let (kind, api_version) = match &self.representation {
            Representation::Full => {
                (self.filter.resource.kind.to_owned(), self.filter.resource.api_version())
            }
            Representation::Metadata { api_version } => {
                ("PartialObjectMetadata".to_owned(), api_version.clone())
            }
        };
        let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({"kind": kind, "apiVersion": api_version, "metadata": metadata});
        self.send_line("BOOKMARK", &object);
    }

    /// Sends what a watch with this filter sees of a change: an update that moves an object
    /// into or out of the selection is an `ADDED` or `DELETED`, as with the API server's cacher.
    fn dispatch(&self, event: &HistoryEvent) {
        if event.key.0 != self.filter.resource.index() {
            return;
        }
        let now = self.filter.matches(&event.object);
        match event.event_type {
            EventType::Added | EventType::Deleted => {
                if now {
                    self.send_event(event.event_type.as_str(), &event.object);
                }
            }
            EventType::Modified => {
                let before = event.previous.as_deref().is_some_and(|p| self.filter.matches(p));
                let event_type = match (before, now) {
                    (true, true) => "MODIFIED",
                    (false, true) => "ADDED",
                    (true, false) => "DELETED",
                    (false, false) => return,
                };
                self.send_event(event_type, &event.object);
            }
        }
    }
}

/// The state of the fake cluster.
pub(crate) struct Store {
    /// Last resource version handed out (etcd's revision).
    rv: u64,
    /// Every change with a resource version above this one is in `history`; below it, gone.
    compacted: u64,
    history_limit: usize,
    /// Every watch from a resource version is answered `410 Expired` (see
    /// `FakeApiServer::expire_watches`).
    pub(crate) expire_watches: bool,
    objects: BTreeMap<ObjectKey, Arc<Value>>,
    history: VecDeque<HistoryEvent>,
    watches: Vec<Watch>,
    next_watch_id: u64,
    next_uid: u64,
    stats: Vec<ResourceStats>,
}

impl Store {
    pub(crate) fn new(history_limit: usize, initial_rv: u64) -> Self {
        Self {
            rv: initial_rv,
            compacted: initial_rv,
            history_limit: history_limit.max(1),
            expire_watches: false,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            watches: Vec::new(),
            next_watch_id: 1,
            next_uid: 1,
            stats: vec![ResourceStats::default(); RESOURCE_TYPES.len()],
        }
    }

    /// The current resource version.
    pub(crate) fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Oldest resource version a watch can still start from.
    pub(crate) fn compacted(&self) -> u64 {
        self.compacted
    }

    pub(crate) fn stats(&self, resource: &ResourceType) -> ResourceStats {
        self.stats[resource.index()]
    }

    pub(crate) fn get(&self, resource: &ResourceType, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.objects.get(&key_of(resource, namespace, name)).cloned()
    }

    /// Current objects of one type (all namespaces), in list order.
    pub(crate) fn objects(&self, resource: &ResourceType) -> Vec<Arc<Value>> {
        self.objects.range(type_range(resource.index())).map(|(_, v)| Arc::clone(v)).collect()
    }

    /// Creates or updates an object; an update that changes nothing is a no-op, as on the real
    /// API server (no new resource version, no event). Returns the stored object.
    pub(crate) fn apply(&mut self, mut object: Value) -> Result<Arc<Value>, String> {
        let api_version = object.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or_default();
        let resource = ResourceType::of_object(api_version, kind)
            .ok_or_else(|| format!("the fake API server does not serve {api_version} {kind}"))?;
        let metadata =
            object.get_mut("metadata").and_then(Value::as_object_mut).ok_or("the object has no metadata")?;
        let name = metadata
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or("the object has no metadata.name")?
            .to_owned();
        let namespace = if resource.namespaced {
            let ns = metadata
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|ns| !ns.is_empty())
                .unwrap_or("default")
                .to_owned();
            metadata.insert("namespace".into(), Value::String(ns.clone()));
            ns
        } else {
            metadata.remove("namespace");
            String::new()
        };
        let key = (resource.index(), namespace, name);
        let previous = self.objects.get(&key).cloned();

        if let Some(prev) = &previous {
            // Server-managed fields come from the stored object.
            for field in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
                match prev.pointer(&format!("/metadata/{field}")) {
                    Some(v) => metadata.insert(field.into(), v.clone()),
                    None => metadata.remove(field),
                };
            }
            if spec_of(&object) != spec_of(prev) {
                let generation = prev.pointer("/metadata/generation").and_then(Value::as_u64).unwrap_or(0);
                object["metadata"]["generation"] = json!(generation + 1);
            }
            if object == **prev {
                return Ok(Arc::clone(prev));
            }
        } else {
            let uid = self.new_uid();
            metadata.insert("uid".into(), Value::String(uid));
            metadata.insert("creationTimestamp".into(), Value::String(rfc3339_now()));
            metadata.insert("generation".into(), json!(1));
        }
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let object = Arc::new(object);
        self.objects.insert(key.clone(), Arc::clone(&object));
        let event_type = if previous.is_some() { EventType::Modified } else { EventType::Added };
        self.record(HistoryEvent { rv, key, event_type, object: Arc::clone(&object), previous });
        Ok(object)
    }

    /// Deletes an object; the `DELETED` event carries its last state with the deletion's
    /// resource version. Returns that, or `None` if there was no such object.
    pub(crate) fn delete(
        &mut self,
        resource: &ResourceType,
        namespace: &str,
        name: &str,
    ) -> Option<Arc<Value>> {
        let key = key_of(resource, namespace, name);
        let previous = self.objects.remove(&key)?;
        let rv = self.next_rv();
        let mut last = (*previous).clone();
        last["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let last = Arc::new(last);
        self.record(HistoryEvent {
            rv,
            key,
            event_type: EventType::Deleted,
            object: Arc::clone(&last),
            previous: Some(previous),
        });
        Some(last)
    }

    /// Forgets the whole history: watches and exact lists from any earlier resource version
    /// get `410 Gone`.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Sends a `BOOKMARK` with the current resource version to every watch that allows them.
    pub(crate) fn send_bookmarks(&self) {
        for watch in self.watches.iter().filter(|w| w.bookmarks) {
            watch.send_bookmark(self.rv, false);
        }
    }

    /// Closes every open watch: abruptly when `abort`, else with a clean end of stream.
    pub(crate) fn close_watches(&mut self, abort: bool) {
        for watch in self.watches.drain(..) {
            let _ = watch.tx.send(if abort { WatchMsg::Abort } else { WatchMsg::End });
            self.stats[watch.filter.resource.index()].open_watches -= 1;
        }
    }

    /// Removes a watch whose stream is gone (idempotent).
    pub(crate) fn unregister(&mut self, id: u64) {
        if let Some(pos) = self.watches.iter().position(|w| w.id == id) {
            let watch = self.watches.swap_remove(pos);
            self.stats[watch.filter.resource.index()].open_watches -= 1;
        }
    }

    pub(crate) fn count_get(&mut self, resource: &ResourceType) {
        self.stats[resource.index()].get_requests += 1;
    }

    /// Answers a LIST with the response body (JSON).
    pub(crate) fn list(&mut self, query: &ListQuery) -> Result<Vec<u8>, ApiError> {
        let resource = query.filter.resource;
        let stats = &mut self.stats[resource.index()];
        stats.list_requests += 1;
        if query.continue_token.is_none() {
            stats.initial_list_requests += 1;
        }
        let rv = query.resource_version.as_deref().filter(|rv| !rv.is_empty());
        let (snapshot_rv, start_after, limit) = if let Some(token) = &query.continue_token {
            if rv.is_some() {
                return Err(ApiError::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let (token_rv, start) = decode_continue(token)
                .ok_or_else(|| ApiError::bad_request(format!("continue key is not valid: {token}")))?;
            if token_rv < self.compacted {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                ));
            }
            (token_rv, Some(start), query.limit)
        } else {
            match (rv, query.resource_version_match.as_deref()) {
                (None, Some(_)) => {
                    return Err(ApiError::bad_request(
                        "resourceVersionMatch is forbidden unless resourceVersion is provided",
                    ));
                }
                (None, None) => (self.rv, None, query.limit),
                // "Any": served from the watch cache, which ignores the limit.
                (Some("0"), None | Some("NotOlderThan")) => (self.rv, None, None),
                (Some(rv), None | Some("NotOlderThan")) => {
                    let rv = self.known_rv(rv)?;
                    // With a limit the list goes to etcd, which refuses compacted revisions.
                    if query.limit.is_some() && rv < self.compacted {
                        return Err(too_old_list());
                    }
                    (self.rv, None, query.limit)
                }
                (Some(rv), Some("Exact")) => {
                    if rv == "0" {
                        return Err(ApiError::bad_request(
                            "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"",
                        ));
                    }
                    let rv = self.known_rv(rv)?;
                    if rv < self.compacted {
                        return Err(too_old_list());
                    }
                    (rv, None, query.limit)
                }
                (Some(_), Some(other)) => {
                    return Err(ApiError::bad_request(format!(
                        "resourceVersionMatch: Unsupported value: \"{other}\""
                    )));
                }
            }
        };
        Ok(self.list_at(query, snapshot_rv, start_after, limit.filter(|&l| l > 0)))
    }

    fn list_at(
        &self,
        query: &ListQuery,
        snapshot_rv: u64,
        start_after: Option<ObjectKey>,
        limit: Option<usize>,
    ) -> Vec<u8> {
        let resource = query.filter.resource;
        let t = resource.index();
        let lower = match start_after {
            Some(key) if key.0 == t => Bound::Excluded(key),
            _ => Bound::Included((t, String::new(), String::new())),
        };
        let upper = Bound::Excluded((t + 1, String::new(), String::new()));

        // The state at `snapshot_rv`: today's objects, with the changes made after it undone.
        let overlay = self.undo_overlay(t, snapshot_rv);
        let in_range: Vec<(&ObjectKey, &Value)> = if overlay.is_empty() {
            self.objects.range((lower, upper)).map(|(k, o)| (k, &**o)).collect()
        } else {
            let mut snapshot: BTreeMap<&ObjectKey, &Arc<Value>> =
                self.objects.range((lower.clone(), upper.clone())).collect();
            for (key, before) in &overlay {
                if (lower.as_ref(), upper.as_ref()).contains(key) {
                    match before {
                        Some(object) => snapshot.insert(key, object),
                        None => snapshot.remove(key),
                    };
                }
            }
            snapshot.into_iter().map(|(k, o)| (k, &**o)).collect()
        };
        let mut items = Vec::new();
        let mut last_key = None;
        let mut remaining: u64 = 0;
        for (key, object) in in_range {
            if !query.filter.matches(object) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                remaining += 1;
            } else {
                items.push(ListItem { object, representation: &query.representation });
                last_key = Some(key.clone());
            }
        }

        let mut metadata = Map::new();
        metadata.insert("resourceVersion".into(), Value::String(snapshot_rv.to_string()));
        if remaining > 0 {
            let last = last_key.expect("a page with more items after it is not empty");
            metadata.insert("continue".into(), Value::String(encode_continue(snapshot_rv, &last)));
            if query.filter.labels.is_empty() && query.filter.fields.is_empty() {
                metadata.insert("remainingItemCount".into(), json!(remaining));
            }
        }
        let (kind, api_version) = match &query.representation {
            Representation::Full => (resource.list_kind(), resource.api_version()),
            Representation::Metadata { api_version } => {
                ("PartialObjectMetadataList".to_owned(), api_version.clone())
            }
        };
        serde_json::to_vec(&ListBody { kind, api_version, metadata, items })
            .expect("JSON values always serialize")
    }

    /// For each object of type `t` changed after `rv`, its state at `rv` (`None`: absent).
    fn undo_overlay(&self, t: usize, rv: u64) -> BTreeMap<ObjectKey, Option<Arc<Value>>> {
        let mut overlay = BTreeMap::new();
        // Newest first, so the oldest change after `rv` has the last word.
        for event in self.history.iter().rev().take_while(|e| e.rv > rv) {
            if event.key.0 == t {
                overlay.insert(event.key.clone(), event.previous.clone());
            }
        }
        overlay
    }

    /// Starts a WATCH: replays what the client missed (or the initial state) and registers the
    /// watch for what comes next.
    pub(crate) fn watch(&mut self, query: WatchQuery) -> Result<WatchStart, ApiError> {
        let resource = query.filter.resource;
        self.stats[resource.index()].watch_requests += 1;
        let rv = query.resource_version.as_deref().filter(|rv| !rv.is_empty());
        match (query.send_initial_events, query.resource_version_match.as_deref()) {
            (Some(true), Some("NotOlderThan")) if !query.bookmarks => {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "allowWatchBookmarks: Required value: sendInitialEvents requires allowWatchBookmarks=true",
                ));
            }
            (Some(_), Some("NotOlderThan")) | (None, None) => {}
            (Some(_), _) => {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                ));
            }
            (None, Some(_)) => {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
                ));
            }
        }

        let (tx, events) = unbounded_channel();
        let id = self.next_watch_id;
        self.next_watch_id += 1;
        let watch = Watch {
            id,
            filter: query.filter,
            representation: query.representation,
            bookmarks: query.bookmarks,
            tx,
        };

        // Unset or "0": synthetic ADDED events for the current state, then changes.
        let initial_events = query.send_initial_events.unwrap_or(matches!(rv, None | Some("0")));
        if let Some(rv) = rv.filter(|rv| !initial_events && *rv != "0") {
            let rv = self.known_rv(rv)?;
            if rv < self.compacted || self.expire_watches {
                // HTTP 200, one ERROR event, end of stream.
                let status =
                    ApiError::expired(format!("too old resource version: {rv} ({})", self.compacted))
                        .to_status();
                watch.send_line("ERROR", &status);
                let _ = watch.tx.send(WatchMsg::End);
                return Ok(WatchStart { events, id: None });
            }
            for event in self.history.iter().filter(|e| e.rv > rv) {
                watch.dispatch(event);
            }
        }
        if initial_events {
            for (_, object) in self.objects.range(type_range(resource.index())) {
                if watch.filter.matches(object) {
                    watch.send_event("ADDED", object);
                }
            }
        }
        if query.send_initial_events == Some(true) {
            watch.send_bookmark(self.rv, true);
        }
        self.stats[resource.index()].open_watches += 1;
        self.watches.push(watch);
        Ok(WatchStart { events, id: Some(id) })
    }

    /// Parses a requested resource version; one from the future is refused as the API server
    /// does once it has waited for it in vain.
    fn known_rv(&self, rv: &str) -> Result<u64, ApiError> {
        let rv: u64 =
            rv.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?;
        if rv > self.rv {
            return Err(ApiError::new(
                504,
                "Timeout",
                format!("Too large resource version: {rv}, current: {}", self.rv),
            ));
        }
        Ok(rv)
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn new_uid(&mut self) -> String {
        let n = self.next_uid;
        self.next_uid += 1;
        format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id())
    }

    /// Keeps an event in the bounded history and sends it to the open watches.
    fn record(&mut self, event: HistoryEvent) {
        for watch in &self.watches {
            watch.dispatch(&event);
        }
        self.history.push_back(event);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }
}

fn too_old_list() -> ApiError {
    ApiError::expired("The resourceVersion for the provided list is too old.")
}

fn key_of(resource: &ResourceType, namespace: &str, name: &str) -> ObjectKey {
    let namespace = if resource.namespaced { namespace } else { "" };
    (resource.index(), namespace.to_owned(), name.to_owned())
}

fn type_range(t: usize) -> (Bound<ObjectKey>, Bound<ObjectKey>) {
    (
        Bound::Included((t, String::new(), String::new())),
        Bound::Excluded((t + 1, String::new(), String::new())),
    )
}

/// Everything but `metadata` and `status`: a change there bumps `metadata.generation`.
fn spec_of(object: &Value) -> Value {
    let mut spec = object.clone();
    if let Some(map) = spec.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    spec
}

/// An opaque continue token: the snapshot's resource version and the last key returned,
/// hex-encoded JSON (the real API server base64-encodes a similar JSON document).
fn encode_continue(rv: u64, last: &ObjectKey) -> String {
    let doc = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": [last.0, last.1, last.2]});
    serde_json::to_vec(&doc).expect("JSON values always serialize").iter().fold(
        String::new(),
        |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        },
    )
}

fn decode_continue(token: &str) -> Option<(u64, ObjectKey)> {
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return None;
    }
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16).ok())
        .collect::<Option<_>>()?;
    let doc: Value = serde_json::from_slice(&bytes).ok()?;
    let rv = doc.get("rv")?.as_u64()?;
    let start = doc.get("start")?.as_array()?;
    let t = usize::try_from(start.first()?.as_u64()?).ok()?;
    let ns = start.get(1)?.as_str()?.to_owned();
    let name = start.get(2)?.as_str()?.to_owned();
    Some((rv, (t, ns, name)))
}

/// The current time as `2006-01-02T15:04:05Z`.
fn rfc3339_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// Formats seconds since the epoch as an RFC 3339 UTC timestamp (civil-from-days algorithm).
fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3_600, (rem % 3_600) / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
    }

    #[test]
    fn continue_tokens_round_trip() {
        let key = (2, "ns".to_owned(), "name-1".to_owned());
        assert_eq!(decode_continue(&encode_continue(42, &key)), Some((42, key)));
        assert_eq!(decode_continue("zz"), None);
    }
}
