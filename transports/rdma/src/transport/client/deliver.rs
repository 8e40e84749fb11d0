//! Delivering a reply: the request's segments registered on the fly deregistered and back
//! in place, inline or bounced payload copied to where it belongs, the request completed,
//! and its credit given back.

use std::sync::atomic::Ordering;

use zcio::transport::{RecvSeg, Reply};

use super::describe::RecvBounce;
use super::{Action, Event, InFlight, Lane};

/// Copies bounced reply payload into the receive segments.
fn copy_out(recv: &mut [RecvSeg], bounces: &[RecvBounce], payload_len: usize) {
    for b in bounces {
        if b.pos >= payload_len {
            break;
        }
        let n = (payload_len - b.pos).min(b.buf.len());
        let mut src = &b.buf[..n];
        let (mut seg, mut off) = (b.seg, b.seg_off);
        while !src.is_empty() && seg < recv.len() {
            let d = recv[seg].as_mut_slice();
            let k = d.len().saturating_sub(off).min(src.len());
            d[off..off + k].copy_from_slice(&src[..k]);
            src = &src[k..];
            off += k;
            if off >= d.len() {
                seg += 1;
                off = 0;
            }
        }
    }
}

impl Lane {
    /// Delivers the reply of `f` (in `f.reply`; the server can reach none of its memory any
    /// more) and frees its slot.
    pub(super) fn finish(&self, slot: usize, mut f: InFlight) {
        // Deregistered, and back in their places.
        for (k, r) in f.scratch.sent.drain(..) {
            f.send[k] = r.into_segment();
        }
        for (k, r) in f.scratch.recvd.drain(..) {
            f.recv[k] = r.into_segment();
        }
        let (payload_len, inline) = f.reply.unwrap_or((0, false));
        if inline {
            zcio::transport::scatter_into(&mut f.recv, &f.scratch.inline);
            f.scratch.inline.fill(0);
        } else {
            copy_out(&mut f.recv, &f.scratch.recv_bounce, payload_len);
        }
        let InFlight {
            completer,
            header,
            send,
            recv,
            mut scratch,
            ..
        } = f;
        // Returns the bounce buffers (the on-the-fly registrations are back in place).
        scratch.clear();
        completer.complete(Ok(Reply {
            header,
            payload_len,
            recv,
            send,
        }));
        let mut guard = self.lock();
        let st = &mut *guard;
        st.slots[slot].scratch = Some(scratch);
        if st.dead.is_some() {
            return;
        }
        match st.feed(Event::Delivered { slot }) {
            Ok(Some(Action::ReturnCredit { .. })) => {
                drop(guard);
                self.busy.fetch_sub(1, Ordering::Relaxed);
                self.cond.notify_one();
            }
            Ok(_) => {}
            Err(r) => {
                let done = self.fail_locked(st, r, None);
                drop(guard);
                self.finish_fail(done);
            }
        }
    }
}
