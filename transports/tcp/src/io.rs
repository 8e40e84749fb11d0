//! Vectored socket I/O that loops over partial transfers without copying.
//!
//! Writes go through `sendmsg(2)` with `MSG_NOSIGNAL` (a `writev` that cannot raise
//! SIGPIPE when the peer has gone, even in a process that did not ignore the signal);
//! reads through `readv(2)` (`Read::read_vectored`). Both advance through the caller's
//! slices in place after a partial transfer.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, sendmsg, MsgFlags, SockaddrStorage};

/// Most iovecs handed to one system call (Linux's `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;

/// Up to this many slices (or iovecs) are gathered on the stack; a vector beyond. So the
/// frames of the data path (a prefix, a header and a few payload segments) allocate
/// nothing.
pub(crate) const STACK_PARTS: usize = 16;

/// Calls `f` with the `n` slices of `items` gathered in a slice of slices: on the stack
/// when `n <= STACK_PARTS`, else in a vector.
pub(crate) fn gather<'a, R>(
    n: usize,
    items: impl Iterator<Item = &'a [u8]>,
    f: impl FnOnce(&mut [&'a [u8]]) -> R,
) -> R {
    if n <= STACK_PARTS {
        let mut a: [&[u8]; STACK_PARTS] = [&[]; STACK_PARTS];
        let mut k = 0;
        for (d, s) in a.iter_mut().zip(items) {
            *d = s;
            k += 1;
        }
        f(&mut a[..k])
    } else {
        f(&mut items.collect::<Vec<_>>())
    }
}

/// [`gather`] for mutable slices.
pub(crate) fn scatter<'a, R>(
    n: usize,
    items: impl Iterator<Item = &'a mut [u8]>,
    f: impl FnOnce(&mut [&'a mut [u8]]) -> R,
) -> R {
    if n <= STACK_PARTS {
        let mut a: [&mut [u8]; STACK_PARTS] = Default::default();
        let mut k = 0;
        for (d, s) in a.iter_mut().zip(items) {
            *d = s;
            k += 1;
        }
        f(&mut a[..k])
    } else {
        f(&mut items.collect::<Vec<_>>())
    }
}

/// Writes every byte of `parts`, in order. The slices are advanced in place, so on error
/// `parts` shows what was not sent.
///
/// The socket is expected to have a send timeout (`SO_SNDTIMEO`). Each time it expires with
/// nothing sent, `stalled` is called with how long the write has made no progress, and may
/// abort it by returning an error; [`give_up`] aborts at the first expiry.
pub(crate) fn write_all_vectored(
    sock: &TcpStream,
    parts: &mut [&[u8]],
    stalled: &mut dyn FnMut(Duration) -> io::Result<()>,
) -> io::Result<()> {
    write_with(sock, parts, MsgFlags::MSG_NOSIGNAL, stalled)
}

fn write_with(
    sock: &TcpStream,
    parts: &mut [&[u8]],
    flags: MsgFlags,
    stalled: &mut dyn FnMut(Duration) -> io::Result<()>,
) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let mut first = 0;
    let mut progress = Instant::now();
    let mut stack = [IoSlice::new(&[]); STACK_PARTS];
    let mut heap: Vec<IoSlice<'_>> = Vec::new();
    loop {
        while first < parts.len() && parts[first].is_empty() {
            first += 1;
        }
        if first == parts.len() {
            return Ok(());
        }
        let live = parts[first..].iter().filter(|p| !p.is_empty());
        let iov: &[IoSlice<'_>] = if parts.len() - first <= STACK_PARTS {
            let mut k = 0;
            for (d, p) in stack.iter_mut().zip(live) {
                *d = IoSlice::new(p);
                k += 1;
            }
            &stack[..k]
        } else {
            heap.clear();
            heap.extend(live.take(MAX_IOV).map(|p| IoSlice::new(p)));
            &heap
        };
        let n = match sendmsg::<SockaddrStorage>(fd, iov, &[], flags, None) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                stalled(progress.elapsed())?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        progress = Instant::now();
        advance(&mut parts[first..], n);
    }
}

/// The [`write_all_vectored`] stall policy of a writer that has nothing else to watch: the
/// send timeout is the deadline.
pub(crate) fn give_up(_stalled: Duration) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "send timed out (the peer is not reading)",
    ))
}

/// Whether the peer has ended its side of the stream (a FIN, a reset or a socket error is
/// pending), whatever unread data is still queued before it. Never blocks.
pub(crate) fn peer_hung_up(sock: &TcpStream) -> bool {
    // nix names no POLLRDHUP (Linux's "peer shut down writing"), so it comes from libc;
    // and as nix cannot decode a revents with that bit, the count of ready descriptors is
    // the answer: only the events asked for (and POLLHUP, POLLERR) make this one ready.
    let ended =
        PollFlags::from_bits_retain(libc::POLLRDHUP) | PollFlags::POLLHUP | PollFlags::POLLERR;
    let mut fds = [PollFd::new(sock.as_fd(), ended)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) => n > 0,
        _ => false,
    }
}

/// Whether the socket has bytes to read, or an end of stream or error to report. Never
/// blocks.
pub(crate) fn readable_now(sock: &TcpStream) -> bool {
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Whether bytes wait unread in the socket. Never blocks.
pub(crate) fn has_unread(sock: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    matches!(recv(sock.as_raw_fd(), &mut b, flags), Ok(n) if n > 0)
}

/// Moves the front of `parts` on by `n` bytes.
fn advance(parts: &mut [&[u8]], mut n: usize) {
    for p in parts.iter_mut() {
        if n == 0 {
            return;
        }
        let k = p.len().min(n);
        *p = &p[k..];
        n -= k;
    }
}

/// Why [`read_exact_vectored`] stopped short.
#[derive(Debug)]
pub(crate) enum ReadError<E> {
    /// The peer closed the stream after `got` bytes of this read.
    Eof {
        /// Bytes read before the end of stream.
        got: usize,
    },
    /// The socket failed.
    Io(io::Error),
    /// The tick callback gave up (a timeout).
    Tick(E),
}

/// Calls a check at most once per `every` while a read waits or trickles.
pub(crate) struct Ticker {
    every: Duration,
    last: Instant,
    /// A non-blocking socket: wait for data with `poll`, up to a tick at a time.
    poll: bool,
    /// Called before each `poll` that waits for data (the server writes the replies it
    /// holds back there: they must not wait for the client's next bytes).
    before_wait: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl Ticker {
    /// A ticker that fires every `every`, for a blocking socket with a receive timeout.
    pub(crate) fn new(every: Duration) -> Ticker {
        Ticker {
            every,
            last: Instant::now(),
            poll: false,
            before_wait: None,
        }
    }

    /// A ticker that fires every `every`, for a non-blocking socket: a read that finds no
    /// data waits for some with `poll`, up to `every`.
    pub(crate) fn polling(every: Duration) -> Ticker {
        Ticker {
            poll: true,
            ..Ticker::new(every)
        }
    }

    /// A polling ticker that calls `f` each time before it waits for data.
    pub(crate) fn before_wait(mut self, f: Arc<dyn Fn() + Send + Sync>) -> Ticker {
        self.before_wait = Some(f);
        self
    }

    fn due(&mut self, timed_out: bool) -> bool {
        let now = Instant::now();
        if timed_out || now.duration_since(self.last) >= self.every {
            self.last = now;
            return true;
        }
        false
    }
}

/// The receive-timeout tick for a deadline of `d`: a fraction of it, within 5 ms ..= 1 s.
pub(crate) fn tick_for(d: Duration) -> Duration {
    (d / 8).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

/// Fills every byte of `parts` from `sock` with `readv`, advancing in place over partial
/// reads. The socket is expected to have a receive timeout (`SO_RCVTIMEO`); each time it
/// expires, and at most once per tick while data trickles in, `tick` is called and may
/// abort the read by returning an error.
pub(crate) fn read_exact_vectored<E>(
    mut sock: &TcpStream,
    parts: &mut [&mut [u8]],
    ticker: &mut Ticker,
    tick: &mut dyn FnMut() -> Result<(), E>,
) -> Result<(), ReadError<E>> {
    let mut got = 0;
    let mut first = 0;
    loop {
        while first < parts.len() && parts[first].is_empty() {
            first += 1;
        }
        if first == parts.len() {
            return Ok(());
        }
        let res = {
            let small = parts.len() - first <= STACK_PARTS;
            let live = parts[first..].iter_mut().filter(|p| !p.is_empty());
            if small {
                let mut stack: [IoSliceMut<'_>; STACK_PARTS] =
                    std::array::from_fn(|_| IoSliceMut::new(&mut []));
                let mut k = 0;
                for (d, p) in stack.iter_mut().zip(live) {
                    *d = IoSliceMut::new(p);
                    k += 1;
                }
                sock.read_vectored(&mut stack[..k])
            } else {
                let mut iov: Vec<IoSliceMut<'_>> =
                    live.take(MAX_IOV).map(|p| IoSliceMut::new(p)).collect();
                sock.read_vectored(&mut iov)
            }
        };
        let timed_out = match res {
            Ok(0) => return Err(ReadError::Eof { got }),
            Ok(n) => {
                got += n;
                advance_mut(&mut parts[first..], n);
                false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && ticker.poll => {
                wait_readable(sock, ticker)
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                true
            }
            Err(e) => return Err(ReadError::Io(e)),
        };
        if ticker.due(timed_out) {
            tick().map_err(ReadError::Tick)?;
        }
    }
}

/// Reads at least `min` bytes (at most `buf.len()`) into `buf` from `sock`, as few reads
/// as it takes: whatever the socket holds comes along, so that one read brings several
/// small frames. `wait_first`: the socket was found empty last time, so wait for data
/// (`poll`, on a polling ticker) before reading instead of after a read that would find
/// none. Returns the bytes read and whether the last read drained the socket (took less
/// than it asked for). Ticks and failures as [`read_exact_vectored`].
pub(crate) fn read_at_least<E>(
    mut sock: &TcpStream,
    buf: &mut [u8],
    min: usize,
    wait_first: bool,
    ticker: &mut Ticker,
    tick: &mut dyn FnMut() -> Result<(), E>,
) -> Result<(usize, bool), ReadError<E>> {
    let mut got = 0;
    let mut wait = wait_first && ticker.poll;
    loop {
        let timed_out = if wait {
            wait = false;
            wait_readable(sock, ticker)
        } else {
            let want = buf.len() - got;
            match sock.read(&mut buf[got..]) {
                Ok(0) => return Err(ReadError::Eof { got }),
                Ok(n) => {
                    got += n;
                    if got >= min {
                        return Ok((got, n < want));
                    }
                    false
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && ticker.poll => {
                    wait_readable(sock, ticker)
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    true
                }
                Err(e) => return Err(ReadError::Io(e)),
            }
        };
        if ticker.due(timed_out) {
            tick().map_err(ReadError::Tick)?;
        }
    }
}

/// Fills every byte of `parts` from `sock` like [`read_exact_vectored`], with `spill` as a
/// last vector in each `readv`: bytes the socket holds past `parts` (the start of the next
/// frame) come in the same system call and land in `spill`. Returns how many did. With more
/// parts than fit the stack, reads exactly `parts` (nothing spills).
pub(crate) fn read_exact_spill<E>(
    mut sock: &TcpStream,
    parts: &mut [&mut [u8]],
    spill: &mut [u8],
    ticker: &mut Ticker,
    tick: &mut dyn FnMut() -> Result<(), E>,
) -> Result<usize, ReadError<E>> {
    if parts.len() >= STACK_PARTS {
        return read_exact_vectored(sock, parts, ticker, tick).map(|()| 0);
    }
    let mut got = 0;
    loop {
        let need: usize = parts.iter().map(|p| p.len()).sum();
        if need == 0 {
            return Ok(0);
        }
        let res = {
            let mut stack: [IoSliceMut<'_>; STACK_PARTS] =
                std::array::from_fn(|_| IoSliceMut::new(&mut []));
            let mut k = 0;
            for p in parts.iter_mut().filter(|p| !p.is_empty()) {
                stack[k] = IoSliceMut::new(p);
                k += 1;
            }
            stack[k] = IoSliceMut::new(&mut spill[..]);
            sock.read_vectored(&mut stack[..k + 1])
        };
        let timed_out = match res {
            Ok(0) => return Err(ReadError::Eof { got }),
            Ok(n) if n >= need => return Ok(n - need),
            Ok(n) => {
                got += n;
                advance_mut(parts, n);
                false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && ticker.poll => {
                wait_readable(sock, ticker)
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                true
            }
            Err(e) => return Err(ReadError::Io(e)),
        };
        if ticker.due(timed_out) {
            tick().map_err(ReadError::Tick)?;
        }
    }
}

/// Bytes read past the end of what a reader asked for (the next frame's start), taken
/// first by its next read.
pub(crate) struct Ahead {
    buf: [u8; AHEAD_WIDE],
    pos: usize,
    end: usize,
}

/// The most bytes a reader reads ahead of a payload: room for the next reply's prefix and
/// a short header, so that reading one payload also brings the next frame's head (a payload
/// byte that comes along is copied out: at most this many per frame).
pub(crate) const AHEAD: usize = 128;

/// The most bytes read ahead by a frame's first read when nothing was read ahead of it
/// ([`Ahead::take_head`]): a small reply (4 KiB of payload and its head) comes whole in
/// one `readv` and is copied out, where reading its head and then its payload would cost
/// a second system call; of a larger payload, at most this much is copied.
pub(crate) const AHEAD_WIDE: usize = 4096 + 256;

impl Ahead {
    pub(crate) fn new() -> Ahead {
        Ahead {
            buf: [0; AHEAD_WIDE],
            pos: 0,
            end: 0,
        }
    }

    /// Bytes read ahead and not taken yet.
    pub(crate) fn buffered(&self) -> usize {
        self.end - self.pos
    }

    /// Fills every byte of `parts`: from the bytes read ahead, then from `sock` with
    /// [`read_exact_spill`] into this buffer. An end of stream reports the bytes of
    /// `parts` filled before it.
    pub(crate) fn take<E>(
        &mut self,
        sock: &TcpStream,
        parts: &mut [&mut [u8]],
        ticker: &mut Ticker,
        tick: &mut dyn FnMut() -> Result<(), E>,
    ) -> Result<(), ReadError<E>> {
        self.take_up_to(AHEAD, sock, parts, ticker, tick)
    }

    /// [`Ahead::take`] for the start of a frame (its prefix): when nothing was read ahead,
    /// reads ahead up to [`AHEAD_WIDE`] bytes, so that a small frame comes whole.
    pub(crate) fn take_head<E>(
        &mut self,
        sock: &TcpStream,
        parts: &mut [&mut [u8]],
        ticker: &mut Ticker,
        tick: &mut dyn FnMut() -> Result<(), E>,
    ) -> Result<(), ReadError<E>> {
        self.take_up_to(AHEAD_WIDE, sock, parts, ticker, tick)
    }

    fn take_up_to<E>(
        &mut self,
        spill: usize,
        sock: &TcpStream,
        parts: &mut [&mut [u8]],
        ticker: &mut Ticker,
        tick: &mut dyn FnMut() -> Result<(), E>,
    ) -> Result<(), ReadError<E>> {
        let mut copied = 0;
        for p in parts.iter_mut() {
            if self.pos == self.end {
                break;
            }
            let n = p.len().min(self.end - self.pos);
            p[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            copied += n;
        }
        advance_mut(parts, copied);
        if self.pos < self.end {
            return Ok(());
        }
        let spilled = read_exact_spill(sock, parts, &mut self.buf[..spill], ticker, tick).map_err(
            |e| match e {
                ReadError::Eof { got } => ReadError::Eof { got: got + copied },
                e => e,
            },
        )?;
        (self.pos, self.end) = (0, spilled);
        Ok(())
    }
}

/// Waits up to a tick for `sock` to become readable; true when the tick passed first.
fn wait_readable(sock: &TcpStream, ticker: &Ticker) -> bool {
    if let Some(f) = &ticker.before_wait {
        f();
    }
    let t = PollTimeout::try_from(ticker.every).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    !matches!(poll(&mut fds, t), Ok(n) if n > 0)
}

/// Moves the front of `parts` on by `n` bytes.
pub(crate) fn advance_mut(parts: &mut [&mut [u8]], mut n: usize) {
    for p in parts.iter_mut() {
        if n == 0 {
            return;
        }
        let k = p.len().min(n);
        let whole = std::mem::take(p);
        *p = &mut whole[k..];
        n -= k;
    }
}

/// Shuts both directions of a socket down, ignoring "not connected".
pub(crate) fn shutdown(sock: &TcpStream) {
    let _ = sock.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_over_slices() {
        let (a, b, c) = (*b"abc", *b"de", *b"fghi");
        let mut parts: [&[u8]; 3] = [&a, &b, &c];
        advance(&mut parts, 4);
        assert_eq!(parts, [&b""[..], &b"e"[..], &b"fghi"[..]]);
        advance(&mut parts, 3);
        assert_eq!(parts[2], b"hi");
        let mut x = *b"abcdef";
        let (l, r) = x.split_at_mut(2);
        let mut m: [&mut [u8]; 2] = [l, r];
        advance_mut(&mut m, 3);
        assert!(m[0].is_empty());
        assert_eq!(&*m[1], b"def");
    }

    #[test]
    fn reading_ahead_brings_the_next_head_and_loses_no_byte() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        // Frames of a 24-byte head and a payload of 0 to 70,000 bytes, written at once.
        let sizes = [4096usize, 0, 70_000, 1, 300, 4096, 129, 0, 0, 8];
        let data: Vec<u8> = (0..sizes.iter().map(|n| 24 + n).sum::<usize>() as u32)
            .map(|i| (i * 13 + i / 97) as u8)
            .collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            write_all_vectored(&a, &mut [&sent[..]], &mut give_up).unwrap();
        });
        let mut ahead = Ahead::new();
        let mut ticker = Ticker::new(Duration::from_millis(50));
        let mut ok = || -> Result<(), ()> { Ok(()) };
        let mut at = 0;
        for (k, &n) in sizes.iter().enumerate() {
            // Heads as the client reads them (wide when nothing is read ahead), and narrow.
            let mut head = [0u8; 24];
            if k % 2 == 0 {
                ahead.take_head(&b, &mut [&mut head[..]], &mut ticker, &mut ok)
            } else {
                ahead.take(&b, &mut [&mut head[..]], &mut ticker, &mut ok)
            }
            .unwrap();
            assert_eq!(head[..], data[at..at + 24], "head {k}");
            at += 24;
            // The payload in two parts, as a request's segments.
            let mut payload = vec![0u8; n];
            let (x, y) = payload.split_at_mut(n / 3);
            ahead.take(&b, &mut [x, y], &mut ticker, &mut ok).unwrap();
            assert!(payload[..] == data[at..at + n], "payload {k}");
            at += n;
            assert!(ahead.end - ahead.pos <= AHEAD_WIDE);
        }
        writer.join().unwrap();
        drop(l);
        let mut more = [0u8; 1];
        assert!(matches!(
            ahead.take(&b, &mut [&mut more[..]], &mut ticker, &mut ok),
            Err(ReadError::Eof { got: 0 })
        ));
    }

    #[test]
    fn vectored_round_trip_over_a_socket_pair() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        // Many parts, some empty, more than MAX_IOV of them, more bytes than a socket
        // buffer holds (so both sides see partial transfers).
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let writer = std::thread::spawn(move || {
            let mut parts: Vec<&[u8]> = Vec::new();
            let mut rest = &data[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = rest.len().min(1 + (i * 37) % 4000);
                parts.push(&rest[..n]);
                if i % 5 == 0 {
                    parts.push(&[]);
                }
                rest = &rest[n..];
                i += 1;
            }
            assert!(parts.len() > MAX_IOV);
            write_all_vectored(&a, &mut parts, &mut give_up).unwrap();
            data
        });
        b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut out = vec![0u8; 3_000_000];
        let mut parts: Vec<&mut [u8]> = out.chunks_mut(999).collect();
        let mut ticker = Ticker::new(Duration::from_millis(50));
        read_exact_vectored::<()>(&b, &mut parts, &mut ticker, &mut || Ok(())).unwrap();
        let data = writer.join().unwrap();
        assert!(out == data);
        // The writer's socket is gone: end of stream at a boundary.
        let mut buf = [0u8; 8];
        let mut parts: [&mut [u8]; 1] = [&mut buf];
        match read_exact_vectored::<()>(&b, &mut parts, &mut ticker, &mut || Ok(())) {
            Err(ReadError::Eof { got: 0 }) => {}
            other => panic!("{other:?}"),
        }
    }
}
