//! Starting a `zcio serve` process on a free port: shared by the process tests and
//! `examples/restart_latency.rs` (which runs a binary it finds itself, so nothing here
//! names the test binary).

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Spawns `bin serve --listen 127.0.0.1:port --export export` with its output discarded;
/// returns at once (the caller waits until it listens, if it needs to).
pub(crate) fn spawn_serve(bin: impl AsRef<OsStr>, export: &Path, port: u16) -> Child {
    Command::new(bin)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--export",
        ])
        .arg(export)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn zcio serve")
}
