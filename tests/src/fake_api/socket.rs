//! The server's sockets. Every one is bound with `SO_REUSEPORT`, so while the server refuses
//! connections a bound socket that does not listen keeps its port, and listening again binds a
//! new listener beside it before the placeholder closes: the port is never free in between, so
//! no other socket of the machine can take it (tests run in parallel threads of one process,
//! each binding ephemeral ports), and coming back cannot fail. A bound socket that does not
//! listen refuses connections (the kernel answers the SYN with a reset).
//!
//! Sockets are made in the server's network namespace, by a thread that enters it.

use std::{
    fs::File,
    io,
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// Where the server's sockets are made and what they bind to.
#[derive(Debug)]
pub(crate) struct Binder {
    /// The server's network namespace (`None`: this process's).
    pub(crate) netns: Option<File>,
}

impl Binder {
    /// A socket bound to `addr` (port 0: an ephemeral one), listening or not.
    pub(crate) fn bind(&self, addr: SocketAddr, listen: bool) -> io::Result<TcpListener> {
        let Some(ns) = &self.netns else { return bind(addr, listen) };
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this scoped thread only, with an open namespace descriptor.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                bind(addr, listen)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the binding thread panicked")))
        })
    }
}

fn bind(addr: SocketAddr, listen: bool) -> io::Result<TcpListener> {
    let SocketAddr::V4(v4) = addr else {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "the fake API server binds IPv4 only"));
    };
    // SAFETY: a new socket; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
        // SAFETY: setsockopt reads a c_int of the length passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const one).cast(),
                socklen::<libc::c_int>(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let sa = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits"),
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: bind reads a sockaddr_in of the length passed.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), socklen::<libc::sockaddr_in>()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on the bound socket this function owns.
    if listen && unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

/// The size of `T` as a socket length.
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).expect("a small struct")
}
