//! Posting a request's SEND, and a reply's receive buffer again.

use zcio::IobufMut;

use super::super::conn::{buf_sge, post_recv_buf, wr_id, KIND_SEND};
use super::{Lane, LaneState};
use crate::verbs::QueuePair;
use crate::RdmaError;

impl Lane {
    /// Posts receive buffer `ri` again (unless the `stop_reposting` fault is on). The
    /// buffer goes back into the ring either way; `Err` (why) if the post failed (the
    /// caller fails the connection).
    pub(super) fn repost(
        &self,
        st: &mut LaneState,
        ri: usize,
        buf: IobufMut,
    ) -> Result<(), String> {
        let posted = match &st.qp {
            Some(_) if self.faults.stop_reposting => Ok(()),
            Some(qp) => post_recv_buf(qp, ri, &buf, self.ctl_reg),
            None => Ok(()),
        };
        st.recv.repost(ri, buf);
        posted
    }

    /// Posts the SEND of the request in slot `slot` (send-queue sequence `seq`), signaled
    /// or not as the lane said: inline when its `msg_len` bytes fit the queue pair's inline
    /// limit, else from the slot's registered message buffer.
    pub(super) fn post_request(
        &self,
        qp: &QueuePair,
        slot: usize,
        seq: u64,
        msg: &IobufMut,
        msg_len: usize,
        signaled: bool,
    ) -> Result<(), RdmaError> {
        let wr = wr_id(KIND_SEND, slot, seq);
        if msg_len <= self.max_inline_send {
            return if signaled {
                qp.post_send_inline(wr, &[&msg[..msg_len]])
            } else {
                qp.post_send_inline_unsignaled(wr, &[&msg[..msg_len]])
            };
        }
        match buf_sge(msg, msg_len, self.ctl_reg) {
            Some(sge) if signaled => qp.post_send(wr, &[sge]),
            Some(sge) => qp.post_send_unsignaled(wr, &[sge]),
            None => Ok(()),
        }
    }
}
