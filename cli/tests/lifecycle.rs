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

fn serve(export: &std::path::Path, listen: &str, extra: &[&str]) -> Served {
    let mut child = zcio()
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
    let first = lines
        .recv_timeout(Duration::from_secs(60))
        .expect("zcio serve printed nothing");
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
