//! Raw-socket baselines on loopback, measured in the same process as `zcio bench`.
//!
//! - `tcp_stream`: one thread writes `bs`-byte chunks into a TCP socket as fast as it can,
//!   another reads them into one buffer: the most a byte stream can carry here.
//! - `tcp_pingpong`: a 32-byte request answered by a `bs`-byte reply, one at a time: the
//!   least a request/response round trip can cost here.
//! - `tcp_rpc`: the same requests and replies with `iodepth` of them in flight on one
//!   socket (no file, no protocol): what small I/O could reach here.
//!
//! Each reports the process's CPU time (user + system, both ends: they run in this
//! process) for CPU seconds per GiB, as the bench's own runs do.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bench::{cpu_seconds, Run};
use crate::AnyResult;

fn pair() -> AnyResult<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let c = TcpStream::connect(l.local_addr()?)?;
    let (s, _) = l.accept()?;
    c.set_nodelay(true)?;
    s.set_nodelay(true)?;
    Ok((c, s))
}

/// Streams `bs`-byte chunks for `runtime`.
pub(crate) fn tcp_stream(bs: usize, runtime: Duration, label: &str) -> AnyResult<Run> {
    let (mut rx, mut tx) = pair()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let buf = vec![7u8; bs];
        while !stop2.load(Ordering::Relaxed) {
            if tx.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; bs];
    let mut bytes = 0u64;
    let mut ops = 0u64;
    let mut lat = Vec::new();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    while t0.elapsed() < runtime {
        let t = Instant::now();
        rx.read_exact(&mut buf)?;
        lat.push(t.elapsed().as_nanos() as u64);
        bytes += bs as u64;
        ops += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    stop.store(true, Ordering::Relaxed);
    drop(rx);
    let _ = writer.join();
    lat.sort_unstable();
    Ok(Run {
        label: label.into(),
        bytes,
        ops,
        secs,
        lat,
        allocs_per_op: None,
        cpu_s: Some(cpu),
    })
}

/// Ends a request/response run: the client's side closes (the server thread sees the end of
/// the stream and returns), and the run counts one reply of `bs` bytes per latency in `lat`,
/// timed from `t0` and `cpu0`.
fn finish_rpc(
    c: TcpStream,
    server: JoinHandle<()>,
    t0: Instant,
    cpu0: f64,
    mut lat: Vec<u64>,
    bs: usize,
    label: &str,
) -> Run {
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    drop(c);
    let _ = server.join();
    lat.sort_unstable();
    let ops = lat.len() as u64;
    Run {
        label: label.into(),
        bytes: ops * bs as u64,
        ops,
        secs,
        lat,
        allocs_per_op: None,
        cpu_s: Some(cpu),
    }
}

/// Request/response round trips of a 32-byte request and a `bs`-byte reply.
pub(crate) fn tcp_pingpong(bs: usize, runtime: Duration, label: &str) -> AnyResult<Run> {
    let (mut c, mut s) = pair()?;
    let server = std::thread::spawn(move || {
        let mut req = [0u8; 32];
        let reply = vec![9u8; bs];
        while s.read_exact(&mut req).is_ok() {
            if s.write_all(&reply).is_err() {
                break;
            }
        }
    });
    let req = [1u8; 32];
    let mut buf = vec![0u8; bs];
    let mut lat = Vec::new();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    while t0.elapsed() < runtime {
        let t = Instant::now();
        c.write_all(&req)?;
        c.read_exact(&mut buf)?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    Ok(finish_rpc(c, server, t0, cpu0, lat, bs, label))
}

/// Bytes of a `tcp_rpc` request.
const RPC_REQ: usize = 32;

/// `iodepth` requests of [`RPC_REQ`] bytes in flight on one socket, each answered with `bs`
/// bytes from memory. The server reads whatever requests have arrived with one `read` and
/// answers each with one `write`; the client sends a new request as each reply completes.
pub(crate) fn tcp_rpc(bs: usize, iodepth: u32, runtime: Duration, label: &str) -> AnyResult<Run> {
    let (mut c, mut s) = pair()?;
    let server = std::thread::spawn(move || {
        let reply = vec![9u8; bs];
        let mut reqs = vec![0u8; RPC_REQ * 64];
        let mut have = 0;
        loop {
            match s.read(&mut reqs[have..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => have += n,
            }
            let whole = have / RPC_REQ;
            for _ in 0..whole {
                if s.write_all(&reply).is_err() {
                    return;
                }
            }
            reqs.copy_within(whole * RPC_REQ..have, 0);
            have -= whole * RPC_REQ;
        }
    });
    let req = [1u8; RPC_REQ];
    let mut buf = vec![0u8; bs];
    let mut sent = VecDeque::with_capacity(iodepth as usize);
    let mut lat = Vec::with_capacity(1 << 16);
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    for _ in 0..iodepth {
        sent.push_back(Instant::now());
        c.write_all(&req)?;
    }
    while t0.elapsed() < runtime {
        c.read_exact(&mut buf)?;
        if let Some(t) = sent.pop_front() {
            lat.push(t.elapsed().as_nanos() as u64);
        }
        sent.push_back(Instant::now());
        c.write_all(&req)?;
    }
    Ok(finish_rpc(c, server, t0, cpu0, lat, bs, label))
}
