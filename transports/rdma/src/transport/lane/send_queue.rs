//! The send-queue ledger of a queue pair and the work request ids both sides use: pure
//! (no verbs, no locks, no `unsafe`), so the bookkeeping of which work requests are
//! outstanding, which resources they hold and how much room the send queue has is tested
//! on any host.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use zcio::{Iobuf, IobufMut};

/// Work request kinds, in the top byte of a `wr_id`: a receive.
pub const KIND_RECV: u8 = 1;
/// A SEND.
pub const KIND_SEND: u8 = 2;
/// An RDMA WRITE.
pub const KIND_WRITE: u8 = 3;
/// An RDMA READ.
pub const KIND_READ: u8 = 4;
/// A memory window bind (client, `rdma.client_exposure = "request"`).
pub const KIND_BIND: u8 = 5;
/// A local invalidation of a memory window (the same); the slot is the request's.
pub const KIND_INV: u8 = 6;

const SEQ_BITS: u32 = 40;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// `wr_id` = kind (8 bits) | slot (16 bits) | send-queue sequence number (low 40 bits).
pub fn wr_id(kind: u8, slot: usize, seq: u64) -> u64 {
    (u64::from(kind) << 56) | (((slot as u64) & 0xffff) << SEQ_BITS) | (seq & SEQ_MASK)
}

/// The parts of a `wr_id`: kind, slot, low 40 bits of the sequence number.
pub fn wr_parts(id: u64) -> (u8, usize, u64) {
    (
        (id >> 56) as u8,
        ((id >> SEQ_BITS) & 0xffff) as usize,
        id & SEQ_MASK,
    )
}

/// What a posted send-queue work request needs kept alive until it completes. Never read:
/// holding it is the point, and dropping it releases the buffer.
#[derive(Debug)]
#[allow(dead_code)]
pub enum Held {
    /// A control buffer holding a message.
    Buf(IobufMut),
    /// A payload buffer an RDMA WRITE gathers from.
    View(Iobuf),
}

/// The send queue's ledger. Send-queue work requests of an RC queue pair complete in posting
/// order, and only some are signaled (the last of each batch: a reply's SEND after its RDMA
/// WRITEs, a request's last RDMA READ), so a completion retires every outstanding work
/// request up to and including its own: the resources held for them are released, and their
/// entries in the queue's depth are free again. Posting and completing happen under one
/// lock (the client's state lock, the server's send-side lock), so sequence numbers follow
/// the posting order.
pub struct SendQueue {
    room: usize,
    next_post: u64,
    next_done: u64,
    held: VecDeque<(u64, Held)>,
}

impl SendQueue {
    /// A ledger for a send queue `depth` entries deep, with room to hold resources for
    /// `held_capacity` work requests before it grows.
    pub fn new(depth: usize, held_capacity: usize) -> SendQueue {
        SendQueue {
            room: depth,
            next_post: 0,
            next_done: 0,
            held: VecDeque::with_capacity(held_capacity),
        }
    }

    /// Free entries of the send queue.
    pub fn room(&self) -> usize {
        self.room
    }

    /// Takes one entry and gives the posting sequence number of the work request about to
    /// be posted.
    pub fn next_seq(&mut self) -> u64 {
        self.room = self.room.saturating_sub(1);
        let s = self.next_post;
        self.next_post += 1;
        s
    }

    /// Sets `n` entries aside for work requests to be posted later (a request's window
    /// invalidations, posted when its reply arrives, where nothing may wait for room);
    /// false, and nothing set aside, if there is not that much room.
    pub fn reserve(&mut self, n: usize) -> bool {
        if self.room < n {
            return false;
        }
        self.room -= n;
        true
    }

    /// Gives back `n` entries set aside by [`SendQueue::reserve`], just before posting
    /// the work requests they were for.
    pub fn unreserve(&mut self, n: usize) {
        self.room += n;
    }

    /// Keeps `h` until work request `seq` completes.
    pub fn hold(&mut self, seq: u64, h: Held) {
        self.held.push_back((seq, h));
    }

    /// Retires every outstanding work request up to and including `seq_lo` (the low bits of
    /// a posting sequence number), which must be outstanding.
    pub fn complete(&mut self, seq_lo: u64) -> std::result::Result<(), String> {
        let outstanding = self.next_post - self.next_done;
        // How far past the oldest outstanding request `seq_lo` lies (modulo the wrap).
        let ahead = seq_lo.wrapping_sub(self.next_done) & SEQ_MASK;
        if ahead >= outstanding {
            return Err(format!(
                "a send-queue completion for sequence {seq_lo}, which is not outstanding \
                 ({outstanding} outstanding from {})",
                self.next_done & SEQ_MASK
            ));
        }
        let done = self.next_done + ahead;
        self.next_done = done + 1;
        self.room += (ahead + 1) as usize;
        while self.held.front().is_some_and(|(s, _)| *s <= done) {
            self.held.pop_front();
        }
        Ok(())
    }

    /// True when every posted work request has completed.
    pub fn idle(&self) -> bool {
        self.next_done == self.next_post
    }

    /// Drops everything held (only once the queue pair is destroyed).
    pub fn clear(&mut self) {
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use zcio::pool::{ClassConfig, PoolConfig};
    use zcio::Pool;

    use super::*;

    #[test]
    fn wr_ids_round_trip() {
        for (k, s, q) in [
            (KIND_READ, 4095usize, 1u64 << 39),
            (KIND_RECV, 0, 0),
            (KIND_SEND, 65535, SEQ_MASK),
        ] {
            assert_eq!(wr_parts(wr_id(k, s, q)), (k, s, q));
        }
        assert_eq!(wr_parts(wr_id(KIND_WRITE, 1, SEQ_MASK + 5)).2, 4);
    }

    #[test]
    fn reserved_room_is_held_until_given_back() {
        let mut sq = SendQueue::new(5, 0);
        assert!(sq.reserve(3));
        assert_eq!(sq.room(), 2);
        assert!(!sq.reserve(3), "only 2 left");
        assert_eq!(sq.room(), 2);
        let a = sq.next_seq();
        assert_eq!(sq.room(), 1);
        sq.unreserve(3);
        assert_eq!(sq.room(), 4);
        for _ in 0..3 {
            sq.next_seq();
        }
        assert_eq!(sq.room(), 1);
        // The last one's completion retires all four.
        sq.complete(a + 3).unwrap();
        assert_eq!(sq.room(), 5);
        assert!(sq.idle());
    }

    #[test]
    fn send_queue_retires_in_order() {
        let mut q = SendQueue::new(4, 4);
        assert!(q.complete(0).is_err());
        let a = q.next_seq();
        let b = q.next_seq();
        let c = q.next_seq();
        assert_eq!(q.room(), 1);
        // b is signaled, a was not: b's completion retires both.
        q.complete(b).unwrap();
        assert_eq!(q.room(), 3);
        assert!(!q.idle());
        assert!(q.complete(a).is_err(), "a is already retired");
        assert!(q.complete(c + 1).is_err(), "never posted");
        q.complete(c).unwrap();
        assert!(q.idle());
        assert_eq!(q.room(), 4);
    }

    #[test]
    fn send_queue_releases_held_through_the_signaled_request() {
        let pool = Pool::new(&PoolConfig {
            classes: vec![ClassConfig {
                size: 4096,
                count: 4,
                reserve: 0,
                arena_slots: 4,
            }],
            wait_timeout: Duration::from_secs(1),
            stripes: 1,
        })
        .unwrap();
        let mut q = SendQueue::new(8, 4);
        // Sequence numbers wrap at 40 bits; start just below.
        q.next_post = SEQ_MASK - 1;
        q.next_done = SEQ_MASK - 1;
        let w1 = q.next_seq();
        let s1 = q.next_seq();
        q.hold(s1, Held::Buf(pool.get_control(4096).unwrap()));
        let w2 = q.next_seq();
        let s2 = q.next_seq();
        q.hold(s2, Held::Buf(pool.get_control(4096).unwrap()));
        assert_eq!(pool.stats().slots_in_use(), 2);
        assert!(q.complete(w1 & SEQ_MASK).is_ok());
        assert_eq!(pool.stats().slots_in_use(), 2, "s1 is not done yet");
        q.complete(s1 & SEQ_MASK).unwrap();
        assert_eq!(pool.stats().slots_in_use(), 1);
        q.complete(s2 & SEQ_MASK).unwrap();
        assert_eq!(pool.stats().slots_in_use(), 0);
        assert!(q.idle());
        assert!(q.complete(w2 & SEQ_MASK).is_err());
    }
}
