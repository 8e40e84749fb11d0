//! # libzcio: the zcio client as a C library
//!
//! The C face of [`zcio_core::Client`], in the style of GlusterFS's libgfapi (`glfs_*`), with
//! the zero-copy calls GlusterFS proposed in 2015 and never shipped: `zcio_get_buffer`,
//! `zcio_free_buffer`, `zcio_zero_readv`, `zcio_zero_writev`. The header `include/zcio.h`
//! is generated from this crate by cbindgen (a test fails when it is stale).
//!
//! Conventions:
//! - Calls return `-1` (or `NULL`) on failure and set `errno`; [`zcio_last_error`] gives
//!   the calling thread's last message. `zcio_free_buffer` returns nothing but sets
//!   `errno` too.
//! - Handles (`zcio_t *`, `zcio_fd_t *`) are looked up in tables before use, so a closed,
//!   finished or made-up handle is `EBADF`, never a dereference of freed memory.
//! - Pool buffers handed out by `zcio_get_buffer` / `zcio_zero_readv` are looked up by
//!   address in a hash table (O(1)): a base that did not come from there, or was already
//!   freed, is `EINVAL`.
//! - No Rust panic crosses into C: each entry point catches one, logs it, and fails with
//!   `EIO`.
//! - Asynchronous calls take a callback, or none (`NULL`) to queue the completion for
//!   [`zcio_reap`]; see [`zcio_io_cbk`] for the thread a callback runs on.
#![allow(non_camel_case_types)]

mod asyncio;
mod error;
mod handles;

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr::{self, NonNull};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use libc::{iovec, mode_t, off_t, size_t, ssize_t};
use zcio_core::{Client, Config, File, Iobref, IobufMut, OpenFlags};

use error::{guard, Failure};
use handles::Handles;

pub use asyncio::{
    zcio_event, zcio_io_cbk, zcio_preadv_async, zcio_pwritev_async, zcio_reap,
    zcio_zero_readv_async, zcio_zero_writev_async,
};

/// The most iovec entries one call takes (as `IOV_MAX`).
pub const ZCIO_IOV_MAX: c_int = 1024;

/// A zcio instance: a configuration, then a connection to one server, its buffer pool and
/// the pool buffers lent to the caller. Opaque.
pub struct zcio_t {
    setup: Mutex<Setup>,
    client: OnceLock<Client>,
    /// Pool buffers the caller holds, by address.
    bufs: Mutex<std::collections::HashMap<usize, IobufMut>>,
    /// Asynchronous requests not yet completed (callbacks not yet returned).
    inflight: Mutex<usize>,
    idle: Condvar,
    /// Completions of asynchronous calls made without a callback, for [`zcio_reap`].
    events: Mutex<asyncio::Queue>,
    ready: Condvar,
}

/// Configuration text and the `zcio_set` overrides, until `zcio_connect`.
struct Setup {
    text: String,
    origin: String,
    overrides: Vec<String>,
}

/// An open file on a zcio instance. Opaque.
pub struct zcio_fd_t {
    zcio: Arc<zcio_t>,
    file: File,
    /// Asynchronous requests on this file not yet completed.
    inflight: Mutex<usize>,
}

fn instances() -> &'static Handles<zcio_t> {
    static H: OnceLock<Handles<zcio_t>> = OnceLock::new();
    H.get_or_init(Handles::new)
}

fn files() -> &'static Handles<zcio_fd_t> {
    static H: OnceLock<Handles<zcio_fd_t>> = OnceLock::new();
    H.get_or_init(Handles::new)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl zcio_t {
    fn client(&self) -> Result<&Client, Failure> {
        self.client
            .get()
            .ok_or_else(|| Failure::new(libc::ENOTCONN, "not connected: call zcio_connect first"))
    }

    /// Takes the buffers at the bases of `iov` out of the lent table (lengths set to the
    /// iovec's); all or nothing.
    fn take_buffers(&self, iov: &[iovec]) -> Result<Iobref, Failure> {
        let mut t = lock(&self.bufs);
        let mut out = Iobref::with_capacity(iov.len());
        for (i, v) in iov.iter().enumerate() {
            let fail = match t.get(&(v.iov_base as usize)) {
                None => Some(Failure::inval(format!(
                    "iov[{i}].iov_base {:p} is not a buffer from zcio_get_buffer held by the caller \
                     (never given, freed, or given twice in one call)",
                    v.iov_base
                ))),
                Some(b) if v.iov_len > b.capacity() => Some(Failure::inval(format!(
                    "iov[{i}].iov_len {} exceeds its buffer's size {}",
                    v.iov_len,
                    b.capacity()
                ))),
                Some(_) => None,
            };
            if let Some(f) = fail {
                for b in out.into_vec() {
                    t.insert(b.as_ptr() as usize, b);
                }
                return Err(f);
            }
            if let Some(mut b) = t.remove(&(v.iov_base as usize)) {
                b.set_len(v.iov_len);
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Lends buffers to the caller (back into the table).
    fn lend(&self, bufs: impl IntoIterator<Item = IobufMut>) {
        let mut t = lock(&self.bufs);
        for b in bufs {
            t.insert(b.as_ptr() as usize, b);
        }
    }

    /// Pool buffers for a read of `size` bytes, in as few buffers as one request can carry
    /// each; at most `max` buffers.
    fn read_buffers(&self, size: usize, max: usize) -> Result<Iobref, Failure> {
        let c = self.client()?;
        let l = c.limits();
        let per = l
            .max_payload
            .min(c.pool().max_buffer_size() * l.max_segments)
            .max(1);
        let mut bufs = Iobref::new();
        let mut left = size;
        while left > 0 {
            let n = left.min(per);
            for b in c.pool().get_span(n)?.into_vec() {
                bufs.push(b);
            }
            if bufs.count() > max {
                return Err(Failure::inval(format!(
                    "{size} bytes need more than *iovcnt = {max} pool buffers"
                )));
            }
            left -= n;
        }
        Ok(bufs)
    }
}

/// The configuration `zcio_connect` would use, with `client.connect` set to `addr`.
fn config_of(z: &zcio_t, addr: Option<&str>) -> Result<Config, Failure> {
    let s = lock(&z.setup);
    let mut o = s.overrides.clone();
    if let Some(a) = addr {
        o.push(format!("client.connect={}", toml::Value::String(a.into())));
    }
    Ok(parse_config(&s.text, &s.origin, &o)?)
}

/// A C string argument as UTF-8.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn cstr<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(Failure::inval(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Failure::inval(format!("{what} is not UTF-8")))
}

/// The caller's iovec array as a slice, checked: count within `0..=ZCIO_IOV_MAX`, no NULL
/// base with a length.
///
/// # Safety
/// `iov` points to `iovcnt` iovecs (or is NULL).
unsafe fn iovecs<'a>(iov: *const iovec, iovcnt: c_int) -> Result<&'a [iovec], Failure> {
    if !(0..=ZCIO_IOV_MAX).contains(&iovcnt) {
        return Err(Failure::inval(format!(
            "iovcnt {iovcnt} is outside 0..={ZCIO_IOV_MAX}"
        )));
    }
    if iovcnt == 0 {
        return Ok(&[]);
    }
    if iov.is_null() {
        return Err(Failure::inval("iov is NULL"));
    }
    // SAFETY: the caller gives `iovcnt` readable iovecs.
    let v = unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) };
    if let Some(i) = v.iter().position(|s| s.iov_base.is_null() && s.iov_len > 0) {
        return Err(Failure::new(
            libc::EFAULT,
            format!("iov[{i}].iov_base is NULL"),
        ));
    }
    Ok(v)
}

/// The non-empty segments of `iov` as (address, length).
fn raw_segs(iov: &[iovec]) -> Vec<(NonNull<u8>, usize)> {
    iov.iter()
        .filter(|s| s.iov_len > 0)
        .filter_map(|s| NonNull::new(s.iov_base.cast::<u8>()).map(|p| (p, s.iov_len)))
        .collect()
}

fn offset_of(offset: off_t) -> Result<u64, Failure> {
    u64::try_from(offset).map_err(|_| Failure::inval(format!("offset {offset} is negative")))
}

fn no_flags(flags: c_int) -> Result<(), Failure> {
    if flags != 0 {
        return Err(Failure::inval(format!(
            "flags {flags:#x}: none are defined yet; pass 0"
        )));
    }
    Ok(())
}

fn instance(z: *mut zcio_t) -> Result<Arc<zcio_t>, Failure> {
    instances()
        .get(z)
        .ok_or_else(|| Failure::badf(format!("zcio_t {z:p} is not a live instance")))
}

fn file(fd: *mut zcio_fd_t) -> Result<Arc<zcio_fd_t>, Failure> {
    files()
        .get(fd)
        .ok_or_else(|| Failure::badf(format!("zcio_fd_t {fd:p} is not an open file")))
}

fn len_ret(n: usize) -> ssize_t {
    n as ssize_t
}

/// The calling thread's last error message (never NULL; empty when none). Valid until
/// this thread's next failing zcio call.
#[no_mangle]
pub extern "C" fn zcio_last_error() -> *const c_char {
    error::last()
}

/// A new instance configured from the TOML file `config_path` (NULL: the defaults).
/// Returns NULL and sets errno when the file cannot be read or parsed.
///
/// # Safety
/// `config_path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn zcio_new(config_path: *const c_char) -> *mut zcio_t {
    guard(ptr::null_mut(), || {
        let (text, origin) = if config_path.is_null() {
            (String::new(), "<defaults>".to_string())
        } else {
            // SAFETY: NUL-terminated by the caller's contract.
            let p = unsafe { cstr(config_path, "config_path") }?;
            let text = std::fs::read_to_string(p).map_err(|source| {
                Failure::from(zcio_core::Error::ReadConfig {
                    path: p.into(),
                    source,
                })
            })?;
            (text, p.to_string())
        };
        parse_config(&text, &origin, &[])?;
        let z = zcio_t {
            setup: Mutex::new(Setup {
                text,
                origin,
                overrides: Vec::new(),
            }),
            client: OnceLock::new(),
            bufs: Mutex::new(Default::default()),
            inflight: Mutex::new(0),
            idle: Condvar::new(),
            events: Mutex::new(Default::default()),
            ready: Condvar::new(),
        };
        Ok(instances().insert(Arc::new(z)))
    })
}

/// Sets one configuration key, as `zcio --set key=value` does (for example
/// `"transport"`, `"rdma"`; `"client.token"`, `"secret"`; `"pool.wait_timeout_ms"`,
/// `"500"`). The value is TOML, or taken as a string when it is not. Checked at once: an
/// unknown key or a bad value is `EINVAL`. Only before `zcio_connect` (else `EISCONN`).
///
/// # Safety
/// `key` and `value` are NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn zcio_set(
    z: *mut zcio_t,
    key: *const c_char,
    value: *const c_char,
) -> c_int {
    guard(-1, || {
        let z = instance(z)?;
        // SAFETY: NUL-terminated by the caller's contract.
        let (k, v) = unsafe { (cstr(key, "key")?, cstr(value, "value")?) };
        if k.is_empty() || k.contains('=') {
            return Err(Failure::inval(format!("bad key {k:?}")));
        }
        if z.client.get().is_some() {
            return Err(Failure::new(libc::EISCONN, "zcio_set after zcio_connect"));
        }
        let mut s = lock(&z.setup);
        let mut o = s.overrides.clone();
        o.push(format!("{k}={v}"));
        parse_config(&s.text, &s.origin, &o)?;
        s.overrides = o;
        Ok(0)
    })
}

/// Parses a configuration, with the sections the transports own (`[tcp]`, `[rdma]`)
/// registered first: every build reads them, with or without RDMA support.
fn parse_config(text: &str, origin: &str, overrides: &[String]) -> zcio_core::Result<Config> {
    zcio_tcp::config::register();
    zcio_rdma::config::register();
    Config::parse_with(text, origin, overrides)
}

/// The transports this library was built with: TCP always, RDMA with the `rdma` feature
/// (without it, selecting `rdma` fails with a message saying how to build it in).
fn registry() -> zcio_core::transport::Registry {
    let mut r = zcio_core::transport::Registry::new();
    zcio_tcp::register(&mut r);
    zcio_rdma::register(&mut r);
    r
}

/// Connects to the server at `addr` (`host:port`; NULL: the configuration's
/// `client.connect`) over the configured transport. Once per instance (`EISCONN`).
///
/// # Safety
/// `addr` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn zcio_connect(z: *mut zcio_t, addr: *const c_char) -> c_int {
    guard(-1, || {
        let z = instance(z)?;
        let addr = if addr.is_null() {
            None
        } else {
            // SAFETY: NUL-terminated by the caller's contract.
            Some(unsafe { cstr(addr, "addr") }?)
        };
        if z.client.get().is_some() {
            return Err(Failure::new(libc::EISCONN, "already connected"));
        }
        let cfg = config_of(&z, addr)?;
        let c = Client::connect_with(&cfg, &registry())?;
        z.client
            .set(c)
            .map_err(|_| Failure::new(libc::EISCONN, "already connected"))?;
        Ok(0)
    })
}

/// Ends an instance: waits for its asynchronous requests (their callbacks return first),
/// closes its open files and its connection, and frees every pool buffer it lent (so
/// their addresses become invalid). Completions not reaped are dropped. A NULL or unknown
/// handle is ignored (errno `EBADF`). Must not be called from a callback.
///
/// # Safety
/// No other thread uses `z` during or after this call.
#[no_mangle]
pub unsafe extern "C" fn zcio_fini(z: *mut zcio_t) {
    guard((), || {
        let z = instances()
            .remove(z)
            .ok_or_else(|| Failure::badf(format!("zcio_t {z:p} is not a live instance")))?;
        {
            let mut n = lock(&z.inflight);
            while *n > 0 {
                n = z.idle.wait(n).unwrap_or_else(|p| p.into_inner());
            }
        }
        for f in files().remove_where(|f| Arc::ptr_eq(&f.zcio, &z)) {
            if let Ok(f) = Arc::try_unwrap(f) {
                let _ = f.file.close();
            }
        }
        lock(&z.events).done.clear();
        lock(&z.bufs).clear();
        if let Some(c) = z.client.get() {
            c.close();
        }
        Ok(())
    })
}

/// POSIX open flags to zcio's.
fn open_flags(flags: c_int) -> Result<OpenFlags, Failure> {
    let known = libc::O_ACCMODE
        | libc::O_CREAT
        | libc::O_EXCL
        | libc::O_TRUNC
        | libc::O_DIRECT
        | libc::O_CLOEXEC
        | libc::O_LARGEFILE
        | libc::O_NOCTTY
        | libc::O_NOATIME;
    if flags & !known != 0 {
        return Err(Failure::inval(format!(
            "open flags {:#o} are not supported (O_APPEND, O_SYNC, ... are not)",
            flags & !known
        )));
    }
    let mut f = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => OpenFlags::READ,
        libc::O_WRONLY => OpenFlags::WRITE,
        libc::O_RDWR => OpenFlags::rw(),
        _ => return Err(Failure::inval("bad access mode")),
    };
    for (posix, ours) in [
        (libc::O_CREAT, OpenFlags::CREATE),
        (libc::O_EXCL, OpenFlags::EXCL),
        (libc::O_TRUNC, OpenFlags::TRUNCATE),
        (libc::O_DIRECT, OpenFlags::DIRECT),
    ] {
        if flags & posix != 0 {
            f = f | ours;
        }
    }
    Ok(f)
}

fn open_common(
    z: *mut zcio_t,
    path: *const c_char,
    flags: c_int,
    mode: Option<mode_t>,
) -> Result<*mut zcio_fd_t, Failure> {
    let z = instance(z)?;
    // SAFETY: NUL-terminated by the caller's contract.
    let path = unsafe { cstr(path, "path") }?;
    let c = z.client()?;
    let file = match mode {
        None if flags & libc::O_CREAT != 0 => {
            return Err(Failure::inval("O_CREAT needs a mode: use zcio_creat"))
        }
        None => c.open(path, open_flags(flags)?)?,
        Some(m) => c.open_mode(path, open_flags(flags | libc::O_CREAT)?, m & 0o7777)?,
    };
    Ok(files().insert(Arc::new(zcio_fd_t {
        zcio: z.clone(),
        file,
        inflight: Mutex::new(0),
    })))
}

/// Opens `path` (relative to the server's export) with POSIX `O_*` flags (`O_RDONLY`,
/// `O_WRONLY`, `O_RDWR`, `O_TRUNC`, `O_DIRECT`; `O_CREAT` only through `zcio_creat`).
///
/// # Safety
/// `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn zcio_open(
    z: *mut zcio_t,
    path: *const c_char,
    flags: c_int,
) -> *mut zcio_fd_t {
    guard(ptr::null_mut(), || open_common(z, path, flags, None))
}

/// Opens `path`, creating it with `mode` if it does not exist (`O_CREAT` is implied;
/// `O_EXCL` fails if it does).
///
/// # Safety
/// `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn zcio_creat(
    z: *mut zcio_t,
    path: *const c_char,
    flags: c_int,
    mode: mode_t,
) -> *mut zcio_fd_t {
    guard(ptr::null_mut(), || open_common(z, path, flags, Some(mode)))
}

/// Closes a file and waits for the server to confirm. `EBUSY` (and the file stays open)
/// while asynchronous requests on it are in flight; `EBADF` for a closed or unknown file.
///
/// # Safety
/// None beyond the handle rules above.
#[no_mangle]
pub unsafe extern "C" fn zcio_close(fd: *mut zcio_fd_t) -> c_int {
    guard(-1, || {
        let f = files()
            .remove_if(fd, |f| *lock(&f.inflight) == 0)
            .map_err(|busy| {
                if busy {
                    Failure::new(
                        libc::EBUSY,
                        "asynchronous requests are in flight on this file",
                    )
                } else {
                    Failure::badf(format!("zcio_fd_t {fd:p} is not an open file"))
                }
            })?;
        // If another thread is inside a call on it, the handle closes (without waiting)
        // when that call returns.
        if let Ok(f) = Arc::try_unwrap(f) {
            f.file.close()?;
        }
        Ok(0)
    })
}

/// Fills `st` with the file's size, mode and modification time (other fields zero,
/// `st_nlink` 1, `st_blksize` 4096).
///
/// # Safety
/// `st` points to a writable `struct stat`.
#[no_mangle]
pub unsafe extern "C" fn zcio_fstat(fd: *mut zcio_fd_t, st: *mut libc::stat) -> c_int {
    guard(-1, || {
        let f = file(fd)?;
        if st.is_null() {
            return Err(Failure::inval("st is NULL"));
        }
        let s = f.file.stat()?;
        // SAFETY: `libc::stat` is plain old data: all zeroes is a valid value.
        let mut out: libc::stat = unsafe { std::mem::zeroed() };
        out.st_size = s.size as off_t;
        out.st_mode = s.mode;
        out.st_nlink = 1;
        out.st_blksize = 4096;
        out.st_blocks = s.size.div_ceil(512) as _;
        out.st_mtime = s.mtime_ns.div_euclid(1_000_000_000);
        out.st_mtime_nsec = s.mtime_ns.rem_euclid(1_000_000_000);
        // SAFETY: non-NULL and writable by the caller's contract.
        unsafe { st.write(out) };
        Ok(0)
    })
}

/// Sets the file's length.
///
/// # Safety
/// None beyond the handle rules above.
#[no_mangle]
pub unsafe extern "C" fn zcio_ftruncate(fd: *mut zcio_fd_t, length: off_t) -> c_int {
    guard(-1, || {
        let f = file(fd)?;
        f.file.truncate(offset_of(length)?)?;
        Ok(0)
    })
}

/// Flushes the file to stable storage on the server.
///
/// # Safety
/// None beyond the handle rules above.
#[no_mangle]
pub unsafe extern "C" fn zcio_fsync(fd: *mut zcio_fd_t) -> c_int {
    guard(-1, || {
        file(fd)?.file.fsync()?;
        Ok(0)
    })
}

/// Removes a file.
///
/// # Safety
/// `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn zcio_unlink(z: *mut zcio_t, path: *const c_char) -> c_int {
    guard(-1, || {
        let z = instance(z)?;
        // SAFETY: NUL-terminated by the caller's contract.
        let p = unsafe { cstr(path, "path") }?;
        z.client()?.unlink(p)?;
        Ok(0)
    })
}

/// Creates a directory with `mode`.
///
/// # Safety
/// `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn zcio_mkdir(z: *mut zcio_t, path: *const c_char, mode: mode_t) -> c_int {
    guard(-1, || {
        let z = instance(z)?;
        // SAFETY: NUL-terminated by the caller's contract.
        let p = unsafe { cstr(path, "path") }?;
        z.client()?.mkdir_mode(p, mode & 0o7777)?;
        Ok(0)
    })
}

/// Reads into the caller's iovecs at `offset`; the transport writes straight into them.
/// Returns the bytes read (short at end of file). `flags`: 0.
///
/// # Safety
/// `iov` points to `iovcnt` iovecs whose ranges are writable.
#[no_mangle]
pub unsafe extern "C" fn zcio_preadv(
    fd: *mut zcio_fd_t,
    iov: *const iovec,
    iovcnt: c_int,
    offset: off_t,
    flags: c_int,
) -> ssize_t {
    // SAFETY: the caller's contract.
    unsafe { vectored(fd, iov, iovcnt, offset, flags, false) }
}

/// Writes the caller's iovecs at `offset`; the transport sends straight from them.
/// Returns the bytes written. `flags`: 0.
///
/// # Safety
/// `iov` points to `iovcnt` iovecs whose ranges are readable.
#[no_mangle]
pub unsafe extern "C" fn zcio_pwritev(
    fd: *mut zcio_fd_t,
    iov: *const iovec,
    iovcnt: c_int,
    offset: off_t,
    flags: c_int,
) -> ssize_t {
    // SAFETY: the caller's contract.
    unsafe { vectored(fd, iov, iovcnt, offset, flags, true) }
}

/// Starts a read into or a write from the caller's memory.
///
/// # Safety
/// As [`File::preadv_raw_async`] (reads) or [`File::pwritev_raw_async`] (writes).
unsafe fn start_vectored(
    f: &zcio_fd_t,
    segs: &[(NonNull<u8>, usize)],
    off: u64,
    write: bool,
) -> zcio_core::Result<zcio_core::Completion<usize>> {
    // SAFETY: the caller's contract.
    unsafe {
        if write {
            f.file.pwritev_raw_async(segs, off)
        } else {
            f.file.preadv_raw_async(segs, off)
        }
    }
}

/// `zcio_preadv` / `zcio_pwritev`: the asynchronous path, waited for.
///
/// # Safety
/// As `zcio_preadv` (reads) or `zcio_pwritev` (writes).
unsafe fn vectored(
    fd: *mut zcio_fd_t,
    iov: *const iovec,
    iovcnt: c_int,
    offset: off_t,
    flags: c_int,
    write: bool,
) -> ssize_t {
    guard(-1, || {
        let f = file(fd)?;
        no_flags(flags)?;
        // SAFETY: the caller's contract.
        let segs = raw_segs(unsafe { iovecs(iov, iovcnt) }?);
        let off = offset_of(offset)?;
        // SAFETY: the ranges are valid as the direction needs, and this call waits for
        // the completion.
        let c = unsafe { start_vectored(&f, &segs, off, write) }?;
        Ok(len_ret(c.wait()?))
    })
}

/// Reads `count` bytes at `offset` into `buf`.
///
/// # Safety
/// `buf` is writable for `count` bytes.
#[no_mangle]
pub unsafe extern "C" fn zcio_pread(
    fd: *mut zcio_fd_t,
    buf: *mut c_void,
    count: size_t,
    offset: off_t,
) -> ssize_t {
    let v = iovec {
        iov_base: buf,
        iov_len: count,
    };
    // SAFETY: the caller's contract, for one iovec.
    unsafe { zcio_preadv(fd, &v, 1, offset, 0) }
}

/// Writes `count` bytes from `buf` at `offset`.
///
/// # Safety
/// `buf` is readable for `count` bytes.
#[no_mangle]
pub unsafe extern "C" fn zcio_pwrite(
    fd: *mut zcio_fd_t,
    buf: *const c_void,
    count: size_t,
    offset: off_t,
) -> ssize_t {
    let v = iovec {
        iov_base: buf.cast_mut(),
        iov_len: count,
    };
    // SAFETY: the caller's contract, for one iovec.
    unsafe { zcio_pwritev(fd, &v, 1, offset, 0) }
}

/// A writable pool buffer of `size` bytes (at most the pool's largest class, see
/// `zcio_max_buffer_size`), registered with the transport: fill it and pass it to
/// `zcio_zero_writev`, or use it with any call. Give it back with `zcio_free_buffer`
/// (`zcio_fini` frees what is left). NULL with `ENOTCONN` before `zcio_connect`, `EINVAL`
/// for a bad size, `ENOMEM` when the pool stays empty past its wait timeout.
///
/// # Safety
/// None beyond the handle rules above.
#[no_mangle]
pub unsafe extern "C" fn zcio_get_buffer(z: *mut zcio_t, size: size_t) -> *mut c_void {
    guard(ptr::null_mut(), || {
        let z = instance(z)?;
        let pool = z.client()?.pool();
        if size == 0 || size > pool.max_buffer_size() {
            return Err(Failure::inval(format!(
                "size {size} is outside 1..={}",
                pool.max_buffer_size()
            )));
        }
        let mut b = pool.get(size)?;
        b.set_len(size);
        let p = b.as_mut_ptr();
        z.lend([b]);
        Ok(p.cast())
    })
}

/// The largest size `zcio_get_buffer` accepts (-1 with `ENOTCONN` before `zcio_connect`).
///
/// # Safety
/// None beyond the handle rules above.
#[no_mangle]
pub unsafe extern "C" fn zcio_max_buffer_size(z: *mut zcio_t) -> ssize_t {
    guard(-1, || {
        Ok(instance(z)?.client()?.pool().max_buffer_size() as ssize_t)
    })
}

/// The usable size of a buffer the caller holds (from `zcio_get_buffer` or
/// `zcio_zero_readv`): at least what was asked for. -1 with `EINVAL` for any other
/// address.
///
/// # Safety
/// None beyond the handle rules above.
#[no_mangle]
pub unsafe extern "C" fn zcio_buffer_size(z: *mut zcio_t, buf: *const c_void) -> ssize_t {
    guard(-1, || {
        let z = instance(z)?;
        let t = lock(&z.bufs);
        t.get(&(buf as usize))
            .map(|b| b.capacity() as ssize_t)
            .ok_or_else(|| Failure::inval(format!("{buf:p} is not a buffer the caller holds")))
    })
}

/// Gives a pool buffer back. A NULL, foreign, already freed or in-flight address is
/// `EINVAL` (errno set; nothing else happens).
///
/// # Safety
/// The caller no longer touches the buffer.
#[no_mangle]
pub unsafe extern "C" fn zcio_free_buffer(z: *mut zcio_t, buf: *mut c_void) {
    guard((), || {
        let z = instance(z)?;
        let b = lock(&z.bufs).remove(&(buf as usize));
        match b {
            Some(b) => {
                drop(b);
                Ok(())
            }
            None => Err(Failure::inval(format!(
                "{buf:p} is not a buffer from zcio_get_buffer/zcio_zero_readv held by the caller \
                 (foreign, freed already, or in flight)"
            ))),
        }
    })
}

/// Writes pool buffers at `offset` without copying: each `iov_base` must be an address
/// `zcio_get_buffer` (or `zcio_zero_readv`) returned, each `iov_len` at most its size.
/// The buffers stay the caller's. Returns the bytes written.
///
/// # Safety
/// `iov` points to `iovcnt` iovecs.
#[no_mangle]
pub unsafe extern "C" fn zcio_zero_writev(
    fd: *mut zcio_fd_t,
    iov: *const iovec,
    iovcnt: c_int,
    offset: off_t,
) -> ssize_t {
    guard(-1, || {
        let f = file(fd)?;
        // SAFETY: the caller's contract.
        let v = unsafe { iovecs(iov, iovcnt) }?;
        let off = offset_of(offset)?;
        let bufs = f.zcio.take_buffers(v)?;
        let r = f.file.zero_writev(&bufs, off);
        f.zcio.lend(bufs.into_vec());
        Ok(len_ret(r?))
    })
}

/// Reads `size` bytes at `offset` into pool buffers the transport fills directly, and
/// lends them: on return `iov[0 .. *iovcnt]` describes them (`*iovcnt` is the capacity of
/// `iov` on entry, the count on return; a read at end of file gives fewer bytes or none).
/// Give each base back with `zcio_free_buffer`. Returns the bytes read.
///
/// # Safety
/// `iov` is writable for `*iovcnt` iovecs; `iovcnt` is valid.
#[no_mangle]
pub unsafe extern "C" fn zcio_zero_readv(
    fd: *mut zcio_fd_t,
    size: size_t,
    offset: off_t,
    iov: *mut iovec,
    iovcnt: *mut c_int,
) -> ssize_t {
    guard(-1, || {
        let f = file(fd)?;
        // SAFETY: the caller's contract.
        let cap = unsafe { read_capacity(iov, iovcnt) }?;
        let off = offset_of(offset)?;
        let bufs = f.zcio.read_buffers(size, cap)?;
        let got = f.file.read_into_async(bufs, off)?.wait()?;
        // SAFETY: the caller's contract.
        Ok(unsafe { asyncio::hand_out(&f.zcio, got, iov, iovcnt) })
    })
}

/// Checks `zcio_zero_readv`'s output arguments; returns the capacity.
///
/// # Safety
/// `iovcnt` is NULL or readable.
unsafe fn read_capacity(iov: *mut iovec, iovcnt: *mut c_int) -> Result<usize, Failure> {
    if iovcnt.is_null() || iov.is_null() {
        return Err(Failure::inval("iov and iovcnt must not be NULL"));
    }
    // SAFETY: non-NULL, readable by the caller's contract.
    let cap = unsafe { iovcnt.read() };
    if !(1..=ZCIO_IOV_MAX).contains(&cap) {
        return Err(Failure::inval(format!(
            "*iovcnt {cap} is outside 1..={ZCIO_IOV_MAX}"
        )));
    }
    Ok(cap as usize)
}

#[cfg(test)]
mod tests;
