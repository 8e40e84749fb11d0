//! What a connection's queue pairs share: the signal `recv` waits on, the activity the
//! idle timeout is measured from, and how the connection ended.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use zcio::transport::{Admission, Incoming};
use zcio::{Error, Result};

use super::super::lock;
use super::Lane;

/// How the connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    /// The client closed it, or the server did.
    Clean,
    /// Idle for longer than the idle timeout.
    Idle(Duration),
    /// An error.
    Failed,
}

/// What the queue pairs of one connection share: the signal `recv` waits on, activity for
/// the idle timeout, and how the connection ended.
pub(super) struct Shared {
    /// Bumped whenever a queue pair has a new event for `recv` or dies. Separate from the
    /// queue pairs' `room_cv`, so that a send-queue completion does not wake `recv` for
    /// nothing: every wake-up is a context switch, and under emulation each costs tens of
    /// microseconds.
    pub(super) gen: Mutex<u64>,
    pub(super) events_cv: Condvar,
    /// The first failure of any queue pair (the others follow it): why and how it ended.
    pub(super) end: Mutex<Option<(String, End)>>,
    /// Set with `end`: no more replies on any queue pair, even one that has yet to see the
    /// bootstrap socket end.
    pub(super) over: AtomicBool,
    /// Requests received and not yet answered, over all queue pairs.
    pub(super) in_flight: AtomicUsize,
    /// Requests received and not yet handed out by `recv` (the backlog).
    pub(super) queued: AtomicUsize,
    /// When a request last arrived or was answered (milliseconds since `base`).
    pub(super) last_activity: AtomicU64,
    pub(super) base: Instant,
    /// The connection's queue pairs, set once they all exist.
    pub(super) lanes: OnceLock<Vec<Weak<Lane>>>,
    /// What the server lets this connection take in (see [`ServerConn::set_admission`](zcio::transport::ServerConn::set_admission)):
    /// no payload before authentication, and at most its budget of payload bytes in pool
    /// buffers at once.
    pub(super) admission: OnceLock<Arc<Admission>>,
}

impl Shared {
    pub(super) fn new() -> Shared {
        Shared {
            gen: Mutex::new(0),
            events_cv: Condvar::new(),
            end: Mutex::new(None),
            over: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            last_activity: AtomicU64::new(0),
            base: Instant::now(),
            lanes: OnceLock::new(),
            admission: OnceLock::new(),
        }
    }

    /// Whether the connection may carry payload: authenticated, or no rules set (yet).
    pub(super) fn authenticated(&self) -> bool {
        self.admission.get().is_none_or(|a| a.authenticated())
    }

    pub(super) fn notify(&self) {
        *lock(&self.gen) += 1;
        self.events_cv.notify_one();
    }

    pub(super) fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity.store(ms, Ordering::Relaxed);
    }

    pub(super) fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_activity.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }

    /// Records why the connection ended, unless an earlier failure already did. A failure
    /// found after a clean end (another queue pair saw the client close first) replaces it:
    /// the client's bad memory key, say, is the cause worth reporting.
    pub(super) fn record_end(&self, reason: &str, end: End) {
        let mut e = lock(&self.end);
        if e.is_none() || (matches!(*e, Some((_, End::Clean))) && end == End::Failed) {
            *e = Some((reason.to_string(), end));
        }
        self.over.store(true, Ordering::SeqCst);
    }

    /// Handles what every queue pair's completion queue holds (before the connection is
    /// ended because the bootstrap socket ended: an error completion on another queue pair
    /// is the real cause).
    pub(super) fn drain_all(&self) {
        for c in self
            .lanes
            .get()
            .into_iter()
            .flatten()
            .filter_map(Weak::upgrade)
        {
            while c.poller.drain(&*c).is_ok_and(|n| n > 0) {}
        }
    }

    /// Why the connection ended, once it has.
    pub(super) fn reason(&self) -> Option<String> {
        lock(&self.end).as_ref().map(|(why, _)| why.clone())
    }

    /// What `recv` returns once the connection has ended.
    pub(super) fn closed_result(&self, peer: &str) -> Result<Option<Incoming>> {
        let (reason, end) = lock(&self.end)
            .clone()
            .unwrap_or_else(|| (format!("the connection from {peer} ended"), End::Failed));
        match end {
            End::Clean => Ok(None),
            End::Idle(after) => Err(Error::Timeout {
                what: format!("idle rdma connection from {peer} (server.idle_timeout)"),
                after,
            }),
            End::Failed => Err(Error::ConnectionClosed(reason)),
        }
    }
}
