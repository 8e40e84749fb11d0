//! Vectors kept for their capacity, so that a request's way through the server allocates
//! nothing: descriptor lists lent to posts, request headers and payload vectors given back by
//! [`Replier::recycle`](zcio::transport::Replier::recycle), and the vectors pool buffers are taken into.

use std::sync::atomic::Ordering;

use zcio::transport::Incoming;
use zcio::{Iobuf, IobufMut};

use super::super::msg::Desc;
use super::{Lane, LaneState};

/// Room in the vectors made when a queue pair is set up: a request header's bytes, and a
/// request payload's buffers (one per largest pool buffer). A larger request grows the
/// vector it gets once, and the vector keeps that room.
pub(super) const HEADER_ROOM: usize = 128;

pub(super) const PAYLOAD_ROOM: usize = 4;

/// Descriptor lists made up front for lending to posts: one per post in progress on a
/// queue pair (a worker's reply, a completion thread's READs), more made when needed.
pub(super) const LENT: usize = 8;

/// A stack of `n` empty vectors with `room` each, and room itself for `n + 2 * credits`
/// (a request in every slot and as many served ones not yet given back).
pub(super) fn spares<T>(n: usize, credits: usize, room: usize) -> Vec<Vec<T>> {
    let mut v = Vec::with_capacity(n + 2 * credits);
    v.extend((0..n).map(|_| Vec::with_capacity(room)));
    v
}

/// Keeps an empty vector for its capacity, if it has any and `spares` has room (its
/// capacity, fixed when the queue pair is set up, bounds what is kept).
pub(super) fn keep_spare<T>(spares: &mut Vec<Vec<T>>, mut v: Vec<T>) {
    v.clear();
    if v.capacity() > 0 && spares.len() < spares.capacity() {
        spares.push(v);
    }
}

impl Lane {
    /// Hands request `s` out with its payload, in vectors kept from earlier requests when
    /// there are some.
    pub(super) fn deliver(
        &self,
        st: &mut LaneState,
        s: usize,
        id: u64,
        mut bufs: Vec<IobufMut>,
    ) -> Incoming {
        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        let mut payload = if bufs.is_empty() {
            Vec::new()
        } else {
            st.spare_payloads.pop().unwrap_or_default()
        };
        payload.extend(bufs.drain(..).map(IobufMut::freeze));
        keep_spare(&mut st.spare_bufs, bufs);
        // The slot keeps a vector to decode its next request's header into.
        let next_header = st.spare_headers.pop().unwrap_or_default();
        let slot = &mut st.slots[s];
        Incoming {
            id,
            header: std::mem::replace(&mut slot.header, next_header),
            payload,
            reply_capacity: slot.recv_cap,
        }
    }

    /// Keeps a served request's vectors for later requests ([`Replier::recycle`](zcio::transport::Replier::recycle)).
    pub(super) fn recycle(&self, mut header: Vec<u8>, mut payload: Vec<Iobuf>) {
        // The payload buffers go back to the pool outside the lock.
        header.clear();
        payload.clear();
        if header.capacity() == 0 && payload.capacity() == 0 {
            return;
        }
        let mut st = self.lock();
        keep_spare(&mut st.spare_headers, header);
        keep_spare(&mut st.spare_payloads, payload);
    }

    /// A descriptor list to lend to a post.
    pub(super) fn spare_descs(&self, st: &mut LaneState) -> Vec<Desc> {
        st.spare_descs
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.limits.max_segments))
    }
}
