//! Waiting for room in a queue pair's send queue before a request is posted.

use std::sync::MutexGuard;

use super::{Lane, LaneState};

impl Lane {
    /// Waits until the send queue has `need` free entries or the connection is dead. Room
    /// is only short while the connection thread has yet to see a signaled SEND's
    /// completion, which is already on its way (`signal_send`), or (with windows) while
    /// other requests' windows are bound; their replies free it.
    pub(super) fn wait_room<'a>(
        &'a self,
        mut st: MutexGuard<'a, LaneState>,
        need: usize,
    ) -> MutexGuard<'a, LaneState> {
        while st.sq.room() < need && st.dead.is_none() {
            // The completion that frees room may sit in the queue with nobody waiting on
            // the channel: let the connection thread take it.
            self.poller.background(false);
            st.room_waiters += 1;
            st = match self.room_cv.wait_timeout(st, self.timeout) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
            st.room_waiters -= 1;
        }
        st
    }
}
