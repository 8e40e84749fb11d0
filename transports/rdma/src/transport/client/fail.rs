//! A connection's failure: the queue pair destroyed first, then every request in flight
//! taken out and completed with the error; how the connection ended, shared by its queue pairs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use zcio::Error;

use super::super::lock;
use super::{Action, Done, Event, Lane, LaneState};

/// Whether and why a connection ended: the first of its queue pairs to fail records it.
/// The others follow when they see the bootstrap socket (shut down by the first) end, after
/// handling what their completion queues already hold, and report this reason; new requests
/// are refused at once.
#[derive(Default)]
pub(super) struct Ended {
    pub(super) yes: AtomicBool,
    pub(super) why: Mutex<Option<String>>,
}

impl Ended {
    pub(super) fn record(&self, reason: &str) {
        lock(&self.why).get_or_insert_with(|| reason.to_string());
        self.yes.store(true, Ordering::SeqCst);
    }

    pub(super) fn reason(&self) -> Option<String> {
        lock(&self.why).clone()
    }
}

impl Lane {
    /// Marks the connection dead, destroys the queue pair and takes every request in
    /// flight out; the caller completes them once the lock is released.
    pub(super) fn fail_locked(
        &self,
        st: &mut LaneState,
        reason: String,
        mut culprit: Option<(u64, Error)>,
    ) -> Vec<Done> {
        if st.dead.is_some() {
            return Vec::new();
        }
        tracing::debug!(peer = %self.peer, %reason, "rdma client queue pair fails");
        self.ended.record(&reason);
        st.dead = Some(reason.clone());
        self.dead.store(true, Ordering::SeqCst);
        // First the windows of requests in flight: freeing a bound window invalidates it at
        // once, and rxe keeps a queue pair with windows bound on it from being destroyed
        // (destroying it first waits for them, for tens of seconds).
        for slot in st.slots.iter_mut() {
            for f in slot.req.iter_mut().chain(slot.invalidating.iter_mut()) {
                f.scratch.windows.clear();
            }
        }
        // Then the queue pair: after this the device touches none of our memory.
        st.qp = None;
        st.recv.clear();
        st.sq.clear();
        let mut done = Vec::new();
        let LaneState {
            requests,
            actions,
            slots,
            ..
        } = st;
        if requests.handle(Event::Failed, actions).is_err() {
            // Unreachable: the buffer holds an action per slot.
            requests.fail();
            actions.clear();
        }
        // The requests the lane aborts, then (unreachable, but no request may be lost) any
        // other the slots still hold.
        let aborted = actions.as_slice().iter().filter_map(|a| match *a {
            Action::Abort { slot } => Some(slot),
            _ => None,
        });
        for s in aborted.chain(0..slots.len()) {
            let slot = &mut slots[s];
            // The queue pair is gone: no window bound on it grants anything any more, so
            // the buffers of requests whose windows were being invalidated may go back.
            if let Some(f) = slot.invalidating.take() {
                done.push((f.completer, Err(Error::ConnectionClosed(reason.clone()))));
            }
            if let Some(f) = slot.req.take() {
                let err = match culprit.take() {
                    Some((id, e)) if id == f.id => e,
                    other => {
                        culprit = other;
                        Error::ConnectionClosed(reason.clone())
                    }
                };
                // Segments, regions and bounce buffers go with `f`.
                done.push((f.completer, Err(err)));
            }
        }
        done
    }

    pub(super) fn fail(&self, reason: String, culprit: Option<(u64, Error)>) {
        let done = {
            let mut st = self.lock();
            self.fail_locked(&mut st, reason, culprit)
        };
        self.finish_fail(done);
    }

    pub(super) fn finish_fail(&self, done: Vec<Done>) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        // Threads waiting on the completion channel stop: nothing more comes.
        self.poller.end();
        self.cond.notify_all();
        self.room_cv.notify_all();
        for (c, r) in done {
            c.complete(r);
        }
    }
}
