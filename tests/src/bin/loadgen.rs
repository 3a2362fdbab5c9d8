//! `loadgen`: the load generator and echo server of `datapath-bench`. Like `testpod`, it first
//! joins a cgroup (so the datapath sees it as that pod, or as no pod at all) and a network
//! namespace, then runs one mode and exits by itself.
//!
//! ```text
//! loadgen [--cgroup DIR] [--netns NAME] serve LISTEN THREADS
//!     TCP echo server (a connection whose first byte is `S` is a sink instead) and UDP echo
//!     on the same port; prints `ready`, exits when stdin closes.
//! loadgen [--cgroup DIR] [--netns NAME] (crr|rr|stream|udp) ADDR[,ADDR…] CLIENTS SECS WARMUP [--peername]
//!     crr:    connect, one 64-byte request and response, close (netperf's TCP_CRR)
//!     rr:     one connection per client, 64-byte request/response ping-pong (TCP_RR)
//!     stream: one connection per client, 64 KiB writes into a sink (TCP_STREAM)
//!     udp:    unconnected sendto/recvfrom of 64-byte datagrams
//!     Runs CLIENTS threads for WARMUP + SECS seconds (spread over the addresses round robin:
//!     per connection for crr and udp, per client otherwise) and prints one JSON object: operations,
//!     errors, the rate over the SECS window and latency percentiles (µs). `--peername` adds a
//!     getpeername() after each connect, as most language runtimes do.
//! loadgen --cgroup DIR hold ADDR
//!     Stays in the cgroup (so that it is never empty) until stdin closes; ADDR is ignored.
//! loadgen [--cgroup DIR] [--netns NAME] probe ADDR INTERVAL_US MAX_SECS [every]
//!     Connects to ADDR every INTERVAL_US, reads the reply line (the backend's identity) and
//!     prints `<CLOCK_MONOTONIC ns> <TAB> <reply>` whenever the reply changes (with `every`: for
//!     every connection; the time is when the connect began); stops when stdin closes or after
//!     MAX_SECS.
//! ```

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// Size of a request and of its response.
const MSG: usize = 64;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut take_flag = |flag: &str| -> Option<String> {
        let i = args.iter().position(|a| a == flag)?;
        let value = args.get(i + 1).cloned().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        args.drain(i..=i + 1);
        Some(value)
    };
    let cgroup = take_flag("--cgroup");
    let netns = take_flag("--netns");
    let peername = if let Some(i) = args.iter().position(|a| a == "--peername") {
        args.remove(i);
        true
    } else {
        false
    };
    // Cgroup first, then the network namespace, while this process has a single thread (a
    // write of 0 to cgroup.procs moves the whole process; setns moves the calling thread and
    // the threads it spawns later).
    if let Some(cg) = cgroup {
        std::fs::write(Path::new(&cg).join("cgroup.procs"), b"0")
            .unwrap_or_else(|e| fail(&format!("join cgroup {cg}: {e}")));
    }
    if let Some(ns) = netns {
        let f = std::fs::File::open(Path::new("/var/run/netns").join(&ns))
            .unwrap_or_else(|e| fail(&format!("open netns {ns}: {e}")));
        // SAFETY: setns with a valid netns fd; this process is single-threaded here.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            fail(&format!("setns {ns}: {}", std::io::Error::last_os_error()));
        }
    }
    let [mode, addrs, rest @ ..] = args.as_slice() else { usage("missing MODE ADDR") };
    let addrs: Vec<SocketAddr> =
        addrs.split(',').map(|a| a.parse().unwrap_or_else(|_| usage("ADDR"))).collect();
    let addr = addrs[0];
    let num = |i: usize, what: &str| -> f64 {
        rest.get(i).and_then(|v| v.parse().ok()).unwrap_or_else(|| usage(what))
    };
    match mode.as_str() {
        "serve" => serve(addr, count(num(0, "THREADS"))),
        "hold" => {
            // Only keeps the cgroup occupied; ADDR is ignored.
            let stop = stop_on_stdin_eof();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        "probe" => {
            let every = rest.get(2).is_some_and(|a| a == "every");
            probe(
                addr,
                Duration::from_micros(count(num(0, "INTERVAL_US")) as u64),
                num(1, "MAX_SECS"),
                every,
            );
        }
        "crr" | "rr" | "stream" | "udp" => {
            let run = Run {
                addrs,
                clients: count(num(0, "CLIENTS")),
                secs: num(1, "SECS"),
                warmup: num(2, "WARMUP"),
                peername,
            };
            let summary = match mode.as_str() {
                "crr" => run.go(crr),
                "rr" => run.go(rr),
                "stream" => run.go(stream),
                _ => run.go(udp),
            };
            println!("{summary}");
        }
        other => usage(&format!("unknown mode {other}")),
    }
}

fn usage(what: &str) -> ! {
    eprintln!(
        "loadgen: {what}\nusage: loadgen [--cgroup DIR] [--netns NAME] MODE ADDR ARGS… (see the source)"
    );
    std::process::exit(2)
}

fn fail(what: &str) -> ! {
    eprintln!("loadgen: {what}");
    std::process::exit(1)
}

#[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "small positive counts")]
fn count(v: f64) -> usize {
    v.max(1.0) as usize
}

/// Sets a flag when stdin reaches end of file (the parent closed it, or died).
fn stop_on_stdin_eof() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::stdin().lock().read_line(&mut line).is_ok_and(|n| n > 0) {
            line.clear();
        }
        flag.store(true, Ordering::Relaxed);
    });
    stop
}

// ---------------------------------------------------------------------------------------------
// Server

fn serve(listen: SocketAddr, threads: usize) {
    let listener = TcpListener::bind(listen).unwrap_or_else(|e| fail(&format!("bind tcp {listen}: {e}")));
    let listener = Arc::new(listener);
    for _ in 0..threads {
        let l = Arc::clone(&listener);
        std::thread::spawn(move || {
            loop {
                match l.accept() {
                    Ok((conn, _)) => handle(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
    }
    let udp = UdpSocket::bind(listen).unwrap_or_else(|e| fail(&format!("bind udp {listen}: {e}")));
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(&buf[..n], from);
            }
        }
    });
    println!("ready");
    let _ = std::io::stdout().flush();
    let stop = stop_on_stdin_eof();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Echoes until the peer closes; a connection that starts with `S` is a sink.
fn handle(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    let Ok(n) = conn.read(&mut buf) else { return };
    if n == 0 {
        return;
    }
    if buf[0] == b'S' {
        while conn.read(&mut buf).is_ok_and(|n| n > 0) {}
        return;
    }
    if conn.write_all(&buf[..n]).is_err() {
        return;
    }
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// One measurement: CLIENTS threads, a warm-up, then the measured window.
struct Run {
    /// Addresses to spread the clients' connections over (round robin).
    addrs: Vec<SocketAddr>,
    clients: usize,
    secs: f64,
    warmup: f64,
    peername: bool,
}

/// What one client thread saw in the measured window.
#[derive(Default)]
struct Tally {
    /// Latency of each operation, ns (empty for `stream`).
    latencies: Vec<u64>,
    /// Operations (or bytes, for `stream`).
    ops: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, e: &std::io::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
        // Do not spin on a persistent failure.
        std::thread::sleep(Duration::from_millis(1));
    }

    /// An operation that began at `t0` has just succeeded: counted, with its latency, unless it
    /// began before the window (warm-up).
    fn done(&mut self, win: Window, t0: Instant) {
        if t0 >= win.from {
            self.ops += 1;
            self.latencies.push(nanos(t0.elapsed()));
        }
    }
}

/// The window a client measures in: operations starting before `from` are warm-up.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    until: Instant,
}

/// A client thread: the run, its window and the thread's index.
type Client = fn(&Run, Window, usize) -> Tally;

impl Run {
    fn go(&self, client: Client) -> String {
        let start = Instant::now() + Duration::from_millis(20);
        let window = Window {
            from: start + Duration::from_secs_f64(self.warmup),
            until: start + Duration::from_secs_f64(self.warmup + self.secs),
        };
        let tallies: Vec<Tally> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.clients)
                .map(|k| {
                    s.spawn(move || {
                        std::thread::sleep(start.saturating_duration_since(Instant::now()));
                        client(self, window, k)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("client thread")).collect()
        });
        let mut all = Vec::new();
        let (mut ops, mut errors, mut first_error) = (0u64, 0u64, None);
        for t in tallies {
            all.extend(t.latencies);
            ops += t.ops;
            errors += t.errors;
            first_error = first_error.or(t.first_error);
        }
        all.sort_unstable();
        #[expect(clippy::cast_precision_loss, reason = "counts and nanoseconds far below 2^52")]
        let (rate, mean_us) = (
            ops as f64 / self.secs,
            if all.is_empty() { 0.0 } else { all.iter().sum::<u64>() as f64 / all.len() as f64 / 1e3 },
        );
        serde_json::json!({
            "ops": ops,
            "errors": errors,
            "first_error": first_error,
            "clients": self.clients,
            "secs": self.secs,
            "rate": rate,
            "mean_us": mean_us,
            "p50_us": percentile_us(&all, 0.50),
            "p90_us": percentile_us(&all, 0.90),
            "p99_us": percentile_us(&all, 0.99),
            "p999_us": percentile_us(&all, 0.999),
        })
        .to_string()
    }
}

#[expect(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "index math on a sorted sample"
)]
fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx] as f64 / 1e3
}

#[expect(clippy::cast_possible_truncation, reason = "a latency under 584 years")]
fn nanos(d: Duration) -> u64 {
    d.as_nanos() as u64
}

fn request() -> [u8; MSG] {
    let mut req = [b'x'; MSG];
    req[0] = b'E';
    req
}

/// TCP_CRR: connect, request, response, close; one latency per connection.
fn crr(run: &Run, win: Window, k: usize) -> Tally {
    let tally = Tally { latencies: Vec::with_capacity(1 << 16), ..Tally::default() };
    let req = request();
    let mut resp = [0u8; MSG];
    each_operation(run, win, k, tally, |to| {
        let mut s = TcpStream::connect(to)?;
        if run.peername {
            s.peer_addr()?;
        }
        s.set_nodelay(true)?;
        s.write_all(&req)?;
        s.read_exact(&mut resp)
    })
}

/// TCP_RR: request/response on one established connection per client.
fn rr(run: &Run, win: Window, k: usize) -> Tally {
    let mut tally = Tally { latencies: Vec::with_capacity(1 << 18), ..Tally::default() };
    let to = run.addrs[k % run.addrs.len()];
    let mut s = match TcpStream::connect(to).and_then(|s| s.set_nodelay(true).map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            tally.error(&e);
            return tally;
        }
    };
    let req = request();
    let mut resp = [0u8; MSG];
    loop {
        let t0 = Instant::now();
        if t0 >= win.until {
            let _ = s.shutdown(Shutdown::Both);
            return tally;
        }
        match s.write_all(&req).and_then(|()| s.read_exact(&mut resp)) {
            Ok(()) => tally.done(win, t0),
            Err(e) => {
                tally.error(&e);
                return tally;
            }
        }
    }
}

/// TCP_STREAM: bytes written into a sink over one connection per client (ops = bytes).
fn stream(run: &Run, win: Window, k: usize) -> Tally {
    let mut tally = Tally::default();
    let mut s = match TcpStream::connect(run.addrs[k % run.addrs.len()]) {
        Ok(s) => s,
        Err(e) => {
            tally.error(&e);
            return tally;
        }
    };
    let mut buf = vec![b'x'; 64 * 1024];
    buf[0] = b'S';
    if let Err(e) = s.write_all(&buf[..1]) {
        tally.error(&e);
        return tally;
    }
    loop {
        let now = Instant::now();
        if now >= win.until {
            return tally;
        }
        match s.write(&buf) {
            Ok(n) if now >= win.from => tally.ops += n as u64,
            Ok(_) => {}
            Err(e) => {
                tally.error(&e);
                return tally;
            }
        }
    }
}

/// Unconnected UDP: sendto the address, recvfrom the reply.
fn udp(run: &Run, win: Window, k: usize) -> Tally {
    let mut tally = Tally { latencies: Vec::with_capacity(1 << 16), ..Tally::default() };
    let bind: SocketAddr =
        if run.addrs[0].is_ipv4() { "0.0.0.0:0".parse() } else { "[::]:0".parse() }.expect("bind address");
    let s = match UdpSocket::bind(bind)
        .and_then(|s| s.set_read_timeout(Some(Duration::from_millis(200))).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => {
            tally.error(&e);
            return tally;
        }
    };
    let req = request();
    let mut buf = [0u8; 2048];
    each_operation(run, win, k, tally, |to| s.send_to(&req, to).and_then(|_| s.recv_from(&mut buf)).map(drop))
}

/// The loop of the clients that address each operation anew (crr, udp): `op` back to back until
/// the window closes, each to the next address round robin (client `k` starts at the k-th),
/// timed and counted by [`Tally::done`]; an error is counted and the loop goes on.
fn each_operation(
    run: &Run,
    win: Window,
    k: usize,
    mut tally: Tally,
    mut op: impl FnMut(SocketAddr) -> std::io::Result<()>,
) -> Tally {
    let mut next = k;
    loop {
        let t0 = Instant::now();
        if t0 >= win.until {
            return tally;
        }
        let to = run.addrs[next % run.addrs.len()];
        next += 1;
        match op(to) {
            Ok(()) => tally.done(win, t0),
            Err(e) => tally.error(&e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Probe

fn probe(addr: SocketAddr, interval: Duration, max_secs: f64, every: bool) {
    let stop = stop_on_stdin_eof();
    let deadline = Instant::now() + Duration::from_secs_f64(max_secs);
    let mut last = String::new();
    let mut out = std::io::stdout().lock();
    writeln!(out, "started").expect("stdout");
    out.flush().expect("stdout");
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let t0 = tagger_tests::monotonic_ns();
        let reply = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut r = String::new();
                s.read_to_string(&mut r)?;
                Ok(r.trim_end().to_owned())
            })
            .unwrap_or_else(|e| format!("error: {e}"));
        if every || reply != last {
            writeln!(out, "{t0}\t{reply}").expect("stdout");
            out.flush().expect("stdout");
            last = reply;
        }
        std::thread::sleep(interval);
    }
}
