//! What the `zcio` process tests share: the binary, waiting on a condition with a
//! deadline, a `zcio serve` process on a free port, an in-process TCP server, and a command
//! that must succeed. Each test binary uses a part of it.
#![allow(dead_code)]

mod process;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use zcio::pool::Pool;
use zcio::{Config, Server, ServerHandle};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    process::free_port()
}

/// The `zcio` binary this package builds.
pub(crate) fn zcio() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zcio"))
}

/// Polls `f` every 20 ms until it holds; panics naming `what` after `limit` (a slow
/// machine's margin, not a speed check).
pub(crate) fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (60 s at most: a slow machine's margin, not a speed check) until a `zcio serve`
/// takes connections on 127.0.0.1:`port`.
pub(crate) fn wait_listening(port: u16) {
    wait_until("zcio serve to listen", Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// `zcio serve` exporting `export` on 127.0.0.1:`port`, once it takes connections.
pub(crate) fn spawn_serve(export: &std::path::Path, port: u16) -> Child {
    let child = process::spawn_serve(env!("CARGO_BIN_EXE_zcio"), export, port);
    wait_listening(port);
    child
}

/// A small pool (at most 128 buffers a class), so that many servers and clients fit.
pub(crate) fn small_pool() -> zcio::PoolConfig {
    let mut p = zcio::PoolConfig::default();
    for c in &mut p.classes {
        c.count = c.count.min(128);
        c.reserve = c.reserve.min(8);
    }
    p
}

/// A server config on 127.0.0.1, any port, exporting `dir`, with [`small_pool`].
pub(crate) fn server_cfg(dir: &std::path::Path) -> Config {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.export = dir.to_path_buf();
    cfg.pool = small_pool();
    cfg
}

/// A server in this process (so a test reads its statistics) over TCP, running.
pub(crate) fn tcp_server(cfg: &Config) -> ServerHandle {
    let pool = Pool::new(&cfg.pool).unwrap();
    Server::bind_transport(cfg, &zcio_tcp::TcpTransport, pool)
        .unwrap()
        .spawn()
        .unwrap()
}

/// Runs `cmd` to its end; panics with its output unless it succeeded. Returns its
/// standard output and error.
pub(crate) fn run_ok(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}
