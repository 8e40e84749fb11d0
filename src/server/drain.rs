//! Graceful shutdown: [`ServerHandle::drain`].
//!
//! 1. The server stops accepting (the listener is shut down) and starts *draining*: a
//!    request received from now on is not served but answered at once with
//!    [`Status::ShuttingDown`], which a client recognises as "not executed; reconnect and
//!    send it again" (safe for every request, even a create or an unlink).
//! 2. Requests received before that are served as usual, until all are answered or the
//!    deadline passes.
//! 3. Every connection is closed; its files are closed as its state goes away, and the
//!    drain waits (up to the deadline) for that too.
//!
//! A request still in a socket's buffer when its connection is closed is never read: its
//! client sees the connection close, as after a crash, and retries what is safe to retry.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::{Duration, Instant};

use super::{Conn, ServerHandle};
use crate::lock;
use crate::proto::{self, Status};
use crate::transport::Incoming;

/// What a [`ServerHandle::drain`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Requests still being served when the drain began, answered during it.
    pub finished: u64,
    /// Requests answered with [`Status::ShuttingDown`] (not executed).
    pub turned_away: u64,
    /// Requests not answered by the deadline (their connections were closed anyway).
    pub abandoned: u64,
    /// Files still open at the deadline (0 after a clean drain).
    pub files_left_open: usize,
    /// How long the drain took.
    pub took: Duration,
}

impl DrainReport {
    /// True when every received request was answered and every file closed in time.
    pub fn clean(&self) -> bool {
        self.abandoned == 0 && self.files_left_open == 0
    }
}

/// How often the drain looks at its counters.
const POLL: Duration = Duration::from_millis(2);

/// Answers a request that arrived during a drain with [`Status::ShuttingDown`].
pub(super) fn turn_away(conn: &Conn, inc: Incoming) {
    let shared = &conn.shared;
    let h = proto::encode_err(
        Status::ShuttingDown as u32,
        "server is shutting down; the request was not executed",
    );
    if let Err(e) = conn.replier.reply(inc.id, &h, &[]) {
        tracing::debug!("shutdown notice to {} failed: {e}", conn.peer);
    }
    shared.turned_away.fetch_add(1, Ordering::Relaxed);
    shared.replied.fetch_add(1, Ordering::SeqCst);
    drop(inc);
    conn.permits.release();
}

impl ServerHandle {
    /// Shuts the server down gracefully within `deadline` (see the module docs): stops
    /// accepting, serves the requests already received, turns later ones away with
    /// [`Status::ShuttingDown`], closes every connection and waits for their files to be
    /// closed. Returns what it did; [`DrainReport::clean`] says whether it all fit in the
    /// deadline.
    pub fn drain(mut self, deadline: Duration) -> DrainReport {
        let t0 = Instant::now();
        let end = t0 + deadline;
        let sh = self.shared.clone();
        sh.stopping.store(true, Ordering::SeqCst);
        sh.draining.store(true, Ordering::SeqCst);
        self.listener.shutdown();
        let received = sh.stats.received.load(Ordering::SeqCst);
        let replied = sh.replied.load(Ordering::SeqCst);
        let turned0 = sh.turned_away.load(Ordering::SeqCst);
        let outstanding = received.saturating_sub(replied);
        // Received before the drain and not yet answered: wait for them.
        let left = loop {
            let left = sh
                .stats
                .received
                .load(Ordering::SeqCst)
                .saturating_sub(sh.replied.load(Ordering::SeqCst));
            if left == 0 || Instant::now() >= end {
                break left;
            }
            std::thread::sleep(POLL);
        };
        let conns: Vec<_> = lock(&sh.conns).iter().filter_map(Weak::upgrade).collect();
        for c in &conns {
            c.replier.close();
        }
        drop(conns);
        self.stop();
        while (sh.stats.active.load(Ordering::SeqCst) > 0
            || sh.stats.open_files.load(Ordering::SeqCst) > 0)
            && Instant::now() < end
        {
            std::thread::sleep(POLL);
        }
        let turned_away = sh.turned_away.load(Ordering::SeqCst) - turned0;
        DrainReport {
            finished: outstanding.saturating_sub(left),
            turned_away,
            abandoned: left,
            files_left_open: sh.stats.open_files.load(Ordering::SeqCst),
            took: t0.elapsed(),
        }
    }
}
