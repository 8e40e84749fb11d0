//! Asynchronous calls: callbacks, or completions queued for [`zcio_reap`].
//!
//! Each request is an [`Op`]: the core's [`zcio_core::Completion`] (a future) plus what to do
//! when it finishes. The op is its own waker: the transport's thread that completes the
//! request wakes it, and that wake polls the finished future and runs the callback (or
//! queues the event) right there. No thread of ours is involved and nothing is handed to
//! another thread per I/O beyond the transport's own completion.

use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use libc::{iovec, off_t, size_t, ssize_t};
use zcio_core::Iobref;

use crate::error::{self, guard, Failure};
use crate::{file, instance, iovecs, lock, offset_of, raw_segs, read_capacity, zcio_fd_t, zcio_t};

/// Called when an asynchronous request finishes: `ret` is the bytes transferred, or -1
/// with `errno` set (on the calling thread) to why.
///
/// **Which thread**: the one that completed the request — the transport's receiving
/// thread for the connection (TCP: its reader; RDMA: its completion thread) — or the
/// submitting thread itself, inside the submitting call, when the request had already
/// finished. Callbacks of one instance can therefore run concurrently with each other
/// and with the application's threads.
///
/// **What it may call**: `zcio_free_buffer`, `zcio_buffer_size`, `zcio_last_error`, and
/// its own non-blocking code (mark the request done, signal a condition variable). It must
/// not block and must not call anything that waits for the server (synchronous I/O,
/// `zcio_open`, `zcio_close`, `zcio_fini`, a waiting `zcio_reap`, new submissions): the
/// thread it runs on is the one that delivers replies, so waiting there can deadlock.
/// `fd` is the file's handle, passed back for identification.
pub type zcio_io_cbk =
    Option<unsafe extern "C" fn(fd: *mut zcio_fd_t, ret: ssize_t, data: *mut c_void)>;

/// One finished asynchronous request, as `zcio_reap` returns it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct zcio_event {
    /// The file the request was on.
    pub fd: *mut zcio_fd_t,
    /// Bytes transferred, or -1.
    pub ret: ssize_t,
    /// The errno when `ret` is -1, else 0.
    pub error: c_int,
    /// The `data` given at submission.
    pub data: *mut c_void,
}

// SAFETY: the pointers are opaque tokens the application gave us; we never dereference
// them, only hand them back.
unsafe impl Send for zcio_event {}

/// Completions queued for reaping, with how many reapable requests are still in flight.
#[derive(Default)]
pub(crate) struct Queue {
    pub(crate) done: VecDeque<zcio_event>,
    pub(crate) pending: usize,
}

/// A raw pointer the op carries to its completion (the caller's contract keeps it valid).
struct Ptr<T>(*mut T);
// SAFETY: only used by the op that owns it, after the request completes, under the
// caller's contract that the memory stays valid until then (or, for handles and `data`,
// only handed back, never dereferenced).
unsafe impl<T> Send for Ptr<T> {}
// SAFETY: as above; `&Ptr` only gives a copy of the address.
unsafe impl<T> Sync for Ptr<T> {}
impl<T> Ptr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

type OpFuture = Pin<Box<dyn Future<Output = Result<usize, Failure>> + Send>>;

/// One asynchronous request in flight; it is also its own waker.
struct Op {
    fut: Mutex<Option<OpFuture>>,
    fd: Arc<zcio_fd_t>,
    fd_handle: Ptr<zcio_fd_t>,
    cbk: zcio_io_cbk,
    data: Ptr<c_void>,
}

impl Wake for Op {
    fn wake(self: Arc<Self>) {
        self.drive();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.drive();
    }
}

impl Op {
    /// Polls the request; when it has finished, delivers its result.
    fn drive(self: &Arc<Self>) {
        let out = {
            let mut g = lock(&self.fut);
            let Some(f) = g.as_mut() else { return };
            let waker = Waker::from(self.clone());
            let mut cx = Context::from_waker(&waker);
            match catch_unwind(AssertUnwindSafe(|| f.as_mut().poll(&mut cx))) {
                Ok(Poll::Pending) => return,
                Ok(Poll::Ready(r)) => {
                    *g = None;
                    r
                }
                Err(p) => {
                    *g = None;
                    Err(error::panic_failure(&*p))
                }
            }
        };
        self.deliver(out);
    }

    fn deliver(&self, out: Result<usize, Failure>) {
        let z = self.fd.zcio.clone();
        *lock(&self.fd.inflight) -= 1;
        let (ret, err) = match &out {
            Ok(n) => (*n as ssize_t, 0),
            Err(f) => (-1, f.errno),
        };
        match self.cbk {
            Some(cbk) => {
                if let Err(f) = &out {
                    error::set(f);
                }
                // SAFETY: the application's callback, called as documented with the
                // pointers it gave us; a C function does not unwind.
                let r = catch_unwind(AssertUnwindSafe(|| unsafe {
                    cbk(self.fd_handle.get(), ret, self.data.get())
                }));
                if let Err(p) = r {
                    error::panic_failure(&*p);
                }
            }
            None => {
                let mut q = lock(&z.events);
                q.pending -= 1;
                q.done.push_back(zcio_event {
                    fd: self.fd_handle.get(),
                    ret,
                    error: err,
                    data: self.data.get(),
                });
                z.ready.notify_all();
            }
        }
        let mut n = lock(&z.inflight);
        *n -= 1;
        if *n == 0 {
            z.idle.notify_all();
        }
    }
}

/// Starts an op: counts it in flight, builds its future with `start` (which submits the
/// request), and polls it once on this thread.
fn submit(
    fd: *mut zcio_fd_t,
    cbk: zcio_io_cbk,
    data: *mut c_void,
    start: impl FnOnce(&Arc<zcio_fd_t>) -> Result<OpFuture, Failure>,
) -> Result<c_int, Failure> {
    let f = file(fd)?;
    let z = f.zcio.clone();
    z.client()?;
    *lock(&z.inflight) += 1;
    *lock(&f.inflight) += 1;
    if cbk.is_none() {
        lock(&z.events).pending += 1;
    }
    let fut = match start(&f) {
        Ok(fut) => fut,
        Err(e) => {
            *lock(&f.inflight) -= 1;
            if cbk.is_none() {
                lock(&z.events).pending -= 1;
            }
            let mut n = lock(&z.inflight);
            *n -= 1;
            if *n == 0 {
                z.idle.notify_all();
            }
            return Err(e);
        }
    };
    let op = Arc::new(Op {
        fut: Mutex::new(Some(fut)),
        fd: f,
        fd_handle: Ptr(fd),
        cbk,
        data: Ptr(data),
    });
    op.drive();
    Ok(0)
}

/// Lends the buffers of a finished zero-copy read to the caller and describes them in
/// `iov[0 .. *iovcnt]`; returns the bytes.
///
/// # Safety
/// `iov` is writable for as many iovecs as `got` has buffers; `iovcnt` is writable.
pub(crate) unsafe fn hand_out(
    z: &zcio_t,
    got: Iobref,
    iov: *mut iovec,
    iovcnt: *mut c_int,
) -> ssize_t {
    let total = got.total_len();
    let bufs = got.into_vec();
    for (i, b) in bufs.iter().enumerate() {
        // SAFETY: at most the capacity checked at submission.
        unsafe {
            iov.add(i).write(iovec {
                iov_base: b.as_ptr().cast_mut().cast(),
                iov_len: b.len(),
            })
        };
    }
    // SAFETY: writable by the caller's contract.
    unsafe { iovcnt.write(bufs.len() as c_int) };
    z.lend(bufs);
    total as ssize_t
}

/// Starts a read into the caller's iovecs (as `zcio_preadv`); returns 0 at once, and
/// `cbk(fd, bytes, data)` runs when it finishes (see [`zcio_io_cbk`]), or, with `cbk`
/// NULL, the completion is queued for `zcio_reap`. -1 and errno if it could not start (no
/// callback then).
///
/// # Safety
/// The iovecs' ranges stay valid and untouched until completion (the `iov` array itself
/// may go at once).
#[no_mangle]
pub unsafe extern "C" fn zcio_preadv_async(
    fd: *mut zcio_fd_t,
    iov: *const iovec,
    iovcnt: c_int,
    offset: off_t,
    flags: c_int,
    cbk: zcio_io_cbk,
    data: *mut c_void,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { vectored_async(fd, iov, iovcnt, offset, flags, cbk, data, false) }
}

/// Starts a write of the caller's iovecs (as `zcio_pwritev`); as `zcio_preadv_async`.
///
/// # Safety
/// The iovecs' ranges stay valid and unwritten until completion.
#[no_mangle]
pub unsafe extern "C" fn zcio_pwritev_async(
    fd: *mut zcio_fd_t,
    iov: *const iovec,
    iovcnt: c_int,
    offset: off_t,
    flags: c_int,
    cbk: zcio_io_cbk,
    data: *mut c_void,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { vectored_async(fd, iov, iovcnt, offset, flags, cbk, data, true) }
}

/// `zcio_preadv_async` / `zcio_pwritev_async`.
///
/// # Safety
/// As those.
#[allow(clippy::too_many_arguments)]
unsafe fn vectored_async(
    fd: *mut zcio_fd_t,
    iov: *const iovec,
    iovcnt: c_int,
    offset: off_t,
    flags: c_int,
    cbk: zcio_io_cbk,
    data: *mut c_void,
    write: bool,
) -> c_int {
    guard(-1, || {
        crate::no_flags(flags)?;
        // SAFETY: the caller's contract.
        let segs = raw_segs(unsafe { iovecs(iov, iovcnt) }?);
        let off = offset_of(offset)?;
        submit(fd, cbk, data, |f| {
            // SAFETY: the ranges stay valid until completion, and the op keeps the
            // completion until it has finished.
            let c = unsafe { crate::start_vectored(f, &segs, off, write) }?;
            Ok(Box::pin(async move { Ok(c.await?) }))
        })
    })
}

/// Starts a zero-copy read (as `zcio_zero_readv`): when it finishes, `iov[0 .. *iovcnt]`
/// describes the filled pool buffers (lent to the caller) and then the callback runs or
/// the event is queued.
///
/// # Safety
/// `iov` (capacity `*iovcnt`) and `iovcnt` stay valid until completion.
#[no_mangle]
pub unsafe extern "C" fn zcio_zero_readv_async(
    fd: *mut zcio_fd_t,
    size: size_t,
    offset: off_t,
    iov: *mut iovec,
    iovcnt: *mut c_int,
    cbk: zcio_io_cbk,
    data: *mut c_void,
) -> c_int {
    guard(-1, || {
        // SAFETY: the caller's contract.
        let cap = unsafe { read_capacity(iov, iovcnt) }?;
        let off = offset_of(offset)?;
        let (iov, iovcnt) = (Ptr(iov), Ptr(iovcnt));
        submit(fd, cbk, data, |f| {
            let bufs = f.zcio.read_buffers(size, cap)?;
            let c = f.file.read_into_async(bufs, off)?;
            let z = f.zcio.clone();
            Ok(Box::pin(async move {
                let got = c.await?;
                // SAFETY: `iov` and `iovcnt` stay valid until completion (the caller's
                // contract); `got` has at most `cap` buffers.
                Ok(unsafe { hand_out(&z, got, iov.get(), iovcnt.get()) } as usize)
            }))
        })
    })
}

/// Starts a zero-copy write (as `zcio_zero_writev`). The buffers are in flight until it
/// finishes (`zcio_free_buffer` on them is `EINVAL` meanwhile) and are the caller's again
/// before the callback runs, whatever the outcome.
///
/// # Safety
/// The buffers are not written until completion.
#[no_mangle]
pub unsafe extern "C" fn zcio_zero_writev_async(
    fd: *mut zcio_fd_t,
    iov: *const iovec,
    iovcnt: c_int,
    offset: off_t,
    cbk: zcio_io_cbk,
    data: *mut c_void,
) -> c_int {
    guard(-1, || {
        // SAFETY: the caller's contract.
        let v = unsafe { iovecs(iov, iovcnt) }?;
        let off = offset_of(offset)?;
        submit(fd, cbk, data, |f| {
            let bufs = f.zcio.take_buffers(v)?;
            // SAFETY: `bufs` moves into the future below, which keeps it until the
            // completion it owns has finished (the op never drops it unfinished).
            let c = match unsafe { f.file.zero_writev_raw_async(&bufs, off) } {
                Ok(c) => c,
                Err(e) => {
                    f.zcio.lend(bufs.into_vec());
                    return Err(e.into());
                }
            };
            let z = f.zcio.clone();
            Ok(Box::pin(async move {
                let r = c.await;
                z.lend(bufs.into_vec());
                Ok(r?)
            }))
        })
    })
}

/// Takes finished requests submitted without a callback on this instance: waits until
/// at least `min` are there (fewer if fewer are outstanding) or `timeout_ms` has passed
/// (negative: no limit; 0: do not wait), then moves up to `max` into `events`. Returns
/// how many. Reap from one thread per instance.
///
/// # Safety
/// `events` is writable for `max` entries.
#[no_mangle]
pub unsafe extern "C" fn zcio_reap(
    z: *mut zcio_t,
    events: *mut zcio_event,
    min: c_int,
    max: c_int,
    timeout_ms: c_int,
) -> c_int {
    guard(-1, || {
        let z = instance(z)?;
        if max <= 0 || min < 0 || min > max || events.is_null() {
            return Err(Failure::inval(format!(
                "need events != NULL and 0 <= min <= max, max > 0 (min {min}, max {max})"
            )));
        }
        let deadline =
            (timeout_ms >= 0).then(|| Instant::now() + Duration::from_millis(timeout_ms as u64));
        let mut q = lock(&z.events);
        loop {
            let want = (min as usize).min(q.done.len() + q.pending);
            if q.done.len() >= want {
                break;
            }
            q = match deadline {
                None => z.ready.wait(q).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break;
                    }
                    z.ready
                        .wait_timeout(q, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
        let n = q.done.len().min(max as usize);
        for (i, e) in q.done.drain(..n).enumerate() {
            // SAFETY: writable for `max` entries by the caller's contract; `i < max`.
            unsafe { events.add(i).write(e) };
        }
        Ok(n as c_int)
    })
}
