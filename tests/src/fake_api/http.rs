//! The HTTP side of the fake API server: the accept loop (which can refuse connections), one
//! hyper HTTP/1.1 connection per client (which can be reset or frozen), routing of API paths, and
//! watch responses streamed as chunked newline-delimited JSON.

use std::convert::Infallible;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedReceiver, error::TryRecvError};
use tokio::time::Instant;

use super::resources::{self, ResourceType};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{ApiError, Filter, ListQuery, Representation, WatchMsg, WatchQuery};
use super::{Reachability, RequestRecord, Shared, Verb};

/// Response body: a whole JSON document or a watch stream.
type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Server-side watch duration when the client gives no `timeoutSeconds` (the real API server
/// picks a random value between 30 and 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_mins(30);

/// A request to the accept loop, acknowledged once carried out.
pub(crate) enum Command {
    SetReachability(Reachability, std::sync::mpsc::SyncSender<Result<(), String>>),
    Shutdown,
}

/// Accepts connections until shut down. While the server refuses connections, a bound socket
/// that does not listen holds its port (see `socket`).
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut commands: UnboundedReceiver<Command>,
) {
    let mut listener = Listener::Listening(listener);
    loop {
        let accept = async {
            match &listener {
                Listener::Listening(l) => l.accept().await,
                Listener::Refusing(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            command = commands.recv() => match command {
                None | Some(Command::Shutdown) => return,
                Some(Command::SetReachability(reachability, ack)) => {
                    let result = set_reachability(&shared, &mut listener, reachability);
                    let _ = ack.send(result);
                }
            },
            accepted = accept => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(Arc::clone(&shared), stream));
                }
                // Out of file descriptors or similar: do not spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// The server's socket: listening, or a bound placeholder while connections are refused.
enum Listener {
    Listening(TcpListener),
    /// Held for its port, never read.
    Refusing(#[expect(dead_code, reason = "held for the port it keeps bound")] std::net::TcpListener),
}

fn set_reachability(
    shared: &Shared,
    listener: &mut Listener,
    reachability: Reachability,
) -> Result<(), String> {
    let refuse = reachability == Reachability::Refused;
    match (&*listener, refuse) {
        (Listener::Listening(_), true) => {
            // The placeholder first, then the listener closes: the port stays held.
            let placeholder = shared
                .binder
                .bind(shared.address, false)
                .map_err(|e| format!("cannot hold {} while refusing: {e}", shared.address))?;
            *listener = Listener::Refusing(placeholder);
        }
        (Listener::Refusing(_), false) => {
            let l = shared
                .binder
                .bind(shared.address, true)
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    TcpListener::from_std(l)
                })
                .map_err(|e| format!("cannot listen on {} again: {e}", shared.address))?;
            *listener = Listener::Listening(l);
        }
        _ => {}
    }
    shared.net.send_replace(reachability);
    if refuse {
        // New connections: ECONNREFUSED. Open ones, watches included: reset.
        shared.kill.send_modify(|epoch| *epoch += 1);
    }
    Ok(())
}

/// Serves one client connection until it closes or the server refuses connections.
async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    let fd = stream.as_raw_fd();
    let _ = stream.set_nodelay(true);
    let mut kill = shared.kill.subscribe();
    let service_shared = Arc::clone(&shared);
    let service = service_fn(move |request| handle(Arc::clone(&service_shared), request));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(None);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = connection => {}
        _ = kill.changed() => {
            // The connection (and its socket) is dropped right after: make that a reset.
            set_zero_linger(fd);
        }
    }
}

/// Sets `SO_LINGER` to zero so that closing the socket sends a TCP reset.
fn set_zero_linger(fd: RawFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: `fd` is the socket of the connection future that is still alive in the caller,
    // and `linger` is a valid `struct linger` of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            libc::socklen_t::try_from(size_of::<libc::linger>()).expect("struct linger is small"),
        );
    }
}

/// Waits while the server is blackholed (or about to reset this connection).
async fn wait_reachable(shared: &Shared) {
    let mut net = shared.net.subscribe();
    // An error means the server is shutting down; the connection goes with it.
    let _ = net.wait_for(|r| *r == Reachability::Reachable).await;
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    wait_reachable(&shared).await;
    Ok(route(&shared, &request).unwrap_or_else(|e| error_response(&e)))
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    json_body_response(status, serde_json::to_vec(value).expect("JSON values always serialize"))
}

fn json_body_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(error: &ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &error.to_status())
}

fn not_found() -> ApiError {
    ApiError::new(404, "NotFound", "the server could not find the requested resource")
}

/// The parsed parts of a request that routing needs.
struct Parsed<'a> {
    segments: Vec<&'a str>,
    query: Vec<(String, String)>,
    accept: Option<String>,
}

impl Parsed<'_> {
    fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A boolean parameter, parsed like Go's `strconv.ParseBool`.
    fn flag(&self, name: &str) -> Result<Option<bool>, ApiError> {
        self.param(name)
            .map(|v| match v {
                "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
                "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
                _ => Err(ApiError::bad_request(format!("{name}: invalid boolean {v:?}"))),
            })
            .transpose()
    }
}

fn route(shared: &Arc<Shared>, request: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = request.uri().path();
    let parsed = Parsed {
        segments: path.split('/').filter(|s| !s.is_empty()).collect(),
        query: form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect(),
        accept: request.headers().get(ACCEPT).and_then(|v| v.to_str().ok()).map(str::to_owned),
    };
    let target = resolve(shared, &parsed.segments);
    let watch = parsed.flag("watch")?.unwrap_or(false);
    let (verb, resource) = match &target {
        Target::Collection { resource, .. } if watch => (Verb::Watch, Some(*resource)),
        Target::Collection { resource, .. } => (Verb::List, Some(*resource)),
        Target::Object { resource, .. } => (Verb::Get, Some(*resource)),
        Target::Document(_) => (Verb::Discovery, None),
        Target::NotFound => (Verb::Other, None),
    };
    shared.record(RequestRecord {
        method: request.method().to_string(),
        path: path.to_owned(),
        query: parsed.query.clone(),
        accept: parsed.accept.clone(),
        verb,
        resource: resource.map(|r| r.plural),
        at: std::time::Instant::now(),
    });
    if request.method() != Method::GET {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the fake API server only serves GET, not {}", request.method()),
        ));
    }
    match target {
        Target::Document(document) => Ok(json_response(StatusCode::OK, &document)),
        Target::Collection { resource, namespace } if watch => {
            watch_collection(shared, &parsed, resource, namespace)
        }
        Target::Collection { resource, namespace } => list_collection(shared, &parsed, resource, namespace),
        Target::Object { resource, namespace, name } => {
            let representation = representation(parsed.accept.as_deref(), false)?;
            let mut store = shared.store();
            store.count_get(resource);
            let object = store.get(resource, namespace.unwrap_or_default(), name).ok_or_else(|| {
                ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", resource.plural))
            })?;
            drop(store);
            Ok(json_response(StatusCode::OK, &representation.render(&object)))
        }
        Target::NotFound => Err(not_found()),
    }
}

/// What a path names.
enum Target<'a> {
    /// A discovery document.
    Document(Value),
    Collection {
        resource: &'static ResourceType,
        namespace: Option<&'a str>,
    },
    Object {
        resource: &'static ResourceType,
        namespace: Option<&'a str>,
        name: &'a str,
    },
    NotFound,
}

fn resolve<'a>(shared: &Shared, segments: &[&'a str]) -> Target<'a> {
    let document = |d: Option<Value>| d.map_or(Target::NotFound, Target::Document);
    match segments {
        ["version"] => Target::Document(resources::version_info()),
        ["api"] => Target::Document(resources::core_versions(&shared.address.to_string())),
        ["apis"] => Target::Document(resources::group_list()),
        ["api", version] => document(resources::resource_list("", version)),
        ["apis", group] => document(resources::group(group)),
        ["apis", group, version] => document(resources::resource_list(group, version)),
        ["api", version, rest @ ..] => resolve_resource("", version, rest),
        ["apis", group, version, rest @ ..] => resolve_resource(group, version, rest),
        _ => Target::NotFound,
    }
}

fn resolve_resource<'a>(group: &str, version: &str, rest: &[&'a str]) -> Target<'a> {
    let find = |plural: &str| ResourceType::at(group, version, plural);
    match rest {
        [plural] => {
            find(plural).map_or(Target::NotFound, |resource| Target::Collection { resource, namespace: None })
        }
        ["namespaces", namespace, plural] => match find(plural) {
            Some(resource) if resource.namespaced => {
                Target::Collection { resource, namespace: Some(namespace) }
            }
            _ => Target::NotFound,
        },
        ["namespaces", namespace, plural, name] => match find(plural) {
            Some(resource) if resource.namespaced => {
                Target::Object { resource, namespace: Some(namespace), name }
            }
            _ => Target::NotFound,
        },
        [plural, name] => match find(plural) {
            Some(resource) if !resource.namespaced => Target::Object { resource, namespace: None, name },
            _ => Target::NotFound,
        },
        _ => Target::NotFound,
    }
}

/// Picks the representation from the `Accept` header as the API server's content negotiation
/// does: the first acceptable entry wins; `as=PartialObjectMetadataList` is acceptable for lists
/// and `as=PartialObjectMetadata` for single objects and watches; anything else (Table,
/// protobuf, YAML) is skipped; nothing acceptable gives `406 Not Acceptable`.
fn representation(accept: Option<&str>, list: bool) -> Result<Representation, ApiError> {
    let Some(accept) = accept.map(str::trim).filter(|a| !a.is_empty()) else {
        return Ok(Representation::Full);
    };
    for entry in accept.split(',') {
        let mut parts = entry.split(';').map(str::trim);
        let media_type = parts.next().unwrap_or_default();
        if !matches!(media_type, "application/json" | "application/*" | "*/*") {
            continue;
        }
        let (mut as_kind, mut group, mut version) = (None, None, None);
        for param in parts {
            match param.split_once('=') {
                Some(("as", v)) => as_kind = Some(v),
                Some(("g", v)) => group = Some(v),
                Some(("v", v)) => version = Some(v),
                _ => {}
            }
        }
        let wanted = if list { "PartialObjectMetadataList" } else { "PartialObjectMetadata" };
        match (as_kind, group, version) {
            (None, _, _) => return Ok(Representation::Full),
            (Some(kind), Some("meta.k8s.io"), Some(version @ ("v1" | "v1beta1"))) if kind == wanted => {
                return Ok(Representation::Metadata { api_version: format!("meta.k8s.io/{version}") });
            }
            _ => {}
        }
    }
    Err(ApiError::new(
        406,
        "NotAcceptable",
        format!("only the following media types are accepted: application/json (got {accept:?})"),
    ))
}

fn filter(
    parsed: &Parsed<'_>,
    resource: &'static ResourceType,
    namespace: Option<&str>,
) -> Result<Filter, ApiError> {
    let labels = LabelSelector::parse(parsed.param("labelSelector").unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let fields =
        FieldSelector::parse(parsed.param("fieldSelector").unwrap_or_default(), resource.field_labels)
            .map_err(ApiError::bad_request)?;
    Ok(Filter { resource, namespace: namespace.map(str::to_owned), labels, fields })
}

fn list_collection(
    shared: &Shared,
    parsed: &Parsed<'_>,
    resource: &'static ResourceType,
    namespace: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let limit = parsed
        .param("limit")
        .map(|l| l.parse::<usize>().map_err(|_| ApiError::bad_request(format!("limit: invalid value {l:?}"))))
        .transpose()?;
    let query = ListQuery {
        filter: filter(parsed, resource, namespace)?,
        limit,
        continue_token: parsed.param("continue").filter(|c| !c.is_empty()).map(str::to_owned),
        resource_version: parsed.param("resourceVersion").map(str::to_owned),
        resource_version_match: parsed
            .param("resourceVersionMatch")
            .filter(|m| !m.is_empty())
            .map(str::to_owned),
        representation: representation(parsed.accept.as_deref(), true)?,
    };
    let body = shared.store().list(&query)?;
    Ok(json_body_response(StatusCode::OK, body))
}

fn watch_collection(
    shared: &Arc<Shared>,
    parsed: &Parsed<'_>,
    resource: &'static ResourceType,
    namespace: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let timeout = match parsed.param("timeoutSeconds") {
        None => DEFAULT_WATCH_TIMEOUT,
        Some(t) => match t.parse::<u64>() {
            Ok(0) => DEFAULT_WATCH_TIMEOUT,
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => return Err(ApiError::bad_request(format!("timeoutSeconds: invalid value {t:?}"))),
        },
    };
    let query = WatchQuery {
        filter: filter(parsed, resource, namespace)?,
        resource_version: parsed.param("resourceVersion").map(str::to_owned),
        resource_version_match: parsed
            .param("resourceVersionMatch")
            .filter(|m| !m.is_empty())
            .map(str::to_owned),
        bookmarks: parsed.flag("allowWatchBookmarks")?.unwrap_or(false),
        send_initial_events: parsed.flag("sendInitialEvents")?,
        representation: representation(parsed.accept.as_deref(), false)?,
    };
    let start = shared.store().watch(query)?;
    let state = WatchStream {
        events: start.events,
        net: shared.net.subscribe(),
        deadline: Instant::now() + timeout,
        registration: start.id.map(|id| Registration { shared: Arc::downgrade(shared), id }),
        pending: None,
        done: false,
    };
    let body = StreamBody::new(futures::stream::unfold(state, WatchStream::next_frame).boxed());
    let mut response = Response::new(BodyExt::boxed_unsync(body));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// Unregisters a watch from the store when its stream goes away.
struct Registration {
    shared: std::sync::Weak<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.store().unregister(self.id);
        }
    }
}

/// The state of one watch response body.
struct WatchStream {
    events: UnboundedReceiver<WatchMsg>,
    net: tokio::sync::watch::Receiver<Reachability>,
    deadline: Instant,
    #[expect(dead_code, reason = "held for its Drop, which unregisters the watch")]
    registration: Option<Registration>,
    /// An end or abort found while batching, acted on at the next call.
    pending: Option<WatchMsg>,
    done: bool,
}

/// Most events sent in one chunk: a burst (the initial state) goes out in few chunks.
const MAX_BATCH: usize = 256;

impl WatchStream {
    /// The next chunk of the body: queued events, the end of the stream (timeout, or closed by
    /// the server), or an error that makes hyper break the connection (a dropped watch). While
    /// the server is blackholed the stream neither sends nor ends: it is frozen.
    async fn next_frame(mut self) -> Option<(Result<Frame<Bytes>, io::Error>, Self)> {
        if self.done {
            return None;
        }
        match self.pending.take() {
            Some(WatchMsg::Abort) => return Some(self.abort()),
            Some(WatchMsg::End) => return None,
            Some(WatchMsg::Line(_)) | None => {}
        }
        loop {
            if *self.net.borrow_and_update() != Reachability::Reachable {
                // Frozen (blackhole), or about to be reset (refused).
                if self.net.changed().await.is_err() {
                    return None;
                }
                continue;
            }
            tokio::select! {
                message = self.events.recv() => match message {
                    Some(WatchMsg::Line(line)) => {
                        let chunk = self.batch(line);
                        return Some((Ok(Frame::data(chunk)), self));
                    }
                    Some(WatchMsg::End) | None => return None,
                    Some(WatchMsg::Abort) => return Some(self.abort()),
                },
                () = tokio::time::sleep_until(self.deadline) => return None,
                changed = self.net.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// The error that makes hyper break the connection mid-body.
    fn abort(mut self) -> (Result<Frame<Bytes>, io::Error>, Self) {
        self.done = true;
        (Err(io::Error::other("watch dropped by the fake API server")), self)
    }

    /// Appends the lines already queued behind `first` (up to [`MAX_BATCH`]) to one chunk; an
    /// end or abort stays queued for the next call.
    fn batch(&mut self, first: Bytes) -> Bytes {
        let mut chunk: Option<Vec<u8>> = None;
        for _ in 1..MAX_BATCH {
            match self.events.try_recv() {
                Ok(WatchMsg::Line(line)) => {
                    chunk.get_or_insert_with(|| first.to_vec()).extend_from_slice(&line);
                }
                Ok(message @ (WatchMsg::End | WatchMsg::Abort)) => {
                    self.pending = Some(message);
                    break;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        chunk.map_or(first, Bytes::from)
    }
}
