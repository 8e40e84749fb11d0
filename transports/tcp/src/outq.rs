//! The server's per-connection output queue: a reply never holds the thread that makes it.
//!
//! A replying thread (a worker, or the receiving thread serving a lone request) writes its
//! frame itself, without waiting, when nothing of the connection is queued: one
//! non-blocking `sendmsg` (and `sendfile` for a file range) straight from the caller's
//! buffers, no copy. If the socket is full, whatever is left of the frame is queued (the
//! header copied, the pool buffers referenced, a file range's descriptor duplicated) and
//! the connection's writer thread takes over: from then on replies are only queued, and the
//! writer sends them, several frames per `sendmsg` (batched), waiting for the socket with
//! `poll`. When the queue is empty the replying threads write directly again.
//!
//! Back-pressure stays on the connection: while more than the byte cap is queued, the
//! connection's receiving thread reads no further request ([`OutQueue::wait_room`]), so a
//! client that does not read its replies stops itself and nobody else. Every queued reply
//! has a deadline: when the socket takes no byte for that long (or the client has ended
//! its side of the stream), the connection fails; other connections never notice.
//!
//! Replies the connection's receiving thread makes itself (small cached reads and buffered
//! writes, served without a hand-off) are *held* ([`OutQueue::cork`]) and leave together,
//! several per `sendmsg`, when the receiving thread is about to wait ([`OutQueue::flush`],
//! also from [`OutQueue::wait_room`]), after [`CORK_FRAMES`] of them, or before any other
//! thread's reply is written. A held reply is
//! queued like a blocked one (header copied, pool buffers referenced), never a file range.
//!
//! All writes happen under the queue's lock and never block in a system call (the socket
//! is non-blocking); only the writer thread waits, in `poll`, without the lock.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::sendfile::sendfile64;
use nix::sys::socket::{sendmsg, MsgFlags, SockaddrStorage};
use zcio::Iobuf;

use crate::io::{peer_hung_up, STACK_PARTS};
use crate::lock;

/// Spare frame vectors made when a connection opens (more are made as needed, and kept up
/// to the connection's requests in flight).
const PREMADE_FRAMES: usize = 16;

/// Most replies held back by a cork before they are written anyway.
pub(crate) const CORK_FRAMES: usize = 16;

/// One reply frame, or what is left of it.
pub(crate) struct Frame {
    /// Prefix and header.
    head: Vec<u8>,
    /// Payload in pool buffers (referenced, not copied).
    payload: Vec<Iobuf>,
    /// Payload as a file range: a duplicate of the file's descriptor, offset, length.
    file: Option<(File, u64, usize)>,
    /// Bytes of the frame already written.
    sent: usize,
}

impl Frame {
    fn payload_len(&self) -> usize {
        self.payload.iter().map(|b| b.len()).sum()
    }

    /// Bytes before the file range (prefix, header, pool payload).
    fn mem_len(&self) -> usize {
        self.head.len() + self.payload_len()
    }

    fn len(&self) -> usize {
        self.mem_len() + self.file.as_ref().map_or(0, |f| f.2)
    }

    /// Feeds the unsent in-memory slices of the frame to `push`, which says whether it
    /// takes more.
    fn unsent<'a>(&'a self, push: &mut dyn FnMut(&'a [u8]) -> bool) {
        let mut skip = self.sent;
        for part in std::iter::once(&self.head[..]).chain(self.payload.iter().map(|b| &b[..])) {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            if !push(&part[skip..]) {
                return;
            }
            skip = 0;
        }
    }
}

/// A reply as a replying thread hands it over: borrowed.
pub(crate) struct Reply<'a> {
    pub(crate) prefix: &'a [u8],
    pub(crate) header: &'a [u8],
    pub(crate) payload: &'a [Iobuf],
    pub(crate) file: Option<(&'a File, u64, usize)>,
}

impl Reply<'_> {
    fn mem_len(&self) -> usize {
        self.prefix.len() + self.header.len() + self.payload.iter().map(|b| b.len()).sum::<usize>()
    }

    fn len(&self) -> usize {
        self.mem_len() + self.file.map_or(0, |f| f.2)
    }
}

struct Out {
    queue: VecDeque<Frame>,
    /// Unsent bytes in `queue`.
    bytes: usize,
    /// The writer thread owns the writing (the socket was full); replies only queue.
    handed_off: bool,
    /// The connection is over: nothing more is written, the writer thread ends.
    closed: bool,
    spare_heads: Vec<Vec<u8>>,
    spare_payloads: Vec<Vec<Iobuf>>,
    keep: usize,
    /// The thread whose replies are held ([`OutQueue::cork`]).
    cork: Option<ThreadId>,
    /// Frames held, unsent, at the front of `queue` (never while `handed_off`).
    held: usize,
}

impl Out {
    fn recycle(&mut self, mut f: Frame) {
        f.payload.clear();
        f.head.clear();
        if self.spare_heads.len() < self.keep {
            self.spare_heads.push(f.head);
            self.spare_payloads.push(f.payload);
        }
    }
}

/// What a write attempt came to.
enum Wrote {
    /// Everything went out.
    All,
    /// The socket is full; `n` bytes went out first.
    Blocked(usize),
}

/// A connection's output queue; see the module docs.
pub(crate) struct OutQueue {
    out: Mutex<Out>,
    /// Wakes the writer thread (handed off, closed) and the receiving thread (room).
    cond: Condvar,
    /// Most bytes queued before the connection's receiving thread stops reading requests.
    cap: usize,
    /// The longest the socket may take no byte of a queued reply.
    deadline: Duration,
    /// How often the writer thread looks at the deadline and the peer while it waits.
    tick: Duration,
}

impl OutQueue {
    pub(crate) fn new(cap: usize, deadline: Duration, tick: Duration, keep: usize) -> OutQueue {
        let pre = keep.min(PREMADE_FRAMES);
        OutQueue {
            out: Mutex::new(Out {
                queue: VecDeque::with_capacity(keep.min(256)),
                bytes: 0,
                handed_off: false,
                closed: false,
                spare_heads: (0..pre).map(|_| Vec::with_capacity(128)).collect(),
                spare_payloads: (0..pre).map(|_| Vec::with_capacity(4)).collect(),
                keep,
                cork: None,
                held: 0,
            }),
            cond: Condvar::new(),
            cap,
            deadline,
            tick,
        }
    }

    /// Sends `r` now if the socket takes it, else queues what is left for the writer
    /// thread. Never waits for the peer.
    pub(crate) fn reply(&self, sock: &TcpStream, r: &Reply<'_>) -> io::Result<()> {
        let mut out = lock(&self.out);
        if out.closed {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection is closed",
            ));
        }
        let hold = !out.handed_off
            && r.file.is_none()
            && out.cork.is_some()
            && out.cork == Some(std::thread::current().id());
        if !hold && out.held > 0 {
            // Held frames go first: a frame written directly must not be cut by them.
            self.flush_locked(sock, &mut out)?;
        }
        let sent = if out.handed_off || hold {
            0
        } else {
            match write_direct(sock, r)? {
                Wrote::All => return Ok(()),
                Wrote::Blocked(n) => n,
            }
        };
        let mut f = Frame {
            head: out.spare_heads.pop().unwrap_or_default(),
            payload: out.spare_payloads.pop().unwrap_or_default(),
            file: None,
            sent,
        };
        f.head.extend_from_slice(r.prefix);
        f.head.extend_from_slice(r.header);
        f.payload.extend(r.payload.iter().cloned());
        if let Some((file, off, len)) = r.file {
            f.file = Some((file.try_clone()?, off, len));
        }
        out.bytes += r.len() - sent;
        out.queue.push_back(f);
        if hold {
            out.held += 1;
            if out.held >= CORK_FRAMES {
                self.flush_locked(sock, &mut out)?;
            }
            return Ok(());
        }
        if !out.handed_off {
            out.handed_off = true;
            self.cond.notify_all();
        }
        Ok(())
    }

    /// `on`: holds the calling thread's replies back (see the module docs) until
    /// [`OutQueue::flush`] or `cork(false)`; other threads' replies are not held. Off: its
    /// next replies are written at once, after those held so far.
    pub(crate) fn cork(&self, on: bool) {
        let mut out = lock(&self.out);
        out.cork = (on && !out.closed).then(|| std::thread::current().id());
    }

    /// Ends the cork and writes the held replies, several per `sendmsg`, without waiting:
    /// what the socket does not take goes to the writer thread.
    pub(crate) fn flush(&self, sock: &TcpStream) -> io::Result<()> {
        let mut out = lock(&self.out);
        out.cork = None;
        if out.held == 0 || out.closed {
            return Ok(());
        }
        self.flush_locked(sock, &mut out)
    }

    /// Writes the held frames (and anything queued behind them) now.
    fn flush_locked(&self, sock: &TcpStream, out: &mut MutexGuard<'_, Out>) -> io::Result<()> {
        out.held = 0;
        if out.handed_off {
            return Ok(());
        }
        if let (Wrote::Blocked(_), _) = write_queued(sock, out)? {
            out.handed_off = true;
            self.cond.notify_all();
        }
        Ok(())
    }

    /// Waits while more than the byte cap is queued (writing the held replies first);
    /// `false` once the connection is closed.
    pub(crate) fn wait_room(&self, sock: &TcpStream) -> bool {
        let mut out = lock(&self.out);
        if out.bytes > self.cap && out.held > 0 && !out.closed {
            out.cork = None;
            if self.flush_locked(sock, &mut out).is_err() {
                return false;
            }
        }
        while out.bytes > self.cap && !out.closed {
            out = self
                .cond
                .wait_timeout(out, self.tick)
                .map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
        !out.closed
    }

    /// Ends the connection's output: queued replies are dropped (their buffers go back to
    /// the pool) and the writer thread ends.
    pub(crate) fn close(&self) {
        let mut out = lock(&self.out);
        out.closed = true;
        out.bytes = 0;
        out.held = 0;
        out.cork = None;
        while let Some(f) = out.queue.pop_front() {
            out.recycle(f);
        }
        self.cond.notify_all();
    }

    /// The writer thread's loop, until the connection closes. `sock` gives the socket while
    /// the connection exists; `fail` ends the connection with a reason.
    ///
    /// `sock` and `fail` are called only without the queue's lock: either may drop the last
    /// reference to the connection, whose drop closes this queue (taking the lock).
    pub(crate) fn run_writer(
        &self,
        sock: &dyn Fn() -> Option<Arc<TcpStream>>,
        fail: &dyn Fn(String),
    ) {
        let mut out = lock(&self.out);
        loop {
            while !out.handed_off && !out.closed {
                out = self
                    .cond
                    .wait_timeout(out, self.tick)
                    .map_or_else(|p| p.into_inner().0, |(g, _)| g);
                drop(out);
                let open = sock().is_some();
                out = lock(&self.out);
                if !open {
                    return;
                }
            }
            if out.closed {
                return;
            }
            drop(out);
            let Some(s) = sock() else { return };
            out = lock(&self.out);
            // Only this thread clears `handed_off`: the queue is still handed off, unless it
            // was closed meanwhile.
            if out.closed {
                return;
            }
            let mut progress = Instant::now();
            // Drain: write what the socket takes, then wait for room without the lock.
            let why = loop {
                match write_queued(&s, &mut out) {
                    Ok((Wrote::All, _)) => {
                        out.handed_off = false;
                        self.cond.notify_all();
                        break None;
                    }
                    Ok((Wrote::Blocked(n), room)) => {
                        if n > 0 {
                            progress = Instant::now();
                        }
                        if room {
                            self.cond.notify_all();
                        }
                    }
                    Err(e) => break Some(format!("sending replies: {e}")),
                }
                if out.closed {
                    return;
                }
                drop(out);
                let ready = wait_writable(&s, self.tick);
                out = lock(&self.out);
                if out.closed {
                    return;
                }
                if !ready {
                    if peer_hung_up(&s) {
                        break Some(
                            "the client ended the connection while replies to it were queued"
                                .into(),
                        );
                    }
                    if progress.elapsed() >= self.deadline {
                        break Some(format!(
                            "no reply bytes accepted for {:?}: the client is not reading",
                            self.deadline
                        ));
                    }
                }
            };
            if let Some(why) = why {
                drop(out);
                fail(why);
                self.close();
                return;
            }
        }
    }
}

/// Writes a borrowed reply without waiting: prefix, header and pool payload with
/// `sendmsg` (16 slices a call), then the file range with `sendfile`.
fn write_direct(sock: &TcpStream, r: &Reply<'_>) -> io::Result<Wrote> {
    let parts = || {
        [r.prefix, r.header]
            .into_iter()
            .chain(r.payload.iter().map(|b| &b[..]))
    };
    let mem = r.mem_len();
    let more = r.file.is_some_and(|f| f.2 > 0);
    let mut done = 0;
    while done < mem {
        let mut iov = [IoSlice::new(&[]); STACK_PARTS];
        let mut n = 0;
        let mut skip = done;
        for p in parts() {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            if n == STACK_PARTS {
                break;
            }
            iov[n] = IoSlice::new(&p[skip..]);
            skip = 0;
            n += 1;
        }
        match send(sock, &iov[..n], more || n == STACK_PARTS) {
            Ok(w) => done += w,
            Err(Errno::EAGAIN) => return Ok(Wrote::Blocked(done)),
            Err(e) => return Err(io_err(e)),
        }
    }
    if let Some((file, off, len)) = r.file {
        let mut sent = 0;
        while sent < len {
            match send_file(sock, file, off + sent as u64, len - sent) {
                Ok(w) => sent += w,
                Err(Errno::EAGAIN) => return Ok(Wrote::Blocked(mem + sent)),
                Err(e) => return Err(io_err(e)),
            }
        }
    }
    Ok(Wrote::All)
}

/// The I/O error for a failed write; a file that ended early says so.
fn io_err(e: Errno) -> io::Error {
    match e {
        Errno::ENODATA => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the file ended short of the reply's announced payload (truncated while being sent)",
        ),
        e => e.into(),
    }
}

/// Writes queued frames without waiting, several per `sendmsg`. Returns how far it got, and
/// whether bytes left the queue (room for the receiving thread).
fn write_queued(sock: &TcpStream, out: &mut MutexGuard<'_, Out>) -> io::Result<(Wrote, bool)> {
    let mut total = 0;
    loop {
        let Some(front) = out.queue.front() else {
            return Ok((Wrote::All, total > 0));
        };
        let r = if front.sent >= front.mem_len() {
            // The frame's file range.
            let (file, off, len) = front
                .file
                .as_ref()
                .map_or((None, 0, 0), |f| (Some(&f.0), f.1, f.2));
            let done = front.sent - front.mem_len();
            match file {
                Some(file) if done < len => send_file(sock, file, off + done as u64, len - done),
                _ => Ok(0),
            }
        } else {
            // In-memory bytes of as many frames as fit, up to the next file range.
            let mut iov = [IoSlice::new(&[]); STACK_PARTS];
            let mut n = 0;
            let mut more = false;
            for f in out.queue.iter() {
                let mut full = false;
                f.unsent(&mut |p| {
                    if n == STACK_PARTS {
                        full = true;
                        return false;
                    }
                    iov[n] = IoSlice::new(p);
                    n += 1;
                    true
                });
                if full {
                    break;
                }
                if f.file.as_ref().is_some_and(|x| x.2 > 0) {
                    more = true;
                    break;
                }
            }
            send(sock, &iov[..n], more)
        };
        let w = match r {
            Ok(w) => w,
            Err(Errno::EAGAIN) => return Ok((Wrote::Blocked(total), total > 0)),
            Err(e) => return Err(io_err(e)),
        };
        total += w;
        out.bytes = out.bytes.saturating_sub(w);
        // Account the bytes to the frames, front to back; finished frames leave.
        let mut left = w;
        while let Some(f) = out.queue.front_mut() {
            let rest = f.len() - f.sent;
            if left < rest {
                f.sent += left;
                break;
            }
            left -= rest;
            if let Some(f) = out.queue.pop_front() {
                out.recycle(f);
            }
            if left == 0 {
                break;
            }
        }
    }
}

fn send(sock: &TcpStream, iov: &[IoSlice<'_>], more: bool) -> Result<usize, Errno> {
    let mut flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    if more {
        // nix names no MSG_MORE (Linux only); the bit comes from libc.
        flags |= MsgFlags::from_bits_retain(libc::MSG_MORE);
    }
    loop {
        match sendmsg::<SockaddrStorage>(sock.as_raw_fd(), iov, &[], flags, None) {
            Ok(0) => return Err(Errno::EPIPE),
            Err(Errno::EINTR) => {}
            r => return r,
        }
    }
}

/// `sendfile(2)` of a range on the non-blocking socket. The file ending early is an error
/// (the frame announced the bytes), reported as [`Errno::ENODATA`].
fn send_file(sock: &TcpStream, file: &File, off: u64, len: usize) -> Result<usize, Errno> {
    let mut o = i64::try_from(off).map_err(|_| Errno::EOVERFLOW)?;
    loop {
        match sendfile64(sock, file, Some(&mut o), len) {
            Ok(0) => return Err(Errno::ENODATA),
            Err(Errno::EINTR) => {}
            r => return r,
        }
    }
}

/// Waits up to `tick` for room in the socket's send buffer.
fn wait_writable(sock: &TcpStream, tick: Duration) -> bool {
    let t = PollTimeout::try_from(tick).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
    matches!(poll(&mut fds, t), Ok(n) if n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connection's last reference can be dropped by the writer thread itself (in
    /// `sock`), and that drop closes the queue: the writer must not hold the queue's lock
    /// then, or it deadlocks with itself and keeps the socket open forever.
    #[test]
    fn writer_ends_when_its_socket_lookup_closes_the_queue() {
        let q = Arc::new(OutQueue::new(
            1 << 20,
            Duration::from_secs(30),
            Duration::from_millis(5),
            4,
        ));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let w = q.clone();
        std::thread::spawn(move || {
            // As the server's lookup does when the connection's last `Arc` drops inside it.
            let sock = || {
                w.close();
                None
            };
            w.run_writer(&sock, &|_| {});
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(30)).is_ok(),
            "the writer thread did not end (deadlocked on its queue's lock)"
        );
    }
}
