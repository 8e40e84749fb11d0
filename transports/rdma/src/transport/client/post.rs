//! Posting a request's SEND.

use zcio::IobufMut;

use super::super::conn::{buf_sge, wr_id, KIND_SEND};
use super::Lane;
use crate::verbs::QueuePair;
use crate::RdmaError;

impl Lane {
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
