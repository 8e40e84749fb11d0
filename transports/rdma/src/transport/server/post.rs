//! Posting a queue pair's work requests: a request's RDMA READs, and a reply's RDMA
//! WRITEs and SEND, under the send-side lock only.

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use zcio::{Error, Iobuf, IobufMut, Result};

use super::super::conn::{
    buf_sge, chain, post_recv_buf, wr_id, Held, KIND_READ, KIND_SEND, KIND_WRITE, MAX_SGE,
};
use super::super::msg::{encode_reply, reply_len, Desc};
use super::super::plan::{Local, Plan};
use super::{keep_spare, End, Lane, LaneState, PostSide, STACK_MSG};
use crate::verbs::{Remote, Sge};

pub(super) fn to_sge(l: &Local) -> Sge {
    Sge {
        addr: l.addr,
        len: l.len,
        lkey: l.lkey,
    }
}

/// A reply's message: on the stack (an inline SEND) or in a control buffer of this length.
pub(super) enum ReplyMsg<'a> {
    Inline(&'a [u8]),
    Buf(IobufMut, usize),
}

/// How [`Lane::post_reads`] went, when the connection did not fail.
pub(super) enum ReadStart {
    /// The READs are posted; their completion queues the request.
    Posted,
    /// No room in the send queue and not allowed to wait: nothing was posted, and these
    /// are the buffers that were to receive the payload.
    NoRoom(Vec<IobufMut>),
}

/// A reply ready to post: its message, and its payload when that had to be copied into
/// this server's registered pool first.
pub(super) struct ReplyOut<'a> {
    pub(super) copied: Option<Vec<Iobuf>>,
    pub(super) total: usize,
    pub(super) inline: bool,
    pub(super) msg: ReplyMsg<'a>,
}

impl Lane {
    /// Posts receive buffer `ri` again, at once: the client may send its next request as
    /// soon as it has this one's reply. The buffer goes back into the ring either way; `Err`
    /// (why) if the post failed (the caller fails the connection).
    pub(super) fn repost(
        &self,
        st: &mut LaneState,
        ri: usize,
        buf: IobufMut,
    ) -> std::result::Result<(), String> {
        let posted = match &*self.qp() {
            Some(qp) => post_recv_buf(qp, ri, &buf, self.ctl_reg),
            None => Ok(()),
        };
        st.recv.repost(ri, buf);
        posted.map_err(|e| format!("reposting a receive: {e}"))
    }

    /// Encodes the reply to `id` (checked against the limits by the caller): on `stack` for
    /// an inline SEND, else into a control buffer; payload up to the inline threshold goes
    /// into the message. Payload outside this server's registered pool is copied into it.
    pub(super) fn encode_reply_msg<'a>(
        &self,
        id: u64,
        header: &[u8],
        payload: &[Iobuf],
        stack: &'a mut [u8; STACK_MSG],
    ) -> Result<ReplyOut<'a>> {
        let total: usize = payload.iter().map(|b| b.len()).sum();
        let copied: Option<Vec<Iobuf>> = if payload.iter().any(|b| b.keys(self.reg).is_none()) {
            let mut span = self.pool.get_span(total)?.into_vec();
            let mut it = payload.iter().flat_map(|b| b.iter().copied());
            for b in span.iter_mut() {
                for (d, s) in b.iter_mut().zip(&mut it) {
                    *d = s;
                }
            }
            Some(span.into_iter().map(IobufMut::freeze).collect())
        } else {
            None
        };
        let payload: &[Iobuf] = copied.as_deref().unwrap_or(payload);
        let inline = total <= self.limits.inline_threshold;
        let msg_len = reply_len(header.len(), if inline { total } else { 0 });
        let on_stack = msg_len <= self.max_inline_send && msg_len <= STACK_MSG;
        let mut ctl_buf = if on_stack {
            None
        } else {
            Some(self.ctl.get_control(msg_len)?)
        };
        {
            let out: &mut [u8] = match ctl_buf.as_mut() {
                Some(b) => &mut b[..msg_len],
                None => &mut stack[..msg_len],
            };
            let mut at = encode_reply(out, id, header, total, inline)
                .map_err(|e| Error::InvalidArgument(format!("cannot encode the reply: {e}")))?;
            if inline {
                for b in payload {
                    out[at..at + b.len()].copy_from_slice(b);
                    at += b.len();
                }
            }
        }
        let msg = match ctl_buf {
            Some(b) => ReplyMsg::Buf(b, msg_len),
            None => ReplyMsg::Inline(&stack[..msg_len]),
        };
        Ok(ReplyOut {
            copied,
            total,
            inline,
            msg,
        })
    }

    /// Starts the RDMA READs of request `s`'s payload into `bufs` (the lane has it
    /// `Reading`): under the state lock (held by the caller) the slot takes the buffers, and
    /// its descriptors are lent out; then the READs are posted under the send-side lock
    /// only. Unless `wait`, a send queue without room for them gives the slot its
    /// descriptors back (`NoRoom`, with the buffers; the caller tells the lane): a
    /// completion thread must not wait for room that only its own completions make. On
    /// `Err` the connection has failed (the caller wakes everyone).
    pub(super) fn post_reads<'a>(
        &'a self,
        mut guard: MutexGuard<'a, LaneState>,
        s: usize,
        bufs: Vec<IobufMut>,
        wait: bool,
    ) -> (MutexGuard<'a, LaneState>, Result<ReadStart>) {
        let total = guard.slots[s].send_total;
        let st = &mut *guard;
        let mut local = st
            .spare_local
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.limits.max_segments));
        local.clear();
        for b in &bufs {
            match b.keys(self.reg) {
                Some(k) => local.push(Local {
                    addr: b.as_ptr() as u64,
                    len: b.len() as u32,
                    lkey: k.lkey,
                }),
                None => {
                    keep_spare(&mut st.spare_local, local);
                    let r = "internal: a pool buffer without rdma registration".to_string();
                    self.fail_locked(st, r.clone(), End::Failed);
                    return (guard, Err(Error::ConnectionClosed(r)));
                }
            }
        }
        let spare = self.spare_descs(st);
        let remote = std::mem::replace(&mut st.slots[s].send, spare);
        let n = Plan::new(&remote, &local, total as u64, self.read_sge).count();
        st.slots[s].bufs = bufs;
        let posted = if n > self.sq_depth {
            Err(format!(
                "a request needs {n} RDMA READs, more than the send queue's {}",
                self.sq_depth
            ))
        } else {
            drop(guard);
            let r = self.post_reads_unlocked(s, &remote, &local, total, n, wait);
            guard = self.lock();
            r
        };
        let st = &mut *guard;
        keep_spare(&mut st.spare_local, local);
        let mut remote = remote;
        if matches!(posted, Ok(false)) && st.dead.is_none() {
            // Nothing was posted: the slot gets its descriptors and stage back.
            let slot = &mut st.slots[s];
            std::mem::swap(&mut slot.send, &mut remote);
            let bufs = std::mem::take(&mut slot.bufs);
            keep_spare(&mut st.spare_descs, remote);
            return (guard, Ok(ReadStart::NoRoom(bufs)));
        }
        keep_spare(&mut st.spare_descs, remote);
        match posted {
            Ok(true) => (guard, Ok(ReadStart::Posted)),
            // The connection died meanwhile: its failure took the buffers back.
            Ok(false) => (guard, Ok(ReadStart::NoRoom(Vec::new()))),
            Err(r) => {
                self.fail_locked(st, r.clone(), End::Failed);
                let e = self
                    .shared
                    .closed_result(&self.peer)
                    .err()
                    .unwrap_or(Error::ConnectionClosed(r));
                (guard, Err(e))
            }
        }
    }

    /// Posts `n` RDMA READs (the last one signaled) of the plan from `remote` into `local`:
    /// `Ok(true)`. Without room for them in the send queue, waits for it if `wait`, else
    /// posts nothing and returns `Ok(false)`.
    pub(super) fn post_reads_unlocked(
        &self,
        s: usize,
        remote: &[Desc],
        local: &[Local],
        total: usize,
        n: usize,
        wait: bool,
    ) -> std::result::Result<bool, String> {
        let p = self.post_lock();
        let mut p = if wait || p.sq.room() >= n {
            match self.wait_room(p, n) {
                Ok(p) => p,
                Err((_, why)) => return Err(why),
            }
        } else {
            return Ok(false);
        };
        let qp = self.qp();
        let Some(qp) = qp.as_ref() else {
            return Err("the queue pair is gone".into());
        };
        let mut plan = Plan::new(remote, local, total as u64, self.read_sge);
        let mut pieces = [Local::default(); MAX_SGE];
        let mut sges = [Sge::default(); MAX_SGE];
        let mut count = 0;
        while let Some(w) = plan.next_into(&mut pieces[..self.read_sge]) {
            for (d, piece) in sges.iter_mut().zip(&pieces[..w.n_sge]) {
                *d = to_sge(piece);
            }
            let seq = p.sq.next_seq();
            count += 1;
            let wr = wr_id(KIND_READ, s, seq);
            let remote = Remote {
                addr: w.remote_addr,
                rkey: w.rkey,
            };
            // One completion per request: the last READ's (they complete in order).
            let r = if count == n {
                qp.post_read(wr, &sges[..w.n_sge], remote)
            } else {
                qp.post_read_unsignaled(wr, &sges[..w.n_sge], remote)
            };
            if let Err(e) = r {
                return Err(format!("posting an RDMA READ: {}", chain(&e)));
            }
        }
        if count != n {
            return Err(format!("internal: planned {n} RDMA READs, posted {count}"));
        }
        Ok(true)
    }

    /// Posts a reply: RDMA WRITEs of `payload` into `remote` (unless it travels inline),
    /// then the SEND of the message. Under the send-side lock only; ends the reply's
    /// `posting` count.
    pub(super) fn post_reply(
        &self,
        remote: &[Desc],
        payload: &[Iobuf],
        total: usize,
        inline: bool,
        msg: ReplyMsg<'_>,
    ) -> std::result::Result<(), String> {
        let p = self.post_lock();
        let (p, r) = self.post_reply_locked(p, remote, payload, total, inline, msg);
        // Under the lock, so that `close` (which checks it under the lock) cannot miss it.
        self.posting.fetch_sub(1, Ordering::SeqCst);
        let wake = p.room_waiters > 0;
        drop(p);
        if wake {
            self.room_cv.notify_all();
        }
        r
    }

    pub(super) fn post_reply_locked<'a>(
        &'a self,
        mut p: MutexGuard<'a, PostSide>,
        remote: &[Desc],
        payload: &[Iobuf],
        total: usize,
        inline: bool,
        msg: ReplyMsg<'_>,
    ) -> (MutexGuard<'a, PostSide>, std::result::Result<(), String>) {
        let n_writes = if inline {
            0
        } else {
            p.local.clear();
            for b in payload.iter().filter(|b| !b.is_empty()) {
                // Checked by `reply`: every buffer has keys.
                let lkey = b.keys(self.reg).map_or(0, |k| k.lkey);
                p.local.push(Local {
                    addr: b.as_ptr() as u64,
                    len: b.len() as u32,
                    lkey,
                });
            }
            Plan::new(remote, &p.local, total as u64, self.write_sge).count()
        };
        if n_writes + 1 > self.sq_depth {
            let r = format!(
                "a reply needs {} work requests, more than the send queue's {}",
                n_writes + 1,
                self.sq_depth
            );
            return (p, Err(r));
        }
        let mut p = match self.wait_room(p, n_writes + 1) {
            Ok(p) => p,
            Err((p, why)) => return (p, Err(why)),
        };
        let qp_guard = self.qp();
        let Some(qp) = qp_guard.as_ref() else {
            return (p, Err("the queue pair is gone".into()));
        };
        let PostSide { sq, local, .. } = &mut *p;
        if !inline {
            let mut plan = Plan::new(remote, local, total as u64, self.write_sge);
            let mut pieces = [Local::default(); MAX_SGE];
            let mut sges = [Sge::default(); MAX_SGE];
            while let Some(w) = plan.next_into(&mut pieces[..self.write_sge]) {
                for (d, piece) in sges.iter_mut().zip(&pieces[..w.n_sge]) {
                    *d = to_sge(piece);
                }
                let seq = sq.next_seq();
                // Unsignaled: the SEND that follows is, and completes after it. The slot
                // number in the id is unused for WRITEs and SENDs.
                if let Err(e) = qp.post_write_unsignaled(
                    wr_id(KIND_WRITE, 0, seq),
                    &sges[..w.n_sge],
                    Remote {
                        addr: w.remote_addr,
                        rkey: w.rkey,
                    },
                ) {
                    let r = format!("posting an RDMA WRITE: {}", chain(&e));
                    return (p, Err(r));
                }
            }
        }
        let seq = sq.next_seq();
        if !inline {
            for b in payload.iter().filter(|b| !b.is_empty()) {
                sq.hold(seq, Held::View(b.clone()));
            }
        }
        let wr = wr_id(KIND_SEND, 0, seq);
        let r = match msg {
            ReplyMsg::Inline(m) => qp.post_send_inline(wr, &[m]),
            ReplyMsg::Buf(b, len) => {
                let r = match buf_sge(&b, len, self.ctl_reg) {
                    Some(sge) => qp.post_send(wr, &[sge]),
                    None => Ok(()),
                };
                sq.hold(seq, Held::Buf(b));
                r
            }
        };
        let r = r.map_err(|e| format!("posting a reply SEND: {}", chain(&e)));
        (p, r)
    }
}
