//! The server's request state machine for one queue pair (a lane): which slot (credit)
//! holds which request, at which stage, and what comes next for `recv`.
//!
//! Pure: no locks, no threads, no verbs, no `unsafe`. The driver (`transport/server.rs`)
//! holds it under its lane lock, feeds it what happened (a request decoded, its READs
//! posted or not, its READs completed, the request handed out, the reply posted, the
//! connection failed) and acts on what it answers (a violation fails the connection; the
//! next [`Ready`] is handed out or has its payload READ). Every transition checks the
//! stage it leaves, so a driver bug shows up as a refused transition in the tests instead
//! of a slot lost or used twice.
//!
//! A slot's life:
//!
//! ```text
//! Free --admit--> Queued --start_reads--> Reading --reads_completed--> Ready --deliver--> Delivered
//!                   |  ^------unstart_reads----'                                  ^          |
//!                   '-------------------------deliver (no READs) ------------------'          |
//! Free <------------------------------------- release (the reply) ----------------------------'
//! ```
//!
//! The driver talks to it through [`ServerLane::handle`]: an [`Event`] in, the
//! [`Action`]s to carry out written into its [`Actions`] buffer. The transitions above are
//! the steps `handle` takes (and what the unit tests drive one by one).
//!
//! Nothing here allocates after [`ServerLane::new`]: the free list, the id map and the
//! event queue are sized for the credits, and a peer can never have more than that many
//! requests admitted.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::fmt;

use super::super::msg::MsgError;

pub use super::{Actions, Overflow};

/// Adds `a` to `out`, or refuses: the buffer is full (a driver bug).
fn push(out: &mut Actions<Action>, a: Action) -> Result<(), Refused> {
    Ok(out.push(a)?)
}

/// The queue pair's index goes in the top byte of the request ids the server hands out:
/// a client's ids must stay below `1 << LANE_SHIFT`.
pub const LANE_SHIFT: u32 = 56;

/// Where a slot's request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// No request.
    Free,
    /// Decoded, waiting for `recv` (for pool buffers, or to be handed out).
    Queued,
    /// RDMA READs of the payload outstanding (only the last is signaled).
    Reading,
    /// Payload in; waiting for `recv` to hand it out.
    Ready,
    /// Handed out; waiting for the reply.
    Delivered,
}

/// What `recv` has to do next for a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// A new request: take buffers for its payload (if any) and READ it, or hand it out.
    New(usize),
    /// A request whose READs are done: hand it out.
    ReadsDone(usize),
}

/// A client's request that breaks the protocol: the connection fails with this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The id uses the top byte the server keeps for the queue pair's index.
    IdTooLarge(u64),
    /// A request with this id is already in flight on this queue pair.
    IdInFlight(u64),
    /// More requests than the negotiated credits (the number given).
    TooManyRequests(usize),
    /// A request carries payload before the connection is authenticated.
    PayloadBeforeAuth {
        /// The request's id.
        id: u64,
        /// Its payload bytes.
        bytes: usize,
    },
    /// A request message that does not decode: truncated, of the wrong kind, lengths that
    /// do not add up, or a field (descriptors, header, payload) over its limit.
    Malformed(MsgError),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::IdTooLarge(id) => write!(f, "request id {id} is not below 2^{LANE_SHIFT}"),
            Violation::IdInFlight(id) => write!(f, "request id {id} is already in flight"),
            Violation::TooManyRequests(credits) => {
                write!(f, "more than the negotiated {credits} requests in flight")
            }
            Violation::PayloadBeforeAuth { id, bytes } => write!(
                f,
                "request {id} carries {bytes} payload bytes before authentication"
            ),
            Violation::Malformed(e) => write!(f, "malformed request: {e}"),
        }
    }
}

/// A transition asked of a slot that is not in the stage it needs: a driver bug, never the
/// peer's doing (the driver fails the connection with it as an internal error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrongStage {
    /// The slot.
    pub slot: usize,
    /// The stage it was in.
    pub was: Stage,
    /// What was asked.
    pub asked: &'static str,
}

impl fmt::Display for WrongStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "internal: request slot {} is {:?}, cannot {}",
            self.slot, self.was, self.asked
        )
    }
}

/// One queue pair's requests on the server: stages, ids, free slots, and what `recv`
/// has to do next.
#[derive(Debug)]
pub struct ServerLane {
    stages: Vec<Stage>,
    ids: Vec<u64>,
    free: Vec<usize>,
    by_id: HashMap<u64, usize>,
    ready: VecDeque<Ready>,
    failed: bool,
    /// What each slot's request carries (set by [`Event::Request`]).
    payloads: Vec<Payload>,
    /// The most reply payload each slot's request takes (set by [`Event::Request`]).
    reply_caps: Vec<usize>,
    /// Each slot's payload bytes (set by [`Event::Request`]).
    bytes: Vec<usize>,
}

impl ServerLane {
    /// A lane with `credits` free slots, taken lowest first.
    pub fn new(credits: usize) -> ServerLane {
        ServerLane {
            stages: vec![Stage::Free; credits],
            ids: vec![0; credits],
            free: (0..credits).rev().collect(),
            by_id: HashMap::with_capacity(2 * credits),
            ready: VecDeque::with_capacity(2 * credits),
            failed: false,
            payloads: vec![Payload::None; credits],
            reply_caps: vec![0; credits],
            bytes: vec![0; credits],
        }
    }

    /// The number of slots (the negotiated credits).
    pub fn credits(&self) -> usize {
        self.stages.len()
    }

    /// Slots without a request.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Whether [`fail`](Self::fail) was called.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Slot `s`'s stage (`Free` for a slot that does not exist).
    pub fn stage(&self, s: usize) -> Stage {
        self.stages.get(s).copied().unwrap_or(Stage::Free)
    }

    /// The id of slot `s`'s request (0 when free).
    pub fn id(&self, s: usize) -> u64 {
        self.ids.get(s).copied().unwrap_or(0)
    }

    /// A request with `id` arrived: checks it against the protocol and gives it a slot,
    /// now `Queued`. The caller then either queues it for `recv`
    /// ([`push_new`](Self::push_new)) or starts its READs itself.
    pub fn admit(&mut self, id: u64) -> Result<usize, Violation> {
        if id >> LANE_SHIFT != 0 {
            return Err(Violation::IdTooLarge(id));
        }
        if self.by_id.contains_key(&id) {
            return Err(Violation::IdInFlight(id));
        }
        let Some(s) = self.free.pop() else {
            return Err(Violation::TooManyRequests(self.credits()));
        };
        self.stages[s] = Stage::Queued;
        self.ids[s] = id;
        self.by_id.insert(id, s);
        Ok(s)
    }

    /// Queues `Queued` slot `s` for `recv`, behind what is already queued.
    pub fn push_new(&mut self, s: usize) -> Result<(), WrongStage> {
        self.expect(s, Stage::Queued, "be queued for recv")?;
        self.ready.push_back(Ready::New(s));
        Ok(())
    }

    /// Puts `Queued` slot `s` back first in line (it waits for pool buffers).
    pub fn push_new_front(&mut self, s: usize) -> Result<(), WrongStage> {
        self.expect(s, Stage::Queued, "go back first in line")?;
        self.ready.push_front(Ready::New(s));
        Ok(())
    }

    /// The next thing for `recv` to do, if any.
    pub fn next_ready(&mut self) -> Option<Ready> {
        self.ready.pop_front()
    }

    /// Takes the first request whose READs are done out of the line, if any: a request
    /// that waits for pool buffers gives way to it (its buffers come back once it is served).
    pub fn take_reads_done(&mut self) -> Option<usize> {
        let k = self
            .ready
            .iter()
            .position(|r| matches!(r, Ready::ReadsDone(_)))?;
        match self.ready.remove(k) {
            Some(Ready::ReadsDone(s)) => Some(s),
            _ => None,
        }
    }

    /// The READs of `Queued` slot `s` are about to be posted: it is `Reading`.
    pub fn start_reads(&mut self, s: usize) -> Result<(), WrongStage> {
        self.expect(s, Stage::Queued, "start its READs")?;
        self.stages[s] = Stage::Reading;
        Ok(())
    }

    /// The READs of `Reading` slot `s` were not posted after all (no room in the send
    /// queue): it is `Queued` again.
    pub fn unstart_reads(&mut self, s: usize) -> Result<(), WrongStage> {
        self.expect(s, Stage::Reading, "take its READs back")?;
        self.stages[s] = Stage::Queued;
        Ok(())
    }

    /// The last (signaled) READ of slot `s` completed. If the slot is `Reading` it is
    /// `Ready` and queued for `recv` (true); otherwise (the lane failed meanwhile, or a
    /// stale completion) nothing changes (false).
    pub fn reads_completed(&mut self, s: usize) -> bool {
        if self.stage(s) != Stage::Reading {
            return false;
        }
        self.stages[s] = Stage::Ready;
        self.ready.push_back(Ready::ReadsDone(s));
        true
    }

    /// Slot `s` is handed out by `recv`: from `Ready` (its READs done) or `Queued` (no
    /// payload to READ, or an inline one). Returns its id.
    pub fn deliver(&mut self, s: usize) -> Result<u64, WrongStage> {
        match self.stage(s) {
            Stage::Ready | Stage::Queued => {
                self.stages[s] = Stage::Delivered;
                Ok(self.ids[s])
            }
            was => Err(WrongStage {
                slot: s,
                was,
                asked: "be handed out",
            }),
        }
    }

    /// The slot of the handed-out request `id`, which the caller replies to; `None` if no
    /// request with that id is waiting for its reply on this lane.
    pub fn reply_slot(&self, id: u64) -> Option<usize> {
        let &s = self.by_id.get(&id)?;
        (self.stages[s] == Stage::Delivered).then_some(s)
    }

    /// The reply to `Delivered` slot `s` is being posted: the slot is free again (the
    /// client cannot use this credit before it has the reply).
    pub fn release(&mut self, s: usize) -> Result<(), WrongStage> {
        self.expect(s, Stage::Delivered, "be released")?;
        self.by_id.remove(&self.ids[s]);
        self.stages[s] = Stage::Free;
        self.ids[s] = 0;
        self.free.push(s);
        Ok(())
    }

    /// The connection failed: every request is dropped (its buffers with it) and nothing is
    /// admitted any more (every slot reads as `Free`, but none is handed out again).
    pub fn fail(&mut self) {
        self.failed = true;
        self.stages.fill(Stage::Free);
        self.ids.fill(0);
        self.free.clear();
        self.by_id.clear();
        self.ready.clear();
    }

    fn expect(&self, s: usize, want: Stage, asked: &'static str) -> Result<(), WrongStage> {
        let was = self.stage(s);
        if s < self.stages.len() && was == want && !self.failed {
            Ok(())
        } else {
            Err(WrongStage {
                slot: s,
                was,
                asked,
            })
        }
    }

    /// Checks the invariants (tests): every slot is free or holds exactly one id, the free
    /// list and the id map agree with the stages, and every queued entry is at its stage.
    #[cfg(test)]
    pub(crate) fn check(&self) {
        if self.failed {
            assert!(self.free.is_empty() && self.by_id.is_empty() && self.ready.is_empty());
            return;
        }
        let mut seen = vec![false; self.credits()];
        for &s in &self.free {
            assert!(!seen[s], "slot {s} twice in the free list");
            seen[s] = true;
            assert_eq!(self.stages[s], Stage::Free, "free-listed slot {s} in use");
        }
        for (s, st) in self.stages.iter().enumerate() {
            if *st == Stage::Free {
                assert!(seen[s], "free slot {s} lost (not in the free list)");
            } else {
                assert_eq!(
                    self.by_id.get(&self.ids[s]),
                    Some(&s),
                    "slot {s} id unmapped"
                );
            }
        }
        assert_eq!(self.by_id.len() + self.free.len(), self.credits());
        for r in &self.ready {
            match *r {
                Ready::New(s) => assert_eq!(self.stages[s], Stage::Queued),
                Ready::ReadsDone(s) => assert_eq!(self.stages[s], Stage::Ready),
            }
        }
        let mut queued = vec![0u8; self.credits()];
        for r in &self.ready {
            let (Ready::New(s) | Ready::ReadsDone(s)) = *r;
            queued[s] += 1;
            assert!(queued[s] == 1, "slot {s} queued twice for recv");
        }
    }
}

/// What a request carries besides its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Nothing.
    None,
    /// Bytes inside the request message: copied into pool buffers before it is handed out.
    Inline,
    /// Bytes in the client's memory: RDMA READ into pool buffers before it is handed out.
    Read,
}

/// What happened, as the driver tells the lane ([`ServerLane::handle`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A request message was decoded (the driver has taken it out of its receive buffer).
    Request {
        /// Its id (as the client gave it).
        id: u64,
        /// What it carries.
        payload: Payload,
        /// Its payload bytes (0 with [`Payload::None`]).
        bytes: usize,
        /// The most reply payload it takes.
        reply_cap: usize,
        /// Whether the connection may carry payload yet (authenticated, or no such rule).
        authenticated: bool,
        /// Whether the server has told the connection its rules yet (the queue pair is up
        /// before the server takes the connection). Until then no payload is READ: the
        /// request waits for `recv`, which checks it against the rules first
        /// ([`Event::Recv`]), so no buffer is ever taken for a payload the rules refuse.
        rules_set: bool,
    },
    /// The READs [`Action::ReadNow`] asked for were not posted: no budget, no pool buffers
    /// without waiting, or no room in the send queue. `recv` takes the request.
    ReadsNotPosted {
        /// The slot.
        slot: usize,
    },
    /// The last (signaled) READ of a slot's payload completed.
    ReadsCompleted {
        /// The slot.
        slot: usize,
    },
    /// `recv` looks at this lane for something to hand out.
    Recv {
        /// Whether the connection may carry payload by now. A request can arrive before
        /// the server has told the connection its rules (the queue pair is up before the
        /// server takes the connection): its payload is checked again here, before any
        /// buffer is taken for it or it is handed out.
        authenticated: bool,
    },
    /// The budget and pool buffers [`Action::Take`] asked for are in hand.
    Buffers {
        /// The slot.
        slot: usize,
    },
    /// The budget or pool buffers [`Action::Take`] asked for are not there.
    Short {
        /// The slot.
        slot: usize,
        /// Whether `recv` may still wait a while for them.
        can_wait: bool,
    },
    /// The server replies to request `id` with `bytes` of payload.
    Reply {
        /// The id as the lane handed it out.
        id: u64,
        /// The reply's payload bytes.
        bytes: usize,
    },
    /// A request message did not decode: the client broke the protocol.
    Malformed(MsgError),
    /// The connection failed or was closed: every request is dropped.
    Failed,
}

/// Why a reply is refused; the connection lives on (the replier's mistake, not the client's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyRefusal {
    /// No request with this id waits for its reply on this lane.
    NotInFlight(u64),
    /// More reply payload than the request takes.
    TooLarge {
        /// The reply's payload bytes.
        bytes: usize,
        /// What the request takes.
        cap: usize,
    },
}

/// What the driver does next, as the lane answers an [`Event`]; carried out in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep the decoded request's header and descriptors in slot `slot`'s storage (and
    /// count it in flight).
    Accept {
        /// The slot.
        slot: usize,
    },
    /// Post the receive buffer the request came in again.
    PostRecv,
    /// Take budget and pool buffers for the slot's payload only if they come without
    /// waiting, and post its READs only if the send queue has room; otherwise tell the lane
    /// [`Event::ReadsNotPosted`]. The slot is `Reading`.
    ReadNow {
        /// The slot.
        slot: usize,
    },
    /// Take budget and pool buffers for the slot's payload (waiting up to a slice if
    /// `wait`), then tell the lane [`Event::Buffers`] or [`Event::Short`].
    Take {
        /// The slot.
        slot: usize,
        /// Whether to wait.
        wait: bool,
    },
    /// Post the READs of the slot's payload into the buffers taken, waiting for room. The
    /// slot is `Reading`; its last READ's completion is [`Event::ReadsCompleted`].
    Read {
        /// The slot.
        slot: usize,
    },
    /// Hand the slot's request out to `recv`'s caller.
    HandOut {
        /// The slot.
        slot: usize,
        /// The request's id.
        id: u64,
        /// Copy its inline payload into the buffers taken first.
        copy_inline: bool,
    },
    /// Wake `recv`: this lane has something new for it.
    Wake,
    /// Nothing for `recv` to hand out now: the next request waits for budget or buffers.
    Blocked,
    /// Post the reply to the slot's request; the slot (credit) is free again.
    Reply {
        /// The slot.
        slot: usize,
    },
    /// Refuse the reply with this error; nothing else changes.
    RefuseReply(ReplyRefusal),
    /// Drop what the slot holds (the connection failed).
    Drop {
        /// The slot.
        slot: usize,
    },
    /// Fail the connection: the client broke the protocol.
    Fail(Violation),
}

/// An event the lane cannot take: a bug in the driver, never the peer's doing (the driver
/// fails the connection with it as an internal error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A slot was not in the stage the event needs.
    WrongStage(WrongStage),
    /// The driver's action buffer was full.
    Overflow(Overflow),
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::WrongStage(w) => w.fmt(f),
            Refused::Overflow(o) => o.fmt(f),
        }
    }
}

impl From<Overflow> for Refused {
    fn from(o: Overflow) -> Refused {
        Refused::Overflow(o)
    }
}

impl From<WrongStage> for Refused {
    fn from(w: WrongStage) -> Refused {
        Refused::WrongStage(w)
    }
}

impl ServerLane {
    /// A buffer for the actions of a lane with `credits` slots: one [`Action::Drop`] per
    /// slot when the connection fails, and at most three actions for any other event.
    pub fn actions_for(credits: usize) -> Actions<Action> {
        Actions::with_capacity(credits.max(3))
    }

    /// A buffer for [`handle`](Self::handle)'s actions.
    pub fn actions(&self) -> Actions<Action> {
        Self::actions_for(self.credits())
    }

    /// Slot `s`'s payload, as its request said.
    pub fn payload(&self, s: usize) -> Payload {
        self.payloads.get(s).copied().unwrap_or(Payload::None)
    }

    /// Takes event `ev` and writes what to do into `out` (emptied first). Every decision
    /// of what to post next is here: the driver only turns what happened into events and
    /// carries out the actions. `Err` is a driver bug (a transition from the wrong stage,
    /// or `out` too small): the driver fails the connection with it.
    pub fn handle(&mut self, ev: Event, out: &mut Actions<Action>) -> Result<(), Refused> {
        out.clear();
        match ev {
            Event::Request {
                id,
                payload,
                bytes,
                reply_cap,
                authenticated,
                rules_set,
            } => {
                let s = match self.admit(id) {
                    Ok(s) => s,
                    Err(v) => return push(out, Action::Fail(v)),
                };
                let payload = if bytes == 0 { Payload::None } else { payload };
                if payload != Payload::None && !authenticated {
                    return push(
                        out,
                        Action::Fail(Violation::PayloadBeforeAuth { id, bytes }),
                    );
                }
                self.payloads[s] = payload;
                self.reply_caps[s] = reply_cap;
                self.bytes[s] = bytes;
                push(out, Action::Accept { slot: s })?;
                push(out, Action::PostRecv)?;
                if payload == Payload::Read && rules_set {
                    // READ it here, on the completion thread, if that needs no wait.
                    self.start_reads(s)?;
                    push(out, Action::ReadNow { slot: s })
                } else {
                    self.push_new(s)?;
                    push(out, Action::Wake)
                }
            }
            Event::ReadsNotPosted { slot } => {
                self.unstart_reads(slot)?;
                self.push_new(slot)?;
                push(out, Action::Wake)
            }
            Event::ReadsCompleted { slot } => {
                if self.reads_completed(slot) {
                    push(out, Action::Wake)?;
                }
                Ok(())
            }
            Event::Recv { authenticated } => match self.next_ready() {
                None => Ok(()),
                Some(Ready::New(s) | Ready::ReadsDone(s))
                    if !authenticated && self.payload(s) != Payload::None =>
                {
                    let (id, bytes) = (self.ids[s], self.bytes[s]);
                    push(
                        out,
                        Action::Fail(Violation::PayloadBeforeAuth { id, bytes }),
                    )
                }
                Some(Ready::ReadsDone(s)) => self.hand_out(s, false, out),
                Some(Ready::New(s)) => {
                    if self.payload(s) == Payload::None {
                        self.hand_out(s, false, out)
                    } else {
                        self.expect(s, Stage::Queued, "take buffers")?;
                        push(
                            out,
                            Action::Take {
                                slot: s,
                                wait: false,
                            },
                        )
                    }
                }
            },
            Event::Buffers { slot } => match self
                .expect(slot, Stage::Queued, "take buffers")
                .map(|()| self.payload(slot))?
            {
                Payload::Read => {
                    self.start_reads(slot)?;
                    push(out, Action::Read { slot })
                }
                _ => self.hand_out(slot, true, out),
            },
            Event::Short { slot, can_wait } => {
                self.expect(slot, Stage::Queued, "wait for buffers")?;
                // A request whose READs are done goes first: its bytes and buffers come back
                // once it is served, so waiting while it sits behind could wait for nothing.
                if let Some(d) = self.take_reads_done() {
                    self.push_new_front(slot)?;
                    return self.hand_out(d, false, out);
                }
                if can_wait {
                    return push(out, Action::Take { slot, wait: true });
                }
                self.push_new_front(slot)?;
                push(out, Action::Blocked)
            }
            Event::Reply { id, bytes } => {
                let Some(s) = self.reply_slot(id) else {
                    return push(out, Action::RefuseReply(ReplyRefusal::NotInFlight(id)));
                };
                let cap = self.reply_caps[s];
                if bytes > cap {
                    return push(
                        out,
                        Action::RefuseReply(ReplyRefusal::TooLarge { bytes, cap }),
                    );
                }
                self.release(s)?;
                self.payloads[s] = Payload::None;
                self.reply_caps[s] = 0;
                self.bytes[s] = 0;
                push(out, Action::Reply { slot: s })
            }
            Event::Malformed(e) => push(out, Action::Fail(Violation::Malformed(e))),
            Event::Failed => {
                if self.failed {
                    return Ok(());
                }
                for s in 0..self.credits() {
                    if self.stages[s] != Stage::Free {
                        push(out, Action::Drop { slot: s })?;
                    }
                }
                self.fail();
                self.payloads.fill(Payload::None);
                self.reply_caps.fill(0);
                self.bytes.fill(0);
                Ok(())
            }
        }
    }

    fn hand_out(
        &mut self,
        s: usize,
        copy_inline: bool,
        out: &mut Actions<Action>,
    ) -> Result<(), Refused> {
        let id = self.deliver(s)?;
        push(
            out,
            Action::HandOut {
                slot: s,
                id,
                copy_inline,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_payload_goes_admit_deliver_release() {
        let mut l = ServerLane::new(2);
        let s = l.admit(7).unwrap();
        assert_eq!((s, l.stage(s), l.free_slots()), (0, Stage::Queued, 1));
        l.push_new(s).unwrap();
        l.check();
        assert_eq!(l.next_ready(), Some(Ready::New(s)));
        assert_eq!(l.reply_slot(7), None, "not handed out yet");
        assert_eq!(l.deliver(s), Ok(7));
        assert_eq!(l.reply_slot(7), Some(s));
        l.release(s).unwrap();
        l.check();
        assert_eq!(
            (l.stage(s), l.free_slots(), l.reply_slot(7)),
            (Stage::Free, 2, None)
        );
        // The id can be used again once its reply is out.
        assert!(l.admit(7).is_ok());
    }

    #[test]
    fn a_request_with_payload_is_read_before_it_is_handed_out() {
        let mut l = ServerLane::new(1);
        let s = l.admit(1).unwrap();
        l.start_reads(s).unwrap();
        assert_eq!(l.stage(s), Stage::Reading);
        assert!(l.deliver(s).is_err(), "not before its READs are done");
        assert!(l.reads_completed(s));
        assert!(!l.reads_completed(s), "a second completion changes nothing");
        l.check();
        assert_eq!(l.next_ready(), Some(Ready::ReadsDone(s)));
        assert_eq!(l.deliver(s), Ok(1));
        l.release(s).unwrap();
        l.check();
    }

    #[test]
    fn reads_without_room_go_back_to_the_queue() {
        let mut l = ServerLane::new(1);
        let s = l.admit(1).unwrap();
        l.start_reads(s).unwrap();
        l.unstart_reads(s).unwrap();
        l.push_new_front(s).unwrap();
        l.check();
        assert_eq!(l.next_ready(), Some(Ready::New(s)));
        assert!(l.unstart_reads(s).is_err(), "only a Reading slot");
    }

    #[test]
    fn credits_are_exhausted_and_come_back_with_replies() {
        let mut l = ServerLane::new(3);
        let slots: Vec<usize> = (10..13).map(|id| l.admit(id).unwrap()).collect();
        assert_eq!(slots, [0, 1, 2]);
        assert_eq!(l.admit(13), Err(Violation::TooManyRequests(3)));
        assert_eq!(
            Violation::TooManyRequests(3).to_string(),
            "more than the negotiated 3 requests in flight"
        );
        l.deliver(1).unwrap();
        l.release(1).unwrap();
        assert_eq!(l.admit(13), Ok(1));
        l.check();
    }

    #[test]
    fn bad_ids_are_violations() {
        let mut l = ServerLane::new(4);
        assert_eq!(
            l.admit(1 << LANE_SHIFT),
            Err(Violation::IdTooLarge(1 << LANE_SHIFT))
        );
        assert_eq!(l.admit(u64::MAX), Err(Violation::IdTooLarge(u64::MAX)));
        l.admit(5).unwrap();
        assert_eq!(l.admit(5), Err(Violation::IdInFlight(5)));
        assert_eq!(
            Violation::IdInFlight(5).to_string(),
            "request id 5 is already in flight"
        );
        assert_eq!(
            Violation::IdTooLarge(1 << 56).to_string(),
            format!("request id {} is not below 2^56", 1u64 << 56)
        );
        // A violation takes no slot.
        assert_eq!(l.free_slots(), 3);
        l.check();
    }

    #[test]
    fn replies_to_unknown_or_undelivered_ids_find_no_slot() {
        let mut l = ServerLane::new(2);
        let s = l.admit(3).unwrap();
        assert_eq!(l.reply_slot(3), None);
        assert_eq!(l.reply_slot(4), None);
        l.deliver(s).unwrap();
        assert_eq!(l.reply_slot(3), Some(s));
        l.release(s).unwrap();
        assert!(l.release(s).is_err(), "a slot is released once");
        assert_eq!(l.reply_slot(3), None, "a second reply finds nothing");
        l.check();
    }

    #[test]
    fn out_of_order_read_completions_are_handed_out_in_completion_order() {
        let mut l = ServerLane::new(3);
        for id in 0..3 {
            let s = l.admit(id).unwrap();
            l.start_reads(s).unwrap();
        }
        assert!(l.reads_completed(2));
        assert!(l.reads_completed(0));
        l.check();
        assert_eq!(l.next_ready(), Some(Ready::ReadsDone(2)));
        assert_eq!(l.next_ready(), Some(Ready::ReadsDone(0)));
        assert_eq!(l.next_ready(), None);
        assert!(l.reads_completed(1));
        assert_eq!(l.next_ready(), Some(Ready::ReadsDone(1)));
    }

    #[test]
    fn a_request_waiting_for_buffers_gives_way_to_one_read_already() {
        let mut l = ServerLane::new(3);
        let a = l.admit(1).unwrap();
        l.push_new(a).unwrap();
        let b = l.admit(2).unwrap();
        l.start_reads(b).unwrap();
        l.reads_completed(b);
        let c = l.admit(3).unwrap();
        l.push_new(c).unwrap();
        assert_eq!(l.next_ready(), Some(Ready::New(a)));
        // `a` waits for pool buffers: `b` goes first, `a` stays first in line.
        assert_eq!(l.take_reads_done(), Some(b));
        l.push_new_front(a).unwrap();
        assert_eq!(l.take_reads_done(), None);
        assert_eq!(l.deliver(b), Ok(2));
        l.check();
        assert_eq!(l.next_ready(), Some(Ready::New(a)));
        assert_eq!(l.next_ready(), Some(Ready::New(c)));
    }

    #[test]
    fn failing_drops_every_request_and_refuses_transitions() {
        let mut l = ServerLane::new(3);
        let a = l.admit(1).unwrap();
        l.push_new(a).unwrap();
        let b = l.admit(2).unwrap();
        l.start_reads(b).unwrap();
        let c = l.admit(3).unwrap();
        l.deliver(c).unwrap();
        l.fail();
        l.check();
        assert!(l.failed());
        assert_eq!(l.next_ready(), None);
        assert!(!l.reads_completed(b), "a READ completing after the failure");
        assert_eq!(l.reply_slot(3), None, "a reply after the failure");
        assert!(l.release(c).is_err());
        assert_eq!(l.admit(4), Err(Violation::TooManyRequests(3)));
    }

    #[test]
    fn transitions_on_slots_that_do_not_exist_are_refused() {
        let mut l = ServerLane::new(1);
        assert!(l.push_new(5).is_err());
        assert!(l.start_reads(5).is_err());
        assert!(!l.reads_completed(5));
        assert!(l.deliver(5).is_err());
        assert!(l.release(5).is_err());
        let e = l.release(0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "internal: request slot 0 is Free, cannot be released"
        );
    }
}

/// The event API ([`ServerLane::handle`]): what each event answers, every way a request
/// ends, a client breaking the protocol, and driver bugs refused without a panic.
#[cfg(test)]
mod event_tests {
    use super::*;

    /// `recv` on an authenticated connection.
    const RECV: Event = Event::Recv {
        authenticated: true,
    };

    fn req(id: u64, payload: Payload, bytes: usize) -> Event {
        Event::Request {
            id,
            payload,
            bytes,
            reply_cap: 4096,
            authenticated: true,
            rules_set: true,
        }
    }

    fn handle(l: &mut ServerLane, out: &mut Actions<Action>, ev: Event) -> Vec<Action> {
        l.handle(ev, out).unwrap();
        l.check();
        out.as_slice().to_vec()
    }

    #[test]
    fn a_request_without_payload_is_handed_out_and_replied() {
        let mut l = ServerLane::new(2);
        let mut out = l.actions();
        assert_eq!(
            handle(&mut l, &mut out, req(7, Payload::None, 0)),
            [Action::Accept { slot: 0 }, Action::PostRecv, Action::Wake]
        );
        assert_eq!(
            handle(&mut l, &mut out, RECV),
            [Action::HandOut {
                slot: 0,
                id: 7,
                copy_inline: false
            }]
        );
        assert_eq!(handle(&mut l, &mut out, RECV), []);
        assert_eq!(
            handle(&mut l, &mut out, Event::Reply { id: 7, bytes: 4096 }),
            [Action::Reply { slot: 0 }]
        );
        assert_eq!(l.free_slots(), 2);
    }

    #[test]
    fn no_payload_is_read_before_the_connections_rules_are_set() {
        // The queue pair is up before the server sets the connection's rules: a request
        // that arrives first waits for `recv`, which checks it against them before any
        // buffer is taken, instead of being READ on the completion thread at once.
        let early = Event::Request {
            id: 1,
            payload: Payload::Read,
            bytes: 10,
            reply_cap: 0,
            authenticated: true,
            rules_set: false,
        };
        let mut l = ServerLane::new(2);
        let mut out = l.actions();
        assert_eq!(
            handle(&mut l, &mut out, early),
            [Action::Accept { slot: 0 }, Action::PostRecv, Action::Wake]
        );
        assert_eq!(l.stage(0), Stage::Queued);
        // Rules that refuse payload before authentication: the connection fails, and no
        // buffer was asked for.
        let unauthed = Event::Recv {
            authenticated: false,
        };
        assert_eq!(
            handle(&mut l, &mut out, unauthed),
            [Action::Fail(Violation::PayloadBeforeAuth {
                id: 1,
                bytes: 10
            })]
        );
        // Rules that allow it: `recv` takes its buffers, then READs it.
        let mut l = ServerLane::new(2);
        handle(&mut l, &mut out, early);
        assert_eq!(
            handle(&mut l, &mut out, RECV),
            [Action::Take {
                slot: 0,
                wait: false
            }]
        );
        assert_eq!(
            handle(&mut l, &mut out, Event::Buffers { slot: 0 }),
            [Action::Read { slot: 0 }]
        );
    }

    #[test]
    fn a_malformed_or_oversized_request_fails_the_connection_and_drops_every_slot_in_use() {
        let mut l = ServerLane::new(2);
        let mut out = l.actions();
        handle(&mut l, &mut out, req(1, Payload::None, 0));
        let e = MsgError::TooLarge {
            field: "request descriptors",
            value: 9,
            limit: 4,
        };
        assert_eq!(
            handle(&mut l, &mut out, Event::Malformed(e)),
            [Action::Fail(Violation::Malformed(e))]
        );
        assert_eq!(
            Violation::Malformed(e).to_string(),
            "malformed request: request descriptors is 9, over the limit of 4"
        );
        assert_eq!(
            handle(&mut l, &mut out, Event::Failed),
            [Action::Drop { slot: 0 }]
        );
    }

    #[test]
    fn a_payload_is_read_on_the_completion_thread_when_that_needs_no_wait() {
        let mut l = ServerLane::new(2);
        let mut out = l.actions();
        assert_eq!(
            handle(&mut l, &mut out, req(1, Payload::Read, 100)),
            [
                Action::Accept { slot: 0 },
                Action::PostRecv,
                Action::ReadNow { slot: 0 }
            ]
        );
        assert_eq!(l.stage(0), Stage::Reading);
        assert_eq!(handle(&mut l, &mut out, RECV), [], "not before its READs");
        assert_eq!(
            handle(&mut l, &mut out, Event::ReadsCompleted { slot: 0 }),
            [Action::Wake]
        );
        assert_eq!(
            handle(&mut l, &mut out, Event::ReadsCompleted { slot: 0 }),
            [],
            "a stale completion changes nothing"
        );
        assert_eq!(
            handle(&mut l, &mut out, RECV),
            [Action::HandOut {
                slot: 0,
                id: 1,
                copy_inline: false
            }]
        );
    }

    #[test]
    fn reads_not_posted_at_once_are_posted_by_recv() {
        let mut l = ServerLane::new(1);
        let mut out = l.actions();
        handle(&mut l, &mut out, req(1, Payload::Read, 100));
        assert_eq!(
            handle(&mut l, &mut out, Event::ReadsNotPosted { slot: 0 }),
            [Action::Wake]
        );
        assert_eq!(l.stage(0), Stage::Queued);
        assert_eq!(
            handle(&mut l, &mut out, RECV),
            [Action::Take {
                slot: 0,
                wait: false
            }]
        );
        assert_eq!(
            handle(&mut l, &mut out, Event::Buffers { slot: 0 }),
            [Action::Read { slot: 0 }]
        );
        assert_eq!(l.stage(0), Stage::Reading);
        handle(&mut l, &mut out, Event::ReadsCompleted { slot: 0 });
        assert_eq!(
            handle(&mut l, &mut out, RECV),
            [Action::HandOut {
                slot: 0,
                id: 1,
                copy_inline: false
            }]
        );
    }

    #[test]
    fn an_inline_payload_is_copied_into_buffers_and_handed_out() {
        let mut l = ServerLane::new(1);
        let mut out = l.actions();
        assert_eq!(
            handle(&mut l, &mut out, req(3, Payload::Inline, 10)),
            [Action::Accept { slot: 0 }, Action::PostRecv, Action::Wake]
        );
        assert_eq!(
            handle(&mut l, &mut out, RECV),
            [Action::Take {
                slot: 0,
                wait: false
            }]
        );
        assert_eq!(
            handle(&mut l, &mut out, Event::Buffers { slot: 0 }),
            [Action::HandOut {
                slot: 0,
                id: 3,
                copy_inline: true
            }]
        );
        // A payload kind with 0 bytes carries nothing.
        handle(&mut l, &mut out, Event::Reply { id: 3, bytes: 0 });
        handle(&mut l, &mut out, req(4, Payload::Read, 0));
        assert_eq!(out.as_slice()[2], Action::Wake);
        assert_eq!(l.payload(0), Payload::None);
    }

    #[test]
    fn short_of_buffers_waits_then_blocks_and_stays_first_in_line() {
        let mut l = ServerLane::new(2);
        let mut out = l.actions();
        handle(&mut l, &mut out, req(1, Payload::Inline, 10));
        handle(&mut l, &mut out, req(2, Payload::None, 0));
        handle(&mut l, &mut out, RECV);
        assert_eq!(
            handle(
                &mut l,
                &mut out,
                Event::Short {
                    slot: 0,
                    can_wait: true
                }
            ),
            [Action::Take {
                slot: 0,
                wait: true
            }]
        );
        assert_eq!(
            handle(
                &mut l,
                &mut out,
                Event::Short {
                    slot: 0,
                    can_wait: false
                }
            ),
            [Action::Blocked]
        );
        // Still first: the request behind it waits too (requests are served in order).
        assert_eq!(
            handle(&mut l, &mut out, RECV),
            [Action::Take {
                slot: 0,
                wait: false
            }]
        );
    }

    #[test]
    fn a_request_short_of_buffers_gives_way_to_one_whose_reads_are_done() {
        let mut l = ServerLane::new(3);
        let mut out = l.actions();
        handle(&mut l, &mut out, req(1, Payload::Read, 100));
        handle(&mut l, &mut out, Event::ReadsNotPosted { slot: 0 });
        handle(&mut l, &mut out, req(2, Payload::Read, 100));
        handle(&mut l, &mut out, Event::ReadsCompleted { slot: 1 });
        assert_eq!(
            handle(&mut l, &mut out, RECV),
            [Action::Take {
                slot: 0,
                wait: false
            }]
        );
        assert_eq!(
            handle(
                &mut l,
                &mut out,
                Event::Short {
                    slot: 0,
                    can_wait: true
                }
            ),
            [Action::HandOut {
                slot: 1,
                id: 2,
                copy_inline: false
            }]
        );
        assert_eq!(
            handle(&mut l, &mut out, RECV),
            [Action::Take {
                slot: 0,
                wait: false
            }]
        );
    }

    #[test]
    fn out_of_order_read_completions_are_handed_out_as_they_complete() {
        let mut l = ServerLane::new(3);
        let mut out = l.actions();
        for id in 0..3 {
            handle(&mut l, &mut out, req(id, Payload::Read, 10));
        }
        for s in [2, 0, 1] {
            assert_eq!(
                handle(&mut l, &mut out, Event::ReadsCompleted { slot: s }),
                [Action::Wake]
            );
        }
        for s in [2, 0, 1] {
            assert_eq!(
                handle(&mut l, &mut out, RECV),
                [Action::HandOut {
                    slot: s,
                    id: s as u64,
                    copy_inline: false
                }]
            );
        }
        // Replies in yet another order.
        for id in [1, 2, 0] {
            assert_eq!(
                handle(&mut l, &mut out, Event::Reply { id, bytes: 0 }),
                [Action::Reply { slot: id as usize }]
            );
        }
        assert_eq!(l.free_slots(), 3);
    }

    #[test]
    fn credits_run_out_and_come_back_with_replies() {
        let mut l = ServerLane::new(2);
        let mut out = l.actions();
        handle(&mut l, &mut out, req(1, Payload::None, 0));
        handle(&mut l, &mut out, req(2, Payload::None, 0));
        assert_eq!(
            handle(&mut l, &mut out, req(3, Payload::None, 0)),
            [Action::Fail(Violation::TooManyRequests(2))]
        );
        handle(&mut l, &mut out, RECV);
        handle(&mut l, &mut out, Event::Reply { id: 1, bytes: 0 });
        assert_eq!(
            handle(&mut l, &mut out, req(3, Payload::None, 0)),
            [Action::Accept { slot: 0 }, Action::PostRecv, Action::Wake]
        );
    }

    #[test]
    fn a_client_breaking_the_protocol_gets_the_violation() {
        let mut l = ServerLane::new(2);
        let mut out = l.actions();
        assert_eq!(
            handle(&mut l, &mut out, req(1 << LANE_SHIFT, Payload::None, 0)),
            [Action::Fail(Violation::IdTooLarge(1 << LANE_SHIFT))]
        );
        handle(&mut l, &mut out, req(5, Payload::None, 0));
        assert_eq!(
            handle(&mut l, &mut out, req(5, Payload::Read, 10)),
            [Action::Fail(Violation::IdInFlight(5))]
        );
        let unauth = Event::Request {
            id: 6,
            payload: Payload::Read,
            bytes: 10,
            reply_cap: 0,
            authenticated: false,
            rules_set: true,
        };
        assert_eq!(
            handle(&mut l, &mut out, unauth),
            [Action::Fail(Violation::PayloadBeforeAuth {
                id: 6,
                bytes: 10
            })]
        );
        assert_eq!(
            Violation::PayloadBeforeAuth { id: 6, bytes: 10 }.to_string(),
            "request 6 carries 10 payload bytes before authentication"
        );
        // A request that arrived before the connection's rules were known (taken as
        // authenticated) is checked again before `recv` takes buffers for it or hands it
        // out; one without payload is handed out.
        let mut l = ServerLane::new(3);
        handle(&mut l, &mut out, req(1, Payload::Inline, 10));
        handle(&mut l, &mut out, req(2, Payload::Read, 20));
        handle(&mut l, &mut out, Event::ReadsCompleted { slot: 1 });
        handle(&mut l, &mut out, req(3, Payload::None, 0));
        let unauthed = Event::Recv {
            authenticated: false,
        };
        assert_eq!(
            handle(&mut l, &mut out, unauthed),
            [Action::Fail(Violation::PayloadBeforeAuth {
                id: 1,
                bytes: 10
            })]
        );
        let mut l = ServerLane::new(2);
        handle(&mut l, &mut out, req(2, Payload::Read, 20));
        handle(&mut l, &mut out, Event::ReadsCompleted { slot: 0 });
        assert_eq!(
            handle(&mut l, &mut out, unauthed),
            [Action::Fail(Violation::PayloadBeforeAuth {
                id: 2,
                bytes: 20
            })]
        );
        handle(&mut l, &mut out, req(3, Payload::None, 0));
        assert!(matches!(
            handle(&mut l, &mut out, unauthed)[..],
            [Action::HandOut { id: 3, .. }]
        ));
        // Without payload, authentication is not needed.
        let mut l = ServerLane::new(1);
        let hello = Event::Request {
            id: 1,
            payload: Payload::None,
            bytes: 0,
            reply_cap: 0,
            authenticated: false,
            rules_set: true,
        };
        assert_eq!(
            handle(&mut l, &mut out, hello)[0],
            Action::Accept { slot: 0 }
        );
    }

    #[test]
    fn replies_the_lane_refuses_leave_everything_as_it_was() {
        let mut l = ServerLane::new(1);
        let mut out = l.actions();
        assert_eq!(
            handle(&mut l, &mut out, Event::Reply { id: 9, bytes: 0 }),
            [Action::RefuseReply(ReplyRefusal::NotInFlight(9))]
        );
        handle(&mut l, &mut out, req(9, Payload::None, 0));
        assert_eq!(
            handle(&mut l, &mut out, Event::Reply { id: 9, bytes: 0 }),
            [Action::RefuseReply(ReplyRefusal::NotInFlight(9))],
            "not handed out yet"
        );
        handle(&mut l, &mut out, RECV);
        assert_eq!(
            handle(&mut l, &mut out, Event::Reply { id: 9, bytes: 4097 }),
            [Action::RefuseReply(ReplyRefusal::TooLarge {
                bytes: 4097,
                cap: 4096
            })]
        );
        assert_eq!(l.stage(0), Stage::Delivered);
        assert_eq!(
            handle(&mut l, &mut out, Event::Reply { id: 9, bytes: 4096 }),
            [Action::Reply { slot: 0 }]
        );
        assert_eq!(
            handle(&mut l, &mut out, Event::Reply { id: 9, bytes: 0 }),
            [Action::RefuseReply(ReplyRefusal::NotInFlight(9))],
            "a second reply"
        );
    }

    #[test]
    fn a_failure_mid_request_drops_every_slot_in_use_once() {
        let mut l = ServerLane::new(4);
        let mut out = l.actions();
        handle(&mut l, &mut out, req(1, Payload::Read, 10)); // Reading
        handle(&mut l, &mut out, req(2, Payload::Inline, 10)); // Queued
        handle(&mut l, &mut out, req(3, Payload::None, 0));
        handle(&mut l, &mut out, RECV); // slot 1: Take
        assert_eq!(
            handle(&mut l, &mut out, Event::Failed),
            [
                Action::Drop { slot: 0 },
                Action::Drop { slot: 1 },
                Action::Drop { slot: 2 }
            ]
        );
        assert!(l.failed());
        assert_eq!(handle(&mut l, &mut out, Event::Failed), [], "once");
        assert_eq!(
            handle(&mut l, &mut out, Event::ReadsCompleted { slot: 0 }),
            []
        );
        assert_eq!(handle(&mut l, &mut out, RECV), []);
        assert_eq!(
            handle(&mut l, &mut out, Event::Reply { id: 3, bytes: 0 }),
            [Action::RefuseReply(ReplyRefusal::NotInFlight(3))]
        );
        assert_eq!(
            handle(&mut l, &mut out, req(5, Payload::None, 0)),
            [Action::Fail(Violation::TooManyRequests(4))]
        );
        // A driver still holding slot 1's buffers when it failed: refused, no panic.
        assert!(matches!(
            l.handle(Event::Buffers { slot: 1 }, &mut out),
            Err(Refused::WrongStage(_))
        ));
    }

    #[test]
    fn a_full_lane_failing_fits_the_action_buffer() {
        for credits in 1..8 {
            let mut l = ServerLane::new(credits);
            let mut out = l.actions();
            for id in 0..credits as u64 {
                handle(&mut l, &mut out, req(id, Payload::Read, 1));
            }
            assert_eq!(handle(&mut l, &mut out, Event::Failed).len(), credits);
        }
    }

    #[test]
    fn driver_bugs_are_refused_not_panics() {
        let mut l = ServerLane::new(1);
        let mut small = Actions::with_capacity(1);
        let e = l.handle(req(1, Payload::None, 0), &mut small).unwrap_err();
        assert_eq!(e, Refused::Overflow(Overflow { capacity: 1 }));
        assert_eq!(
            e.to_string(),
            "internal: more than 1 actions for one event of a request lane"
        );
        let mut out = l.actions();
        for ev in [
            Event::ReadsNotPosted { slot: 0 },
            Event::Buffers { slot: 5 },
            Event::Short {
                slot: 9,
                can_wait: true,
            },
        ] {
            assert!(
                matches!(l.handle(ev, &mut out), Err(Refused::WrongStage(_))),
                "{ev:?}"
            );
        }
        let e = l.handle(Event::Buffers { slot: 3 }, &mut out).unwrap_err();
        assert_eq!(
            e.to_string(),
            "internal: request slot 3 is Free, cannot take buffers"
        );
    }
}
