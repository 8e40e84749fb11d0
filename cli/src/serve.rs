//! `zcio serve`: runs the server until SIGTERM or SIGINT, then shuts it down gracefully
//! ([`zcio::ServerHandle::drain`] within `server.drain_timeout_ms`) and exits 0; a second
//! signal during the drain exits at once (status 1).

use nix::sys::signal::{SigSet, Signal};

use crate::AnyResult;
use zcio::{Config, Server};

/// Blocks SIGTERM and SIGINT in this thread, and so in every thread it starts afterwards:
/// they are then taken by `sigwait` on the main thread only. Call before any thread starts.
fn block_signals() -> AnyResult<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()
        .map_err(|e| format!("blocking SIGTERM and SIGINT: {e}"))?;
    Ok(set)
}

/// Serves `cfg` until a signal, then drains.
pub(crate) fn run(cfg: &Config) -> AnyResult<()> {
    let signals = block_signals()?;
    let server = Server::bind(cfg, &crate::registry())?;
    eprintln!(
        "zcio: serving {} over {} on {}{}",
        cfg.server.export.display(),
        cfg.transport_list().join(", "),
        server.local_addr(),
        if cfg.server.read_only {
            " (read-only)"
        } else {
            ""
        }
    );
    let handle = server.spawn()?;
    let sig = signals
        .wait()
        .map_err(|e| format!("waiting for a signal: {e}"))?;
    eprintln!(
        "zcio: {sig:?}: shutting down (finishing requests for up to {:?}; a second signal stops at once)",
        cfg.server.drain_timeout
    );
    let deadline = cfg.server.drain_timeout;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("zcio-drain".into())
        .spawn(move || {
            let r = handle.drain(deadline);
            let _ = tx.send(r);
            // Wake the main thread's sigwait (a signal to the process, not to this
            // thread, which blocks it too): the drain is over.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGTERM);
        })
        .map_err(|e| format!("spawn drain thread: {e}"))?;
    let second = signals
        .wait()
        .map_err(|e| format!("waiting for a signal: {e}"))?;
    match rx.try_recv() {
        Ok(r) => {
            eprintln!(
                "zcio: stopped in {:?}: {} requests finished, {} turned away, {} abandoned, {} files left open",
                r.took, r.finished, r.turned_away, r.abandoned, r.files_left_open
            );
            Ok(())
        }
        Err(_) => {
            eprintln!("zcio: second {second:?}: stopping now");
            std::process::exit(1);
        }
    }
}
