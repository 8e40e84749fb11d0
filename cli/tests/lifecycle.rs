//! Connection lifecycle with real `zcio serve` processes: graceful shutdown on SIGTERM and
//! SIGINT.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use zcio::pool::Pool;
use zcio::proto::Status;
use zcio::{Client, Config, Error, OpenFlags};

fn zcio() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zcio"))
}

fn small_pool() -> zcio::PoolConfig {
    let mut p = zcio::PoolConfig::default();
    for c in &mut p.classes {
        c.count = c.count.min(128);
        c.reserve = c.reserve.min(8);
    }
    p
}

/// A `zcio serve` process; its stderr lines arrive on `lines`.
struct Served {
    child: Child,
    addr: String,
    lines: mpsc::Receiver<String>,
}

/// A failing test leaves no server behind.
impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(export: &std::path::Path, listen: &str, extra: &[&str]) -> Served {
    let mut child = zcio()
        .env("ZCIO_LOG", "zcio=debug")
        .args(["serve", "--listen", listen, "--export"])
        .arg(export)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let first = loop {
        let l = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("zcio serve did not say where it listens");
        if l.starts_with("zcio: serving") {
            break l;
        }
    };
    let addr = first
        .rsplit(" on ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    Served { child, addr, lines }
}

/// Waits for the process to exit (with a generous deadline) and returns its exit code.
fn exit_code(child: &mut Child) -> Option<i32> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("zcio serve did not exit within 60 s of the signal");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn client(addr: &str, reconnect: bool) -> Client {
    let mut cfg = Config::default();
    cfg.client.connect = addr.to_string();
    cfg.client.reconnect = reconnect;
    cfg.pool = small_pool();
    Client::connect_transport(&cfg, &zcio_tcp::TcpTransport, Pool::new(&cfg.pool).unwrap()).unwrap()
}

fn block(i: u64) -> Vec<u8> {
    (0..64u64 << 10)
        .map(|k| ((i * 31 + k / 4096) % 251) as u8 + 1)
        .collect()
}

#[test]
fn sigterm_and_sigint_drain_the_server_which_exits_zero_and_keeps_every_acknowledged_write() {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = serve(dir.path(), "127.0.0.1:0", &[]);
        let c = client(&s.addr, false);
        let f = Arc::new(c.open("f", OpenFlags::rw() | OpenFlags::CREATE).unwrap());
        let (acked_tx, acked_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        // A writer keeps 4 writes in flight and reports each acknowledged block.
        let writer = {
            let (f, stop) = (f.clone(), stop.clone());
            std::thread::spawn(move || -> Option<Error> {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let p: Vec<_> = (i..i + 4)
                        .map(|j| (j, f.pwritev_async(vec![block(j)], j << 16)))
                        .collect();
                    for (j, p) in p {
                        match p.and_then(|p| p.wait()) {
                            Ok((n, _)) => {
                                assert_eq!(n, 64 << 10);
                                acked_tx.send(j).unwrap();
                            }
                            Err(e) => return Some(e),
                        }
                    }
                    i += 4;
                }
                None
            })
        };
        let mut acked: Vec<u64> = (0..40)
            .map(|_| acked_rx.recv_timeout(Duration::from_secs(60)).unwrap())
            .collect();
        kill(Pid::from_raw(s.child.id() as i32), sig).unwrap();
        assert_eq!(exit_code(&mut s.child), Some(0), "{sig:?}: exit status");
        stop.store(true, Ordering::Relaxed);
        let err = writer.join().unwrap();
        // The client sees the shutdown as the end of its connection or as the shutdown
        // notice, never as a failed operation of another kind.
        if let Some(e) = &err {
            assert!(
                matches!(e, Error::ConnectionClosed(_) | Error::Transport { .. })
                    || matches!(e, Error::Remote { code, .. } if *code == Status::ShuttingDown as u32),
                "{sig:?}: unclear error at shutdown: {e:?}"
            );
        }
        let said: Vec<String> = s.lines.try_iter().collect();
        let summary = said
            .iter()
            .find(|l| l.contains("stopped in"))
            .unwrap_or_else(|| panic!("{sig:?}: no summary in {said:?}"));
        eprintln!("{sig:?}: {summary}; client: {err:?}");
        assert!(
            summary.contains(" 0 abandoned, 0 files left open"),
            "{summary}"
        );
        let on_disk = std::fs::read(dir.path().join("f")).unwrap();
        acked.extend(acked_rx.try_iter());
        for j in acked {
            let at = (j << 16) as usize;
            assert!(
                on_disk.get(at..at + (64 << 10)) == Some(&block(j)[..]),
                "{sig:?}: acknowledged block {j} is not on disk"
            );
        }
    }
}

fn registry() -> zcio::transport::Registry {
    let mut r = zcio::transport::Registry::new();
    zcio_tcp::register(&mut r);
    // Without the `rdma` feature this records that the build lacks RDMA; with it, on a host
    // without a device, `check_available` says so. Either way RDMA is unavailable here.
    zcio_rdma::register(&mut r);
    r
}

fn client_cfg(addr: &str) -> Config {
    let mut cfg = Config::default();
    cfg.client.connect = addr.to_string();
    cfg.pool = small_pool();
    cfg
}

#[test]
fn a_transport_list_falls_back_to_tcp_and_says_why_while_rdma_alone_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"fallback").unwrap();
    let mut s = serve(dir.path(), "127.0.0.1:0", &[]);
    let mut cfg = client_cfg(&s.addr);
    cfg.transport = "rdma".into();
    cfg.more_transports = vec!["tcp".into()];
    let c = Client::connect_with(&cfg, &registry()).unwrap();
    assert_eq!(c.transport(), Some("tcp"));
    let why = c.fallback_reason().expect("no reason for the fallback");
    assert!(why.contains("rdma is not available here"), "{why}");
    let mut buf = [0u8; 8];
    c.open("f", OpenFlags::READ)
        .unwrap()
        .pread(&mut buf, 0)
        .unwrap();
    assert_eq!(&buf, b"fallback");
    // One transport stays strict: today's clear error.
    cfg.more_transports.clear();
    let e = Client::connect_with(&cfg, &registry()).unwrap_err();
    assert!(
        matches!(e, Error::TransportUnavailable { .. }),
        "rdma alone: {e:?}"
    );
    // The command says which transport it used, and why not the first.
    let out = zcio()
        .args(["get", "--transport", "rdma,tcp", &s.addr, "f"])
        .arg(dir.path().join("copy"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("over tcp"), "{err}");
    assert!(err.contains("rdma is not available here"), "{err}");
    let out = zcio()
        .args(["get", "--transport", "rdma", &s.addr, "f"])
        .arg(dir.path().join("copy2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rdma"));
    let _ = s.child.kill();
    let _ = s.child.wait();
}

#[test]
fn keepalive_keeps_an_idle_client_past_the_server_s_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"still here").unwrap();
    let mut s = serve(
        dir.path(),
        "127.0.0.1:0",
        &["--set", "server.idle_timeout_ms=400"],
    );
    let t = Arc::new(zcio_tcp::TcpTransport);
    for keepalive in [Some(Duration::from_millis(100)), None] {
        let mut cfg = client_cfg(&s.addr);
        // Without reconnect: only the keepalive can keep the file readable.
        cfg.client.reconnect = false;
        cfg.client.keepalive = keepalive;
        let c = Client::connect_shared(&cfg, t.clone(), Pool::new(&cfg.pool).unwrap()).unwrap();
        let f = c.open("f", OpenFlags::READ).unwrap();
        // Idle for five times the server's idle timeout: the point of the test, not a wait
        // for something to happen.
        std::thread::sleep(Duration::from_millis(2000));
        let mut buf = [0u8; 10];
        let r = f.pread(&mut buf, 0);
        match keepalive {
            Some(_) => {
                assert_eq!(r.unwrap(), 10);
                assert_eq!(&buf, b"still here");
            }
            // The control: without keepalive the server closed the idle connection.
            None => assert!(r.is_err(), "the server's idle timeout did not close it"),
        }
    }
    let _ = s.child.kill();
    let _ = s.child.wait();
}

#[test]
fn clients_reconnect_reopen_and_retry_across_sigkill_and_sigterm_restarts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gone"), b"x").unwrap();
    let mut s = serve(dir.path(), "127.0.0.1:0", &[]);
    let addr = s.addr.clone();
    let mut cfg = client_cfg(&addr);
    cfg.client.reconnect_give_up = Duration::from_secs(60);
    let c = Client::connect_shared(
        &cfg,
        Arc::new(zcio_tcp::TcpTransport),
        Pool::new(&cfg.pool).unwrap(),
    )
    .unwrap();
    // Opened with CREATE and TRUNCATE: the reopen must not empty it.
    let f = Arc::new(
        c.open(
            "f",
            OpenFlags::rw() | OpenFlags::CREATE | OpenFlags::TRUNCATE,
        )
        .unwrap(),
    );
    let gone = c.open("gone", OpenFlags::READ).unwrap();
    // A pool buffer the application holds across the restarts.
    let mut held = c.get_buffers(4096, 1).unwrap();
    held.buffers_mut()[0].fill(7);
    let (acked_tx, acked_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || -> zcio::Result<u64> {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let b = block(i);
                let iov: Vec<std::io::IoSlice<'_>> =
                    b.chunks(4096).map(std::io::IoSlice::new).collect();
                assert_eq!(f.pwritev(&iov, (i % 512) << 16)?, 64 << 10);
                let mut back = vec![0u8; 64 << 10];
                assert_eq!(f.pread(&mut back, (i % 512) << 16)?, 64 << 10);
                assert!(back == b, "block {i} read back wrong");
                acked_tx.send(i).unwrap();
                i += 1;
            }
            Ok(i)
        })
    };
    let mut acked = Vec::new();
    for (round, sig) in [
        Signal::SIGKILL,
        Signal::SIGKILL,
        Signal::SIGTERM,
        Signal::SIGINT,
    ]
    .into_iter()
    .enumerate()
    {
        for _ in 0..30 {
            acked.push(acked_rx.recv_timeout(Duration::from_secs(60)).unwrap());
        }
        kill(Pid::from_raw(s.child.id() as i32), sig).unwrap();
        let _ = s.child.wait();
        if round == 1 {
            std::fs::remove_file(dir.path().join("gone")).unwrap();
        }
        s = serve(dir.path(), &addr, &[]);
    }
    for _ in 0..30 {
        acked.push(acked_rx.recv_timeout(Duration::from_secs(60)).unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let n = writer
        .join()
        .unwrap()
        .expect("a request failed across the restarts");
    acked.extend(acked_rx.try_iter());
    assert_eq!(acked.len() as u64, n);
    // Every acknowledged block is on disk (the last write of each slot wins).
    let on_disk = std::fs::read(dir.path().join("f")).unwrap();
    let mut last = std::collections::HashMap::new();
    for j in acked {
        last.insert(j % 512, j);
    }
    for (slot, j) in last {
        let at = (slot << 16) as usize;
        assert!(
            on_disk.get(at..at + (64 << 10)) == Some(&block(j)[..]),
            "acknowledged block {j} is not on disk"
        );
    }
    // The file whose path vanished while the server was down is stale.
    let e = gone.pread(&mut [0u8; 1], 0).unwrap_err();
    assert!(
        matches!(e, Error::Remote { code, .. } if code == zcio::client::reconnect::ESTALE),
        "{e:?}"
    );
    assert!(held.buffers()[0].iter().all(|&b| b == 7));
    assert_eq!(f.zero_writev(&held, 0).unwrap(), 4096);
    let _ = s.child.kill();
    let _ = s.child.wait();
}

#[test]
fn one_server_serves_several_listeners_with_server_wide_limits_and_rdma_fails_clearly() {
    use zcio::transport::multi::MultiListener;
    use zcio::transport::Transport;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"shared").unwrap();
    let mut cfg = Config::default();
    cfg.server.export = dir.path().to_path_buf();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.max_connections = 2;
    cfg.pool = small_pool();
    let pool = Pool::new(&cfg.pool).unwrap();
    // Two listeners (TCP twice: the only transport this host has) behind one server.
    let parts: Vec<(&'static str, Arc<dyn zcio::transport::Listener>)> = (0..2)
        .map(|_| {
            let l = zcio_tcp::TcpTransport.listen(&cfg, &pool).unwrap();
            ("tcp", Arc::from(l))
        })
        .collect();
    let addrs: Vec<String> = parts.iter().map(|(_, l)| l.local_addr()).collect();
    let multi = MultiListener::new(parts).unwrap();
    assert_eq!(
        zcio::transport::Listener::local_addr(&multi),
        format!("tcp={} tcp={}", addrs[0], addrs[1])
    );
    let srv = zcio::Server::with_listener(&cfg, Arc::new(multi), pool)
        .unwrap()
        .spawn()
        .unwrap();
    let clients: Vec<Client> = addrs.iter().map(|a| client(a, false)).collect();
    for c in &clients {
        let mut buf = [0u8; 6];
        c.open("f", OpenFlags::READ)
            .unwrap()
            .pread(&mut buf, 0)
            .unwrap();
        assert_eq!(&buf, b"shared");
    }
    // The connection limit is the server's, across listeners.
    let mut cfg3 = client_cfg(&addrs[0]);
    cfg3.client.reconnect = false;
    let e = Client::connect_transport(
        &cfg3,
        &zcio_tcp::TcpTransport,
        Pool::new(&cfg3.pool).unwrap(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("limit of 2 connections"), "{e}");
    assert_eq!(srv.connections(), 2);
    drop(clients);
    srv.shutdown();
    // `zcio serve --transport tcp,rdma` on a host without RDMA: a clear error.
    let out = zcio()
        .args([
            "serve",
            "--transport",
            "tcp,rdma",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--export")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("rdma"), "{err}");
}

/// Waits until the server process has logged file data (a read or a write answered) for
/// `n` connections other than `skip`'s; false after a minute without. (A client that is
/// still saying hello when the server dies connects again silently, as a first
/// connection; one that has moved data reconnects, and says so.)
fn await_io(s: &Served, n: usize, skip: Option<&str>) -> bool {
    let mut seen: Vec<String> = Vec::new();
    let t0 = Instant::now();
    while seen.len() < n {
        let left = Duration::from_secs(60).saturating_sub(t0.elapsed());
        let Ok(l) = s.lines.recv_timeout(left) else {
            return false;
        };
        if !(l.contains("op=\"read\"") || l.contains("op=\"write\"")) || !l.contains("replied") {
            continue;
        }
        let peer = l
            .split("request{peer=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default()
            .to_string();
        if !peer.is_empty() && Some(peer.as_str()) != skip && !seen.contains(&peer) {
            seen.push(peer);
        }
    }
    true
}

/// Waits for the server process's first "connection from" line and returns the peer
/// (the bench's set-up client); `None` after a minute without.
fn first_peer(s: &Served) -> Option<String> {
    let t0 = Instant::now();
    loop {
        let left = Duration::from_secs(60).saturating_sub(t0.elapsed());
        let l = s.lines.recv_timeout(left).ok()?;
        if let Some(rest) = l.split("connection from ").nth(1) {
            return rest.split_whitespace().next().map(str::to_string);
        }
    }
}

#[test]
fn zcio_bench_verify_survives_server_restarts_by_sigkill_and_sigterm() {
    for (sig, rw, mode) in [
        (Signal::SIGKILL, "randwrite", "zero-copy"),
        (Signal::SIGKILL, "randread", "direct"),
        (Signal::SIGTERM, "randwrite", "direct"),
        (Signal::SIGTERM, "randread", "zero-copy"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = serve(dir.path(), "127.0.0.1:0", &[]);
        let addr = s.addr.clone();
        let bench = zcio()
            .args([
                "bench", "--server", &addr, "--verify", "--rw", rw, "--mode", mode,
            ])
            .args([
                "--bs",
                "64K",
                "--iodepth",
                "8",
                "--size",
                "4M",
                "--files",
                "2",
            ])
            .args(["--jobs", "2", "--runtime", "8s"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The bench's jobs are moving data once the server has answered reads or writes on
        // two connections besides the first (the set-up connection, which lays the files
        // out and then stays idle). Killing the server earlier could catch both jobs in
        // their hello, which they retry as a first connection, without a reconnect.
        let mut bench = bench;
        let fail = |bench: &mut Child, what: &str| -> ! {
            let _ = bench.kill();
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(bench.stderr.as_mut().unwrap(), &mut err);
            panic!("{sig:?} {rw} {mode}: {what}; bench said:\n{err}");
        };
        let Some(setup) = first_peer(&s) else {
            fail(&mut bench, "the bench did not connect")
        };
        if !await_io(&s, 2, Some(&setup)) {
            fail(&mut bench, "the bench's jobs moved no data");
        }
        for _ in 0..2 {
            kill(Pid::from_raw(s.child.id() as i32), sig).unwrap();
            let _ = s.child.wait();
            s = serve(dir.path(), &addr, &[]);
            // Both jobs come back and move data again (the idle set-up client only on its
            // next request).
            if !await_io(&s, 2, None) {
                fail(
                    &mut bench,
                    "the jobs did not move data on the restarted server",
                );
            }
        }
        let out = bench.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{sig:?} {rw} {mode}: the bench failed across restarts:\n{err}"
        );
        if rw == "randwrite" {
            assert!(err.contains("verify: every byte"), "{err}");
        }
        assert!(
            err.contains("reconnected"),
            "{sig:?}: no reconnect logged:\n{err}"
        );
        let _ = s.child.kill();
        let _ = s.child.wait();
    }
}

/// A raw TCP client that opens `path` and asks for `count` reads of 1 MiB without ever
/// reading the replies: the server's replies back up and its workers block on them, so a
/// drain cannot finish.
fn stuck_reader(addr: &str, path: &str, count: u64) -> std::net::TcpStream {
    use std::io::{Read, Write};
    use zcio::proto::{self, Req, Resp};
    use zcio_tcp::wire::{Hello, Kind, Prefix, HELLO_LEN, PREFIX_LEN};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let limits = Config::default().limits;
    s.write_all(&Hello::from_limits(&limits, 64).encode())
        .unwrap();
    let mut h = [0u8; HELLO_LEN];
    s.read_exact(&mut h).unwrap();
    let mut call = |id: u64, req: &Req| -> Resp {
        let header = req.encode();
        let p = Prefix {
            kind: Kind::Request,
            header_len: header.len(),
            id,
            payload_len: 0,
            recv_cap: 0,
        };
        s.write_all(&p.encode()).unwrap();
        s.write_all(&header).unwrap();
        let mut pb = [0u8; PREFIX_LEN];
        s.read_exact(&mut pb).unwrap();
        let p = zcio_tcp::wire::decode_prefix(&pb, Kind::Reply, &limits).unwrap();
        let mut rh = vec![0u8; p.header_len];
        s.read_exact(&mut rh).unwrap();
        proto::decode_reply(req, &rh).unwrap()
    };
    call(
        1,
        &Req::Hello {
            version: proto::VERSION,
            client_nonce: [0; proto::NONCE_LEN],
        },
    );
    let Resp::Open { fh, .. } = call(
        2,
        &Req::Open {
            path: path.into(),
            flags: OpenFlags::READ,
            mode: 0,
        },
    ) else {
        panic!("open failed")
    };
    for i in 0..count {
        let header = Req::Read {
            fh,
            offset: i << 20,
            len: 1 << 20,
        }
        .encode();
        let p = Prefix {
            kind: Kind::Request,
            header_len: header.len(),
            id: 10 + i,
            payload_len: 0,
            recv_cap: 1 << 20,
        };
        s.write_all(&p.encode()).unwrap();
        s.write_all(&header).unwrap();
    }
    s
}

#[test]
fn a_second_signal_stops_a_stuck_drain_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("big"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut s = serve(
        dir.path(),
        "127.0.0.1:0",
        &["--set", "server.drain_timeout_ms=600000"],
    );
    let _stuck = stuck_reader(&s.addr, "big", 64);
    let pid = Pid::from_raw(s.child.id() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    let t0 = Instant::now();
    loop {
        let l = s
            .lines
            .recv_timeout(Duration::from_secs(60))
            .expect("no shutdown message");
        if l.contains("shutting down") {
            break;
        }
    }
    kill(pid, Signal::SIGINT).unwrap();
    assert_eq!(exit_code(&mut s.child), Some(1));
    let said: Vec<String> = s.lines.try_iter().collect();
    assert!(
        said.iter()
            .any(|l| l.contains("second SIGINT: stopping now")),
        "{said:?}"
    );
    assert!(!said.iter().any(|l| l.contains("stopped in")), "{said:?}");
    // Far inside the 10-minute drain deadline.
    assert!(t0.elapsed() < Duration::from_secs(120));
}

/// A transport called `rdma` that is available here and connects like TCP: at a port where
/// nobody listens, it meets what an RDMA client meets at a server that does not offer RDMA,
/// seen from the fallback's side.
struct NotOffered;

impl zcio::transport::Transport for NotOffered {
    fn name(&self) -> &'static str {
        "rdma"
    }
    fn check_available(&self, _: &Config) -> zcio::Result<()> {
        Ok(())
    }
    fn connect(
        &self,
        cfg: &Config,
        pool: &Pool,
    ) -> zcio::Result<Box<dyn zcio::transport::ClientConn>> {
        zcio_tcp::TcpTransport.connect(cfg, pool)
    }
    fn listen(&self, _: &Config, _: &Pool) -> zcio::Result<Box<dyn zcio::transport::Listener>> {
        Err(Error::InvalidArgument("not a server transport".into()))
    }
}

#[test]
fn a_transport_the_server_does_not_offer_falls_back_too_but_not_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"offered").unwrap();
    let mut s = serve(dir.path(), "127.0.0.1:0", &[]);
    // A port with nobody listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut reg = zcio::transport::Registry::new();
    zcio_tcp::register(&mut reg);
    reg.register(Arc::new(NotOffered));
    // One address per transport, as `zcio serve` prints them for several.
    let mut cfg = client_cfg(&format!("rdma=127.0.0.1:{closed} tcp={}", s.addr));
    cfg.transport = "rdma".into();
    cfg.more_transports = vec!["tcp".into()];
    let c = Client::connect_with(&cfg, &reg).unwrap();
    assert_eq!(c.transport(), Some("tcp"));
    let why = c.fallback_reason().unwrap();
    assert!(
        why.contains("rdma could not connect") && why.contains("may not offer it"),
        "{why}"
    );
    let mut buf = [0u8; 7];
    c.open("f", OpenFlags::READ)
        .unwrap()
        .pread(&mut buf, 0)
        .unwrap();
    assert_eq!(&buf, b"offered");
    // Alone, the same transport is strict: its own error, no fallback.
    cfg.more_transports.clear();
    assert!(Client::connect_with(&cfg, &reg).is_err());
    let _ = s.child.kill();
    let _ = s.child.wait();
}

#[test]
fn keepalive_notices_a_silent_server_while_the_client_is_idle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"x").unwrap();
    let mut s = serve(dir.path(), "127.0.0.1:0", &[]);
    let mut cfg = client_cfg(&s.addr);
    cfg.client.reconnect = false;
    cfg.client.keepalive = Some(Duration::from_millis(100));
    cfg.client.timeout = Duration::from_millis(500);
    let c = Client::connect_shared(
        &cfg,
        Arc::new(zcio_tcp::TcpTransport),
        Pool::new(&cfg.pool).unwrap(),
    )
    .unwrap();
    let f = c.open("f", OpenFlags::READ).unwrap();
    // The server stops answering (alive, connection open: no reset tells the client).
    let pid = Pid::from_raw(s.child.id() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    // Idle for longer than keepalive + timeout (the bound): the point of the test.
    std::thread::sleep(Duration::from_millis(2000));
    let e = f.pread(&mut [0u8; 1], 0).unwrap_err();
    kill(pid, Signal::SIGCONT).unwrap();
    // The keepalive's ping found the server silent and ended the connection, so this
    // request fails at once as closed; without it, this request would have waited for
    // its own timeout (Error::Timeout).
    assert!(
        matches!(&e, Error::ConnectionClosed(m) if m.contains("no reply within client.timeout")),
        "{e:?}"
    );
    let _ = s.child.kill();
    let _ = s.child.wait();
}

#[test]
fn zcio_bench_with_a_transport_list_falls_back_on_this_host() {
    let out = zcio()
        .args([
            "bench",
            "--transport",
            "rdma,tcp",
            "--rw",
            "randread",
            "--bs",
            "64K",
        ])
        .args([
            "--size",
            "1M",
            "--files",
            "1",
            "--runtime",
            "1s",
            "--verify",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("transport in use: tcp"), "{err}");
    assert!(err.contains("rdma is not available here"), "{err}");
}
