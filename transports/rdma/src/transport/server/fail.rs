//! Ending a connection: the queue pair destroyed first (after that the device touches none
//! of the connection's memory), then every buffer its requests hold given back; the other
//! queue pairs follow when they see the bootstrap socket end.

use std::sync::atomic::Ordering;

use zcio::Error;

use super::{Action, End, Event, Lane, LaneState, Slot, Violation};

impl Lane {
    /// Marks the connection dead and releases everything; the QP goes first.
    pub(super) fn fail_locked(&self, st: &mut LaneState, reason: String, end: End) -> bool {
        if st.dead.is_some() {
            return false;
        }
        tracing::debug!(peer = %self.peer, lane = self.lane, %reason, "rdma server queue pair ends");
        self.shared.record_end(&reason, end);
        st.dead = Some(reason);
        self.dead.store(true, Ordering::SeqCst);
        {
            // First: after this the device touches none of our memory. Waits for a post in
            // progress to end.
            let mut p = self.post_lock();
            *self.qp.write().unwrap_or_else(|p| p.into_inner()) = None;
            p.sq.clear();
        }
        st.recv.clear();
        let LaneState {
            requests,
            actions,
            slots,
            ..
        } = st;
        if requests.handle(Event::Failed, actions).is_ok() {
            for a in actions.as_slice() {
                if let Action::Drop { slot } = *a {
                    slots[slot].reset();
                }
            }
        } else {
            slots.iter_mut().for_each(Slot::reset);
            requests.fail();
        }
        true
    }

    pub(super) fn after_fail(&self) {
        // The other queue pairs' threads see the bootstrap socket end and follow.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.poller.end();
        self.shared.notify();
        self.room_cv.notify_all();
    }

    pub(super) fn fail(&self, reason: String, end: End) {
        let failed = {
            let mut st = self.lock();
            self.fail_locked(&mut st, reason, end)
        };
        if failed {
            self.after_fail();
        }
    }

    pub(super) fn violation(&self, what: String) -> String {
        format!("protocol violation by the client {}: {what}", self.peer)
    }

    /// [`Action::Fail`]: the client broke the protocol; its connection ends, and only it.
    /// True if this ended it (the caller wakes everyone once it has let go of the lock).
    pub(super) fn fail_violation(&self, st: &mut LaneState, v: Violation) -> bool {
        let r = self.violation(v.to_string());
        if matches!(
            v,
            Violation::PayloadBeforeAuth { .. } | Violation::Malformed(_)
        ) {
            tracing::warn!(peer = %self.peer, "{r}; closing that connection");
        }
        self.fail_locked(st, r, End::Failed)
    }

    /// A transition the request state machine refused: a bug in this driver, never the
    /// client's doing. Fails the queue pair (the caller wakes everyone once it has let go
    /// of the lock) and gives the error to return.
    pub(super) fn refused(&self, st: &mut LaneState, e: impl std::fmt::Display) -> Error {
        let r = e.to_string();
        self.fail_locked(st, r.clone(), End::Failed);
        Error::ConnectionClosed(r)
    }
}
