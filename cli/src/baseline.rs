//! Raw-socket baselines on loopback, measured in the same process as `zcio bench`.
//!
//! - `tcp_stream`: one thread writes `bs`-byte chunks into a TCP socket as fast as it can,
//!   another reads them into one buffer: the most a byte stream can carry here.
//! - `tcp_pingpong`: a 32-byte request answered by a `bs`-byte reply, one at a time: the
//!   least a request/response round trip can cost here.
//! - `tcp_rpc`: the same requests and replies with `iodepth` of them in flight on one
//!   socket (no file, no protocol): what small I/O could reach here.
//! - `tcp_sendfile`: `tcp_stream` with the writer sending a file of `--size` bytes with
//!   `sendfile(2)` from the page cache, `bs` a call: what a zero-copy read could reach
//!   here (the file's pages are read once, by the reader's copy).
//! - `tcp_file_write`: `tcp_stream` with the reader writing every chunk into a file of
//!   `--size` bytes (`read`, then `pwrite` at the next offset, wrapping): what a write
//!   could reach here (one copy out of the socket, one into the page cache).
//! - `tcp_splice_write`: the same, moving the chunks with `splice(2)` socket -> pipe ->
//!   file instead (no user-space copy): the question whether splice would make
//!   writes faster, answered side by side.
//!
//! `tcp_stream` agrees with iperf3 (one stream on loopback, 128 KiB writes and reads,
//! default socket buffers in both) within the noise in CPU per GiB; what iperf3 does more
//! is one `pselect6` per `read` on its receiver (and ~30% more context switches), so it
//! comes out a little slower, not the baseline faster. The file baselines make their file
//! in `$TMPDIR` (where the embedded server's export is by default).
//!
//! Each runs its requesting (reading) end on the calling thread and its answering (writing)
//! end on a thread of its own; with a placement (`zcio bench --cpus`, by default two
//! different CPUs when there are two) the calling thread is put on the client side's CPUs
//! for the run and the other end on the server side's.
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

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use nix::fcntl::{fcntl, splice, FcntlArg, SpliceFFlags};
use nix::sys::sendfile::sendfile64;

use crate::bench::{cpu_seconds, Run};
use crate::cpus::{spawn_on, PinGuard, Sides};
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
pub(crate) fn tcp_stream(
    bs: usize,
    runtime: Duration,
    label: &str,
    pin: Option<&Sides>,
) -> AnyResult<Run> {
    stream_with(bs, runtime, label, pin, Source::Memory, &mut Sink::Discard)
}

/// Streams `bs`-byte chunks of a file of `size` bytes with `sendfile(2)`, for `runtime`.
pub(crate) fn tcp_sendfile(
    bs: usize,
    size: usize,
    runtime: Duration,
    label: &str,
    pin: Option<&Sides>,
) -> AnyResult<Run> {
    let f = bench_file(size.max(bs))?;
    // Into the page cache first, as the bench's own files are.
    let mut chunk = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < f.metadata()?.len() {
        let n = f.read_at(&mut chunk, off)?;
        if n == 0 {
            break;
        }
        off += n as u64;
    }
    stream_with(bs, runtime, label, pin, Source::File(f), &mut Sink::Discard)
}

/// Streams `bs`-byte chunks into a file of `size` bytes: `read` then `pwrite`, or with
/// `splice` socket -> pipe -> file.
pub(crate) fn tcp_file_write(
    bs: usize,
    size: usize,
    runtime: Duration,
    label: &str,
    with_splice: bool,
    pin: Option<&Sides>,
) -> AnyResult<Run> {
    let f = bench_file(size.max(bs))?;
    let size = f.metadata()?.len();
    let mut sink = if with_splice {
        let (r, w) = nix::unistd::pipe()?;
        // Room for a whole chunk in the pipe (the default is 64 KiB); capped by
        // /proc/sys/fs/pipe-max-size for an unprivileged user, so a failure is kept.
        let _ = fcntl(
            &w,
            FcntlArg::F_SETPIPE_SZ(i32::try_from(bs).unwrap_or(i32::MAX)),
        );
        Sink::Splice {
            f,
            size,
            off: 0,
            r,
            w,
        }
    } else {
        Sink::Pwrite { f, size, off: 0 }
    };
    stream_with(bs, runtime, label, pin, Source::Memory, &mut sink)
}

/// A file of `size` bytes in `$TMPDIR`, removed when dropped (unlinked at once).
fn bench_file(size: usize) -> AnyResult<std::fs::File> {
    let f = tempfile::tempfile()?;
    let chunk = vec![5u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = chunk.len().min(size - off);
        f.write_all_at(&chunk[..n], off as u64)?;
        off += n;
    }
    Ok(f)
}

/// What a stream's writer sends.
enum Source {
    /// One `bs` buffer, over and over.
    Memory,
    /// The file, `bs` a `sendfile` call, wrapping at its end.
    File(std::fs::File),
}

/// Where a stream's reader puts each `bs` chunk.
enum Sink {
    /// One buffer, overwritten.
    Discard,
    /// The buffer, then `pwrite` into the file at the next offset.
    Pwrite {
        f: std::fs::File,
        size: u64,
        off: u64,
    },
    /// `splice` from the socket into the pipe, then from the pipe into the file.
    Splice {
        f: std::fs::File,
        size: u64,
        off: u64,
        r: std::os::fd::OwnedFd,
        w: std::os::fd::OwnedFd,
    },
}

impl Sink {
    /// Takes the next `buf.len()` bytes of the stream.
    fn take(&mut self, rx: &mut TcpStream, buf: &mut [u8]) -> AnyResult<()> {
        let bs = buf.len() as u64;
        match self {
            Sink::Discard => rx.read_exact(buf)?,
            Sink::Pwrite { f, size, off } => {
                rx.read_exact(buf)?;
                f.write_all_at(buf, *off)?;
                *off = (*off + bs) % (*size - *size % bs).max(bs);
            }
            Sink::Splice { f, size, off, r, w } => {
                let mut moved = 0;
                while moved < buf.len() {
                    let n = splice(
                        rx.as_fd(),
                        None,
                        &*w,
                        None,
                        buf.len() - moved,
                        SpliceFFlags::SPLICE_F_MOVE,
                    )?;
                    if n == 0 {
                        return Err("the stream ended".into());
                    }
                    moved += n;
                    // Empty the pipe into the file as it fills.
                    let mut out = 0;
                    while out < n {
                        let mut at = i64::try_from(*off)?;
                        let k = splice(
                            &*r,
                            None,
                            &*f,
                            Some(&mut at),
                            n - out,
                            SpliceFFlags::SPLICE_F_MOVE,
                        )?;
                        if k == 0 {
                            return Err("splice into the file made no progress".into());
                        }
                        out += k;
                        *off += k as u64;
                    }
                }
                *off %= (*size - *size % bs).max(bs);
            }
        }
        Ok(())
    }
}

/// One writer thread streams `bs` chunks from `source` for `runtime`; this thread takes
/// them into `sink`.
fn stream_with(
    bs: usize,
    runtime: Duration,
    label: &str,
    pin: Option<&Sides>,
    source: Source,
    sink: &mut Sink,
) -> AnyResult<Run> {
    let _here = PinGuard::new(pin.map(|p| &p.client[..]))?;
    let (mut rx, mut tx) = pair()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = spawn_on(pin.map(|p| &p.server[..]), move || match source {
        Source::Memory => {
            let buf = vec![7u8; bs];
            while !stop2.load(Ordering::Relaxed) {
                if tx.write_all(&buf).is_err() {
                    break;
                }
            }
        }
        Source::File(f) => {
            let size = f.metadata().map_or(0, |m| m.len() as i64);
            let mut off = 0i64;
            while !stop2.load(Ordering::Relaxed) {
                let mut left = bs;
                while left > 0 {
                    if off >= size {
                        off = 0;
                    }
                    let want = left.min((size - off) as usize);
                    match sendfile64(&tx, &f, Some(&mut off), want) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => left -= n,
                    }
                }
            }
        }
    })?;
    let mut buf = vec![0u8; bs];
    let mut bytes = 0u64;
    let mut ops = 0u64;
    let mut lat = Vec::new();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut res = Ok(());
    while t0.elapsed() < runtime {
        let t = Instant::now();
        if let Err(e) = sink.take(&mut rx, &mut buf) {
            res = Err(e);
            break;
        }
        lat.push(t.elapsed().as_nanos() as u64);
        bytes += bs as u64;
        ops += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    stop.store(true, Ordering::Relaxed);
    // Closing with unread bytes resets the connection: a writer blocked on a full socket
    // wakes up (a shutdown alone would leave it waiting for window).
    drop(rx);
    let _ = writer.join();
    res?;
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
pub(crate) fn tcp_pingpong(
    bs: usize,
    runtime: Duration,
    label: &str,
    pin: Option<&Sides>,
) -> AnyResult<Run> {
    let _here = PinGuard::new(pin.map(|p| &p.client[..]))?;
    let (mut c, mut s) = pair()?;
    let server = spawn_on(pin.map(|p| &p.server[..]), move || {
        let mut req = [0u8; 32];
        let reply = vec![9u8; bs];
        while s.read_exact(&mut req).is_ok() {
            if s.write_all(&reply).is_err() {
                break;
            }
        }
    })?;
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
pub(crate) fn tcp_rpc(
    bs: usize,
    iodepth: u32,
    runtime: Duration,
    label: &str,
    pin: Option<&Sides>,
) -> AnyResult<Run> {
    let _here = PinGuard::new(pin.map(|p| &p.client[..]))?;
    let (mut c, mut s) = pair()?;
    let server = spawn_on(pin.map(|p| &p.server[..]), move || {
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
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Both file sinks put every streamed byte at its place in the file, and wrap at its
    /// end: the write baselines measure real writes, nothing dropped.
    #[test]
    fn file_sinks_write_every_byte_in_place() {
        let bs = 96 * 1024;
        for with_splice in [false, true] {
            let (mut rx, mut tx) = pair().unwrap();
            // Three chunks into a file of two: the third overwrites the first.
            let data: Vec<u8> = (0..3 * bs as u32)
                .map(|i| (i * 7 + i / 509) as u8)
                .collect();
            let sent = data.clone();
            let writer = std::thread::spawn(move || tx.write_all(&sent).unwrap());
            let f = bench_file(2 * bs).unwrap();
            let g = f.try_clone().unwrap();
            let mut sink = if with_splice {
                let (r, w) = nix::unistd::pipe().unwrap();
                Sink::Splice {
                    f,
                    size: 2 * bs as u64,
                    off: 0,
                    r,
                    w,
                }
            } else {
                Sink::Pwrite {
                    f,
                    size: 2 * bs as u64,
                    off: 0,
                }
            };
            let mut buf = vec![0u8; bs];
            for _ in 0..3 {
                sink.take(&mut rx, &mut buf).unwrap();
            }
            writer.join().unwrap();
            let mut got = vec![0u8; 2 * bs];
            g.read_exact_at(&mut got, 0).unwrap();
            assert!(got[..bs] == data[2 * bs..], "splice {with_splice}: chunk 3");
            assert!(
                got[bs..] == data[bs..2 * bs],
                "splice {with_splice}: chunk 2"
            );
            assert_eq!(g.metadata().unwrap().len(), 2 * bs as u64);
        }
    }
}
