//! Packet capture inside a test pod's network namespace with an `AF_PACKET` socket: what the
//! pod's interface received, parsed just enough to check TCP SYN options.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::topology::Pod;

/// A TCP SYN (without ACK) seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Syn {
    /// Destination port.
    pub dport: u16,
    /// The TCP options, raw (kind, then the bytes of the option from its kind on).
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Syn {
    /// The option of this kind, from its kind byte on.
    #[must_use]
    pub fn option(&self, kind: u8) -> Option<&[u8]> {
        self.options.iter().find(|(k, _)| *k == kind).map(|(_, b)| b.as_slice())
    }
}

/// A running capture; stops on drop.
#[derive(Debug)]
pub struct Capture {
    frames: Receiver<Vec<u8>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    /// Captures every frame of the pod's namespace from now on.
    #[must_use]
    pub fn start(pod: &Pod) -> Self {
        let ns_path = pod.ns.path();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let (tx, frames) = channel();
        let (ready_tx, ready_rx) = channel();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns_path).expect("open netns");
            // SAFETY: setns on a valid netns fd moves only this thread.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            #[expect(clippy::cast_possible_truncation, reason = "ETH_P_ALL fits in u16")]
            let proto = i32::from((libc::ETH_P_ALL as u16).to_be());
            // The timeout lets the loop below see `stop` on a quiet interface.
            let fd = tagger::sys::socket_with_recv_timeout(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                proto,
                Duration::from_millis(20),
            )
            .unwrap_or_else(|e| panic!("AF_PACKET socket: {e}"));
            ready_tx.send(()).expect("ready");
            let mut buf = vec![0u8; 65_536];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok(n) = tagger::sys::recv(fd.as_fd(), &mut buf)
                    && tx.send(buf[..n].to_vec()).is_err()
                {
                    break;
                }
            }
        });
        ready_rx.recv().expect("capture thread failed to start");
        Self { frames, stop, thread: Some(thread) }
    }

    /// Every frame captured within `wait`, raw (Ethernet first).
    #[must_use]
    pub fn frames(&self, wait: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(frame) = self.frames.recv_timeout(left) else { break };
            out.push(frame);
        }
        out
    }

    /// The IPv4 TCP SYNs to `dport` captured within `wait`.
    #[must_use]
    pub fn syns(&self, dport: u16, wait: Duration) -> Vec<Syn> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(frame) = self.frames.recv_timeout(left) else { break };
            if let Some(syn) = parse_syn(&frame)
                && syn.dport == dport
            {
                out.push(syn);
            }
        }
        out
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An Ethernet + IPv4 + TCP SYN (no ACK), or None.
fn parse_syn(f: &[u8]) -> Option<Syn> {
    if f.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = f.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != 6 {
        return None;
    }
    let tcp = ip.get(ihl..)?;
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let flags = *tcp.get(13)?;
    if flags & 0x12 != 0x02 {
        return None;
    }
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    let mut opts = tcp.get(20..doff)?;
    let mut options = Vec::new();
    while let Some(&kind) = opts.first() {
        match kind {
            0 => break,
            1 => opts = &opts[1..],
            _ => {
                let len = usize::from(*opts.get(1)?);
                if len < 2 {
                    return None;
                }
                options.push((kind, opts.get(..len)?.to_vec()));
                opts = opts.get(len..)?;
            }
        }
    }
    Some(Syn { dport, options })
}
