//! The client's life cycle over the in-memory transport: the keepalive thread ends with its
//! client, a reconnect to a server with other limits is followed by `limits()` and
//! `read_only()`, and async operations over held buffers are done again after a restart.
//!
//! Its own test binary: the keepalive test counts the process's `zcio-keepalive` threads,
//! so no other test here may keep a client with a keepalive.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zcio::pool::Pool;
use zcio::transport::mem::MemTransport;
use zcio::transport::{ClientConn, Listener, Transport};
use zcio::{Client, Config, OpenFlags, Server};

/// Threads of this process named `zcio-keepalive` (from /proc/self/task/*/comm).
fn keepalive_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "zcio-keepalive")
        .count()
}

/// Polls `cond` until it holds; panics with `what` after a generous deadline.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "still not true after 30 s: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn small_pool(cfg: &mut Config) {
    cfg.pool.classes.iter_mut().for_each(|c| {
        c.count = c.count.min(32);
        c.reserve = c.reserve.min(4);
    });
}

fn server_cfg(dir: &std::path::Path) -> Config {
    let mut cfg = Config::default();
    cfg.server.export = dir.to_path_buf();
    small_pool(&mut cfg);
    cfg
}

#[test]
fn a_dropped_client_s_keepalive_thread_ends_without_waiting_out_its_period() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_cfg(dir.path());
    let t = MemTransport::new();
    let pool = Pool::new(&cfg.pool).unwrap();
    let srv = Server::bind_transport(&cfg, t.as_ref(), pool.clone())
        .unwrap()
        .spawn()
        .unwrap();
    let mut ccfg = cfg.clone();
    ccfg.client.connect = srv.local_addr().to_string();
    // An hour: without the wake-up on drop the thread would sleep that long.
    ccfg.client.keepalive = Some(Duration::from_secs(3600));
    assert_eq!(
        keepalive_threads(),
        0,
        "a keepalive thread before any client"
    );
    for round in 0..3 {
        let c = Client::connect_shared(&ccfg, t.clone(), pool.clone()).unwrap();
        let clone = c.clone();
        wait_until("the client's keepalive thread runs", || {
            keepalive_threads() == 1
        });
        c.ping().unwrap();
        drop(c);
        // A clone keeps the client, and so its thread.
        clone.ping().unwrap();
        assert_eq!(
            keepalive_threads(),
            1,
            "round {round}: a clone is still alive"
        );
        drop(clone);
        wait_until("the dropped client's keepalive thread ends", || {
            keepalive_threads() == 0
        });
    }
    srv.shutdown();
}

/// A transport that dials whichever in-memory listener `target` names now: a "server
/// restart" at the same address, as a real transport sees it.
struct Switch {
    mem: Arc<MemTransport>,
    target: Mutex<String>,
}

impl Transport for Switch {
    fn name(&self) -> &'static str {
        "mem"
    }
    fn check_available(&self, _: &Config) -> zcio::Result<()> {
        Ok(())
    }
    fn connect(&self, cfg: &Config, pool: &Pool) -> zcio::Result<Box<dyn ClientConn>> {
        let mut cfg = cfg.clone();
        cfg.client.connect = self.target.lock().unwrap().clone();
        self.mem.connect(&cfg, pool)
    }
    fn listen(&self, cfg: &Config, pool: &Pool) -> zcio::Result<Box<dyn Listener>> {
        self.mem.listen(cfg, pool)
    }
}

#[test]
fn limits_and_read_only_follow_the_connection_after_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.bin"), vec![7u8; 10_000]).unwrap();
    let mem = MemTransport::new();
    let sw = Arc::new(Switch {
        mem: mem.clone(),
        target: Mutex::new(String::new()),
    });

    let mut cfg1 = server_cfg(dir.path());
    cfg1.limits.max_segments = 64;
    cfg1.limits.max_payload = 1 << 20;
    let pool = Pool::new(&cfg1.pool).unwrap();
    let srv1 = Server::bind_transport(&cfg1, mem.as_ref(), pool.clone())
        .unwrap()
        .spawn()
        .unwrap();
    *sw.target.lock().unwrap() = srv1.local_addr().to_string();

    let mut ccfg = cfg1.clone();
    ccfg.client.connect = "switch".into();
    ccfg.client.keepalive = None;
    ccfg.client.reconnect = true;
    ccfg.client.reconnect_give_up = Duration::from_secs(30);
    let c = Client::connect_shared(&ccfg, sw.clone(), Pool::new(&ccfg.pool).unwrap()).unwrap();
    assert_eq!(c.limits().max_segments, 64);
    assert_eq!(c.limits().max_payload, 1 << 20);
    assert!(!c.read_only());
    let f = c.open("f.bin", OpenFlags::READ).unwrap();

    // The "restarted" server is read-only and offers less.
    let mut cfg2 = server_cfg(dir.path());
    cfg2.limits.max_segments = 16;
    cfg2.limits.max_payload = 256 << 10;
    cfg2.server.read_only = true;
    let srv2 = Server::bind_transport(&cfg2, mem.as_ref(), pool.clone())
        .unwrap()
        .spawn()
        .unwrap();
    *sw.target.lock().unwrap() = srv2.local_addr().to_string();
    srv1.shutdown();

    // The read fails on the dead connection, reconnects to the second server, reopens the
    // file and is retried there.
    let mut buf = vec![0u8; 10_000];
    assert_eq!(f.pread(&mut buf, 0).unwrap(), 10_000);
    assert!(buf.iter().all(|&b| b == 7));
    assert_eq!(
        c.limits().max_segments,
        16,
        "limits of the first connection kept"
    );
    assert_eq!(c.limits().max_payload, 256 << 10);
    assert!(c.read_only(), "read_only of the first connection kept");
    srv2.shutdown();
}

/// Async reads and writes started after the server went away complete on the next one:
/// the completion holds the buffers (the pool's `Held`), the transport gets views of them,
/// and when the connection turns out lost the operation is done again on the same buffers.
/// Covers one request (caller vectors, pool buffers) and several (an iovec over the
/// payload limit).
#[test]
fn held_async_reads_and_writes_survive_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("f.bin"), &data).unwrap();
    let mem = MemTransport::new();
    let sw = Arc::new(Switch {
        mem: mem.clone(),
        target: Mutex::new(String::new()),
    });
    let mut cfg = server_cfg(dir.path());
    cfg.limits.max_payload = 128 << 10;
    let pool = Pool::new(&cfg.pool).unwrap();
    let start = |cfg: &Config| {
        Server::bind_transport(cfg, mem.as_ref(), pool.clone())
            .unwrap()
            .spawn()
            .unwrap()
    };
    let mut srv = start(&cfg);
    *sw.target.lock().unwrap() = srv.local_addr().to_string();
    let mut ccfg = cfg.clone();
    ccfg.client.connect = "switch".into();
    ccfg.client.keepalive = None;
    ccfg.client.reconnect = true;
    ccfg.client.reconnect_give_up = Duration::from_secs(30);
    let c = Client::connect_shared(&ccfg, sw.clone(), Pool::new(&ccfg.pool).unwrap()).unwrap();
    let f = c.open("f.bin", OpenFlags::READ | OpenFlags::WRITE).unwrap();

    // Each round: the server "restarts" (a new listener at the switch), then an async
    // operation starts on the dead connection.
    let mut restart = || {
        let next = start(&cfg);
        *sw.target.lock().unwrap() = next.local_addr().to_string();
        std::mem::replace(&mut srv, next).shutdown();
    };

    restart();
    let (n, v) = f
        .preadv_async(vec![vec![0u8; 1000], vec![0u8; 3000]], 5000)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(n, 4000);
    assert_eq!(v[0], data[5000..6000]);
    assert_eq!(v[1], data[6000..9000]);

    restart();
    let got = f
        .read_into_async(c.get_buffers(4096, 3).unwrap(), 100)
        .unwrap()
        .wait()
        .unwrap();
    let bytes: Vec<u8> = got.buffers().iter().flat_map(|b| b.to_vec()).collect();
    assert_eq!(bytes, data[100..100 + 3 * 4096]);

    // Over the 128 KiB payload limit: several requests over the same held vectors.
    restart();
    let (n, v) = f
        .preadv_async(vec![vec![0u8; 100_000]; 3], 0)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(n, 300_000);
    assert_eq!(v.concat(), data);

    restart();
    let (n, _) = f
        .pwritev_async(vec![vec![1u8; 100_000], vec![2u8; 100_000]], 50_000)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(n, 200_000);
    let on_disk = std::fs::read(dir.path().join("f.bin")).unwrap();
    assert_eq!(on_disk[..50_000], data[..50_000]);
    assert!(on_disk[50_000..150_000].iter().all(|&b| b == 1));
    assert!(on_disk[150_000..250_000].iter().all(|&b| b == 2));
    assert_eq!(on_disk[250_000..], data[250_000..]);
    srv.shutdown();
}
