//! Per-request memory windows (`rdma.client_exposure = "request"`): bound before the
//! request's SEND, invalidated once its reply is in, before the request completes.

use zcio::Error;

use super::super::conn::{chain, wr_id, KIND_BIND, KIND_INV};
use super::{Action, Event, InFlight, Lane, LaneState, Scratch};

/// Posts the binds of a request's windows (unsignaled: the request's SEND, or a later
/// signaled work request, retires them) and sets room aside for their invalidations. The
/// caller made sure of `2n + 1` entries of room.
pub(super) fn post_binds(
    st: &mut LaneState,
    slot: usize,
    s: &mut Scratch,
) -> std::result::Result<(), crate::RdmaError> {
    let LaneState { qp, sq, .. } = st;
    let Some(qp) = qp else {
        return Ok(());
    };
    for (b, w) in s.binds.iter().zip(s.windows.iter_mut()) {
        let seq = sq.next_seq();
        let planned = w.next_rkey();
        let rkey = qp.post_bind(
            wr_id(KIND_BIND, slot, seq),
            w,
            &b.mr,
            b.addr,
            b.len,
            b.access,
            false,
        )?;
        if rkey != planned {
            return Err(crate::RdmaError::Window {
                what: format!("bound with rkey {rkey:#x}, the request carries {planned:#x}"),
            });
        }
    }
    if !sq.reserve(s.binds.len()) {
        return Err(crate::RdmaError::Window {
            what: "internal: no send-queue room left for the invalidations".into(),
        });
    }
    Ok(())
}

impl Lane {
    /// Posts the invalidation of every window of `f` (whose reply is in), the last one
    /// signaled; `f` completes when that completion arrives ([`Lane::on_invalidated`]), so
    /// its buffers go back to the caller only once the server can no longer reach them.
    pub(super) fn invalidate(&self, slot: usize, mut f: InFlight) {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.dead.is_some() {
            // The queue pair is destroyed: its windows grant nothing any more.
            let e = self.closed_err(st);
            drop(guard);
            f.completer.complete(Err(e));
            return;
        }
        let n = f.scratch.binds.len();
        st.sq.unreserve(n);
        let mut posted = Ok(());
        if let Some(qp) = &st.qp {
            for (k, w) in f.scratch.windows[..n].iter_mut().enumerate() {
                let seq = st.sq.next_seq();
                posted = qp.post_invalidate(wr_id(KIND_INV, slot, seq), w, k + 1 == n);
                if posted.is_err() {
                    break;
                }
            }
        }
        match posted {
            Ok(()) => st.slots[slot].invalidating = Some(f),
            Err(e) => {
                let reason = format!(
                    "posting a memory window invalidation on the connection to {}: {}",
                    self.peer,
                    chain(&e)
                );
                let mut done = self.fail_locked(st, reason.clone(), None);
                drop(guard);
                done.push((f.completer, Err(Error::ConnectionClosed(reason))));
                self.finish_fail(done);
            }
        }
    }

    /// The last invalidation of the request in `slot` executed: it completes.
    pub(super) fn on_invalidated(&self, slot: usize) {
        let f = {
            let mut st = self.lock();
            if st.dead.is_some() {
                return;
            }
            match st.feed(Event::Invalidated { slot }) {
                Ok(Some(Action::Complete { .. })) => {
                    st.slots.get_mut(slot).and_then(|s| s.invalidating.take())
                }
                _ => None,
            }
        };
        match f {
            Some(f) => self.finish(slot, f),
            None => self.fail(
                format!("internal: an invalidation completed for slot {slot}, which has none"),
                None,
            ),
        }
    }
}
