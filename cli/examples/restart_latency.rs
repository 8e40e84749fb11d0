//! Item 7 of issue 14: time from a server restart to a reconnecting client's first
//! successful request. Starts `zcio serve` (the binary next to this example's target dir,
//! or `$ZCIO_BIN`), keeps a client reading a file in a loop, SIGKILLs the server and starts
//! it again on the same port `N` times (default 20), and prints the p50 and p99 of the time
//! from spawning the new server to the client's first successful read after it.
//!
//! `cargo build --release -p zcio-cli --bin zcio --example restart_latency &&
//!  target/release/examples/restart_latency 20`

#[path = "../tests/support/process.rs"]
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{free_port, spawn_serve};
use zcio::{Client, Config, OpenFlags, Pool};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let bin = std::env::var("ZCIO_BIN").unwrap_or_else(|_| {
        let me = std::env::current_exe().unwrap();
        me.parent()
            .and_then(|p| p.parent())
            .unwrap()
            .join("zcio")
            .to_string_lossy()
            .into_owned()
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), vec![1u8; 4096]).unwrap();
    let port = free_port();
    let mut server = spawn_serve(&bin, dir.path(), port);
    let mut cfg = Config::default();
    cfg.client.connect = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    let c = loop {
        match Client::connect_shared(
            &cfg,
            Arc::new(zcio_tcp::TcpTransport),
            Pool::new(&cfg.pool).unwrap(),
        ) {
            Ok(c) => break c,
            Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("first connect: {e}"),
        }
    };
    let f = Arc::new(c.open("f", OpenFlags::READ).unwrap());
    // Microseconds since `base` of the reader's last successful read.
    let base = Instant::now();
    let last_ok = Arc::new(AtomicU64::new(0));
    {
        let (f, last_ok) = (f.clone(), last_ok.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                f.pread(&mut buf, 0).expect("read failed across a restart");
                last_ok.store(base.elapsed().as_micros() as u64, Ordering::SeqCst);
            }
        });
    }
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        std::thread::sleep(Duration::from_millis(100));
        server.kill().unwrap();
        server.wait().unwrap();
        // The client notices and starts backing off while the server is down.
        std::thread::sleep(Duration::from_millis(100));
        let restart = base.elapsed().as_micros() as u64;
        server = spawn_serve(&bin, dir.path(), port);
        while last_ok.load(Ordering::SeqCst) <= restart {
            std::thread::sleep(Duration::from_micros(200));
        }
        took.push(last_ok.load(Ordering::SeqCst) - restart);
    }
    server.kill().unwrap();
    let _ = server.wait();
    took.sort_unstable();
    let p = |q: f64| took[((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1];
    println!(
        "restart -> first successful read over {n} SIGKILL restarts: p50 {:.1} ms, p99 {:.1} ms, min {:.1} ms, max {:.1} ms",
        p(0.5) as f64 / 1000.0,
        p(0.99) as f64 / 1000.0,
        took[0] as f64 / 1000.0,
        took[took.len() - 1] as f64 / 1000.0
    );
}
