//! Property tests: a client lane and a server lane driven together through random event
//! orders, as the drivers would drive them, with the wire modelled as an RC queue pair does
//! it (each direction delivers its messages in order; everything else, from RDMA READ
//! completions to the order `recv` hands requests out and the order the server replies in,
//! is up to the random schedule). After every event both machines' own invariants hold
//! (no slot lost or doubled); at the end, once everything in flight has run its course,
//! every credit is back on both sides and every request sent completed exactly once.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use zcio::pool::{ClassConfig, PoolConfig};
use zcio::Pool;

use super::client::{
    Action as ClientAction, ClientLane, Event as ClientEvent, Violation as ReplyViolation,
};
use super::send_queue::{Held, SendQueue};
use super::server::{
    Action, Actions, Event as LaneEvent, Payload, Ready, ServerLane, Stage, Violation,
};

/// One thing that happens; the numbers pick among what is possible at that moment.
#[derive(Clone, Debug)]
enum Event {
    /// The caller starts a request (with a payload to READ, one inline, or none), or gives
    /// the slot back before sending (its preparation failed).
    Start {
        payload: Payload,
        abandon: bool,
        windows: bool,
    },
    /// The next request message reaches the server; with `direct`, its READs start at once
    /// on the completion thread; with `early`, before the server has set the connection's
    /// rules (then its payload waits for `recv`).
    Arrive { direct: bool, early: bool },
    /// `recv` looks at the next thing to do; with `short`, the budget or pool buffers a
    /// request needs are not there (it waits a slice, in vain, and is blocked).
    Recv { short: bool },
    /// The last READ of one of the requests being read completes.
    ReadDone(usize),
    /// The server replies to one of the requests handed out.
    Reply(usize),
    /// The invalidation of one answered request's windows completes.
    Invalidated(usize),
    /// The next reply reaches the client.
    ReplyArrives,
    /// The connection fails (peer gone, error completion).
    Fail,
    /// Time passes (milliseconds) and the client's connection thread ticks: a request past
    /// the timeout fails the connection.
    Tick(u64),
}

/// The client's request timeout in the model.
const TIMEOUT: Duration = Duration::from_secs(5);

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => (
            prop_oneof![Just(Payload::None), Just(Payload::Inline), Just(Payload::Read)],
            prop::bool::weighted(0.1),
            any::<bool>(),
        )
            .prop_map(|(payload, abandon, windows)| Event::Start { payload, abandon, windows }),
        4 => (any::<bool>(), any::<bool>())
            .prop_map(|(direct, early)| Event::Arrive { direct, early }),
        4 => prop::bool::weighted(0.2).prop_map(|short| Event::Recv { short }),
        3 => any::<usize>().prop_map(Event::ReadDone),
        3 => any::<usize>().prop_map(Event::Reply),
        2 => any::<usize>().prop_map(Event::Invalidated),
        4 => Just(Event::ReplyArrives),
        1 => Just(Event::Fail),
        2 => (0u64..3000).prop_map(Event::Tick),
    ]
}

/// How a request ended, as its caller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Replied,
    Failed,
    TimedOut,
}

/// Both lanes, the wire between them, and the drivers' bookkeeping.
struct Pair {
    credits: usize,
    client: ClientLane,
    server: ServerLane,
    /// Request messages on their way: (id, payload).
    requests: VecDeque<(u64, Payload)>,
    /// Reply messages on their way.
    replies: VecDeque<u64>,
    /// The server driver's view: what each request in flight carries.
    payload: HashMap<u64, Payload>,
    /// The server driver's action buffer, made once.
    actions: Actions<Action>,
    /// The client driver's action buffer, made once.
    client_actions: Actions<ClientAction>,
    /// The client's requests sent and not completed, by slot.
    client_ids: HashMap<usize, u64>,
    /// Which requests bound windows.
    windows: HashMap<u64, bool>,
    /// Answered requests whose windows are being invalidated (slots).
    invalidating: Vec<usize>,
    /// Requests handed out by `recv`, waiting for the server's reply.
    handed_out: Vec<u64>,
    /// Every request the client sent, and how it ended (once).
    outcome: HashMap<u64, Option<Outcome>>,
    failed: bool,
    now: Instant,
}

impl Pair {
    fn new(credits: usize) -> Pair {
        Pair {
            credits,
            client: ClientLane::new(credits),
            server: ServerLane::new(credits),
            requests: VecDeque::new(),
            replies: VecDeque::new(),
            payload: HashMap::new(),
            actions: ServerLane::actions_for(credits),
            client_actions: ClientLane::actions_for(credits),
            client_ids: HashMap::new(),
            windows: HashMap::new(),
            invalidating: Vec::new(),
            handed_out: Vec::new(),
            outcome: HashMap::new(),
            failed: false,
            now: Instant::now(),
        }
    }

    fn complete(&mut self, id: u64, how: Outcome) {
        let o = self.outcome.get_mut(&id).expect("a request that was sent");
        assert_eq!(*o, None, "request {id} completed twice");
        *o = Some(how);
    }

    fn apply(&mut self, ev: &Event) {
        if self.failed {
            return;
        }
        match *ev {
            Event::Start {
                payload,
                abandon,
                windows,
            } => {
                let (slot, id) = match self.act_client(ClientEvent::Acquire)[..] {
                    [ClientAction::Prepare { slot, id }] => (slot, id),
                    [ClientAction::NoCredit] => {
                        // Every credit in use: the caller waits for a reply.
                        assert_eq!(self.client.free_slots(), 0);
                        return;
                    }
                    ref a => panic!("acquire answered with {a:?}"),
                };
                if abandon {
                    assert_eq!(
                        self.act_client(ClientEvent::Unsent { slot }),
                        [ClientAction::ReturnCredit { slot }]
                    );
                    return;
                }
                let a = self.act_client(ClientEvent::Send {
                    slot,
                    id,
                    now: self.now,
                    reply_cap: 0,
                    offered: false,
                    windows,
                    room_after: 2 * self.credits,
                    force_signal: false,
                });
                assert!(matches!(a[..], [ClientAction::Post { slot: s, .. }] if s == slot));
                assert!(
                    self.outcome.insert(id, None).is_none(),
                    "id {id} reused in flight"
                );
                self.client_ids.insert(slot, id);
                self.windows.insert(id, windows);
                self.requests.push_back((id, payload));
            }
            Event::Arrive { direct, early } => {
                let Some((id, payload)) = self.requests.pop_front() else {
                    return;
                };
                // A client that keeps to its credits never trips the server's checks.
                let a = self.act(LaneEvent::Request {
                    id,
                    payload,
                    bytes: usize::from(payload != Payload::None),
                    reply_cap: 0,
                    authenticated: true,
                    rules_set: !early,
                });
                let Action::Accept { slot: s } = a[0] else {
                    panic!("request {id} not accepted: {a:?}")
                };
                assert_eq!(a[1], Action::PostRecv);
                self.payload.insert(id, payload);
                if payload == Payload::Read && early {
                    // Not READ before the rules are known: `recv` takes it.
                    assert_eq!(a[2..], [Action::Wake]);
                    assert_eq!(self.server.stage(s), Stage::Queued);
                } else if payload == Payload::Read {
                    assert_eq!(a[2..], [Action::ReadNow { slot: s }]);
                    assert_eq!(self.server.stage(s), Stage::Reading);
                    if !direct {
                        // No buffers or room without waiting: `recv` takes it.
                        let a = self.act(LaneEvent::ReadsNotPosted { slot: s });
                        assert_eq!(a, [Action::Wake]);
                    }
                } else {
                    assert_eq!(a[2..], [Action::Wake]);
                }
            }
            Event::Recv { short } => {
                let mut ev = LaneEvent::Recv {
                    authenticated: true,
                };
                // Follows `recv`'s driver: one action per event, until it hands a request
                // out or has nothing to do.
                for round in 0.. {
                    assert!(round < 4, "recv goes round in circles");
                    let a = self.act(ev);
                    ev = match a[..] {
                        [] | [Action::Blocked] => break,
                        [Action::HandOut {
                            slot,
                            id,
                            copy_inline,
                        }] => {
                            assert_eq!(self.server.stage(slot), Stage::Delivered);
                            assert_eq!(copy_inline, self.payload[&id] == Payload::Inline);
                            self.handed_out.push(id);
                            break;
                        }
                        [Action::Take { slot, wait }] => {
                            assert_ne!(self.payload_of(slot), Payload::None);
                            if short {
                                LaneEvent::Short {
                                    slot,
                                    can_wait: !wait,
                                }
                            } else {
                                LaneEvent::Buffers { slot }
                            }
                        }
                        [Action::Read { slot }] => {
                            assert_eq!(self.payload_of(slot), Payload::Read);
                            assert_eq!(self.server.stage(slot), Stage::Reading);
                            break;
                        }
                        _ => panic!("recv answered with {a:?}"),
                    };
                }
            }
            Event::ReadDone(k) => {
                let reading: Vec<usize> = (0..self.credits)
                    .filter(|&s| self.server.stage(s) == Stage::Reading)
                    .collect();
                if !reading.is_empty() {
                    let slot = reading[k % reading.len()];
                    assert_eq!(self.act(LaneEvent::ReadsCompleted { slot }), [Action::Wake]);
                }
            }
            Event::Reply(k) => {
                if self.handed_out.is_empty() {
                    return;
                }
                let id = self.handed_out.swap_remove(k % self.handed_out.len());
                let s = self.server.reply_slot(id).expect("a handed-out request");
                assert_eq!(
                    self.act(LaneEvent::Reply { id, bytes: 0 }),
                    [Action::Reply { slot: s }]
                );
                assert_eq!(self.server.reply_slot(id), None);
                self.payload.remove(&id);
                self.replies.push_back(id);
            }
            Event::ReplyArrives => {
                let Some(id) = self.replies.pop_front() else {
                    return;
                };
                let a = self.act_client(ClientEvent::ReplyArrived {
                    id,
                    payload_len: 0,
                    inline: false,
                });
                match a[..] {
                    [ClientAction::Invalidate { slot }] => {
                        assert!(self.windows[&id]);
                        self.invalidating.push(slot);
                    }
                    [ClientAction::Complete { slot }] => {
                        assert!(!self.windows[&id]);
                        self.deliver(slot);
                    }
                    _ => panic!("reply {id} answered with {a:?}"),
                }
            }
            Event::Invalidated(k) => {
                if self.invalidating.is_empty() {
                    return;
                }
                let slot = self.invalidating.swap_remove(k % self.invalidating.len());
                assert_eq!(
                    self.act_client(ClientEvent::Invalidated { slot }),
                    [ClientAction::Complete { slot }]
                );
                self.deliver(slot);
            }
            Event::Fail => self.fail(None),
            Event::Tick(ms) => {
                self.now += Duration::from_millis(ms);
                let tick = ClientEvent::Tick {
                    now: self.now,
                    timeout: TIMEOUT,
                };
                match self.act_client(tick)[..] {
                    [] => {}
                    [ClientAction::TimedOut { id }] => self.fail(Some(id)),
                    ref a => panic!("a tick answered with {a:?}"),
                }
            }
        }
    }

    /// The connection fails: the drivers complete every request still in flight with the
    /// error (the overdue one, if a tick found one, with a timeout); a reply already on the
    /// wire is never seen.
    fn fail(&mut self, overdue: Option<u64>) {
        let mut expect: Vec<usize> = (0..self.credits)
            .filter(|&s| self.client.in_flight(s).is_some())
            .chain(self.invalidating.iter().copied())
            .collect();
        expect.sort_unstable();
        let aborted: Vec<usize> = self
            .act_client(ClientEvent::Failed)
            .iter()
            .map(|a| match *a {
                ClientAction::Abort { slot } => slot,
                _ => panic!("failing answered with {a:?}"),
            })
            .collect();
        assert_eq!(aborted, expect, "every request in flight aborted, once");
        let in_flight: Vec<u64> = aborted.iter().map(|s| self.client_ids[s]).collect();
        let in_use: Vec<usize> = (0..self.credits)
            .filter(|&s| self.server.stage(s) != Stage::Free)
            .collect();
        let dropped: Vec<usize> = self
            .act(LaneEvent::Failed)
            .iter()
            .map(|a| match *a {
                Action::Drop { slot } => slot,
                _ => panic!("failing answered with {a:?}"),
            })
            .collect();
        assert_eq!(dropped, in_use, "every slot in use dropped, once");
        for id in in_flight {
            let how = if Some(id) == overdue {
                Outcome::TimedOut
            } else {
                Outcome::Failed
            };
            self.complete(id, how);
        }
        self.failed = true;
    }

    /// The server lane's answer to `ev`: never a driver bug, never more actions than the
    /// buffer made for the lane holds.
    fn act(&mut self, ev: LaneEvent) -> Vec<Action> {
        if let Err(e) = self.server.handle(ev, &mut self.actions) {
            panic!("{ev:?} refused: {e}");
        }
        self.actions.as_slice().to_vec()
    }

    /// The client lane's answer to `ev`: never a driver bug, never more actions than the
    /// buffer made for the lane holds.
    fn act_client(&mut self, ev: ClientEvent) -> Vec<ClientAction> {
        if let Err(e) = self.client.handle(ev, &mut self.client_actions) {
            panic!("{ev:?} refused: {e}");
        }
        self.client_actions.as_slice().to_vec()
    }

    /// The reply in client slot `slot` goes to its caller, and the credit comes back.
    fn deliver(&mut self, slot: usize) {
        let id = self
            .client_ids
            .remove(&slot)
            .expect("a request in the slot");
        self.complete(id, Outcome::Replied);
        assert_eq!(
            self.act_client(ClientEvent::Delivered { slot }),
            [ClientAction::ReturnCredit { slot }]
        );
    }

    /// What slot `s`'s request carries, as the driver knows it.
    fn payload_of(&self, s: usize) -> Payload {
        self.payload[&self.server.id(s)]
    }

    fn check(&self) {
        self.client.check();
        self.server.check();
        if !self.failed {
            let in_flight = (0..self.credits)
                .filter(|&s| self.client.in_flight(s).is_some())
                .count();
            let open = self.outcome.values().filter(|o| o.is_none()).count();
            assert_eq!(
                in_flight + self.invalidating.len(),
                open,
                "a request the client lost track of"
            );
            assert_eq!(self.client_ids.len(), open);
            assert!(self.server.free_slots() >= self.client.free_slots());
        }
    }

    /// Runs everything in flight to its end, in a fixed order.
    fn settle(&mut self) {
        for _ in 0..10 * self.credits + 10 {
            self.apply(&Event::Arrive {
                direct: false,
                early: false,
            });
            self.apply(&Event::Recv { short: false });
            for k in 0..self.credits {
                self.apply(&Event::ReadDone(k));
            }
            for k in 0..self.credits {
                self.apply(&Event::Reply(k));
            }
            while !self.replies.is_empty() && !self.failed {
                self.apply(&Event::ReplyArrives);
            }
            while !self.invalidating.is_empty() && !self.failed {
                self.apply(&Event::Invalidated(0));
            }
            self.check();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_request_completes_once_and_every_credit_comes_back(
        credits in 1usize..6,
        events in prop::collection::vec(event(), 0..200),
    ) {
        let mut p = Pair::new(credits);
        for ev in &events {
            p.apply(ev);
            p.check();
        }
        p.settle();
        prop_assert!(p.outcome.values().all(Option::is_some), "a request never completed");
        if !p.failed {
            prop_assert_eq!(p.client.free_slots(), credits);
            prop_assert_eq!(p.server.free_slots(), credits);
            prop_assert!(p.requests.is_empty() && p.replies.is_empty());
            prop_assert!(p.handed_out.is_empty());
        }
    }

    /// A client that does not keep to the protocol: arbitrary ids, more requests than its
    /// credits, replies for whatever. The server's answer is always the one the protocol
    /// gives, and taking a violation changes nothing.
    #[test]
    fn a_misbehaving_client_gets_the_violation_the_protocol_names(
        credits in 1usize..5,
        ids in prop::collection::vec(prop_oneof![0u64..8, any::<u64>()], 0..40),
        replies in prop::collection::vec(0u64..8, 0..40),
    ) {
        let mut server = ServerLane::new(credits);
        let mut live: Vec<u64> = Vec::new();
        for (k, &id) in ids.iter().enumerate() {
            let want = if id >> 56 != 0 {
                Err(Violation::IdTooLarge(id))
            } else if live.contains(&id) {
                Err(Violation::IdInFlight(id))
            } else if live.len() == credits {
                Err(Violation::TooManyRequests(credits))
            } else {
                Ok(())
            };
            let got = server.admit(id);
            prop_assert_eq!(got.map(|_| ()), want);
            if let Ok(s) = got {
                live.push(id);
                server.push_new(s).unwrap();
            }
            server.check();
            // Now and then the oldest is served and answered.
            if k % 3 == 2 {
                if let Some(Ready::New(s)) = server.next_ready() {
                    let id = server.deliver(s).unwrap();
                    server.release(server.reply_slot(id).unwrap()).unwrap();
                    live.retain(|&l| l != id);
                }
            }
        }
        // The client side: replies for ids that may or may not be in flight.
        let mut client = ClientLane::new(credits);
        let mut sent = Vec::new();
        while let Some(s) = client.acquire() {
            let id = client.next_id(s);
            client.sent(s, id, Instant::now()).unwrap();
            sent.push(id);
        }
        for r in replies {
            let id = (r << 16) | (r % credits as u64);
            let got = client.reply_arrived(id);
            if let Some(k) = sent.iter().position(|&x| x == id) {
                prop_assert_eq!(got, Ok((id & 0xffff) as usize));
                sent.swap_remove(k);
            } else {
                prop_assert_eq!(got, Err(ReplyViolation::NotInFlight(id)));
            }
            client.check();
        }
    }

    /// The send-queue ledger against a model of an RC send queue: work requests posted while
    /// there is room, some signaled, some holding a buffer; completions only for signaled
    /// ones, in posting order. Room and held buffers always match what is outstanding, and
    /// a completion for anything not outstanding is refused and changes nothing.
    #[test]
    fn the_send_queue_gives_back_every_entry_and_every_held_buffer(
        depth in 1usize..12,
        ops in prop::collection::vec((0u8..3, any::<bool>(), any::<bool>(), 0u64..64), 0..300),
    ) {
        let pool = Pool::new(&PoolConfig {
            classes: vec![ClassConfig { size: 4096, count: 16, reserve: 0, arena_slots: 16 }],
            wait_timeout: std::time::Duration::from_secs(1),
            stripes: 1,
        })
        .unwrap();
        let mut q = SendQueue::new(depth, 4);
        // Outstanding work requests: (sequence, signaled, holds a buffer).
        let mut outstanding: VecDeque<(u64, bool, bool)> = VecDeque::new();
        let mut posted = 0u64;
        for (op, signaled, hold, junk) in ops {
            match op {
                0 if q.room() > 0 => {
                    let seq = q.next_seq();
                    prop_assert_eq!(seq, posted);
                    posted += 1;
                    if hold {
                        q.hold(seq, Held::Buf(pool.get_control(4096).unwrap()));
                    }
                    outstanding.push_back((seq, signaled, hold));
                }
                1 => {
                    // The next signaled completion, retiring everything before it.
                    if let Some(k) = outstanding.iter().position(|w| w.1) {
                        let seq = outstanding[k].0;
                        prop_assert!(q.complete(seq).is_ok());
                        outstanding.drain(..=k);
                    }
                }
                _ => {
                    // A completion for something not outstanding (already retired, or not
                    // posted yet): refused.
                    let next = posted;
                    let oldest = outstanding.front().map_or(next, |w| w.0);
                    let seq = if junk % 2 == 0 || oldest <= junk / 2 {
                        next + junk / 2
                    } else {
                        oldest - 1 - junk / 2
                    };
                    let before = q.room();
                    prop_assert!(q.complete(seq).is_err());
                    prop_assert_eq!(q.room(), before);
                }
            }
            prop_assert_eq!(q.room(), depth - outstanding.len());
            prop_assert_eq!(q.idle(), outstanding.is_empty());
            let held = outstanding.iter().filter(|w| w.2).count();
            prop_assert_eq!(pool.stats().slots_in_use(), held);
        }
        // A last signaled work request retires the rest.
        if q.room() == 0 {
            let first = outstanding.front().map(|w| w.0);
            if let Some(k) = outstanding.iter().position(|w| w.1) {
                q.complete(outstanding[k].0).unwrap();
                outstanding.drain(..=k);
            } else if let Some(s) = first {
                // Every one unsignaled: the driver never lets that happen; retire by hand.
                q.complete(s + outstanding.len() as u64 - 1).unwrap();
                outstanding.clear();
            }
        }
        let last = q.next_seq();
        q.complete(last).unwrap();
        prop_assert!(q.idle());
        prop_assert_eq!(q.room(), depth);
        prop_assert_eq!(pool.stats().slots_in_use(), 0);
    }
}
