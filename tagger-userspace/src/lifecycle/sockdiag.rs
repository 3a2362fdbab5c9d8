//! Destroying sockets with netlink `SOCK_DIAG` (`SOCK_DESTROY`, kernel `CONFIG_INET_DIAG_DESTROY`),
//! from inside a network namespace. The kernel aborts the socket: a TCP peer gets a RST and the
//! application's next call fails with `ECONNABORTED`; a UDP socket reports `ECONNABORTED`.
//!
//! Sockets are found by dumping the namespace's TCP and UDP sockets and matching their cookies
//! (the same cookie `bpf_get_socket_cookie` returns), so only the sockets asked for are touched.
//!
//! A socket asked for *when idle* is destroyed only if the dump shows it idle: empty receive and
//! send queues (for TCP the send queue counts every byte not yet acknowledged) and, for TCP,
//! nothing unacknowledged in `tcp_info` and no request waiting for its answer (the last data
//! was received no earlier than the last data was sent). Otherwise it is reported busy and
//! left alone, for the caller to retry.

use std::{
    collections::BTreeSet,
    fs::File,
    io,
    mem::size_of,
    os::fd::{AsFd as _, OwnedFd},
    time::Duration,
};

use crate::sys;

const NETLINK_SOCK_DIAG: i32 = 4;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// `inet_diag_req_v2::idiag_ext` bit asking for `INET_DIAG_INFO` (`tcp_info` for TCP).
const EXT_INFO: u8 = 1 << (INET_DIAG_INFO - 1);
const INET_DIAG_INFO: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Request {
    hdr: NlMsgHdr,
    req: ReqV2,
}

/// One socket found in a dump.
#[derive(Clone, Copy, Debug)]
struct Found {
    family: u8,
    protocol: u8,
    id: SockId,
    idle: bool,
}

/// The fields of the kernel's `struct tcp_info` that idleness reads, by byte offset.
mod tcp_info {
    pub const UNACKED: usize = 24;
    pub const LAST_DATA_SENT: usize = 44;
    pub const LAST_DATA_RECV: usize = 52;
    pub const MIN_LEN: usize = 56;
}

/// Whether a dumped socket is idle: see the module documentation. `attrs` are the netlink
/// attributes after the `inet_diag_msg`.
fn is_idle(msg: &DiagMsg, protocol: u8, attrs: &[u8]) -> bool {
    if msg.rqueue != 0 || msg.wqueue != 0 {
        return false;
    }
    if protocol != tagger_common::IPPROTO_TCP {
        return true;
    }
    let Some(info) = attribute(attrs, INET_DIAG_INFO).filter(|i| i.len() >= tcp_info::MIN_LEN) else {
        // No tcp_info (a socket in a state without one): the queues said idle.
        return true;
    };
    let word = |at: usize| u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]]);
    // `last_data_*` are milliseconds ago: a smaller "sent" means sent after the last receive.
    word(tcp_info::UNACKED) == 0 && word(tcp_info::LAST_DATA_RECV) <= word(tcp_info::LAST_DATA_SENT)
}

/// The payload of the first netlink attribute of type `kind` in `attrs`.
fn attribute(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == kind {
            return Some(&attrs[4..len]);
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    None
}

impl SockId {
    fn cookie(&self) -> u64 {
        u64::from(self.cookie[0]) | (u64::from(self.cookie[1]) << 32)
    }
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a repr(C) struct of integers without implicit padding (checked by the
    // size assertions in the tests), so all its bytes are initialised.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
}

/// A `NETLINK_SOCK_DIAG` socket in the calling thread's network namespace.
struct Diag {
    fd: OwnedFd,
    seq: u32,
}

impl Diag {
    fn open() -> io::Result<Self> {
        let fd = sys::socket_with_recv_timeout(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM,
            NETLINK_SOCK_DIAG,
            Duration::from_secs(1),
        )?;
        Ok(Self { fd, seq: 0 })
    }

    fn send(&mut self, kind: u16, flags: u16, req: ReqV2) -> io::Result<u32> {
        self.seq += 1;
        let msg = Request {
            hdr: NlMsgHdr {
                len: u32::try_from(size_of::<Request>()).unwrap_or(0),
                kind,
                flags: NLM_F_REQUEST | flags,
                seq: self.seq,
                pid: 0,
            },
            req,
        };
        let bytes = as_bytes(&msg);
        // To the kernel: a netlink socket's default destination (pid 0) needs no address.
        crate::sys::send(self.fd.as_fd(), bytes)?;
        Ok(self.seq)
    }

    /// Reads replies to `seq` until DONE or an error/ack; calls `each` on every message body.
    fn receive(&self, seq: u32, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = sys::recv(self.fd.as_fd(), &mut buf)?;
            let mut off = 0;
            while off + size_of::<NlMsgHdr>() <= n {
                // SAFETY: at least a header's bytes remain; read unaligned.
                let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                let len = hdr.len as usize;
                if len < size_of::<NlMsgHdr>() || off + len > n {
                    return Err(io::Error::other("truncated netlink message"));
                }
                let body = &buf[off + size_of::<NlMsgHdr>()..off + len];
                if hdr.seq == seq {
                    match hdr.kind {
                        NLMSG_DONE => return Ok(()),
                        NLMSG_ERROR => {
                            let err =
                                body.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                            return if err == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-err)) };
                        }
                        _ => each(body),
                    }
                }
                off += (len + 3) & !3;
            }
        }
    }

    fn dump(&mut self, family: u8, protocol: u8, out: &mut Vec<Found>) -> io::Result<()> {
        let req = ReqV2 { family, protocol, ext: EXT_INFO, states: u32::MAX, ..ReqV2::default() };
        let seq = self.send(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, req)?;
        self.receive(seq, |body| {
            if body.len() >= size_of::<DiagMsg>() {
                // SAFETY: a full inet_diag_msg; read unaligned.
                let msg: DiagMsg = unsafe { std::ptr::read_unaligned(body.as_ptr().cast()) };
                let idle = is_idle(&msg, protocol, &body[size_of::<DiagMsg>()..]);
                out.push(Found { family: msg.family, protocol, id: msg.id, idle });
            }
        })
    }

    fn destroy(&mut self, s: &Found) -> io::Result<()> {
        let req =
            ReqV2 { family: s.family, protocol: s.protocol, states: u32::MAX, id: s.id, ..ReqV2::default() };
        let seq = self.send(SOCK_DESTROY, NLM_F_ACK, req)?;
        self.receive(seq, |_| {})
    }
}

/// What a destroy pass did with the sockets asked for (sockets not found are in neither list:
/// they are closed already, or in another namespace).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Destroyed {
    /// Cookies destroyed.
    pub done: Vec<u64>,
    /// Cookies asked for when idle, found busy and left alone.
    pub busy: Vec<u64>,
}

/// Destroys the TCP and UDP sockets of the calling thread's network namespace whose cookies are
/// in `cookies`; those in `when_idle` only if they are idle.
fn destroy_here(cookies: &BTreeSet<u64>, when_idle: &BTreeSet<u64>) -> io::Result<Destroyed> {
    let mut diag = Diag::open()?;
    let mut found = Vec::new();
    for protocol in [tagger_common::IPPROTO_TCP, tagger_common::IPPROTO_UDP] {
        for family in [AF_INET, AF_INET6] {
            diag.dump(family, protocol, &mut found)?;
        }
    }
    let mut out = Destroyed::default();
    for s in found.iter().filter(|s| cookies.contains(&s.id.cookie())) {
        let cookie = s.id.cookie();
        if !s.idle && when_idle.contains(&cookie) {
            out.busy.push(cookie);
            continue;
        }
        match diag.destroy(s) {
            Ok(()) => out.done.push(cookie),
            // Closed meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Destroys the sockets with these cookies inside the network namespace `netns`, those in
/// `when_idle` only if idle.
pub fn destroy_in(netns: &File, cookies: &BTreeSet<u64>, when_idle: &BTreeSet<u64>) -> io::Result<Destroyed> {
    in_netns(netns, || destroy_here(cookies, when_idle))
}

/// Whether `SOCK_DESTROY` works inside the network namespace `netns`: entering it (`setns`,
/// `CAP_SYS_ADMIN`), then [`probe`] there (`CAP_NET_ADMIN`, a kernel with
/// `CONFIG_INET_DIAG_DESTROY`). Nothing is destroyed.
pub fn probe_in(netns: &File) -> io::Result<()> {
    in_netns(netns, probe)
}

/// Runs `f` on a short-lived thread inside the network namespace `netns`, so the caller's
/// namespace never changes. A failed `setns` is returned as it is (`EPERM`: no
/// `CAP_SYS_ADMIN`).
fn in_netns<T: Send>(netns: &File, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Err(e) = sys::enter_netns(netns.as_fd()) {
                return Err(io::Error::new(e.kind(), format!("entering the network namespace (setns): {e}")));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("socket destroy thread panicked")))
    })
}

/// Whether `SOCK_DESTROY` works in the calling thread's namespace, for real: binds a UDP socket
/// there (an unused port, for an instant; nothing can reach it meaningfully), finds it in the
/// socket dump as a reset finds its sockets, and destroys it. A lookup of a socket that does
/// not exist would not do: the kernel checks `CAP_NET_ADMIN` only once it has found one.
/// `EOPNOTSUPP`: a kernel without `CONFIG_INET_DIAG_DESTROY`; `EPERM`: no `CAP_NET_ADMIN`.
fn probe() -> io::Result<()> {
    let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
    let cookie = sys::socket_cookie(sock.as_fd())?;
    let mut diag = Diag::open()?;
    let mut found = Vec::new();
    diag.dump(AF_INET, tagger_common::IPPROTO_UDP, &mut found)?;
    let own = found
        .iter()
        .find(|s| s.id.cookie() == cookie)
        .ok_or_else(|| io::Error::other("the probe's own UDP socket is missing from the socket dump"))?;
    diag.destroy(own)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel_abi() {
        assert_eq!(size_of::<NlMsgHdr>(), 16);
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<ReqV2>(), 56);
        assert_eq!(size_of::<DiagMsg>(), 72);
        assert_eq!(size_of::<Request>(), 72);
    }

    #[test]
    fn family_constants_match_libc() {
        assert_eq!(i32::from(AF_INET), libc::AF_INET);
        assert_eq!(i32::from(AF_INET6), libc::AF_INET6);
    }

    #[test]
    fn idleness_reads_queues_unacked_and_the_last_exchange() {
        let msg = DiagMsg::default();
        let tcp = tagger_common::IPPROTO_TCP;
        let info = |unacked: u32, sent_ago: u32, recv_ago: u32| {
            let len = 4 + tcp_info::MIN_LEN;
            let mut attr = vec![0u8; len];
            attr[..2].copy_from_slice(&u16::try_from(len).unwrap().to_ne_bytes());
            attr[2..4].copy_from_slice(&INET_DIAG_INFO.to_ne_bytes());
            attr[4 + tcp_info::UNACKED..][..4].copy_from_slice(&unacked.to_ne_bytes());
            attr[4 + tcp_info::LAST_DATA_SENT..][..4].copy_from_slice(&sent_ago.to_ne_bytes());
            attr[4 + tcp_info::LAST_DATA_RECV..][..4].copy_from_slice(&recv_ago.to_ne_bytes());
            attr
        };
        // Answer received after the request: idle.
        assert!(is_idle(&msg, tcp, &info(0, 100, 50)));
        // Request sent after the last answer: waiting for one.
        assert!(!is_idle(&msg, tcp, &info(0, 50, 100)));
        assert!(!is_idle(&msg, tcp, &info(1, 100, 50)));
        assert!(!is_idle(&DiagMsg { wqueue: 10, ..msg }, tcp, &info(0, 100, 50)));
        assert!(!is_idle(&DiagMsg { rqueue: 1, ..msg }, tagger_common::IPPROTO_UDP, &[]));
        assert!(is_idle(&msg, tagger_common::IPPROTO_UDP, &[]));
        assert!(is_idle(&msg, tcp, &[]));
    }

    #[test]
    fn cookie_words_are_low_then_high() {
        let id = SockId { cookie: [0x1234_5678, 0x9], ..SockId::default() };
        assert_eq!(id.cookie(), 0x9_1234_5678);
    }
}
