//! A rolling update under load, as a platform engineer runs one: HTTP/1.1 keep-alive clients
//! (a pool of connections, some requests slow) against a Service whose backends are replaced
//! one by one, each old one terminating while its server drains gracefully.
//!
//! [`serve`] is the backend: every request is answered with the server's name (`/slow` after
//! 500 ms). On `drain` (a line on stdin, as a pod's SIGTERM handler would start it) it stops
//! accepting, answers each open connection's next request with `Connection: close` and closes
//! it, finishes requests in flight, and prints `drained` once no connection is left.
//!
//! [`pool`] is the client: `conns` threads, each with one keep-alive connection, sending
//! requests back to back (every fourth one `/slow`) and opening a new connection when the
//! server said `Connection: close`. Any failure — a connect error, a reset, a closed connection
//! without an answer — is a failed request. When stdin closes it prints
//! `done <TAB> <requests> <TAB> <failed>`, then `error <TAB> <n> <TAB> <what>` and
//! `backend <TAB> <n> <TAB> <name>` lines.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// How long a slow request takes.
pub const SLOW: Duration = Duration::from_millis(500);

/// Serves until drained (see the module documentation).
pub fn serve(listen: SocketAddr, name: &str) {
    let listener = TcpListener::bind(listen).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let draining = Arc::new(AtomicBool::new(false));
    let open = Arc::new(AtomicUsize::new(0));
    {
        let draining = Arc::clone(&draining);
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            draining.store(true, Ordering::SeqCst);
        });
    }
    println!("serving");
    let mut out = std::io::stdout();
    while !draining.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((conn, _)) => {
                open.fetch_add(1, Ordering::SeqCst);
                let (name, draining, open) = (name.to_owned(), Arc::clone(&draining), Arc::clone(&open));
                std::thread::spawn(move || {
                    answer(conn, &name, &draining);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    // Draining: no new connection is accepted; the open ones end after their next answer.
    drop(listener);
    let deadline = Instant::now() + Duration::from_secs(20);
    while open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = writeln!(out, "drained\t{}", open.load(Ordering::SeqCst));
    let _ = out.flush();
}

/// Answers requests on one connection until the client closes it or, once draining, after the
/// next answer (sent with `Connection: close`).
fn answer(mut conn: TcpStream, name: &str, draining: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut pending = Vec::new();
    let mut buf = [0u8; 1024];
    let mut idle_since = Instant::now();
    loop {
        let Some(end) = find(&pending, b"\r\n\r\n") else {
            match conn.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    idle_since = Instant::now();
                }
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    // A draining server gives an idle client a moment to send its next request
                    // (answered with Connection: close), then closes: clients of this pool
                    // always send again at once.
                    if draining.load(Ordering::SeqCst) && idle_since.elapsed() > Duration::from_secs(2) {
                        return;
                    }
                }
                Err(_) => return,
            }
            continue;
        };
        let request: Vec<u8> = pending.drain(..end + 4).collect();
        if request.starts_with(b"GET /slow ") {
            std::thread::sleep(SLOW);
        }
        let close = draining.load(Ordering::SeqCst);
        let body = format!("{name}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        if conn.write_all(response.as_bytes()).is_err() || close {
            return;
        }
        idle_since = Instant::now();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The outcome of one request.
enum Reply {
    /// Answered by this backend; `close`: the server asked to close the connection.
    Ok { backend: String, close: bool },
    /// Failed (the message).
    Failed(String),
}

fn request(s: &mut TcpStream, slow: bool) -> Reply {
    let path = if slow { "/slow" } else { "/" };
    let req = format!("GET {path} HTTP/1.1\r\nHost: tagger-rollout\r\n\r\n");
    if let Err(e) = s.write_all(req.as_bytes()) {
        return Reply::Failed(format!("send: {e}"));
    }
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Reply::Failed("closed without an answer".into()),
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) => return Reply::Failed(format!("receive: {e}")),
        }
        let text = String::from_utf8_lossy(&response);
        let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
        let Some(len) = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")?.trim().parse().ok())
        else {
            return Reply::Failed("no Content-Length".into());
        };
        if body.len() >= len {
            return Reply::Ok {
                backend: body.trim_end().to_owned(),
                close: head.lines().any(|l| l.eq_ignore_ascii_case("Connection: close")),
            };
        }
    }
}

#[derive(Default)]
struct Tally {
    requests: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    backends: BTreeMap<String, u64>,
}

/// Runs the client pool until stdin closes (see the module documentation).
pub fn pool(addr: SocketAddr, conns: usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
            std::thread::spawn(move || worker(addr, i, &stop, &tally))
        })
        .collect();
    println!("started");
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    let t = tally.lock().expect("tally");
    println!("done\t{}\t{}", t.requests, t.failed);
    for (e, n) in &t.errors {
        println!("error\t{n}\t{e}");
    }
    for (b, n) in &t.backends {
        println!("backend\t{n}\t{b}");
    }
}

fn worker(addr: SocketAddr, index: usize, stop: &AtomicBool, tally: &Mutex<Tally>) {
    let mut conn: Option<TcpStream> = None;
    let mut n = index;
    while !stop.load(Ordering::SeqCst) {
        let s = match conn.as_mut() {
            Some(s) => s,
            None => match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    conn.insert(s)
                }
                Err(e) => {
                    let mut t = tally.lock().expect("tally");
                    t.requests += 1;
                    t.failed += 1;
                    *t.errors.entry(format!("connect: {e}")).or_default() += 1;
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        n += 1;
        let reply = request(s, n.is_multiple_of(4));
        let mut t = tally.lock().expect("tally");
        t.requests += 1;
        match reply {
            Reply::Ok { backend, close } => {
                *t.backends.entry(backend).or_default() += 1;
                if close {
                    conn = None;
                }
            }
            Reply::Failed(e) => {
                t.failed += 1;
                *t.errors.entry(e).or_default() += 1;
                conn = None;
            }
        }
    }
}

/// What a rolling update under load did.
#[derive(Clone, Debug, Default)]
pub struct RolloutReport {
    /// Requests sent.
    pub requests: u64,
    /// Requests that failed.
    pub failed: u64,
    /// `error` lines of the pool (what failed, how often).
    pub errors: Vec<String>,
    /// Requests answered per backend.
    pub served: BTreeMap<String, u64>,
    /// Backends replaced.
    pub replaced: usize,
    /// Stale-connection resets the agent logged meanwhile.
    pub resets: usize,
}

/// Runs a rolling update under load on an agent sandbox: a Service at `vip` with `base`
/// backends `r-1`..`r-<base>` and one gray backend (so that tagger steers it), `conns`
/// keep-alive clients in a base caller pod `rollout-gw`, and every base backend replaced in turn
/// (new pod ready, old one terminating, drained, deleted). The agent is started here on the
/// file source.
pub fn rolling_update(
    sb: &mut crate::agent::AgentSandbox,
    vip: SocketAddr,
    base: usize,
    conns: usize,
) -> RolloutReport {
    const WAIT: Duration = Duration::from_secs(30);
    let port = crate::agent::PORT;
    sb.caller("rollout-gw", None);
    let mut servers = BTreeMap::new();
    let old: Vec<String> = (1..=base).map(|i| format!("r-{i}")).collect();
    for name in &old {
        servers.insert(name.clone(), sb.rollout_backend(name, None));
    }
    servers.insert("r-gray".to_owned(), sb.rollout_backend("r-gray", Some("gray")));
    let mut backends: Vec<&str> = old.iter().map(String::as_str).collect();
    backends.push("r-gray");
    sb.cluster.service("r", &[vip.ip()], vip.port(), port, &backends);
    sb.write_source_file();
    sb.start_agent_on_file(&[]);
    let base_set = |t: &tagger::datapath::Tables| crate::agent::set_ips(t, vip, "base");
    let ip = |sb: &crate::agent::AgentSandbox, name: &str| sb.ip4(name);
    let mut want: Vec<std::net::IpAddr> = old.iter().map(|n| ip(sb, n)).collect();
    want.sort();
    sb.wait_for("the Service's base set", WAIT, |t| base_set(t) == want);

    let cg = sb.pod_cgroup("rollout-gw");
    let pool = crate::client::HoldClient::start_with(
        &cg,
        &sb.netns["rollout-gw"].ns,
        "rollout-pool",
        vip,
        &[&conns.to_string()],
    );
    assert!(pool.wait_line("started", WAIT).is_some(), "the client pool did not start");
    std::thread::sleep(Duration::from_secs(1));
    for (i, old) in old.iter().enumerate() {
        // maxSurge: the new pod is ready first, then the old one terminates, drains and goes.
        let new = format!("r-{}", base + i + 1);
        servers.insert(new.clone(), sb.rollout_backend(&new, None));
        sb.cluster.services.get_mut("r").expect("service r").backends.push(new.clone());
        sb.write_source_file();
        sb.wait_for("the new backend in the set", WAIT, |t| base_set(t).contains(&ip(sb, &new)));
        sb.cluster.pods.get_mut(old.as_str()).expect("old pod").terminating = true;
        sb.write_source_file();
        sb.wait_for("the terminating backend out of the set", WAIT, |t| !base_set(t).contains(&ip(sb, old)));
        // Its SIGTERM: drain. The connections it holds keep working until it closes them.
        std::thread::sleep(Duration::from_millis(200));
        let server = servers.get_mut(old).expect("old server");
        server.tell("drain");
        assert!(server.wait_line("drained", WAIT).is_some(), "{old} did not drain");
        sb.cluster.services.get_mut("r").expect("service r").backends.retain(|b| b != old);
        sb.cluster.pods.remove(old.as_str());
        sb.write_source_file();
        std::thread::sleep(Duration::from_secs(1));
    }
    let lines = pool.finish(WAIT);
    let mut report = RolloutReport { replaced: old.len(), ..RolloutReport::default() };
    for line in &lines {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.as_slice() {
            ["done", requests, failed] => {
                report.requests = requests.parse().expect("requests");
                report.failed = failed.parse().expect("failed");
            }
            ["error", ..] => report.errors.push(line.clone()),
            ["backend", n, name] => {
                report.served.insert((*name).to_owned(), n.parse().expect("count"));
            }
            _ => {}
        }
    }
    report.resets = sb.agent_log().matches("reset stale connection").count();
    report
}
