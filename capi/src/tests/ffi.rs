//! The C API called as C would call it, against a real zcio server on 127.0.0.1 over
//! TCP: every call, the zero-copy family, 32 asynchronous requests in flight (callbacks
//! and reaping), and every misuse the library can tell (each an errno, nothing broken).

use std::ffi::{c_int, c_void, CStr, CString};
use std::ptr;
use std::sync::mpsc;
use std::time::Duration;

use crate::{
    zcio_buffer_size, zcio_close, zcio_connect, zcio_creat, zcio_event, zcio_fd_t, zcio_fini,
    zcio_free_buffer, zcio_fstat, zcio_fsync, zcio_ftruncate, zcio_get_buffer, zcio_last_error,
    zcio_max_buffer_size, zcio_mkdir, zcio_new, zcio_open, zcio_pread, zcio_preadv,
    zcio_preadv_async, zcio_pwrite, zcio_pwritev, zcio_pwritev_async, zcio_reap, zcio_set, zcio_t,
    zcio_unlink, zcio_zero_readv, zcio_zero_readv_async, zcio_zero_writev, zcio_zero_writev_async,
    ZCIO_IOV_MAX,
};
use libc::iovec;
use zcio_core::{Config, ServerHandle};

struct Env {
    _dir: tempfile::TempDir,
    export: std::path::PathBuf,
    server: Option<ServerHandle>,
    addr: CString,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

fn server() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.server.export = dir.path().to_path_buf();
    cfg.server.listen = "127.0.0.1:0".into();
    let mut reg = zcio_core::transport::Registry::new();
    zcio_tcp::register(&mut reg);
    let s = zcio_core::Server::bind(&cfg, &reg)
        .unwrap()
        .spawn()
        .unwrap();
    let addr = CString::new(s.local_addr()).unwrap();
    Env {
        export: dir.path().to_path_buf(),
        _dir: dir,
        server: Some(s),
        addr,
    }
}

fn errno() -> c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn clear_errno() {
    // SAFETY: this thread's errno.
    unsafe { *libc::__errno_location() = 0 };
}

fn last_error() -> String {
    // SAFETY: the library returns a valid C string.
    unsafe { CStr::from_ptr(zcio_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// A connected instance.
fn connect(env: &Env) -> *mut zcio_t {
    // SAFETY: valid arguments.
    unsafe {
        let z = zcio_new(ptr::null());
        assert!(!z.is_null(), "{}", last_error());
        assert_eq!(zcio_connect(z, env.addr.as_ptr()), 0, "{}", last_error());
        z
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn every_call_against_a_real_server() {
    let env = server();
    // SAFETY: the calls below follow the header's rules.
    unsafe {
        let z = zcio_new(ptr::null());
        assert!(!z.is_null());
        assert_eq!(
            zcio_set(z, c("client.timeout_ms").as_ptr(), c("20000").as_ptr()),
            0
        );
        assert_eq!(zcio_connect(z, env.addr.as_ptr()), 0, "{}", last_error());
        assert_eq!(zcio_mkdir(z, c("d").as_ptr(), 0o750), 0, "{}", last_error());
        let md = std::fs::metadata(env.export.join("d")).unwrap();
        assert!(md.is_dir());
        let fd = zcio_creat(z, c("d/f").as_ptr(), libc::O_RDWR, 0o640);
        assert!(!fd.is_null(), "{}", last_error());
        let data = pattern(300_000, 7);
        assert_eq!(
            zcio_pwrite(fd, data.as_ptr().cast(), data.len(), 0),
            300_000
        );
        let mut back = vec![0u8; 300_000];
        assert_eq!(
            zcio_pread(fd, back.as_mut_ptr().cast(), back.len(), 0),
            300_000
        );
        assert_eq!(back, data);
        assert_eq!(std::fs::read(env.export.join("d/f")).unwrap(), data);
        // Vectored, three segments, one of them empty, at an offset.
        let (a, b) = (pattern(5000, 1), pattern(70_000, 2));
        let iov = [
            iovec {
                iov_base: a.as_ptr() as *mut c_void,
                iov_len: a.len(),
            },
            iovec {
                iov_base: ptr::null_mut(),
                iov_len: 0,
            },
            iovec {
                iov_base: b.as_ptr() as *mut c_void,
                iov_len: b.len(),
            },
        ];
        assert_eq!(zcio_pwritev(fd, iov.as_ptr(), 3, 1000, 0), 75_000);
        let (mut ra, mut rb) = (vec![0u8; 5000], vec![0u8; 70_000]);
        let riov = [
            iovec {
                iov_base: ra.as_mut_ptr().cast(),
                iov_len: ra.len(),
            },
            iovec {
                iov_base: rb.as_mut_ptr().cast(),
                iov_len: rb.len(),
            },
        ];
        assert_eq!(zcio_preadv(fd, riov.as_ptr(), 2, 1000, 0), 75_000);
        assert_eq!((ra, rb), (a, b));
        // Short at end of file.
        let mut tail = vec![0u8; 100];
        assert_eq!(zcio_pread(fd, tail.as_mut_ptr().cast(), 100, 299_950), 50);
        let mut st: libc::stat = std::mem::zeroed();
        assert_eq!(zcio_fstat(fd, &mut st), 0);
        assert_eq!(st.st_size, 300_000);
        assert_eq!(st.st_mode & 0o777, 0o640);
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFREG);
        assert_eq!(zcio_ftruncate(fd, 4096), 0);
        assert_eq!(zcio_fstat(fd, &mut st), 0);
        assert_eq!(st.st_size, 4096);
        assert_eq!(zcio_fsync(fd), 0);
        assert_eq!(zcio_close(fd), 0);
        let ro = zcio_open(z, c("d/f").as_ptr(), libc::O_RDONLY);
        assert!(!ro.is_null(), "{}", last_error());
        assert_eq!(zcio_pwrite(ro, data.as_ptr().cast(), 10, 0), -1);
        assert_ne!(errno(), 0);
        assert_eq!(zcio_close(ro), 0);
        assert_eq!(zcio_unlink(z, c("d/f").as_ptr()), 0);
        assert!(!env.export.join("d/f").exists());
        assert!(zcio_open(z, c("d/f").as_ptr(), libc::O_RDONLY).is_null());
        assert_eq!(errno(), libc::ENOENT, "{}", last_error());
        assert!(!last_error().is_empty());
        zcio_fini(z);
    }
}

#[test]
fn zero_copy_family_moves_pool_buffers() {
    let env = server();
    // SAFETY: as the header says.
    unsafe {
        let z = connect(&env);
        let fd = zcio_creat(z, c("zc").as_ptr(), libc::O_RDWR, 0o644);
        assert!(!fd.is_null());
        let max = zcio_max_buffer_size(z);
        assert!(max >= 1 << 20);
        let sizes = [128 << 10, 4096, 1 << 20];
        let mut iov = Vec::new();
        let mut want = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let p = zcio_get_buffer(z, n);
            assert!(!p.is_null(), "{}", last_error());
            assert!(zcio_buffer_size(z, p) as usize >= n);
            let data = pattern(n, i as u8 + 3);
            std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>(), n);
            want.extend_from_slice(&data);
            iov.push(iovec {
                iov_base: p,
                iov_len: n,
            });
        }
        let total = want.len() as isize;
        assert_eq!(
            zcio_zero_writev(fd, iov.as_ptr(), 3, 0),
            total,
            "{}",
            last_error()
        );
        assert_eq!(std::fs::read(env.export.join("zc")).unwrap(), want);
        // The buffers are still the caller's: write them again elsewhere, then free.
        assert_eq!(
            zcio_zero_writev(fd, iov.as_ptr(), 1, total as i64),
            128 << 10
        );
        for v in &iov {
            clear_errno();
            zcio_free_buffer(z, v.iov_base);
            assert_eq!(errno(), 0);
        }
        // Read it back into pool buffers the transport fills.
        let mut out = [iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        }; 8];
        let mut cnt: c_int = 8;
        let n = zcio_zero_readv(fd, total as usize, 0, out.as_mut_ptr(), &mut cnt);
        assert_eq!(n, total, "{}", last_error());
        assert!((2..=8).contains(&cnt));
        let mut got = Vec::new();
        for v in &out[..cnt as usize] {
            got.extend_from_slice(std::slice::from_raw_parts(
                v.iov_base.cast::<u8>(),
                v.iov_len,
            ));
            assert!(zcio_buffer_size(z, v.iov_base) as usize >= v.iov_len);
        }
        assert_eq!(got, want);
        // A buffer from zcio_zero_readv can be written back with zcio_zero_writev.
        assert_eq!(
            zcio_zero_writev(fd, out.as_ptr(), 1, 0),
            out[0].iov_len as isize
        );
        for v in &out[..cnt as usize] {
            clear_errno();
            zcio_free_buffer(z, v.iov_base);
            assert_eq!(errno(), 0);
        }
        // At end of file: nothing, no buffers.
        cnt = 8;
        assert_eq!(
            zcio_zero_readv(fd, 4096, 10 << 20, out.as_mut_ptr(), &mut cnt),
            0
        );
        assert_eq!(cnt, 0);
        assert_eq!(zcio_close(fd), 0);
        zcio_fini(z);
    }
}

const DEPTH: usize = 32;
const BS: usize = 64 << 10;

unsafe extern "C" fn on_done(_fd: *mut zcio_fd_t, ret: isize, data: *mut c_void) {
    // SAFETY: `data` is the sender the test passed, alive until every callback ran.
    let tx = unsafe { &*(data as *const mpsc::Sender<(isize, c_int)>) };
    let e = if ret < 0 { errno() } else { 0 };
    let _ = tx.send((ret, e));
}

#[test]
fn thirty_two_async_requests_with_callbacks() {
    let env = server();
    // SAFETY: buffers outlive their requests (every callback is awaited).
    unsafe {
        let z = connect(&env);
        let fd = zcio_creat(z, c("a").as_ptr(), libc::O_RDWR, 0o644);
        let (tx, rx) = mpsc::channel::<(isize, c_int)>();
        let txp = &tx as *const _ as *mut c_void;
        let bufs: Vec<Vec<u8>> = (0..DEPTH).map(|i| pattern(BS, i as u8)).collect();
        let iovs: Vec<iovec> = bufs
            .iter()
            .map(|b| iovec {
                iov_base: b.as_ptr() as *mut c_void,
                iov_len: BS,
            })
            .collect();
        for (i, v) in iovs.iter().enumerate() {
            let r = zcio_pwritev_async(fd, v, 1, (i * BS) as i64, 0, Some(on_done), txp);
            assert_eq!(r, 0, "{}", last_error());
        }
        for _ in 0..DEPTH {
            let (ret, e) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
            assert_eq!((ret, e), (BS as isize, 0));
        }
        let disk = std::fs::read(env.export.join("a")).unwrap();
        assert_eq!(disk, bufs.concat());
        let mut rbufs: Vec<Vec<u8>> = (0..DEPTH).map(|_| vec![0u8; BS]).collect();
        for (i, b) in rbufs.iter_mut().enumerate() {
            let v = iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: BS,
            };
            assert_eq!(
                zcio_preadv_async(fd, &v, 1, (i * BS) as i64, 0, Some(on_done), txp),
                0
            );
        }
        for _ in 0..DEPTH {
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(60)).unwrap(),
                (BS as isize, 0)
            );
        }
        assert_eq!(rbufs, bufs);
        // Zero-copy, with callbacks.
        let mut outs = vec![
            [iovec {
                iov_base: ptr::null_mut(),
                iov_len: 0
            }; 4];
            DEPTH
        ];
        let mut cnts = [4 as c_int; DEPTH];
        for i in 0..DEPTH {
            let r = zcio_zero_readv_async(
                fd,
                BS,
                (i * BS) as i64,
                outs[i].as_mut_ptr(),
                &mut cnts[i],
                Some(on_done),
                txp,
            );
            assert_eq!(r, 0, "{}", last_error());
        }
        for _ in 0..DEPTH {
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(60)).unwrap(),
                (BS as isize, 0)
            );
        }
        for i in 0..DEPTH {
            let mut got = Vec::new();
            for v in &outs[i][..cnts[i] as usize] {
                got.extend_from_slice(std::slice::from_raw_parts(
                    v.iov_base.cast::<u8>(),
                    v.iov_len,
                ));
            }
            assert_eq!(got, bufs[i]);
        }
        // Write them back shifted by one block, zero-copy and async.
        for i in 0..DEPTH {
            let off = ((i + 1) % DEPTH * BS) as i64;
            let r = zcio_zero_writev_async(fd, outs[i].as_ptr(), cnts[i], off, Some(on_done), txp);
            assert_eq!(r, 0, "{}", last_error());
        }
        for _ in 0..DEPTH {
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(60)).unwrap(),
                (BS as isize, 0)
            );
        }
        let disk = std::fs::read(env.export.join("a")).unwrap();
        for i in 0..DEPTH {
            assert_eq!(&disk[(i + 1) % DEPTH * BS..][..BS], &bufs[i][..]);
        }
        for i in 0..DEPTH {
            for v in &outs[i][..cnts[i] as usize] {
                clear_errno();
                zcio_free_buffer(z, v.iov_base);
                assert_eq!(errno(), 0, "{}", last_error());
            }
        }
        assert_eq!(zcio_close(fd), 0);
        zcio_fini(z);
    }
}

#[test]
fn thirty_two_async_requests_reaped() {
    let env = server();
    // SAFETY: buffers outlive their requests (every completion is reaped).
    unsafe {
        let z = connect(&env);
        let fd = zcio_creat(z, c("r").as_ptr(), libc::O_RDWR, 0o644);
        let mut bufs: Vec<*mut c_void> = Vec::new();
        for i in 0..DEPTH {
            let p = zcio_get_buffer(z, BS);
            assert!(!p.is_null(), "{}", last_error());
            std::ptr::copy_nonoverlapping(pattern(BS, i as u8 + 9).as_ptr(), p.cast(), BS);
            bufs.push(p);
        }
        for (i, &p) in bufs.iter().enumerate() {
            let v = iovec {
                iov_base: p,
                iov_len: BS,
            };
            let r = zcio_zero_writev_async(fd, &v, 1, (i * BS) as i64, None, i as *mut c_void);
            assert_eq!(r, 0, "{}", last_error());
        }
        let mut ev = vec![
            zcio_event {
                fd: ptr::null_mut(),
                ret: 0,
                error: 0,
                data: ptr::null_mut()
            };
            DEPTH
        ];
        let mut seen = [false; DEPTH];
        let mut got = 0;
        while got < DEPTH {
            let n = zcio_reap(z, ev.as_mut_ptr(), 1, DEPTH as c_int, 60_000);
            assert!(n >= 1, "{}", last_error());
            for e in &ev[..n as usize] {
                assert_eq!((e.fd, e.ret, e.error), (fd, BS as isize, 0));
                assert!(!std::mem::replace(&mut seen[e.data as usize], true));
            }
            got += n as usize;
        }
        let disk = std::fs::read(env.export.join("r")).unwrap();
        for i in 0..DEPTH {
            assert_eq!(&disk[i * BS..][..BS], &pattern(BS, i as u8 + 9)[..]);
        }
        // Nothing outstanding: a reap asking for one returns at once with none.
        assert_eq!(zcio_reap(z, ev.as_mut_ptr(), 1, 1, -1), 0);
        // Reads into the same pool buffers (zeroed first), reaped all at once.
        for &p in &bufs {
            std::ptr::write_bytes(p.cast::<u8>(), 0, BS);
        }
        for (i, &p) in bufs.iter().enumerate() {
            let v = iovec {
                iov_base: p,
                iov_len: BS,
            };
            assert_eq!(
                zcio_preadv_async(fd, &v, 1, (i * BS) as i64, 0, None, i as *mut c_void),
                0
            );
        }
        assert_eq!(
            zcio_reap(z, ev.as_mut_ptr(), DEPTH as c_int, DEPTH as c_int, 60_000),
            DEPTH as c_int
        );
        for e in &ev {
            assert_eq!(e.ret, BS as isize);
        }
        for (i, &p) in bufs.iter().enumerate() {
            let s = std::slice::from_raw_parts(p.cast::<u8>(), BS);
            assert_eq!(s, &pattern(BS, i as u8 + 9)[..]);
            zcio_free_buffer(z, p);
        }
        assert_eq!(zcio_close(fd), 0);
        zcio_fini(z);
    }
}

#[test]
fn misuse_is_an_errno_and_breaks_nothing() {
    let env = server();
    // SAFETY: every call below is a misuse the library must detect without UB.
    unsafe {
        // Before connecting.
        let z = zcio_new(ptr::null());
        assert!(zcio_get_buffer(z, 4096).is_null());
        assert_eq!(errno(), libc::ENOTCONN);
        assert!(zcio_open(z, c("x").as_ptr(), libc::O_RDONLY).is_null());
        assert_eq!(errno(), libc::ENOTCONN);
        // zcio_set: unknown key, bad value, NULLs.
        assert_eq!(zcio_set(z, c("no.such_key").as_ptr(), c("1").as_ptr()), -1);
        assert_eq!(errno(), libc::EINVAL);
        assert!(last_error().contains("no"), "{}", last_error());
        assert_eq!(
            zcio_set(z, c("pool.wait_timeout_ms").as_ptr(), c("banana").as_ptr()),
            -1
        );
        assert_eq!(errno(), libc::EINVAL);
        assert_eq!(zcio_set(z, ptr::null(), c("1").as_ptr()), -1);
        assert_eq!(errno(), libc::EINVAL);
        // The transports' own sections: their keys set, their bounds checked.
        assert_eq!(zcio_set(z, c("rdma.credits").as_ptr(), c("8").as_ptr()), 0);
        assert_eq!(
            zcio_set(z, c("tcp.nodelay").as_ptr(), c("false").as_ptr()),
            0
        );
        assert_eq!(zcio_set(z, c("rdma.credits").as_ptr(), c("1").as_ptr()), -1);
        assert_eq!(errno(), libc::EINVAL);
        assert!(last_error().contains("rdma.credits"), "{}", last_error());
        assert_eq!(zcio_set(z, c("tcp.no_delay").as_ptr(), c("1").as_ptr()), -1);
        assert_eq!(errno(), libc::EINVAL);
        assert!(last_error().contains("tcp.no_delay"), "{}", last_error());
        assert_eq!(
            zcio_set(ptr::null_mut(), c("transport").as_ptr(), c("tcp").as_ptr()),
            -1
        );
        assert_eq!(errno(), libc::EBADF);
        // A config file that does not exist.
        assert!(zcio_new(c("/nonexistent/zcio.toml").as_ptr()).is_null());
        assert_eq!(errno(), libc::ENOENT);
        // Unknown transport.
        let bad = zcio_new(ptr::null());
        assert_eq!(
            zcio_set(bad, c("transport").as_ptr(), c("carrier-pigeon").as_ptr()),
            0
        );
        assert_eq!(zcio_connect(bad, env.addr.as_ptr()), -1);
        assert_eq!(errno(), libc::EPROTONOSUPPORT, "{}", last_error());
        zcio_fini(bad);
        // Made-up and finished instances.
        let fake = 0x1000 as *mut zcio_t;
        assert_eq!(zcio_connect(fake, env.addr.as_ptr()), -1);
        assert_eq!(errno(), libc::EBADF);
        clear_errno();
        zcio_fini(ptr::null_mut());
        assert_eq!(errno(), libc::EBADF);

        assert_eq!(zcio_connect(z, env.addr.as_ptr()), 0);
        assert_eq!(zcio_connect(z, env.addr.as_ptr()), -1);
        assert_eq!(errno(), libc::EISCONN);
        assert_eq!(zcio_set(z, c("transport").as_ptr(), c("tcp").as_ptr()), -1);
        assert_eq!(errno(), libc::EISCONN);
        // NULL path, O_CREAT without a mode, unsupported flags, a path out of the export.
        assert!(zcio_open(z, ptr::null(), libc::O_RDONLY).is_null());
        assert_eq!(errno(), libc::EINVAL);
        assert!(zcio_open(z, c("n").as_ptr(), libc::O_RDWR | libc::O_CREAT).is_null());
        assert_eq!(errno(), libc::EINVAL);
        assert!(zcio_creat(z, c("n").as_ptr(), libc::O_RDWR | libc::O_APPEND, 0o644).is_null());
        assert_eq!(errno(), libc::EINVAL);
        assert!(zcio_open(z, c("../../etc/passwd").as_ptr(), libc::O_RDONLY).is_null());
        assert_ne!(errno(), 0);

        let fd = zcio_creat(z, c("m").as_ptr(), libc::O_RDWR, 0o644);
        assert!(!fd.is_null());
        let mut small = [0u8; 16];
        // NULL iov with a count, NULL base with a length, counts over the limit.
        assert_eq!(zcio_preadv(fd, ptr::null(), 1, 0, 0), -1);
        assert_eq!(errno(), libc::EINVAL);
        let nullbase = iovec {
            iov_base: ptr::null_mut(),
            iov_len: 10,
        };
        assert_eq!(zcio_pwritev(fd, &nullbase, 1, 0, 0), -1);
        assert_eq!(errno(), libc::EFAULT);
        let many = vec![
            iovec {
                iov_base: small.as_mut_ptr().cast(),
                iov_len: 1
            };
            ZCIO_IOV_MAX as usize + 1
        ];
        assert_eq!(zcio_pwritev(fd, many.as_ptr(), ZCIO_IOV_MAX + 1, 0, 0), -1);
        assert_eq!(errno(), libc::EINVAL);
        assert_eq!(zcio_preadv(fd, many.as_ptr(), -1, 0, 0), -1);
        assert_eq!(errno(), libc::EINVAL);
        assert_eq!(
            zcio_preadv_async(
                fd,
                many.as_ptr(),
                ZCIO_IOV_MAX + 1,
                0,
                0,
                None,
                ptr::null_mut()
            ),
            -1
        );
        assert_eq!(errno(), libc::EINVAL);
        // Negative offset, unknown flags, NULL stat.
        assert_eq!(zcio_pread(fd, small.as_mut_ptr().cast(), 16, -1), -1);
        assert_eq!(errno(), libc::EINVAL);
        assert_eq!(zcio_ftruncate(fd, -5), -1);
        assert_eq!(errno(), libc::EINVAL);
        assert_eq!(zcio_preadv(fd, many.as_ptr(), 1, 0, 0x40), -1);
        assert_eq!(errno(), libc::EINVAL);
        assert_eq!(zcio_fstat(fd, ptr::null_mut()), -1);
        assert_eq!(errno(), libc::EINVAL);

        // Buffers: bad sizes, foreign, interior and double frees, foreign zero-copy bases.
        assert!(zcio_get_buffer(z, 0).is_null());
        assert_eq!(errno(), libc::EINVAL);
        assert!(zcio_get_buffer(z, (zcio_max_buffer_size(z) + 1) as usize).is_null());
        assert_eq!(errno(), libc::EINVAL);
        let p = zcio_get_buffer(z, 4096);
        assert!(!p.is_null());
        clear_errno();
        zcio_free_buffer(z, small.as_mut_ptr().cast());
        assert_eq!(errno(), libc::EINVAL);
        clear_errno();
        zcio_free_buffer(z, p.cast::<u8>().add(8).cast());
        assert_eq!(errno(), libc::EINVAL);
        clear_errno();
        zcio_free_buffer(z, ptr::null_mut());
        assert_eq!(errno(), libc::EINVAL);
        let foreign = iovec {
            iov_base: small.as_mut_ptr().cast(),
            iov_len: 16,
        };
        assert_eq!(zcio_zero_writev(fd, &foreign, 1, 0), -1);
        assert_eq!(errno(), libc::EINVAL);
        assert_eq!(
            zcio_zero_writev_async(fd, &foreign, 1, 0, None, ptr::null_mut()),
            -1
        );
        assert_eq!(errno(), libc::EINVAL);
        // A good base next to a bad one: all or nothing, the good one stays usable.
        let mixed = [
            iovec {
                iov_base: p,
                iov_len: 4096,
            },
            foreign,
        ];
        assert_eq!(zcio_zero_writev(fd, mixed.as_ptr(), 2, 0), -1);
        assert_eq!(errno(), libc::EINVAL);
        // The same base twice in one call.
        let twice = [
            iovec {
                iov_base: p,
                iov_len: 100,
            },
            iovec {
                iov_base: p,
                iov_len: 100,
            },
        ];
        assert_eq!(zcio_zero_writev(fd, twice.as_ptr(), 2, 0), -1);
        assert_eq!(errno(), libc::EINVAL);
        // Longer than the buffer.
        let long = iovec {
            iov_base: p,
            iov_len: zcio_buffer_size(z, p) as usize + 1,
        };
        assert_eq!(zcio_zero_writev(fd, &long, 1, 0), -1);
        assert_eq!(errno(), libc::EINVAL);
        assert_eq!(
            zcio_zero_writev(fd, mixed.as_ptr(), 1, 0),
            4096,
            "{}",
            last_error()
        );
        clear_errno();
        zcio_free_buffer(z, p);
        assert_eq!(errno(), 0);
        zcio_free_buffer(z, p);
        assert_eq!(errno(), libc::EINVAL, "double free");
        assert_eq!(
            zcio_zero_writev(fd, mixed.as_ptr(), 1, 0),
            -1,
            "a freed base"
        );
        assert_eq!(errno(), libc::EINVAL);
        assert_eq!(zcio_buffer_size(z, p), -1);
        // zero_readv: capacity too small, NULL outputs.
        let mut one = [iovec {
            iov_base: ptr::null_mut(),
            iov_len: 0,
        }; 1];
        let mut cnt: c_int = 1;
        let max = zcio_max_buffer_size(z) as usize;
        assert_eq!(
            zcio_zero_readv(fd, 2 * max, 0, one.as_mut_ptr(), &mut cnt),
            -1
        );
        assert_eq!(errno(), libc::EINVAL);
        assert_eq!(zcio_zero_readv(fd, 10, 0, ptr::null_mut(), &mut cnt), -1);
        assert_eq!(errno(), libc::EINVAL);
        cnt = 0;
        assert_eq!(zcio_zero_readv(fd, 10, 0, one.as_mut_ptr(), &mut cnt), -1);
        assert_eq!(errno(), libc::EINVAL);
        // zcio_reap: bad arguments.
        let mut ev = [zcio_event {
            fd: ptr::null_mut(),
            ret: 0,
            error: 0,
            data: ptr::null_mut(),
        }; 2];
        assert_eq!(zcio_reap(z, ev.as_mut_ptr(), 2, 1, 0), -1);
        assert_eq!(errno(), libc::EINVAL);
        assert_eq!(zcio_reap(z, ptr::null_mut(), 0, 1, 0), -1);
        assert_eq!(errno(), libc::EINVAL);

        // Closed and made-up files.
        assert_eq!(zcio_close(fd), 0);
        assert_eq!(zcio_close(fd), -1);
        assert_eq!(errno(), libc::EBADF);
        assert_eq!(zcio_pread(fd, small.as_mut_ptr().cast(), 16, 0), -1);
        assert_eq!(errno(), libc::EBADF);
        assert_eq!(zcio_fsync(fd), -1);
        assert_eq!(errno(), libc::EBADF);
        assert_eq!(
            zcio_preadv_async(fd, &foreign, 1, 0, 0, None, ptr::null_mut()),
            -1
        );
        assert_eq!(errno(), libc::EBADF);
        assert_eq!(zcio_close(ptr::null_mut()), -1);
        assert_eq!(errno(), libc::EBADF);
        assert_eq!(zcio_fsync(ptr::dangling_mut::<zcio_fd_t>()), -1);
        assert_eq!(errno(), libc::EBADF);

        // After all that, the instance still works.
        let fd = zcio_open(z, c("m").as_ptr(), libc::O_RDONLY);
        assert!(!fd.is_null(), "{}", last_error());
        assert_eq!(zcio_pread(fd, small.as_mut_ptr().cast(), 16, 0), 16);
        zcio_fini(z);
        // Finished: every handle of it is gone.
        assert_eq!(zcio_pread(fd, small.as_mut_ptr().cast(), 16, 0), -1);
        assert_eq!(errno(), libc::EBADF);
        assert!(zcio_get_buffer(z, 10).is_null());
        assert_eq!(errno(), libc::EBADF);
    }
}
