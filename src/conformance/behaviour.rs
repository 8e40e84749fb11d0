//! Conformance cases for behaviour the first cases left untested: file handles are a
//! connection's own, long listings span replies, open's mode and `TRUNCATE` reach the file,
//! `server.direct_io` forces `O_DIRECT`, and shutting the server down with clients
//! connected ends their requests and gives every buffer back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{pattern, write_file, Harness};
use crate::error::Error;
use crate::proto::{OpenFlags, Req, Resp, Status};
use crate::transport::Transport;
use crate::Client;

/// Fails unless `r` is the server's "unknown file handle" refusal.
fn bad_handle<T: std::fmt::Debug>(r: crate::Result<T>, what: &str) {
    match r {
        Err(Error::Remote { code, .. }) if code == Status::BadHandle as u32 => {}
        other => panic!("{what}: expected the unknown-handle refusal, got {other:?}"),
    }
}

/// The size the server reports for handle `fh` on `c`'s connection.
fn fstat_size(c: &crate::Client, fh: u64) -> crate::Result<u64> {
    match c.call_simple(&Req::Fstat { fh })? {
        Resp::Stat(st) => Ok(st.size),
        r => panic!("fstat reply {r:?}"),
    }
}

/// File handles belong to the connection that opened them: another connection cannot use
/// a number it was not given (a security property: handles are not capabilities to pass
/// around), a number both hold names each one's own file, and a closed handle is dead.
pub fn file_handles_are_per_connection(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    write_file(&h, "a", b"alpha, 7");
    write_file(&h, "b", b"bravo");
    let ca = h.client();
    let cb = h.client();
    let mut fa: Vec<_> = (0..3)
        .map(|_| ca.open("a", OpenFlags::rw()).unwrap())
        .collect();
    let fb = cb.open("b", OpenFlags::READ).unwrap();
    for f in &fa {
        let fh = f.handle();
        if fh == fb.handle() {
            // The same number on B's connection is B's own file.
            assert_eq!(fstat_size(&cb, fh).unwrap(), 5, "handle {fh} on B");
            continue;
        }
        let what = format!("B using A's handle {fh}");
        bad_handle(fstat_size(&cb, fh), &what);
        let read = Req::Read {
            fh,
            offset: 0,
            len: 8,
        };
        bad_handle(cb.call_simple(&read), &what);
        bad_handle(cb.call_simple(&Req::Truncate { fh, len: 0 }), &what);
        bad_handle(cb.call_simple(&Req::Close { fh }), &what);
    }
    // Nothing B tried touched A's file or handles.
    assert_eq!(std::fs::read(h.path("a")).unwrap(), b"alpha, 7");
    for f in &fa {
        assert_eq!(fstat_size(&ca, f.handle()).unwrap(), 8);
    }
    // A closed handle is dead on its own connection too, and closing it twice fails.
    let closed = fa.remove(0);
    let fh = closed.handle();
    closed.close().unwrap();
    bad_handle(fstat_size(&ca, fh), "a closed handle");
    bad_handle(ca.call_simple(&Req::Close { fh }), "closing twice");
    let mut b = [0u8; 8];
    assert_eq!(fa[0].pread(&mut b, 0).unwrap(), 8);
    assert_eq!(&b, b"alpha, 7");
    drop((fa, fb, ca, cb));
    h.assert_server_clean();
}

/// A directory whose listing does not fit one reply comes back whole, sorted, each entry
/// once, over several requests.
pub fn long_listing_spans_replies(t: Arc<dyn Transport>) {
    // Small payloads, so a few hundred entries take several replies.
    let h = Harness::start(t, |c| c.limits.max_payload = 8192);
    std::fs::create_dir(h.path("many")).unwrap();
    let mut names: Vec<String> = (0..300)
        .map(|i| format!("{i:04}-{}", "n".repeat(90)))
        .collect();
    for (i, n) in names.iter().enumerate() {
        std::fs::write(h.path(&format!("many/{n}")), vec![1u8; i]).unwrap();
    }
    let c = h.client();
    let before = h
        .server
        .stats()
        .requests
        .load(std::sync::atomic::Ordering::SeqCst);
    let got = c.list("many").unwrap();
    let requests = h
        .server
        .stats()
        .requests
        .load(std::sync::atomic::Ordering::SeqCst)
        - before;
    assert!(
        requests >= 3,
        "{requests} list requests for ~30 KiB of entries"
    );
    names.sort();
    let listed: Vec<&str> = got.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(listed, names, "the listing differs");
    for e in &got {
        let i: u64 = e.name[..4].parse().unwrap();
        assert_eq!((e.size, e.is_dir), (i, false), "{}", e.name);
    }
}

/// The process's umask (from /proc), which the server's creates are subject to.
fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .expect("Umask in /proc/self/status");
    u32::from_str_radix(line.trim(), 8).unwrap()
}

/// The mode given to open is the created file's (less the umask), and `TRUNCATE` empties
/// an existing file at open.
pub fn open_mode_and_truncate(t: Arc<dyn Transport>) {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::start(t, |_| {});
    let c = h.client();
    let mask = umask();
    for (name, mode) in [("m600", 0o600), ("m640", 0o640), ("m444", 0o444)] {
        let f = c
            .open_mode(name, OpenFlags::WRITE | OpenFlags::CREATE, mode)
            .unwrap();
        drop(f);
        let got = std::fs::metadata(h.path(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(got, mode & !mask, "{name}: mode {got:o}");
    }
    let data = pattern(77, 10_000);
    write_file(&h, "t", &data);
    // Without TRUNCATE the contents stay; with it the file is empty from the open on.
    let f = c.open("t", OpenFlags::rw()).unwrap();
    assert_eq!(f.size_at_open(), 10_000);
    drop(f);
    assert!(std::fs::read(h.path("t")).unwrap() == data);
    let f = c.open("t", OpenFlags::rw() | OpenFlags::TRUNCATE).unwrap();
    assert_eq!(f.size_at_open(), 0);
    assert_eq!(std::fs::metadata(h.path("t")).unwrap().len(), 0);
    assert_eq!(f.pwrite(b"new", 0).unwrap(), 3);
    assert_eq!(std::fs::read(h.path("t")).unwrap(), b"new");
    drop((f, c));
    h.assert_server_clean();
}

/// Whether this process holds `path` open with `O_DIRECT` (from /proc/self/fdinfo), or
/// `None` when it does not hold it open at all.
fn held_with_o_direct(path: &std::path::Path) -> Option<bool> {
    let want = std::fs::canonicalize(path).unwrap();
    let mut seen = None;
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target != want {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let Some(flags) = info.lines().find_map(|l| l.strip_prefix("flags:")) else {
            continue;
        };
        let flags = u32::from_str_radix(flags.trim(), 8).unwrap();
        let direct = flags & libc::O_DIRECT as u32 != 0;
        seen = Some(seen.unwrap_or(false) || direct);
    }
    seen
}

/// `server.direct_io` opens every file with `O_DIRECT`, asked for or not; without it a file
/// is opened as asked. Data goes through either way.
pub fn direct_io_forced_by_the_server(t: Arc<dyn Transport>) {
    for forced in [false, true] {
        let h = Harness::start(t.clone(), |c| c.server.direct_io = forced);
        let data = pattern(78, 64 << 10);
        write_file(&h, "d", &data);
        let c = h.client();
        let f = c.open("d", OpenFlags::READ).unwrap();
        // The server is in this process: its descriptor for the file shows the flag.
        assert_eq!(
            held_with_o_direct(&h.path("d")),
            Some(forced),
            "server.direct_io = {forced}"
        );
        assert!(f.zero_readv(64 << 10, 0).unwrap().to_vec() == data);
        drop((f, c));
        h.assert_server_clean();
    }
}

/// Shutting the server down while clients are connected, with requests in flight: it
/// returns, every request ends (served right or failed as a closed connection, none
/// hangs), new connections are refused, and the server's pool gets every buffer back.
pub fn shutdown_with_live_connections(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    let data = pattern(79, 1 << 20);
    write_file(&h, "f", &data);
    let c = h.client();
    let f = c.open("f", OpenFlags::READ).unwrap();
    let mut b = vec![0u8; 4096];
    assert_eq!(f.pread(&mut b, 0).unwrap(), 4096);
    let pending: Vec<_> = (0..8u64)
        .map(|i| (i, f.zero_readv_async(64 << 10, i << 16).unwrap()))
        .collect();
    let idle = h.client();
    let Harness {
        server,
        cfg,
        transport,
        dir,
    } = h;
    let pool = server.pool().clone();
    let (done, shut) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        server.shutdown();
        let _ = done.send(());
    });
    shut.recv_timeout(Duration::from_secs(60))
        .expect("shutdown did not return with clients connected");
    for (i, p) in pending {
        match p.wait() {
            Ok(got) => assert!(
                got.to_vec() == data[(i as usize) << 16..((i as usize) + 1) << 16],
                "read {i} served other bytes"
            ),
            Err(e) => assert!(e.is_connection_fatal(), "read {i}: {e:?}"),
        }
    }
    for (what, c) in [("busy", &c), ("idle", &idle)] {
        match c.stat("f") {
            Err(e) => assert!(e.is_connection_fatal(), "{what} client: {e:?}"),
            Ok(_) => panic!("the {what} client was served after the shutdown"),
        }
    }
    let again = Client::connect_transport(&cfg, transport.as_ref(), pool.clone());
    assert!(again.is_err(), "a new connection after the shutdown");
    drop((f, c, idle));
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool.stats().slots_in_use() != 0 {
        assert!(
            Instant::now() < deadline,
            "server buffers held: {}",
            pool.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(dir);
}
