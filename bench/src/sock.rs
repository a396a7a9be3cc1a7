//! Non-blocking TCP connects from a chosen loopback source address, and the
//! open-file limit.
//!
//! One source address gives at most one connection per ephemeral port
//! (`/proc/sys/net/ipv4/ip_local_port_range`, about 28,000 by default), and
//! connect(2) slows down sharply long before that, so the bench spreads connections over 127.0.0.1, 127.0.0.2, ...
//! (the whole of 127.0.0.0/8 is local on Linux). std cannot bind a socket
//! before connecting it, so this uses libc directly (already a dependency)
//! rather than adding socket2, and sets `IP_BIND_ADDRESS_NO_PORT` so the port is
//! chosen at connect time per destination (which socket2 does not expose).

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use mio::net::TcpStream;

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr = libc::in_addr {
        s_addr: u32::from(*addr.ip()).to_be(),
    };
    sa
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Starts a non-blocking connect to `dst`, from `src` (any port) when given.
/// The connect completes (or fails) later: the caller waits for writability and
/// then checks `take_error` / `peer_addr`.
pub fn connect(dst: SocketAddrV4, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    check(fd)?;
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    if let Some(ip) = src {
        let one: libc::c_int = 1;
        // SAFETY: valid fd, option value points at a c_int of the given size.
        check(unsafe {
            libc::setsockopt(
                raw,
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
        let sa = sockaddr(SocketAddrV4::new(ip, 0));
        // SAFETY: valid fd; sa is a sockaddr_in of the given length.
        check(unsafe {
            libc::bind(
                raw,
                (&sa as *const libc::sockaddr_in).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        })?;
    }
    let sa = sockaddr(dst);
    // SAFETY: valid fd; sa is a sockaddr_in of the given length.
    let ret = unsafe {
        libc::connect(
            raw,
            (&sa as *const libc::sockaddr_in).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(fd));
    // Pongs and close frames are tiny and must not wait for Nagle.
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Raises the soft open-file limit to the hard limit and warns when it is
/// below the `needed` descriptors.
pub fn raise_nofile_limit_for(needed: usize) -> Result<(), String> {
    let nofile = raise_nofile_limit().map_err(|e| format!("raising RLIMIT_NOFILE: {e}"))?;
    if needed as u64 > nofile {
        eprintln!("warning: open-file limit {nofile} < {needed}: some connections will fail");
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
fn raise_nofile_limit() -> io::Result<u64> {
    // SAFETY: rlimit is plain old data filled in by getrlimit.
    let mut limit: libc::rlimit = unsafe { mem::zeroed() };
    // SAFETY: valid resource id and pointer.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: valid resource id and pointer.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) })?;
    }
    Ok(limit.rlim_cur as u64)
}

/// Size of the local ephemeral port range, or a conservative guess.
pub fn ephemeral_ports() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<usize>().ok());
            let (low, high) = (it.next()??, it.next()??);
            high.checked_sub(low).map(|d| d + 1)
        })
        .unwrap_or(28_000)
}
