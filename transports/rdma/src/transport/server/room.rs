//! Waiting for room in a queue pair's send queue, and for posted work requests to drain
//! before the connection closes.

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::time::Instant;

use super::{Lane, PostSide, ROOM_STALL};

impl Lane {
    /// Waits for `n` free send-queue entries; `Err` (with why) once the connection is dead
    /// or after [`ROOM_STALL`] without room (the caller then fails the connection).
    #[allow(clippy::type_complexity)]
    pub(super) fn wait_room<'a>(
        &'a self,
        mut g: MutexGuard<'a, PostSide>,
        n: usize,
    ) -> std::result::Result<MutexGuard<'a, PostSide>, (MutexGuard<'a, PostSide>, String)> {
        let deadline = Instant::now() + ROOM_STALL;
        loop {
            if self.dead.load(Ordering::SeqCst) {
                return Err((g, "the connection ended".into()));
            }
            if g.sq.room() >= n {
                return Ok(g);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err((
                    g,
                    format!(
                        "the client {} took nothing from its queue pair for {ROOM_STALL:?} (the send queue stayed full)",
                        self.peer
                    ),
                ));
            }
            // The completions that free room: `recv` may not be there to take them.
            self.poller.background(false);
            g.room_waiters += 1;
            g = match self.room_cv.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
            g.room_waiters -= 1;
        }
    }

    /// Stops new replies and lets those already posted reach the client (a refusal like
    /// "server full" is sent right before the connection is closed), until `deadline`.
    pub(super) fn drain(&self, deadline: Instant) {
        self.lock().closing = true;
        // The completions this waits for: `recv` may not be there to take them.
        self.poller.background(false);
        let mut p = self.post_lock();
        while !self.dead.load(Ordering::SeqCst)
            && (!p.sq.idle() || self.posting.load(Ordering::SeqCst) > 0)
        {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            p.room_waiters += 1;
            p = match self.room_cv.wait_timeout(p, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
            p.room_waiters -= 1;
        }
    }
}
