//! Backends: a thread per backend, inside the backend pod's network namespace, answering every
//! TCP connection and UDP datagram on its port with its identity line.

use std::{
    io::Write as _,
    net::{TcpListener, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use crate::topology::Pod;

/// A running backend; stops on drop.
#[derive(Debug)]
pub struct BackendServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BackendServer {
    /// Serves `identity` on TCP and UDP `port`, IPv4 and IPv6, inside the pod.
    #[must_use]
    pub fn start(pod: &Pod, identity: &str, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reply = format!("{identity}\n").into_bytes();
        let ns_path = pod.ns.path();
        let stop2 = Arc::clone(&stop);
        let ns_name = pod.ns.name().to_owned();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns_path).expect("open netns");
            // SAFETY: setns on a valid netns fd moves only this thread.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns {ns_name}");
            // [::] with IPV6_V6ONLY off (Linux default) also accepts IPv4.
            let tcp = TcpListener::bind(("::", port)).expect("bind tcp");
            let udp = UdpSocket::bind(("::", port)).expect("bind udp");
            tcp.set_nonblocking(true).expect("nonblocking");
            udp.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            serve(&tcp, &udp, &reply, &stop2);
        });
        ready_rx.recv().expect("backend thread failed to start");
        Self { stop, thread: Some(thread) }
    }
}

/// A stand-in for the cluster's own Service implementation (kube-proxy) as one pod sees it: `vip`
/// becomes a local address of the pod's network namespace, answered there as `identity` (TCP and
/// UDP). Only a connection the datapath left untouched reaches it; a steered one goes to its
/// backend.
#[must_use]
pub fn service_stand_in(pod: &Pod, vip: std::net::SocketAddr, identity: &str) -> BackendServer {
    let prefix = if vip.is_ipv4() { 32 } else { 128 };
    pod.ns.ip(&["addr", "add", &format!("{}/{prefix}", vip.ip()), "dev", "lo"]);
    BackendServer::start(pod, identity, vip.port())
}

fn serve(tcp: &TcpListener, udp: &UdpSocket, reply: &[u8], stop: &AtomicBool) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [
            libc::pollfd { fd: tcp.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: udp.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) };
        while let Ok((mut s, _)) = tcp.accept() {
            let _ = s.set_nonblocking(false);
            let _ = s.write_all(reply);
        }
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(reply, from);
        }
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
