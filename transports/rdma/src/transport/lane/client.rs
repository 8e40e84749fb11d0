//! The client's request state machine for one queue pair (a lane): free slots (credits),
//! request ids, the requests in flight, which SENDs are signaled, and the checks on the
//! server's replies.
//!
//! Pure: no locks, no threads, no verbs, no `unsafe`. The driver (`transport/client.rs`)
//! holds it under its lane lock next to each slot's data (message buffer, scratch, the
//! caller's request and its completer), feeds it what happened and acts on what it
//! answers. A slot's life:
//!
//! ```text
//! free --acquire--> taken --sent(id)--> in flight --reply_arrived(id)--> answered --reply_done--> free
//!                     '------release (never sent) ----------------------------------------------^
//! ```
//!
//! A slot is free again once its reply is in, not when the request's SEND completes: the
//! server could only reply after the whole request message reached it. The driver talks to
//! it through [`ClientLane::handle`]: an [`Event`] in, the [`Action`]s to carry out written
//! into its [`Actions`] buffer. Nothing here allocates after [`ClientLane::new`].
#![forbid(unsafe_code)]

use std::fmt;
use std::time::{Duration, Instant};

use super::super::msg::MsgError;

pub use super::{Actions, Overflow};

/// An event the lane cannot take: a bug in the driver, never the peer's doing (the driver
/// fails the connection with it as an internal error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A slot was not in the state the event needs.
    WrongState(WrongState),
    /// The driver's action buffer was full.
    Overflow(Overflow),
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::WrongState(w) => w.fmt(f),
            Refused::Overflow(o) => o.fmt(f),
        }
    }
}

impl From<Overflow> for Refused {
    fn from(o: Overflow) -> Refused {
        Refused::Overflow(o)
    }
}

/// Adds `a` to `out`, or refuses: the buffer is full (a driver bug).
fn push(out: &mut Actions<Action>, a: Action) -> Result<(), Refused> {
    Ok(out.push(a)?)
}

/// Request ids are `(sequence << SLOT_BITS) | slot`.
pub const SLOT_BITS: u32 = 16;

/// Sequence numbers wrap at `1 << SEQ_BITS`, so ids stay below `1 << 56`: the server keeps
/// the top byte for itself.
pub const SEQ_BITS: u32 = 40;

/// The client's send-queue depth for `credits` requests in flight. Most request SENDs are
/// posted unsignaled (one completion, one wake-up of the connection thread, less per
/// request), and an unsignaled SEND keeps its entry until a later signaled one's completion
/// is seen: twice the credits leaves room for a window of those behind the requests in
/// flight.
pub fn sq_depth(credits: usize) -> usize {
    2 * credits + 1
}

/// Whether the next request SEND is signaled: one in every `credits`, and every one once
/// the send queue is half full, so that a completion that frees room is always on its way.
pub fn signal_send(unsignaled: usize, credits: usize, room_after: usize) -> bool {
    unsignaled + 1 >= credits || room_after <= credits
}

/// A server's reply that breaks the protocol: the connection fails with this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// No request with this id is in flight on this lane.
    NotInFlight(u64),
    /// The reply carries more payload than the request has room for.
    TooLong {
        /// The reply's id.
        id: u64,
        /// The payload length it claims.
        payload_len: usize,
        /// The request's reply capacity.
        room: usize,
    },
    /// The reply claims payload written by RDMA, but the request offered no memory for it.
    NothingOffered {
        /// The reply's id.
        id: u64,
        /// The payload length it claims.
        payload_len: usize,
    },
    /// A reply message that does not decode: truncated, of the wrong kind, lengths that do
    /// not add up, or a field over its limit.
    Malformed(MsgError),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Violation::NotInFlight(id) => {
                write!(f, "a reply for request id {id}, which is not in flight")
            }
            Violation::TooLong {
                id,
                payload_len,
                room,
            } => write!(
                f,
                "reply {id} carries {payload_len} payload bytes, the request has room for {room}"
            ),
            Violation::NothingOffered { id, payload_len } => write!(
                f,
                "reply {id} claims {payload_len} bytes written, but the request offered none"
            ),
            Violation::Malformed(e) => write!(f, "malformed reply: {e}"),
        }
    }
}

/// A transition asked of a slot that is not in the state it needs: a driver bug, never the
/// peer's doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrongState {
    /// The slot.
    pub slot: usize,
    /// What was asked.
    pub asked: &'static str,
}

impl fmt::Display for WrongState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "internal: rdma request slot {} cannot {}",
            self.slot, self.asked
        )
    }
}

/// One queue pair's requests on the client.
#[derive(Debug)]
pub struct ClientLane {
    /// Taken by a `start` or in use by a request (until its reply is in).
    busy: Vec<bool>,
    /// The id of the request in flight in each slot.
    in_flight: Vec<Option<u64>>,
    /// When each request in flight was sent.
    started: Vec<Option<Instant>>,
    free: Vec<usize>,
    next_seq: u64,
    /// SENDs posted unsignaled since the last signaled one.
    unsignaled: usize,
    failed: bool,
    /// What the event API knows of each slot's request (set by [`Event::Send`]).
    reqs: Vec<ReqFacts>,
}

/// What the event API keeps of a request in flight, to check its reply and end it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ReqFacts {
    /// The most reply payload it takes.
    reply_cap: usize,
    /// Whether it offered memory for the reply's payload.
    offered: bool,
    /// Whether it bound memory windows (invalidated once the reply is in).
    windows: bool,
    /// Its reply is in and its windows are being invalidated.
    invalidating: bool,
}

impl ClientLane {
    /// A lane with `credits` free slots (at most `1 << SLOT_BITS`), taken lowest first.
    pub fn new(credits: usize) -> ClientLane {
        let credits = credits.min(1 << SLOT_BITS);
        ClientLane {
            busy: vec![false; credits],
            in_flight: vec![None; credits],
            started: vec![None; credits],
            free: (0..credits).rev().collect(),
            next_seq: 1,
            unsignaled: 0,
            failed: false,
            reqs: vec![ReqFacts::default(); credits],
        }
    }

    /// The number of slots (the negotiated credits).
    pub fn credits(&self) -> usize {
        self.busy.len()
    }

    /// Slots neither taken nor in use.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Whether [`fail`](Self::fail) was called.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Takes a free slot for a request being prepared (`None`: all are taken, or the lane
    /// failed).
    pub fn acquire(&mut self) -> Option<usize> {
        if self.failed {
            return None;
        }
        let s = self.free.pop()?;
        self.busy[s] = true;
        Some(s)
    }

    /// Gives back a taken slot whose request was never sent.
    pub fn release(&mut self, s: usize) -> Result<(), WrongState> {
        if !self.busy.get(s).copied().unwrap_or(false) || self.in_flight[s].is_some() {
            return Err(WrongState {
                slot: s,
                asked: "be given back unsent",
            });
        }
        self.busy[s] = false;
        if !self.failed {
            self.free.push(s);
        }
        Ok(())
    }

    /// The id of the next request, to be sent in slot `s`.
    pub fn next_id(&mut self, s: usize) -> u64 {
        let seq = self.next_seq;
        self.next_seq = (self.next_seq + 1) & ((1 << SEQ_BITS) - 1);
        (seq << SLOT_BITS) | s as u64
    }

    /// Whether the request SEND about to be posted is signaled, with `room_after` entries
    /// left in the send queue once it is ([`signal_send`]).
    pub fn signal_next(&mut self, room_after: usize) -> bool {
        let signaled = signal_send(self.unsignaled, self.credits(), room_after);
        self.unsignaled = if signaled { 0 } else { self.unsignaled + 1 };
        signaled
    }

    /// Request `id` was posted in taken slot `s` at `now`: it is in flight.
    pub fn sent(&mut self, s: usize, id: u64, now: Instant) -> Result<(), WrongState> {
        if self.failed
            || !self.busy.get(s).copied().unwrap_or(false)
            || self.in_flight[s].is_some()
            || (id & ((1 << SLOT_BITS) - 1)) as usize != s
        {
            return Err(WrongState {
                slot: s,
                asked: "carry a request",
            });
        }
        self.in_flight[s] = Some(id);
        self.started[s] = Some(now);
        Ok(())
    }

    /// The id of the request in flight in slot `s`.
    pub fn in_flight(&self, s: usize) -> Option<u64> {
        self.in_flight.get(s).copied().flatten()
    }

    /// A reply for `id` arrived: the slot of its request, no longer in flight (it stays
    /// taken until [`reply_done`](Self::reply_done)), or the violation.
    pub fn reply_arrived(&mut self, id: u64) -> Result<usize, Violation> {
        let s = (id & ((1 << SLOT_BITS) - 1)) as usize;
        match self.in_flight.get_mut(s) {
            Some(f) if *f == Some(id) => {
                *f = None;
                self.started[s] = None;
                Ok(s)
            }
            _ => Err(Violation::NotInFlight(id)),
        }
    }

    /// Checks reply `id` (`payload_len` bytes, inline or not) against its request, which
    /// had room for `room` bytes and offered receive descriptors or not.
    pub fn check_reply(
        id: u64,
        payload_len: usize,
        inline: bool,
        room: usize,
        offered: bool,
    ) -> Result<(), Violation> {
        if payload_len > room {
            Err(Violation::TooLong {
                id,
                payload_len,
                room,
            })
        } else if !inline && payload_len > 0 && !offered {
            Err(Violation::NothingOffered { id, payload_len })
        } else {
            Ok(())
        }
    }

    /// A tick at `now`: the id of the oldest request in flight if it has waited longer than
    /// `timeout` for its reply (the connection then fails, that request with a timeout).
    pub fn overdue(&self, now: Instant, timeout: Duration) -> Option<u64> {
        let (s, started) = self
            .started
            .iter()
            .enumerate()
            .filter_map(|(s, t)| t.map(|t| (s, t)))
            .min_by_key(|&(_, t)| t)?;
        let id = self.in_flight[s]?;
        (now.saturating_duration_since(started) > timeout).then_some(id)
    }

    /// Slot `s`'s reply has been handed to the caller: the slot is free again (true), unless
    /// the lane failed meanwhile (false).
    pub fn reply_done(&mut self, s: usize) -> bool {
        if self.failed || !self.busy.get(s).copied().unwrap_or(false) || self.in_flight[s].is_some()
        {
            return false;
        }
        self.busy[s] = false;
        self.free.push(s);
        true
    }

    /// The connection failed: no request is in flight any more (the driver completes them
    /// all with the error) and no slot is taken again.
    pub fn fail(&mut self) {
        self.failed = true;
        self.in_flight.fill(None);
        self.started.fill(None);
        self.free.clear();
    }

    /// Checks the invariants (tests): a slot is free exactly when it is not busy, and only
    /// a busy slot has a request in flight, with an id naming that slot.
    #[cfg(test)]
    pub(crate) fn check(&self) {
        if self.failed {
            assert!(self.free.is_empty() && self.in_flight.iter().all(Option::is_none));
            return;
        }
        let mut seen = vec![false; self.credits()];
        for &s in &self.free {
            assert!(!seen[s], "slot {s} twice in the free list");
            seen[s] = true;
        }
        for (s, &free) in seen.iter().enumerate() {
            assert_eq!(free, !self.busy[s], "slot {s}: free list and busy disagree");
            if let Some(id) = self.in_flight[s] {
                assert!(self.busy[s], "slot {s} in flight but not busy");
                assert_eq!((id & 0xffff) as usize, s);
            }
        }
    }
}

/// What happened, as the client driver tells the lane ([`ClientLane::handle`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A caller wants to start a request: a credit, please.
    Acquire,
    /// The request prepared in taken slot `slot` is not sent after all (its preparation
    /// failed, or the connection ended first).
    Unsent {
        /// The slot.
        slot: usize,
    },
    /// The request `id` prepared in taken slot `slot` is about to be posted.
    Send {
        /// The slot.
        slot: usize,
        /// Its id (from [`Action::Prepare`]).
        id: u64,
        /// When.
        now: Instant,
        /// The most reply payload it takes.
        reply_cap: usize,
        /// Whether it offers memory for the reply's payload.
        offered: bool,
        /// Whether it bound memory windows.
        windows: bool,
        /// Send-queue entries left once its SEND is posted.
        room_after: usize,
        /// Its SEND must be signaled whatever the count says.
        force_signal: bool,
    },
    /// A reply arrived.
    ReplyArrived {
        /// Its id.
        id: u64,
        /// The payload length it claims.
        payload_len: usize,
        /// Whether the payload came inline.
        inline: bool,
    },
    /// The last invalidation of slot `slot`'s windows completed.
    Invalidated {
        /// The slot.
        slot: usize,
    },
    /// Slot `slot`'s reply was handed to its caller.
    Delivered {
        /// The slot.
        slot: usize,
    },
    /// The connection thread's tick.
    Tick {
        /// The time.
        now: Instant,
        /// How long a request may wait for its reply (`client.timeout`).
        timeout: Duration,
    },
    /// A reply message did not decode: the server broke the protocol.
    Malformed(MsgError),
    /// The connection failed.
    Failed,
}

/// What the client driver does next, as the lane answers an [`Event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// A credit is taken: prepare the request in slot `slot` with id `id`.
    Prepare {
        /// The slot.
        slot: usize,
        /// The request's id.
        id: u64,
    },
    /// No free credit: wait for a reply (or the connection's end).
    NoCredit,
    /// The slot's credit is free again: its storage goes home, a waiter may take it.
    ReturnCredit {
        /// The slot.
        slot: usize,
    },
    /// Post the slot's request SEND, signaled or not.
    Post {
        /// The slot.
        slot: usize,
        /// Whether the SEND is signaled.
        signaled: bool,
    },
    /// The slot's reply is in: invalidate its windows, then [`Event::Invalidated`].
    Invalidate {
        /// The slot.
        slot: usize,
    },
    /// The slot's reply is in and the server can reach none of its memory: complete the
    /// request with it, then [`Event::Delivered`].
    Complete {
        /// The slot.
        slot: usize,
    },
    /// Request `id` waited longer than the timeout: fail the connection, that request with
    /// a timeout.
    TimedOut {
        /// Its id.
        id: u64,
    },
    /// Fail the connection: the server broke the protocol.
    Fail(Violation),
    /// Complete the slot's request with the connection's error.
    Abort {
        /// The slot.
        slot: usize,
    },
}

impl ClientLane {
    /// A buffer for the actions of a lane with `credits` slots: one [`Action::Abort`] per
    /// slot when the connection fails, and one action for any other event.
    pub fn actions_for(credits: usize) -> Actions<Action> {
        Actions::with_capacity(credits.clamp(1, 1 << SLOT_BITS))
    }

    /// A buffer for [`handle`](Self::handle)'s actions.
    pub fn actions(&self) -> Actions<Action> {
        Self::actions_for(self.credits())
    }

    /// Takes event `ev` and writes what to do into `out` (emptied first): which credit and
    /// id a request gets, whether its SEND is signaled, whether its reply keeps to the
    /// protocol, when it completes and with what, when its credit comes back. `Err` is a
    /// driver bug (the wrong state, or `out` too small): the driver fails the connection.
    pub fn handle(&mut self, ev: Event, out: &mut Actions<Action>) -> Result<(), Refused> {
        out.clear();
        match ev {
            Event::Acquire => match self.acquire() {
                Some(slot) => {
                    let id = self.next_id(slot);
                    push(out, Action::Prepare { slot, id })
                }
                None => push(out, Action::NoCredit),
            },
            Event::Unsent { slot } => {
                self.release(slot).map_err(Refused::WrongState)?;
                if self.failed {
                    return Ok(());
                }
                push(out, Action::ReturnCredit { slot })
            }
            Event::Send {
                slot,
                id,
                now,
                reply_cap,
                offered,
                windows,
                room_after,
                force_signal,
            } => {
                self.sent(slot, id, now).map_err(Refused::WrongState)?;
                self.reqs[slot] = ReqFacts {
                    reply_cap,
                    offered,
                    windows,
                    invalidating: false,
                };
                let signaled = self.signal_next(room_after) || force_signal;
                push(out, Action::Post { slot, signaled })
            }
            Event::ReplyArrived {
                id,
                payload_len,
                inline,
            } => {
                let s = (id & ((1 << SLOT_BITS) - 1)) as usize;
                if self.in_flight(s) != Some(id) {
                    return push(out, Action::Fail(Violation::NotInFlight(id)));
                }
                let r = self.reqs[s];
                if let Err(v) = Self::check_reply(id, payload_len, inline, r.reply_cap, r.offered) {
                    // Still in flight: the failure that follows completes it.
                    return push(out, Action::Fail(v));
                }
                self.reply_arrived(id).map_err(|_| {
                    Refused::WrongState(WrongState {
                        slot: s,
                        asked: "take its reply",
                    })
                })?;
                if r.windows {
                    self.reqs[s].invalidating = true;
                    push(out, Action::Invalidate { slot: s })
                } else {
                    push(out, Action::Complete { slot: s })
                }
            }
            Event::Invalidated { slot } => {
                if self.failed
                    || !self.reqs.get(slot).is_some_and(|r| r.invalidating)
                    || self.in_flight(slot).is_some()
                {
                    return Err(Refused::WrongState(WrongState {
                        slot,
                        asked: "end its invalidations",
                    }));
                }
                self.reqs[slot].invalidating = false;
                push(out, Action::Complete { slot })
            }
            Event::Delivered { slot } => {
                if self.reqs.get(slot).is_some_and(|r| r.invalidating) {
                    return Err(Refused::WrongState(WrongState {
                        slot,
                        asked: "deliver before its invalidations",
                    }));
                }
                if self.reply_done(slot) {
                    self.reqs[slot] = ReqFacts::default();
                    push(out, Action::ReturnCredit { slot })?;
                }
                Ok(())
            }
            Event::Tick { now, timeout } => {
                if self.failed {
                    return Ok(());
                }
                match self.overdue(now, timeout) {
                    Some(id) => push(out, Action::TimedOut { id }),
                    None => Ok(()),
                }
            }
            Event::Malformed(e) => push(out, Action::Fail(Violation::Malformed(e))),
            Event::Failed => {
                if self.failed {
                    return Ok(());
                }
                for s in 0..self.credits() {
                    if self.in_flight[s].is_some() || self.reqs[s].invalidating {
                        push(out, Action::Abort { slot: s })?;
                    }
                }
                self.fail();
                self.reqs.fill(ReqFacts::default());
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn a_request_takes_a_slot_until_its_reply_is_done() {
        let mut l = ClientLane::new(2);
        let s = l.acquire().unwrap();
        assert_eq!((s, l.free_slots()), (0, 1));
        let id = l.next_id(s);
        assert_eq!(id, 1 << 16, "sequence 1, slot 0");
        l.sent(s, id, t0()).unwrap();
        assert_eq!(l.in_flight(s), Some(id));
        l.check();
        assert_eq!(l.reply_arrived(id), Ok(s));
        assert_eq!(l.free_slots(), 1, "taken until the caller has the reply");
        assert!(l.reply_done(s));
        assert!(!l.reply_done(s), "freed once");
        assert_eq!(l.free_slots(), 2);
        l.check();
    }

    #[test]
    fn credits_are_exhausted_and_returned() {
        let mut l = ClientLane::new(3);
        let taken: Vec<usize> = (0..3).map(|_| l.acquire().unwrap()).collect();
        assert_eq!(taken, [0, 1, 2]);
        assert_eq!(l.acquire(), None);
        l.release(1).unwrap();
        assert_eq!(l.acquire(), Some(1));
        l.check();
        assert!(l.release(7).is_err(), "no such slot");
        let id = l.next_id(2);
        l.sent(2, id, t0()).unwrap();
        assert!(
            l.release(2).is_err(),
            "a slot in flight is not given back unsent"
        );
    }

    #[test]
    fn ids_name_their_slot_and_never_repeat_soon() {
        let mut l = ClientLane::new(4);
        let a = l.next_id(3);
        let b = l.next_id(3);
        assert_ne!(a, b);
        assert_eq!((a & 0xffff, b & 0xffff), (3, 3));
        assert!(a < 1 << 56 && b < 1 << 56);
        assert!(l.sent(2, a, t0()).is_err(), "an id naming another slot");
    }

    #[test]
    fn sequence_numbers_wrap_below_the_servers_byte() {
        let mut l = ClientLane::new(1);
        l.next_seq = (1 << SEQ_BITS) - 1;
        let last = l.next_id(0);
        assert_eq!(last >> SLOT_BITS, (1 << SEQ_BITS) - 1);
        assert!(last < 1 << 56);
        assert_eq!(l.next_id(0) >> SLOT_BITS, 0);
    }

    #[test]
    fn replies_for_ids_not_in_flight_are_violations() {
        let mut l = ClientLane::new(2);
        let s = l.acquire().unwrap();
        let id = l.next_id(s);
        assert_eq!(
            l.reply_arrived(id),
            Err(Violation::NotInFlight(id)),
            "not sent yet"
        );
        l.sent(s, id, t0()).unwrap();
        assert_eq!(
            l.reply_arrived(id + (1 << 16)),
            Err(Violation::NotInFlight(id + (1 << 16)))
        );
        assert_eq!(
            l.reply_arrived(0xffff),
            Err(Violation::NotInFlight(0xffff)),
            "no such slot"
        );
        assert_eq!(l.reply_arrived(id), Ok(s));
        assert_eq!(
            l.reply_arrived(id),
            Err(Violation::NotInFlight(id)),
            "a second reply"
        );
        assert_eq!(
            Violation::NotInFlight(9).to_string(),
            "a reply for request id 9, which is not in flight"
        );
        l.check();
    }

    #[test]
    fn replies_are_checked_against_their_request() {
        assert_eq!(ClientLane::check_reply(1, 10, false, 10, true), Ok(()));
        assert_eq!(
            ClientLane::check_reply(1, 11, false, 10, true),
            Err(Violation::TooLong {
                id: 1,
                payload_len: 11,
                room: 10
            })
        );
        assert_eq!(
            ClientLane::check_reply(1, 11, true, 10, false),
            Err(Violation::TooLong {
                id: 1,
                payload_len: 11,
                room: 10
            }),
            "inline too"
        );
        assert_eq!(
            ClientLane::check_reply(2, 5, false, 10, false),
            Err(Violation::NothingOffered {
                id: 2,
                payload_len: 5
            })
        );
        assert_eq!(
            ClientLane::check_reply(2, 5, true, 10, false),
            Ok(()),
            "inline needs none"
        );
        assert_eq!(ClientLane::check_reply(2, 0, false, 0, false), Ok(()));
        assert_eq!(
            Violation::TooLong {
                id: 1,
                payload_len: 11,
                room: 10
            }
            .to_string(),
            "reply 1 carries 11 payload bytes, the request has room for 10"
        );
        assert_eq!(
            Violation::NothingOffered {
                id: 2,
                payload_len: 5
            }
            .to_string(),
            "reply 2 claims 5 bytes written, but the request offered none"
        );
    }

    #[test]
    fn out_of_order_replies_free_their_own_slots() {
        let mut l = ClientLane::new(3);
        let ids: Vec<u64> = (0..3)
            .map(|_| {
                let s = l.acquire().unwrap();
                let id = l.next_id(s);
                l.sent(s, id, t0()).unwrap();
                id
            })
            .collect();
        for &k in &[2, 0, 1] {
            let s = l.reply_arrived(ids[k]).unwrap();
            assert_eq!(s, k);
            assert!(l.reply_done(s));
            l.check();
        }
        assert_eq!(l.free_slots(), 3);
    }

    #[test]
    fn failing_ends_every_request_and_takes_no_more() {
        let mut l = ClientLane::new(2);
        let s = l.acquire().unwrap();
        let id = l.next_id(s);
        l.sent(s, id, t0()).unwrap();
        let t = l.acquire().unwrap();
        l.fail();
        l.check();
        assert!(l.failed());
        assert_eq!(l.in_flight(s), None);
        assert_eq!(l.reply_arrived(id), Err(Violation::NotInFlight(id)));
        assert!(!l.reply_done(s), "no slot freed after the failure");
        assert_eq!(l.acquire(), None);
        // A request being prepared when it failed is given back, and nothing reuses it.
        assert!(l.release(t).is_ok());
        assert_eq!(l.free_slots(), 0);
        assert!(l.sent(t, (1 << 16) | t as u64, t0()).is_err());
    }

    #[test]
    fn one_send_in_every_credits_is_signaled_and_every_one_when_half_full() {
        let mut l = ClientLane::new(4);
        let room = 100;
        let signaled: Vec<bool> = (0..8).map(|_| l.signal_next(room)).collect();
        assert_eq!(
            signaled,
            [false, false, false, true, false, false, false, true]
        );
        assert!(l.signal_next(4), "room at the credits: always signaled");
        assert!(l.signal_next(0));
        assert_eq!(sq_depth(4), 9);
    }

    #[test]
    fn a_tick_finds_the_oldest_request_past_its_timeout() {
        let mut l = ClientLane::new(3);
        let t = Instant::now();
        let timeout = Duration::from_secs(5);
        let send = |l: &mut ClientLane, at: Duration| {
            let s = l.acquire().unwrap();
            let id = l.next_id(s);
            l.sent(s, id, t + at).unwrap();
            id
        };
        let a = send(&mut l, Duration::from_secs(2));
        let b = send(&mut l, Duration::from_secs(1));
        assert_eq!(l.overdue(t, timeout), None, "nothing has waited yet");
        assert_eq!(
            l.overdue(t + Duration::from_secs(6), timeout),
            None,
            "exactly 5 s"
        );
        assert_eq!(l.overdue(t + Duration::from_millis(6001), timeout), Some(b));
        // Answered requests are not overdue; the next oldest is.
        l.reply_arrived(b).unwrap();
        assert_eq!(l.overdue(t + Duration::from_secs(7), timeout), None);
        assert_eq!(l.overdue(t + Duration::from_secs(8), timeout), Some(a));
        l.fail();
        assert_eq!(l.overdue(t + Duration::from_secs(60), timeout), None);
    }
}

/// The event API ([`ClientLane::handle`]): credits, signaling, replies checked, windows
/// invalidated before completion, timeouts, failure, driver bugs refused without a panic.
#[cfg(test)]
mod event_tests {
    use super::*;

    fn handle(l: &mut ClientLane, out: &mut Actions<Action>, ev: Event) -> Vec<Action> {
        l.handle(ev, out).unwrap();
        l.check();
        out.as_slice().to_vec()
    }

    /// Takes a credit and sends a request in it: (slot, id).
    fn send(
        l: &mut ClientLane,
        out: &mut Actions<Action>,
        now: Instant,
        cap: usize,
        windows: bool,
    ) -> (usize, u64) {
        let [Action::Prepare { slot, id }] = handle(l, out, Event::Acquire)[..] else {
            panic!("no credit")
        };
        let a = handle(
            l,
            out,
            Event::Send {
                slot,
                id,
                now,
                reply_cap: cap,
                offered: cap > 0,
                windows,
                room_after: 100,
                force_signal: false,
            },
        );
        assert!(matches!(a[..], [Action::Post { slot: s, .. }] if s == slot));
        (slot, id)
    }

    fn arrived(id: u64, payload_len: usize) -> Event {
        Event::ReplyArrived {
            id,
            payload_len,
            inline: false,
        }
    }

    #[test]
    fn credits_run_out_and_come_back_once_replies_are_delivered() {
        let mut l = ClientLane::new(2);
        let mut out = l.actions();
        let t = Instant::now();
        let (a, ida) = send(&mut l, &mut out, t, 0, false);
        let (b, _) = send(&mut l, &mut out, t, 0, false);
        assert_eq!((a, b), (0, 1));
        assert_eq!(handle(&mut l, &mut out, Event::Acquire), [Action::NoCredit]);
        assert_eq!(
            handle(&mut l, &mut out, arrived(ida, 0)),
            [Action::Complete { slot: a }]
        );
        assert_eq!(
            handle(&mut l, &mut out, Event::Acquire),
            [Action::NoCredit],
            "not before the caller has the reply"
        );
        assert_eq!(
            handle(&mut l, &mut out, Event::Delivered { slot: a }),
            [Action::ReturnCredit { slot: a }]
        );
        assert!(matches!(
            handle(&mut l, &mut out, Event::Acquire)[..],
            [Action::Prepare { slot: 0, .. }]
        ));
    }

    #[test]
    fn an_unsent_request_gives_its_credit_back() {
        let mut l = ClientLane::new(1);
        let mut out = l.actions();
        let [Action::Prepare { slot, .. }] = handle(&mut l, &mut out, Event::Acquire)[..] else {
            panic!()
        };
        assert_eq!(
            handle(&mut l, &mut out, Event::Unsent { slot }),
            [Action::ReturnCredit { slot }]
        );
        assert!(matches!(
            l.handle(Event::Unsent { slot }, &mut out),
            Err(Refused::WrongState(_))
        ));
        let (s, _) = send(&mut l, &mut out, Instant::now(), 0, false);
        assert!(
            l.handle(Event::Unsent { slot: s }, &mut out).is_err(),
            "a request in flight is not unsent"
        );
    }

    #[test]
    fn one_send_in_every_credits_is_signaled_or_when_forced() {
        let mut l = ClientLane::new(3);
        let mut out = l.actions();
        let mut signaled = Vec::new();
        for force in [false, false, false, true] {
            let [Action::Prepare { slot, id }] = handle(&mut l, &mut out, Event::Acquire)[..]
            else {
                // Out of credits: deliver the oldest's reply.
                unreachable!()
            };
            let ev = Event::Send {
                slot,
                id,
                now: Instant::now(),
                reply_cap: 0,
                offered: false,
                windows: false,
                room_after: 100,
                force_signal: force,
            };
            let [Action::Post { signaled: s, .. }] = handle(&mut l, &mut out, ev)[..] else {
                panic!()
            };
            signaled.push(s);
            if slot == 2 {
                break;
            }
        }
        assert_eq!(signaled, [false, false, true]);
        let mut l = ClientLane::new(3);
        let [Action::Prepare { slot, id }] = handle(&mut l, &mut out, Event::Acquire)[..] else {
            panic!()
        };
        let ev = Event::Send {
            slot,
            id,
            now: Instant::now(),
            reply_cap: 0,
            offered: false,
            windows: false,
            room_after: 100,
            force_signal: true,
        };
        assert_eq!(
            handle(&mut l, &mut out, ev),
            [Action::Post {
                slot,
                signaled: true
            }]
        );
    }

    #[test]
    fn a_request_with_windows_completes_after_their_invalidation() {
        let mut l = ClientLane::new(1);
        let mut out = l.actions();
        let (s, id) = send(&mut l, &mut out, Instant::now(), 4096, true);
        assert_eq!(
            handle(&mut l, &mut out, arrived(id, 4096)),
            [Action::Invalidate { slot: s }]
        );
        assert!(
            l.handle(Event::Delivered { slot: s }, &mut out).is_err(),
            "not before its windows are invalidated"
        );
        assert_eq!(
            handle(&mut l, &mut out, Event::Invalidated { slot: s }),
            [Action::Complete { slot: s }]
        );
        assert!(
            l.handle(Event::Invalidated { slot: s }, &mut out).is_err(),
            "one invalidation end per request"
        );
        assert_eq!(
            handle(&mut l, &mut out, Event::Delivered { slot: s }),
            [Action::ReturnCredit { slot: s }]
        );
    }

    #[test]
    fn a_malformed_reply_fails_the_connection_and_aborts_what_is_in_flight() {
        let mut l = ClientLane::new(2);
        let mut out = l.actions();
        let (a, _) = send(&mut l, &mut out, Instant::now(), 100, false);
        let e = MsgError::Length {
            described: 40,
            got: 24,
        };
        assert_eq!(
            handle(&mut l, &mut out, Event::Malformed(e)),
            [Action::Fail(Violation::Malformed(e))]
        );
        assert_eq!(
            Violation::Malformed(e).to_string(),
            "malformed reply: message is 24 bytes but its fields describe 40"
        );
        assert_eq!(
            handle(&mut l, &mut out, Event::Failed),
            [Action::Abort { slot: a }]
        );
    }

    #[test]
    fn a_server_breaking_the_protocol_fails_the_connection_and_its_request() {
        let mut l = ClientLane::new(2);
        let mut out = l.actions();
        let t = Instant::now();
        let (a, ida) = send(&mut l, &mut out, t, 100, false);
        let (b, idb) = send(&mut l, &mut out, t, 0, false);
        assert_eq!(
            handle(&mut l, &mut out, arrived(ida + (1 << SLOT_BITS), 0)),
            [Action::Fail(Violation::NotInFlight(ida + (1 << SLOT_BITS)))]
        );
        assert_eq!(
            handle(&mut l, &mut out, arrived(ida, 101)),
            [Action::Fail(Violation::TooLong {
                id: ida,
                payload_len: 101,
                room: 100
            })]
        );
        assert_eq!(
            handle(&mut l, &mut out, arrived(idb, 0)),
            [Action::Complete { slot: b }],
            "an empty reply needs no memory"
        );
        assert_eq!(
            handle(&mut l, &mut out, arrived(idb, 0)),
            [Action::Fail(Violation::NotInFlight(idb))],
            "a second reply"
        );
        // The request whose reply broke the rules is still in flight: the failure ends it.
        assert_eq!(
            handle(&mut l, &mut out, Event::Failed),
            [Action::Abort { slot: a }]
        );
        let mut l = ClientLane::new(1);
        let (_, id) = send(&mut l, &mut out, t, 0, false);
        assert_eq!(
            handle(&mut l, &mut out, arrived(id, 10)),
            [Action::Fail(Violation::TooLong {
                id,
                payload_len: 10,
                room: 0
            })]
        );
        let mut l = ClientLane::new(1);
        let [Action::Prepare { slot, id }] = handle(&mut l, &mut out, Event::Acquire)[..] else {
            panic!()
        };
        let ev = Event::Send {
            slot,
            id,
            now: t,
            reply_cap: 100,
            offered: false,
            windows: false,
            room_after: 100,
            force_signal: false,
        };
        handle(&mut l, &mut out, ev);
        assert_eq!(
            handle(&mut l, &mut out, arrived(id, 10)),
            [Action::Fail(Violation::NothingOffered {
                id,
                payload_len: 10
            })]
        );
        assert_eq!(
            handle(
                &mut l,
                &mut out,
                Event::ReplyArrived {
                    id,
                    payload_len: 10,
                    inline: true
                }
            ),
            [Action::Complete { slot }],
            "inline payload needs no memory offered"
        );
    }

    #[test]
    fn out_of_order_replies_free_their_own_credits() {
        let mut l = ClientLane::new(3);
        let mut out = l.actions();
        let t = Instant::now();
        let sent: Vec<(usize, u64)> = (0..3)
            .map(|_| send(&mut l, &mut out, t, 0, false))
            .collect();
        for k in [2, 0, 1] {
            let (s, id) = sent[k];
            assert_eq!(
                handle(&mut l, &mut out, arrived(id, 0)),
                [Action::Complete { slot: s }]
            );
            assert_eq!(
                handle(&mut l, &mut out, Event::Delivered { slot: s }),
                [Action::ReturnCredit { slot: s }]
            );
        }
        assert_eq!(l.free_slots(), 3);
    }

    #[test]
    fn a_tick_times_out_the_oldest_request_past_the_timeout() {
        let mut l = ClientLane::new(2);
        let mut out = l.actions();
        let t = Instant::now();
        let timeout = Duration::from_secs(5);
        let (_, old) = send(&mut l, &mut out, t, 0, false);
        send(&mut l, &mut out, t + Duration::from_secs(3), 0, false);
        let tick = |s| Event::Tick {
            now: t + Duration::from_secs(s),
            timeout,
        };
        assert_eq!(handle(&mut l, &mut out, tick(5)), []);
        assert_eq!(
            handle(&mut l, &mut out, tick(6)),
            [Action::TimedOut { id: old }]
        );
    }

    #[test]
    fn a_failure_aborts_every_request_in_flight_or_invalidating_and_no_other() {
        let mut l = ClientLane::new(4);
        let mut out = l.actions();
        let t = Instant::now();
        let (a, _) = send(&mut l, &mut out, t, 0, false); // in flight
        let (b, idb) = send(&mut l, &mut out, t, 0, true); // invalidating
        handle(&mut l, &mut out, arrived(idb, 0));
        let (_, idc) = send(&mut l, &mut out, t, 0, false); // answered, being delivered
        handle(&mut l, &mut out, arrived(idc, 0));
        let [Action::Prepare { slot: d, .. }] = handle(&mut l, &mut out, Event::Acquire)[..] else {
            panic!()
        }; // taken, being prepared
        assert_eq!(
            handle(&mut l, &mut out, Event::Failed),
            [Action::Abort { slot: a }, Action::Abort { slot: b }]
        );
        assert_eq!(handle(&mut l, &mut out, Event::Failed), [], "once");
        assert_eq!(handle(&mut l, &mut out, Event::Acquire), [Action::NoCredit]);
        assert_eq!(handle(&mut l, &mut out, Event::Unsent { slot: d }), []);
        assert_eq!(
            handle(
                &mut l,
                &mut out,
                Event::Tick {
                    now: t + Duration::from_secs(100),
                    timeout: Duration::ZERO
                }
            ),
            []
        );
        assert_eq!(
            handle(&mut l, &mut out, arrived(idb, 0)),
            [Action::Fail(Violation::NotInFlight(idb))]
        );
        assert!(l.handle(Event::Invalidated { slot: b }, &mut out).is_err());
    }

    #[test]
    fn driver_bugs_are_refused_not_panics() {
        let mut l = ClientLane::new(2);
        let mut out = l.actions();
        let t = Instant::now();
        send(&mut l, &mut out, t, 0, false);
        send(&mut l, &mut out, t, 0, false);
        let mut small = Actions::with_capacity(1);
        let e = l.handle(Event::Failed, &mut small).unwrap_err();
        assert_eq!(e, Refused::Overflow(Overflow { capacity: 1 }));
        let mut l = ClientLane::new(2);
        let ev = Event::Send {
            slot: 0,
            id: 1 << SLOT_BITS,
            now: t,
            reply_cap: 0,
            offered: false,
            windows: false,
            room_after: 1,
            force_signal: false,
        };
        let e = l.handle(ev, &mut out).unwrap_err();
        assert_eq!(
            e.to_string(),
            "internal: rdma request slot 0 cannot carry a request"
        );
        assert!(l.handle(Event::Invalidated { slot: 7 }, &mut out).is_err());
        assert_eq!(handle(&mut l, &mut out, Event::Delivered { slot: 7 }), []);
    }
}
