//! Runs `testpod` inside a pod's cgroup and network namespace and parses what it saw.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use crate::netns::Netns;

/// The outcome of one connection attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Connected (or got a UDP reply): the backend's identity and the peer address the
    /// application saw.
    Ok { reply: String, peer: SocketAddr },
    /// Failed with an errno.
    Err { errno: i32, message: String },
}

impl Attempt {
    /// The reply, or a panic naming the failure.
    #[must_use]
    pub fn reply(&self) -> &str {
        match self {
            Attempt::Ok { reply, .. } => reply,
            Attempt::Err { errno, message } => panic!("expected a reply, got errno {errno}: {message}"),
        }
    }
}

/// Path of the `testpod` binary built with these tests.
#[must_use]
pub fn testpod_bin() -> PathBuf {
    crate::agent::workspace_bin("testpod")
}

/// How the client talks to the address.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// TCP connect, read the reply, close.
    Tcp,
    /// Unconnected UDP: `sendto` then `recvfrom`.
    Udp,
    /// Connected UDP: `connect`, `send`, `recvfrom`.
    UdpConnected,
}

/// Makes `count` attempts to `addr` from inside the pod.
#[must_use]
pub fn attempts(cgroup: &Path, netns: &Netns, mode: Mode, addr: SocketAddr, count: usize) -> Vec<Attempt> {
    let mode = match mode {
        Mode::Tcp => "tcp",
        Mode::Udp => "udp",
        Mode::UdpConnected => "udp-connected",
    };
    run_attempts(cgroup, netns, &[mode, &addr.to_string(), &count.to_string()], count)
}

/// Makes `count` HTTP/1.0 GETs to `addr` from inside the pod, each on its own connection and
/// with the request header `header` (`(name, value)`) if given: a reply is the response body.
#[must_use]
pub fn http_attempts(
    cgroup: &Path,
    netns: &Netns,
    addr: SocketAddr,
    count: usize,
    header: Option<(&str, &str)>,
) -> Vec<Attempt> {
    let header = header.map(|(name, value)| format!("{name}:{value}"));
    let (addr, n) = (addr.to_string(), count.to_string());
    let mut args = vec!["http", addr.as_str(), n.as_str()];
    if let Some(h) = &header {
        args.extend(["--header", h.as_str()]);
    }
    run_attempts(cgroup, netns, &args, count)
}

/// Runs `testpod` with `args` (a mode that prints one line per attempt) inside the pod.
fn run_attempts(cgroup: &Path, netns: &Netns, args: &[&str], count: usize) -> Vec<Attempt> {
    let out = Command::new(testpod_bin())
        .args(["--cgroup", &cgroup.to_string_lossy(), "--netns", netns.name()])
        .args(args)
        .output()
        .expect("run testpod");
    assert!(out.status.success(), "testpod failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let attempts: Vec<Attempt> = text.lines().map(parse_line).collect();
    assert_eq!(attempts.len(), count, "testpod printed {text}");
    attempts
}

fn parse_line(line: &str) -> Attempt {
    let f: Vec<&str> = line.split('\t').collect();
    match f.as_slice() {
        ["ok", reply, peer] => Attempt::Ok { reply: (*reply).to_owned(), peer: peer.parse().expect("peer") },
        ["err", errno, message] => {
            Attempt::Err { errno: errno.parse().expect("errno"), message: (*message).to_owned() }
        }
        _ => panic!("unexpected testpod line {line:?}"),
    }
}

/// A client connecting in a tight loop until [`LoopClient::finish`].
#[derive(Debug)]
pub struct LoopClient {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

/// What a loop client counted.
#[derive(Debug)]
pub struct LoopSummary {
    /// Successful connections.
    pub ok: u64,
    /// Failed connections.
    pub failed: u64,
    /// Distinct errors and their counts.
    pub errors: Vec<String>,
    /// Replies (backend identities) and their counts.
    pub replies: std::collections::BTreeMap<String, u64>,
}

impl LoopClient {
    /// Starts the loop and waits until it runs.
    #[must_use]
    pub fn start(cgroup: &Path, netns: &Netns, addr: SocketAddr) -> Self {
        let mut child = Command::new(testpod_bin())
            .args([
                "--cgroup",
                &cgroup.to_string_lossy(),
                "--netns",
                netns.name(),
                "tcp-loop",
                &addr.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn testpod");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "started", "testpod loop did not start");
        Self { child, stdin, stdout }
    }

    /// Stops the loop and returns its counts.
    #[must_use]
    pub fn finish(mut self) -> LoopSummary {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"\n");
        }
        let mut summary =
            LoopSummary { ok: 0, failed: 0, errors: Vec::new(), replies: std::collections::BTreeMap::new() };
        let mut line = String::new();
        while self.stdout.read_line(&mut line).expect("read") > 0 {
            let f: Vec<&str> = line.trim_end().split('\t').collect();
            match f.as_slice() {
                ["done", ok, failed] => {
                    summary.ok = ok.parse().expect("ok");
                    summary.failed = failed.parse().expect("failed");
                }
                ["error", n, e] => summary.errors.push(format!("{n} x {e}")),
                ["reply", n, r] => {
                    summary.replies.insert((*r).to_owned(), n.parse().expect("count"));
                }
                _ => panic!("unexpected testpod line {line:?}"),
            }
            line.clear();
        }
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "testpod loop exited with {status}");
        summary
    }
}

impl Drop for LoopClient {
    fn drop(&mut self) {
        // Only our own child, by its pid, and only if finish() did not reap it.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A client holding one connection open at a time (`testpod ... hold-tcp|hold-udp|hold-udp-unconnected
/// ADDR`): it prints `ok <reply> <peer>` when connected, `closed <errno>` when the connection
/// fails, then reconnects. Lines arrive on a channel, so tests can wait with a deadline.
#[derive(Debug)]
pub struct HoldClient {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl HoldClient {
    /// Starts the client (`mode`: `hold-tcp`, `hold-udp` or `hold-udp-unconnected`).
    #[must_use]
    pub fn start(cgroup: &Path, netns: &Netns, mode: &str, addr: SocketAddr) -> Self {
        Self::start_with(cgroup, netns, mode, addr, &[])
    }

    /// Starts testpod in `mode` with extra arguments after the address (e.g. `answer ADDR NAME`).
    #[must_use]
    pub fn start_with(cgroup: &Path, netns: &Netns, mode: &str, addr: SocketAddr, extra: &[&str]) -> Self {
        let mut child = Command::new(testpod_bin())
            .args(["--cgroup", &cgroup.to_string_lossy(), "--netns", netns.name(), mode, &addr.to_string()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn testpod");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line within `timeout`, if any.
    #[must_use]
    pub fn next_line(&self, timeout: std::time::Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Waits up to `timeout` for a line starting with `prefix`; returns it.
    #[must_use]
    pub fn wait_line(&self, prefix: &str, timeout: std::time::Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            let line = self.next_line(left)?;
            if line.starts_with(prefix) {
                return Some(line);
            }
        }
    }

    /// Writes one line to its stdin.
    pub fn tell(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to testpod");
        stdin.flush().expect("flush testpod's stdin");
    }

    /// Closes its stdin and returns every line it prints until it exits (within `timeout`).
    #[must_use]
    pub fn finish(mut self, timeout: std::time::Duration) -> Vec<String> {
        drop(self.child.stdin.take());
        let deadline = std::time::Instant::now() + timeout;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(line),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for HoldClient {
    fn drop(&mut self) {
        // Only our own child, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
