//! A request's payload budget and pool buffers: reserved in the connection's
//! [`Admission`](zcio::transport::Admission), then taken from the pool, without waiting on the completion thread and with
//! waits of a slice at a time in `recv`.

use std::sync::MutexGuard;
use std::time::Duration;

use zcio::{Error, Result};

use super::{keep_spare, End, Event, Lane, LaneState, ReadStart, Slot};

/// How long `recv` waits for the payload budget or pool buffers at a time before it looks
/// at every queue pair's events again.
pub(super) const POOL_SLICE: Duration = Duration::from_millis(20);

impl Lane {
    /// Reserves slot `slot`'s payload bytes in the connection's budget if that needs no
    /// wait (or there is no budget); true once they are reserved.
    pub(super) fn try_admit(&self, slot: &mut Slot) -> bool {
        if !slot.admitted {
            slot.admitted = match self.shared.admission.get() {
                None => true,
                Some(a) => a
                    .reserve(slot.id, slot.send_total, Duration::ZERO, || Err(()))
                    .is_ok(),
            };
        }
        slot.admitted
    }

    /// [`Action::Take`](super::super::lane::server::Action::Take): the connection's payload budget, then pool buffers (kept in the
    /// slot), for slot `s`'s payload. Without `w` only what needs no wait; with it, a wait of
    /// up to `slice` for the budget (if not yet reserved; then the buffers without waiting)
    /// or else for the buffers. The answer is the event to tell the lane; `None` once the
    /// connection is dead. Never a failure for want of budget or buffers: back-pressure on
    /// this connection, for as long as it stays open.
    pub(super) fn take<'a>(
        &'a self,
        mut st: MutexGuard<'a, LaneState>,
        s: usize,
        w: bool,
        slice: Option<Duration>,
    ) -> Result<(MutexGuard<'a, LaneState>, Option<Event>)> {
        let may_wait = slice.is_some();
        let short = |can_wait| Some(Event::Short { slot: s, can_wait });
        let total = st.slots[s].send_total;
        let slice = slice.unwrap_or(Duration::ZERO);
        let mut pool_wait = w;
        if !self.try_admit(&mut st.slots[s]) {
            if !w {
                return Ok((st, short(may_wait)));
            }
            pool_wait = false;
            let id = st.slots[s].id;
            let admission = self.shared.admission.get().cloned();
            // Not under the lock.
            drop(st);
            let mut waited = false;
            let reserved = admission.is_none_or(|a| {
                a.reserve(id, total, slice, || {
                    if waited {
                        Err(())
                    } else {
                        waited = true;
                        Ok(())
                    }
                })
                .is_ok()
            });
            st = self.lock();
            if st.dead.is_some() {
                return Ok((st, None));
            }
            if !reserved {
                return Ok((st, short(false)));
            }
            st.slots[s].admitted = true;
        }
        let mut bufs = st.spare_bufs.pop().unwrap_or_default();
        if let Ok(true) = self.pool.try_get_span_into(total, &mut bufs) {
            st.slots[s].bufs = bufs;
            return Ok((st, Some(Event::Buffers { slot: s })));
        }
        if !pool_wait {
            keep_spare(&mut st.spare_bufs, bufs);
            return Ok((st, short(may_wait)));
        }
        // Not under the lock.
        drop(st);
        let b = self.pool.get_span_within_into(total, slice, &mut bufs);
        st = self.lock();
        if st.dead.is_some() {
            return Ok((st, None));
        }
        match b {
            Ok(()) => {
                st.slots[s].bufs = bufs;
                Ok((st, Some(Event::Buffers { slot: s })))
            }
            // Back-pressure, not failure: the pool stays short only while requests hold
            // its buffers, and they give them back once served.
            Err(Error::PoolExhausted { .. }) => {
                keep_spare(&mut st.spare_bufs, bufs);
                Ok((st, short(false)))
            }
            Err(e) => {
                let r = format!(
                    "no pool buffers for a {total}-byte request payload from {}: {e}",
                    self.peer,
                );
                if self.fail_locked(&mut st, r, End::Failed) {
                    drop(st);
                    self.after_fail();
                }
                Err(e)
            }
        }
    }

    /// [`Action::ReadNow`](super::super::lane::server::Action::ReadNow): READs of slot `s`'s payload on the completion thread, if the
    /// budget and the pool give the buffers without waiting and the send queue has room.
    /// On Soft-RoCE the READ's protocol work (the client's responses included) runs in the
    /// posting thread, so each queue pair then moves its own payload instead of every
    /// request of the connection queuing for the thread behind `recv`; and the READs start
    /// without a hand-off. Otherwise `recv` takes the buffers (it may wait) and posts them.
    /// `None` once the guard is let go of (the READs posted, or the connection failed).
    pub(super) fn read_now<'a>(
        &'a self,
        mut guard: MutexGuard<'a, LaneState>,
        s: usize,
    ) -> Option<MutexGuard<'a, LaneState>> {
        let st = &mut *guard;
        let total = st.slots[s].send_total;
        let bufs = if self.try_admit(&mut st.slots[s]) {
            let mut v = st.spare_bufs.pop().unwrap_or_default();
            if let Ok(true) = self.pool.try_get_span_into(total, &mut v) {
                Some(v)
            } else {
                keep_spare(&mut st.spare_bufs, v);
                None
            }
        } else {
            None
        };
        if let Some(bufs) = bufs {
            let (g, r) = self.post_reads(guard, s, bufs, false);
            guard = g;
            match r {
                Ok(ReadStart::Posted) => return None,
                Ok(ReadStart::NoRoom(bufs)) => keep_spare(&mut guard.spare_bufs, bufs),
                Err(_) => {
                    drop(guard);
                    self.after_fail();
                    return None;
                }
            }
        }
        // `recv` posts them, once there is budget, buffers and room. (Refused only if the
        // queue pair failed meanwhile.)
        if guard.dead.is_some() {
            return None;
        }
        if self
            .feed(&mut guard, Event::ReadsNotPosted { slot: s })
            .is_err()
        {
            drop(guard);
            self.after_fail();
            return None;
        }
        Some(guard)
    }
}
