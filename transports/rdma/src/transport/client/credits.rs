//! Taking a free slot (a credit) for a request, waiting for one up to the timeout, and
//! giving back one that never carried its request.

use std::sync::atomic::Ordering;
use std::time::Instant;

use zcio::{Error, IobufMut, Result};

use super::{Action, Event, Lane, Scratch};

impl Lane {
    pub(super) fn free_slots(&self) -> usize {
        self.limits
            .max_in_flight
            .saturating_sub(self.busy.load(Ordering::Relaxed))
    }

    /// Takes a free slot and the id of the request to send in it, waiting up to the timeout.
    pub(super) fn acquire(&self) -> Result<(usize, u64, Scratch, IobufMut)> {
        let mut st = self.lock();
        let deadline = Instant::now() + self.timeout;
        loop {
            if st.dead.is_some() {
                return Err(self.closed_err(&st));
            }
            if let Ok(Some(Action::Prepare { slot: i, id })) = st.feed(Event::Acquire) {
                let slot = &mut st.slots[i];
                if let (Some(scratch), Some(msg)) = (slot.scratch.take(), slot.msg.take()) {
                    self.busy.fetch_add(1, Ordering::Relaxed);
                    return Ok((i, id, scratch, msg));
                }
                // Unreachable: a free slot has its storage home.
                return Err(Error::ConnectionClosed("rdma slot state lost".into()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "a free credit on the rdma connection to {} ({} requests in flight)",
                        self.peer, self.limits.max_in_flight
                    ),
                    after: self.timeout,
                });
            }
            // Take replies (which free slots) off the completion channel on this thread,
            // as a waiter for its own reply would; then block as usual if that stopped
            // short (the connection thread is then watching the channel).
            drop(st);
            self.poller.wait(
                self,
                &|| self.free_slots() > 0 || self.dead.load(Ordering::SeqCst),
                Some(deadline),
            );
            st = self.lock();
            if st.requests.free_slots() > 0 || st.dead.is_some() {
                continue;
            }
            let now = Instant::now();
            st = match self
                .cond
                .wait_timeout(st, deadline.saturating_duration_since(now))
            {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Gives a slot back that never carried the request.
    pub(super) fn release(&self, i: usize, mut scratch: Scratch, msg: IobufMut) {
        scratch.clear();
        let mut st = self.lock();
        let slot = &mut st.slots[i];
        slot.scratch = Some(scratch);
        slot.msg = Some(msg);
        let refused = st.feed(Event::Unsent { slot: i });
        let done = match refused.clone() {
            Ok(_) => Vec::new(),
            Err(e) => self.fail_locked(&mut st, e, None),
        };
        drop(st);
        self.busy.fetch_sub(1, Ordering::Relaxed);
        self.cond.notify_one();
        if refused.is_err() {
            self.finish_fail(done);
        }
    }
}
