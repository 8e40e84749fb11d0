//! What zcio's tests and `zcio bench --hostile` share: a raw-socket client of the TCP wire
//! that does exactly what it is told (so it can misbehave), and deterministic pattern bytes.
//!
//! Nothing here panics: the attack tool counts failures rather than stopping on them, and a
//! test unwraps where it wants to.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use zcio::proto::Req;
use zcio_tcp::wire::{Hello, Kind, Prefix, HELLO_LEN};

/// Deterministic pattern bytes (xorshift from `seed`): the same `seed` and `len` give the
/// same bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A TCP connection to `dst` from `src` (any port): an attacker on another loopback address
/// (127.0.0.2, ...) is a host of its own for the server's per-address limits.
pub fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<TcpStream> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
    let s = TcpStream::from(fd);
    s.set_nodelay(true)?;
    Ok(s)
}

/// [`connect_from`] with `addr` as text, which must be an IPv4 address and port.
pub fn connect_from_str(src: Ipv4Addr, addr: &str) -> io::Result<TcpStream> {
    match addr.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(dst)) => connect_from(src, dst),
        Ok(SocketAddr::V6(_)) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr}: IPv4 expected"),
        )),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
    }
}

/// The transport hello of a client with the default limits (`[limits]`) and 64 requests in
/// flight.
pub fn hello_bytes() -> [u8; HELLO_LEN] {
    let l = zcio::Config::default().limits;
    Hello::from_limits(&l, 64).encode()
}

/// The transport handshake on `s`: sends [`hello_bytes`] and reads the server's hello back
/// (waiting `timeout` at most), which it returns undecoded.
pub fn handshake(s: &mut TcpStream, timeout: Duration) -> io::Result<[u8; HELLO_LEN]> {
    s.write_all(&hello_bytes())?;
    s.set_read_timeout(Some(timeout))?;
    let mut h = [0u8; HELLO_LEN];
    s.read_exact(&mut h)?;
    Ok(h)
}

/// Request `id` framed for the wire: prefix (a reply capacity of 4096 bytes), `req`'s
/// header, then `payload`.
pub fn request_frame(id: u64, req: &Req, payload: &[u8]) -> Vec<u8> {
    let h = req.encode();
    let mut v = Prefix {
        kind: Kind::Request,
        header_len: h.len(),
        id,
        payload_len: payload.len(),
        recv_cap: 4096,
    }
    .encode()
    .to_vec();
    v.extend_from_slice(&h);
    v.extend_from_slice(payload);
    v
}

/// True if the server closes `s` (end of stream, or an error such as a reset) within
/// `within`; what it sends meanwhile is read and dropped.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    if s.set_read_timeout(Some(Duration::from_millis(100)))
        .is_err()
    {
        return true;
    }
    while t0.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}
