//! Connection life cycle and containment over RDMA, against a real server on a real device
//! (issues 14 and 15):
//!
//! - one server on both transports: an RDMA client and a TCP client on the same files at
//!   once, bytes checked;
//! - reconnect after queue-pair errors (forced every 12th request that carries memory
//!   keys): every byte right, several reconnects;
//! - a client that stops posting receives is cut off (finite RNR retry) while a good client
//!   keeps working;
//! - payload before authentication is refused before the server takes a buffer for it;
//! - the per-connection payload budget is back-pressure (a hog never holds more);
//! - a pool short for longer than its wait timeout is back-pressure, not a failure.
//!
//! All need a device: `#[ignore]`d on the host, run by `ci/rxe-test` in the Soft-RoCE guest.
#![cfg(feature = "rdma")]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zcio::config::Config;
use zcio::conformance::{pattern, test_pool, Harness};
use zcio::proto::{OpenFlags, Req};
use zcio::transport::multi::MultiListener;
use zcio::transport::{Listener, Request, SendSeg, Transport};
use zcio::{Client, Pool, Server};
use zcio_rdma::config::RdmaConfig;
use zcio_rdma::transport::Faults;
use zcio_rdma::RdmaTransport;
use zcio_tcp::TcpTransport;

/// A hang guard, never a speed check (the guest is emulated: slow).
const PATIENCE: Duration = Duration::from_secs(120);

fn device_name() -> Option<String> {
    std::env::var("ZCIO_RDMA_DEVICE")
        .ok()
        .filter(|n| !n.is_empty())
}

/// The RDMA transport (with `faults` on its client side); a missing device fails the test.
fn rdma(faults: Faults) -> Arc<RdmaTransport> {
    let t = RdmaTransport::with_faults(faults);
    let mut cfg = Config::default();
    RdmaConfig::of_mut(&mut cfg).device = device_name();
    if let Err(e) = t.check_available(&cfg) {
        panic!("this test needs an RDMA device: {e}");
    }
    Arc::new(t)
}

fn start(tweak: impl FnOnce(&mut Config)) -> Harness {
    Harness::start(rdma(Faults::default()), |c| {
        RdmaConfig::of_mut(c).device = device_name();
        tweak(c);
    })
}

/// Polls `cond` until it holds; panics with `what` after [`PATIENCE`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {PATIENCE:?}: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Joins `h`, failing the test if it does not end within [`PATIENCE`].
fn join_within<T: Send + 'static>(what: &str, h: JoinHandle<T>) -> T {
    wait_until(what, || h.is_finished());
    h.join().expect(what)
}

/// A client of `t` with its own pool.
fn client_of(cfg: &Config, t: Arc<dyn Transport>) -> zcio::Result<Client> {
    let pool = Pool::new(&cfg.pool)?;
    Client::connect_shared(cfg, t, pool)
}

/// Writes `len` bytes of client `who`'s data and reads them back, `rounds` times, each on
/// a new connection: the good client beside an attack. Returns the rounds done or the
/// first error.
fn good_client(
    cfg: Config,
    t: Arc<dyn Transport>,
    who: usize,
    rounds: usize,
    len: usize,
) -> JoinHandle<Result<usize, String>> {
    std::thread::spawn(move || {
        for round in 0..rounds {
            let c = client_of(&cfg, t.clone()).map_err(|e| format!("{who}/{round}: {e}"))?;
            let f = c
                .open(&format!("good-{who}"), OpenFlags::rw() | OpenFlags::CREATE)
                .map_err(|e| format!("{who}/{round}: open: {e}"))?;
            let want = pattern((who * 1000 + round) as u64, len);
            let n = f
                .pwrite(&want, 0)
                .map_err(|e| format!("{who}/{round}: write: {e}"))?;
            if n != len {
                return Err(format!("{who}/{round}: wrote {n} of {len}"));
            }
            let mut got = vec![0u8; len];
            let n = f
                .pread(&mut got, 0)
                .map_err(|e| format!("{who}/{round}: read: {e}"))?;
            if n != len || got != want {
                return Err(format!("{who}/{round}: read back wrong bytes"));
            }
            f.close()
                .map_err(|e| format!("{who}/{round}: close: {e}"))?;
        }
        Ok(rounds)
    })
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn one_server_serves_an_rdma_and_a_tcp_client_on_the_same_files_at_once() {
    let r = rdma(Faults::default());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    RdmaConfig::of_mut(&mut cfg).device = device_name();
    cfg.pool = test_pool();
    cfg.server.export = dir.path().to_path_buf();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.workers = 4;
    // One pool, one export, one server; a listener per transport.
    let pool = Pool::new(&cfg.pool).unwrap();
    let rl: Arc<dyn Listener> = Arc::from(r.listen(&cfg, &pool).unwrap());
    let tl: Arc<dyn Listener> = Arc::from(TcpTransport.listen(&cfg, &pool).unwrap());
    let (raddr, taddr) = (rl.local_addr(), tl.local_addr());
    let multi = MultiListener::new(vec![("rdma", rl), ("tcp", tl)]).unwrap();
    let srv = Server::with_listener(&cfg, Arc::new(multi), pool)
        .unwrap()
        .spawn()
        .unwrap();
    println!("serving on {}", srv.local_addr());

    // Each client writes its half of every shared file, then (after the other did too)
    // reads the whole file and checks both halves.
    const FILES: usize = 4;
    const ROUNDS: usize = 6;
    const HALF: usize = 192 << 10;
    let barrier = Arc::new(Barrier::new(2));
    let run = |side: usize, t: Arc<dyn Transport>, addr: String| {
        let mut ccfg = cfg.clone();
        ccfg.transport = t.name().to_string();
        ccfg.client.connect = addr;
        let barrier = barrier.clone();
        std::thread::spawn(move || -> Result<&'static str, String> {
            let c = client_of(&ccfg, t).map_err(|e| e.to_string())?;
            let used = c.transport().unwrap_or("?");
            let files: Vec<_> = (0..FILES)
                .map(|k| c.open(&format!("shared-{k}"), OpenFlags::rw() | OpenFlags::CREATE))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{used}: open: {e}"))?;
            for round in 0..ROUNDS {
                for (k, f) in files.iter().enumerate() {
                    let mine = pattern((round * 100 + k * 10 + side) as u64, HALF);
                    f.pwrite(&mine, (side * HALF) as u64)
                        .map_err(|e| format!("{used}: write: {e}"))?;
                }
                barrier.wait();
                for (k, f) in files.iter().enumerate() {
                    let mut got = vec![0u8; 2 * HALF];
                    let n = f
                        .pread(&mut got, 0)
                        .map_err(|e| format!("{used}: read: {e}"))?;
                    for s in 0..2 {
                        let want = pattern((round * 100 + k * 10 + s) as u64, HALF);
                        if n != 2 * HALF || got[s * HALF..(s + 1) * HALF] != want[..] {
                            return Err(format!(
                                "{used}: round {round} file {k}: half {s} has wrong bytes"
                            ));
                        }
                    }
                }
                // Nobody writes the next round before both have checked this one.
                barrier.wait();
            }
            Ok(used)
        })
    };
    let a = run(0, r.clone(), raddr);
    let b = run(1, Arc::new(TcpTransport), taddr);
    let a = join_within("the RDMA client", a);
    let b = join_within("the TCP client", b);
    assert_eq!(a, Ok("rdma"));
    assert_eq!(b, Ok("tcp"));
    assert_eq!(srv.stats().accepted.load(Ordering::SeqCst), 2);
    srv.shutdown();
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn a_client_reconnects_after_queue_pair_errors_and_every_byte_is_right() {
    let h = start(|_| {});
    // Every 12th request with memory keys advertises corrupted ones: the server's RDMA
    // READ or WRITE fails with a remote access error and the queue pairs go to the error
    // state; the client reconnects and sends the request again.
    let t = rdma(Faults {
        qp_error_every: 12,
        ..Faults::default()
    });
    let mut cfg = h.cfg.clone();
    cfg.client.reconnect = true;
    cfg.client.reconnect_give_up = PATIENCE;
    let c = client_of(&cfg, t).unwrap();
    const ROUNDS: usize = 48;
    const LEN: usize = 64 << 10;
    let f = c
        .open("qp-errors", OpenFlags::rw() | OpenFlags::CREATE)
        .unwrap();
    for round in 0..ROUNDS {
        let want = pattern(round as u64, LEN);
        let off = (round * LEN) as u64;
        assert_eq!(f.pwrite(&want, off).unwrap(), LEN, "round {round}");
        let mut got = vec![0u8; LEN];
        assert_eq!(f.pread(&mut got, off).unwrap(), LEN, "round {round}");
        assert!(got == want, "round {round}: wrong bytes read back");
    }
    f.close().unwrap();
    let on_disk = std::fs::read(h.path("qp-errors")).unwrap();
    assert_eq!(on_disk.len(), ROUNDS * LEN);
    for round in 0..ROUNDS {
        assert!(
            on_disk[round * LEN..(round + 1) * LEN] == pattern(round as u64, LEN)[..],
            "round {round}: wrong bytes on disk"
        );
    }
    // 96 keyed requests, one in 12 failing, each failure a new connection.
    let accepted = h.server.stats().accepted.load(Ordering::SeqCst);
    println!("{} reconnects", accepted - 1);
    assert!(accepted >= 5, "only {} reconnects", accepted - 1);
    drop(c);
    h.assert_server_clean();
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn a_client_that_stops_posting_receives_is_cut_off_while_a_good_client_keeps_working() {
    let h = start(|_| {});
    let good_t: Arc<dyn Transport> = rdma(Faults::default());
    let bad_t: Arc<dyn Transport> = rdma(Faults {
        stop_reposting: true,
        ..Faults::default()
    });
    std::fs::write(h.path("small"), pattern(5, 4096)).unwrap();
    let mut bad_cfg = h.cfg.clone();
    bad_cfg.client.reconnect = false;
    // Long enough that only the server ending the connection ends the wait.
    bad_cfg.client.timeout = Duration::from_secs(3600);
    bad_cfg.client.keepalive = None;
    let bad = client_of(&bad_cfg, bad_t).unwrap();
    let bf = bad.open("small", OpenFlags::READ).unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let bad_run = {
        let served = served.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; 4096];
            // Its receives run out after its credits' worth of replies; the next reply's
            // SEND meets "receiver not ready" until the RNR retries are spent.
            loop {
                match bf.pread(&mut b, 0) {
                    Ok(_) => served.fetch_add(1, Ordering::SeqCst),
                    Err(e) => return e,
                };
            }
        })
    };
    let good = good_client(h.cfg.clone(), good_t.clone(), 0, 8, 256 << 10);
    let e = join_within("the client that stopped reposting is cut off", bad_run);
    println!(
        "stalled client cut off after {} replies: {e}",
        served.load(Ordering::SeqCst)
    );
    assert!(e.is_connection_fatal(), "{e:?}");
    assert_eq!(join_within("the good client", good), Ok(8));
    // And the server goes on serving new clients.
    assert_eq!(
        join_within(
            "a later client",
            good_client(h.cfg.clone(), good_t, 1, 2, 64 << 10)
        ),
        Ok(2)
    );
    drop(bad);
    wait_until("the server dropped the stalled connection", || {
        h.server.connections() == 0
    });
    h.assert_server_clean();
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn payload_before_authentication_is_refused_before_a_buffer_is_taken() {
    // The server's pool waits as long as it takes: a payload it tried to take buffers for
    // would wait for the buffers this test holds (the old behaviour: the READ came first,
    // the refusal after).
    let h = start(|c| {
        c.server.token = "s3cret".into();
        c.client.token = "s3cret".into();
        c.pool.wait_timeout = Duration::from_secs(3600);
        // Nor does the authentication deadline end the connection first.
        c.server.auth_timeout = None;
    });
    let held: Vec<_> = (0..24)
        .map(|_| h.server.pool().get(1 << 20).unwrap())
        .collect();
    let t = rdma(Faults::default());
    let cpool = Pool::new(&h.cfg.pool).unwrap();
    let conn = t.connect(&h.cfg, &cpool).unwrap();
    let mut b = cpool.get(1 << 20).unwrap();
    b.fill(9);
    let sent = std::thread::spawn(move || {
        conn.start(Request {
            header: Req::Write { fh: 1, offset: 0 }.encode(),
            send: vec![SendSeg::PoolMut(b)],
            recv: Vec::new(),
        })
        .and_then(|p| p.wait())
        .map(drop)
    });
    let r = join_within("payload before authentication refused", sent);
    let e = r.expect_err("payload before authentication was accepted");
    assert!(e.is_connection_fatal(), "{e:?}");
    drop(held);
    // An authenticated client writes as usual.
    let good = good_client(h.cfg.clone(), rdma(Faults::default()), 0, 2, 1 << 20);
    assert_eq!(join_within("the good client", good), Ok(2));
    h.assert_server_clean();
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn the_payload_budget_is_back_pressure_on_the_hog_only() {
    const BUDGET: usize = 2 << 20;
    let h = start(|c| {
        c.server.max_payload_in_flight = BUDGET;
        c.server.workers = 2;
    });
    let t: Arc<dyn Transport> = rdma(Faults::default());
    // The hog keeps 16 x 1 MiB writes in flight (from its own big pool): 16 MiB asked of
    // a 2 MiB budget, against a server pool of 24 MiB.
    let stop = Arc::new(AtomicBool::new(false));
    let hog = {
        let (mut cfg, stop, t) = (h.cfg.clone(), stop.clone(), t.clone());
        cfg.pool.wait_timeout = PATIENCE;
        cfg.limits.max_in_flight = 16;
        for c in &mut cfg.pool.classes {
            if c.size == 1 << 20 {
                c.count = 16;
            }
        }
        std::thread::spawn(move || -> Result<usize, String> {
            let c = client_of(&cfg, t).map_err(|e| e.to_string())?;
            let f = c
                .open("hog", OpenFlags::rw() | OpenFlags::CREATE)
                .map_err(|e| e.to_string())?;
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) {
                let pending: Vec<_> = (0..16u64)
                    .map(|k| {
                        let mut b = c.get_buffers(1 << 20, 1)?;
                        b.buffers_mut()[0].fill(k as u8);
                        f.zero_writev_async(b, k << 20)
                    })
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("hog: {e}"))?;
                for p in pending {
                    p.wait().map_err(|e| format!("hog: {e}"))?;
                }
                rounds += 1;
            }
            Ok(rounds)
        })
    };
    // The most 1 MiB server buffers in use at once, while the hog and a good client run.
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (pool, most, stop) = (h.server.pool().clone(), most.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let in_use = pool.stats().classes[2].in_use;
                most.fetch_max(in_use, Ordering::Relaxed);
                std::thread::yield_now();
            }
        })
    };
    let good = good_client(h.cfg.clone(), t, 0, 6, 1 << 20);
    assert_eq!(join_within("the good client", good), Ok(6));
    stop.store(true, Ordering::Relaxed);
    let rounds = join_within("the hog", hog);
    join_within("the sampler", sampler);
    // Back-pressure, not failure: the hog's writes all succeed too.
    assert!(rounds.is_ok(), "{rounds:?}");
    let most = most.load(Ordering::Relaxed);
    println!("hog rounds {rounds:?}; at most {most} 1 MiB server buffers in use");
    // Two connections, each held to its budget (the hog alone would take 16 without it).
    assert!(
        most <= 2 * BUDGET / (1 << 20),
        "{most} 1 MiB buffers in use at once, over two connections' budgets"
    );
    h.assert_server_clean();
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn a_pool_short_past_its_wait_timeout_is_back_pressure_not_failure() {
    const WAIT: Duration = Duration::from_millis(200);
    let h = start(|c| c.pool.wait_timeout = WAIT);
    let mut cfg = h.cfg.clone();
    cfg.client.reconnect = false;
    cfg.pool.wait_timeout = PATIENCE;
    let c = client_of(&cfg, rdma(Faults::default())).unwrap();
    let f = c
        .open("short", OpenFlags::rw() | OpenFlags::CREATE)
        .unwrap();
    // Every 1 MiB buffer of the server's pool, held by the test.
    let held: Vec<_> = (0..24)
        .map(|_| h.server.pool().get(1 << 20).unwrap())
        .collect();
    let want = pattern(77, 1 << 20);
    let write = {
        let want = want.clone();
        std::thread::spawn(move || f.pwrite(&want, 0).map(|n| (n, f)))
    };
    // The write waits for buffers for five times the pool's wait timeout (the old code
    // failed the connection after one); that much time passing is the point, not a hope.
    std::thread::sleep(5 * WAIT);
    assert!(!write.is_finished(), "the write did not wait for the pool");
    drop(held);
    let (n, f) = join_within("the write after the pool came back", write).expect("write");
    assert_eq!(n, 1 << 20);
    let mut got = vec![0u8; 1 << 20];
    assert_eq!(f.pread(&mut got, 0).unwrap(), 1 << 20);
    assert!(got == want, "wrong bytes read back");
    drop(f);
    drop(c);
    h.assert_server_clean();
}
