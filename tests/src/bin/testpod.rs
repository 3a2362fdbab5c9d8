//! `testpod`: a client process for the kernel tests. It joins a pod's cgroup (so the datapath
//! sees it as that pod), then the pod's network namespace, then makes real connections and
//! prints one line per attempt:
//!
//! ```text
//! ok <TAB> <reply line> <TAB> <peer address seen by the application>
//! err <TAB> <errno> <TAB> <message>
//! ```
//!
//! Usage: `testpod --cgroup DIR --netns NAME (tcp|udp|udp-connected) ADDR COUNT`
//!        `testpod --cgroup DIR --netns NAME tcp-loop ADDR` (until stdin closes; then a summary)
//!        `testpod --cgroup DIR --netns NAME http ADDR COUNT [--header NAME:VALUE]` (HTTP/1.0 GETs,
//!        with that request header if given; the body is the reply)
//!        `testpod --cgroup DIR --netns NAME serve LISTEN_ADDR NAME LANE [NEXT_ADDR]` (an HTTP
//!        server answering `NAME[LANE]`, or `NAME[LANE] -> <what NEXT_ADDR answered>`: a
//!        service that calls the next one, from inside its pod)
//!        `testpod --cgroup DIR --netns NAME (hold-tcp|hold-udp|hold-udp-unconnected) ADDR` (holds one
//!        connection open; prints `ok` lines as above on connect, `closed <TAB> <errno>` when it
//!        fails, and reconnects; runs until killed)
//!        `testpod --cgroup DIR --netns NAME peer-tcp ADDR` (one TCP connection: an `ok` line as
//!        above, then `peer <TAB> <getpeername>` for every line read from stdin, until it closes)
//!        `testpod --cgroup DIR --netns NAME pool ADDR` (one pooled HTTP/1.1 keep-alive connection,
//!        a request every 20 ms, reconnecting when the connection is reset; prints
//!        `<ms since start> <TAB> ok|reset <TAB> <body or error>` whenever that changes, until
//!        stdin closes)
//!        `testpod --cgroup DIR --netns NAME rollout-serve LISTEN_ADDR NAME` (an HTTP/1.1 keep-alive
//!        server that drains gracefully when stdin gives a line) and `... rollout-pool ADDR CONNS`
//!        (CONNS keep-alive clients until stdin closes, then a summary): see `tagger_tests::rollout`
//!        `testpod --cgroup DIR --netns NAME exec PROGRAM [ARGS...]` (runs a program inside the pod,
//!        as a container runtime would: it replaces testpod, so its pid is the one the caller
//!        spawned and can stop)
//!        `testpod install BPFFS_DIR CGROUP_DIR` (installs or adopts the datapath, then exits)

use std::{
    io::{BufRead as _, Read as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("install") {
        let (bpffs, cgroup) = (Path::new(&args[1]), Path::new(&args[2]));
        match tagger::datapath::Datapath::install(bpffs, cgroup) {
            Ok((_, installed)) => println!("{installed:?}"),
            Err(e) => {
                eprintln!("install: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let [flag_cg, cgroup, flag_ns, netns, mode, target, rest @ ..] = args.as_slice() else {
        eprintln!("usage: testpod --cgroup DIR --netns NAME MODE ADDR [COUNT]");
        std::process::exit(2);
    };
    assert_eq!((flag_cg.as_str(), flag_ns.as_str()), ("--cgroup", "--netns"), "bad flags");
    // Cgroup first: inside the new network namespace's private mount namespace
    // (`ip netns exec`) the cgroup2 tree might not be visible; with setns it is, but the order
    // keeps both ways right.
    std::fs::write(Path::new(cgroup).join("cgroup.procs"), b"0").expect("join cgroup");
    let ns = std::fs::File::open(Path::new("/var/run/netns").join(netns)).expect("open netns");
    // SAFETY: setns with a valid netns fd; this process is single-threaded here.
    assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
    if mode == "exec" {
        let e = std::os::unix::process::CommandExt::exec(std::process::Command::new(target).args(rest));
        eprintln!("testpod: cannot run {target}: {e}");
        std::process::exit(127);
    }
    let addr: SocketAddr = target.parse().expect("ADDR");
    let count = || -> usize { rest.first().map_or(1, |c| c.parse().expect("COUNT")) };
    let mut out = std::io::stdout().lock();
    match mode.as_str() {
        "tcp" => (0..count()).for_each(|_| report(&mut out, tcp_once(addr))),
        "udp" => (0..count()).for_each(|_| report(&mut out, udp_once(addr, false))),
        "udp-connected" => (0..count()).for_each(|_| report(&mut out, udp_once(addr, true))),
        "tcp-loop" => tcp_loop(&mut out, addr),
        "http" => {
            let header = match rest.get(1..).unwrap_or_default() {
                [] => None,
                [flag, header] if flag == "--header" => {
                    Some(header.split_once(':').expect("--header NAME:VALUE"))
                }
                other => panic!("http: unexpected arguments {other:?}"),
            };
            (0..count()).for_each(|_| report(&mut out, http_once(addr, header)));
        }
        "serve" => serve(addr, rest),
        "answer" => answer(addr, rest),
        "pool" => pool(&mut out, addr),
        "rollout-serve" => {
            tagger_tests::rollout::serve(addr, rest.first().expect("rollout-serve needs NAME"));
        }
        "rollout-pool" => tagger_tests::rollout::pool(addr, count()),
        "hold-tcp" | "hold-udp" | "hold-udp-unconnected" => hold(&mut out, mode, addr),
        "peer-tcp" => peer_tcp(&mut out, addr),
        other => panic!("unknown mode {other}"),
    }
}

fn report(out: &mut impl std::io::Write, r: std::io::Result<(String, SocketAddr)>) {
    match r {
        Ok((reply, peer)) => writeln!(out, "ok\t{reply}\t{peer}").expect("stdout"),
        Err(e) => writeln!(out, "err\t{}\t{e}", e.raw_os_error().unwrap_or(0)).expect("stdout"),
    }
}

fn tcp_once(addr: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let peer = s.peer_addr()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok((reply.trim_end().to_owned(), peer))
}

/// Connects and reads the reply line, keeping the connection.
fn tcp_connect(addr: SocketAddr) -> std::io::Result<(String, SocketAddr, TcpStream)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let peer = s.peer_addr()?;
    let mut reply = String::new();
    std::io::BufReader::new(&s).read_line(&mut reply)?;
    Ok((reply.trim_end().to_owned(), peer, s))
}

/// One HTTP/1.0 GET (with `header` as `(name, value)` if given); the body. The answer may come
/// as HTTP/1.1 (a proxy such as nginx answers in its own version), as long as it is a 200.
fn http_once(addr: SocketAddr, header: Option<(&str, &str)>) -> std::io::Result<(String, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let peer = s.peer_addr()?;
    let extra = header.map(|(name, value)| format!("{name}: {value}\r\n")).unwrap_or_default();
    let request = format!("GET / HTTP/1.0\r\nHost: tagger-demo\r\n{extra}\r\n");
    std::io::Write::write_all(&mut s, request.as_bytes())?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("not HTTP"))?;
    if head.split_whitespace().nth(1) != Some("200") {
        return Err(std::io::Error::other(format!("HTTP error: {}", head.lines().next().unwrap_or(""))));
    }
    Ok((body.trim_end().to_owned(), peer))
}

/// An HTTP/1.0 server answering with its name and lane, after calling `next` if given.
fn serve(listen: SocketAddr, rest: &[String]) {
    let [name, lane, next @ ..] = rest else { panic!("serve needs NAME LANE [NEXT_ADDR]") };
    let me = format!("{name}[{lane}]");
    let next: Option<SocketAddr> = next.first().map(|n| n.parse().expect("NEXT_ADDR"));
    let listener = std::net::TcpListener::bind(listen).expect("bind");
    println!("serving");
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let me = me.clone();
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            // One request per read (the clients send each request in one write); HTTP/1.1
            // requests keep the connection (a pooled client), HTTP/1.0 ones close it.
            let mut buf = [0u8; 1024];
            loop {
                let n = match std::io::Read::read(&mut conn, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let keep_alive = buf[..n].starts_with(b"GET / HTTP/1.1");
                let body = match next {
                    None => me.clone(),
                    // A new connection per request: each is steered by this pod's lane.
                    Some(next) => match http_once(next, None) {
                        Ok((downstream, _)) => format!("{me} -> {downstream}"),
                        Err(e) => format!("{me} -> error: {e}"),
                    },
                };
                let response = if keep_alive {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}\n",
                        body.len() + 1
                    )
                } else {
                    format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}\n")
                };
                if std::io::Write::write_all(&mut conn, response.as_bytes()).is_err() || !keep_alive {
                    return;
                }
            }
        });
    }
}

/// Answers every TCP connection with `NAME` and a newline, then closes it (the protocol of the
/// in-process backends, from a process inside a pod cgroup: the listener belongs to the pod).
/// Stops when stdin closes.
fn answer(listen: SocketAddr, rest: &[String]) {
    let [name, ..] = rest else { panic!("answer needs NAME") };
    let reply = format!("{name}\n");
    let listener = std::net::TcpListener::bind(listen).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = stop_on_stdin();
    println!("serving");
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                let _ = conn.set_nonblocking(false);
                let _ = std::io::Write::write_all(&mut conn, reply.as_bytes());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn udp_once(addr: SocketAddr, connected: bool) -> std::io::Result<(String, SocketAddr)> {
    let bind: SocketAddr =
        if addr.is_ipv4() { "0.0.0.0:0".parse() } else { "[::]:0".parse() }.expect("bind addr");
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 1500];
    let (n, from) = if connected {
        s.connect(addr)?;
        let peer = s.peer_addr()?;
        s.send(b"hi")?;
        let (n, from) = s.recv_from(&mut buf)?;
        if from != peer {
            return Err(std::io::Error::other(format!("reply from {from} but getpeername says {peer}")));
        }
        (n, from)
    } else {
        s.send_to(b"hi", addr)?;
        s.recv_from(&mut buf)?
    };
    Ok((String::from_utf8_lossy(&buf[..n]).trim_end().to_owned(), from))
}

/// Connects in a tight loop until stdin closes, then prints `done <ok> <failed>`, the distinct
/// failures and the distinct replies with their counts.
fn tcp_loop(out: &mut impl std::io::Write, addr: SocketAddr) {
    let stop = stop_on_stdin();
    writeln!(out, "started").expect("stdout");
    out.flush().expect("stdout");
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    let mut replies = std::collections::BTreeMap::<String, u64>::new();
    while !stop.load(Ordering::Relaxed) {
        match tcp_once(addr) {
            Ok((reply, _)) => {
                ok += 1;
                *replies.entry(reply).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                *errors.entry(e.to_string()).or_default() += 1;
            }
        }
    }
    writeln!(out, "done\t{ok}\t{failed}").expect("stdout");
    for (e, n) in errors {
        writeln!(out, "error\t{n}\t{e}").expect("stdout");
    }
    for (r, n) in replies {
        writeln!(out, "reply\t{n}\t{r}").expect("stdout");
    }
}

/// One TCP connection, asked for its peer address again whenever stdin says so: what
/// `getpeername` shows long after the connect.
fn peer_tcp(out: &mut impl std::io::Write, addr: SocketAddr) {
    let (reply, peer, s) = match tcp_connect(addr) {
        Ok(connected) => connected,
        Err(e) => {
            report(out, Err(e));
            return;
        }
    };
    report(out, Ok((reply, peer)));
    out.flush().expect("stdout");
    for _ in std::io::stdin().lock().lines() {
        match s.peer_addr() {
            Ok(p) => writeln!(out, "peer\t{p}").expect("stdout"),
            Err(e) => writeln!(out, "err\t{}\t{e}", e.raw_os_error().unwrap_or(0)).expect("stdout"),
        }
        out.flush().expect("stdout");
    }
}

/// Holds one connection open at a time, reporting each connect and each failure.
fn hold(out: &mut impl std::io::Write, mode: &str, addr: SocketAddr) {
    loop {
        let r = match mode {
            "hold-tcp" => hold_tcp(out, addr),
            _ => hold_udp(out, addr, mode == "hold-udp"),
        };
        if let Err(e) = r {
            writeln!(out, "closed\t{}\t{e}", e.raw_os_error().unwrap_or(0)).expect("stdout");
            out.flush().expect("stdout");
        }
    }
}

fn hold_tcp(out: &mut impl std::io::Write, addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    let peer = s.peer_addr()?;
    let mut line = String::new();
    std::io::BufReader::new(&mut s).read_line(&mut line)?;
    writeln!(out, "ok\t{}\t{peer}", line.trim_end()).expect("stdout");
    out.flush().expect("stdout");
    let mut buf = [0u8; 64];
    loop {
        if s.read(&mut buf)? == 0 {
            return Err(std::io::Error::other("closed by the peer"));
        }
    }
}

fn hold_udp(out: &mut impl std::io::Write, addr: SocketAddr, connected: bool) -> std::io::Result<()> {
    let bind: SocketAddr =
        if addr.is_ipv4() { "0.0.0.0:0".parse() } else { "[::]:0".parse() }.expect("bind addr");
    let s = UdpSocket::bind(bind)?;
    let mut buf = [0u8; 1500];
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let (n, peer) = if connected {
        s.connect(addr)?;
        s.send(b"hi")?;
        (s.recv(&mut buf)?, s.peer_addr()?)
    } else {
        s.send_to(b"hi", addr)?;
        s.recv_from(&mut buf)?
    };
    writeln!(out, "ok\t{}\t{peer}", String::from_utf8_lossy(&buf[..n]).trim_end()).expect("stdout");
    out.flush().expect("stdout");
    s.set_read_timeout(None)?;
    // Blocks until the socket fails (nothing else sends to it).
    loop {
        s.recv(&mut buf)?;
    }
}

/// One request on a kept-alive connection: the body, or the error that ended the connection.
fn pooled_request(s: &mut TcpStream) -> std::io::Result<String> {
    std::io::Write::write_all(s, b"GET / HTTP/1.1\r\nHost: tagger-demo\r\n\r\n")?;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = std::io::Read::read(s, &mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed by the peer"));
        }
        response.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&response);
        let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other("no Content-Length"))?;
        if body.len() >= len {
            return Ok(body.trim_end().to_owned());
        }
    }
}

/// Keeps one pooled connection to `addr`, a request every 20 ms, reconnecting after a reset,
/// until stdin closes; prints each change of outcome with the time since start.
fn pool(out: &mut impl std::io::Write, addr: SocketAddr) {
    let stop = stop_on_stdin();
    writeln!(out, "started").expect("stdout");
    out.flush().expect("stdout");
    let start = std::time::Instant::now();
    let mut conn: Option<TcpStream> = None;
    let mut last = String::new();
    while !stop.load(Ordering::Relaxed) {
        let outcome = match conn.as_mut() {
            None => match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    conn = Some(s);
                    continue;
                }
                Err(e) => format!("error\t{e}"),
            },
            Some(s) => match pooled_request(s) {
                Ok(body) => format!("ok\t{body}"),
                Err(e) => {
                    conn = None;
                    format!("reset\t{e}")
                }
            },
        };
        if outcome != last {
            writeln!(out, "{}\t{outcome}", start.elapsed().as_millis()).expect("stdout");
            out.flush().expect("stdout");
            last = outcome;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A flag set when stdin gives a line or closes (the test's signal to stop and report).
fn stop_on_stdin() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        flag.store(true, Ordering::Relaxed);
    });
    stop
}
