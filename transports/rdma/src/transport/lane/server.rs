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
//! Nothing here allocates after [`ServerLane::new`]: the free list, the id map and the
//! event queue are sized for the credits, and a peer can never have more than that many
//! requests admitted.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::fmt;

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
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::IdTooLarge(id) => write!(f, "request id {id} is not below 2^{LANE_SHIFT}"),
            Violation::IdInFlight(id) => write!(f, "request id {id} is already in flight"),
            Violation::TooManyRequests(credits) => {
                write!(f, "more than the negotiated {credits} requests in flight")
            }
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
