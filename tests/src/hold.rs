//! A backend that holds connections open: each TCP connection gets the identity line and then
//! stays open until the server stops (or the peer goes); each UDP datagram gets the identity.
//! For lifecycle tests, where a long-lived connection must outlive its backend's removal.

use std::{
    io::Write as _,
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::topology::Pod;

/// A running holding backend; stops (closing every held connection) on drop.
#[derive(Debug)]
pub struct HoldServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HoldServer {
    /// Serves `identity` on TCP and UDP `port` (IPv4 and IPv6) inside the pod.
    #[must_use]
    pub fn start(pod: &Pod, identity: &str, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reply = format!("{identity}\n").into_bytes();
        let ns_path = pod.ns.path();
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns_path).expect("open netns");
            // SAFETY: setns on a valid netns fd moves only this thread.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let tcp = TcpListener::bind(("::", port)).expect("bind tcp");
            let udp = UdpSocket::bind(("::", port)).expect("bind udp");
            tcp.set_nonblocking(true).expect("nonblocking");
            udp.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            let mut held: Vec<TcpStream> = Vec::new();
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::Relaxed) {
                while let Ok((mut s, _)) = tcp.accept() {
                    let _ = s.write_all(&reply);
                    held.push(s);
                }
                while let Ok((_, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&reply, from);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        ready_rx.recv().expect("hold server failed to start");
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for HoldServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A sandboxed node with services `a` (`vip`, the backends' ordinary port) and `h` (`hold_vip`,
/// `hold_port`), each with a base (`a-base`) and a gray (`a-gray`) backend, and a gray caller
/// `gw`; with the holding servers of `h`, which stop when dropped.
#[must_use]
pub fn gray_node_with_held_service(
    vip: std::net::SocketAddr,
    hold_vip: std::net::SocketAddr,
    hold_port: u16,
) -> (crate::agent::AgentSandbox, Vec<HoldServer>) {
    let mut sb = crate::agent::AgentSandbox::new();
    sb.backend("a-base", None);
    sb.backend("a-gray", Some("gray"));
    sb.caller("gw", Some("gray"));
    let backends = ["a-base", "a-gray"];
    sb.cluster.service("a", &[vip.ip()], vip.port(), crate::agent::PORT, &backends);
    sb.cluster.service("h", &[hold_vip.ip()], hold_vip.port(), hold_port, &backends);
    let servers = backends.iter().map(|n| HoldServer::start(&sb.netns[*n], n, hold_port)).collect();
    (sb, servers)
}
