//! The request state machines of one queue pair (a *lane*), one per side, as plain data.
//!
//! A lane is a queue pair's worth of state: its slots (one per credit), the requests in
//! them, their ids and stages. These modules hold that state and the protocol checks on
//! it, and nothing else: no locks, no threads, no verbs, no `unsafe`, no allocation after
//! set-up. The drivers (`client.rs`, `server.rs`) keep them under their lane lock, feed
//! them what happened as events (a message arrived, a work request completed, the
//! connection failed) and carry out the actions they write into an [`Actions`] buffer
//! (post, complete, fail). So the protocol logic is tested
//! here, on any host, without a device; the drivers' tests need one.
//!
//! - [`server::ServerLane`]: which slot holds which request at which stage (queued,
//!   reading its payload, ready, handed out), the checks on a client's request ids and
//!   credits, and what `recv` does next.
//! - [`client::ClientLane`]: free slots (credits), the ids of requests in flight, which
//!   request SEND is signaled, and the checks on a server's replies.
//! - [`idle::IdleTimeout`]: when a server's connection counts as idle, over all of its
//!   queue pairs.
#![forbid(unsafe_code)]

use std::fmt;

pub mod client;
pub mod idle;
pub mod receives;
pub mod send_queue;
pub mod server;

#[cfg(test)]
mod props;

/// An action buffer was full: a driver bug (its capacity is fixed when the lane is made and
/// covers the most actions one event gives), reported as an error, never a panic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow {
    /// The buffer's capacity.
    pub capacity: usize,
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "internal: more than {} actions for one event of a request lane",
            self.capacity
        )
    }
}

/// A fixed-capacity list of actions, owned by the driver and filled by `handle`: made once
/// per lane, it never grows (a push past its capacity is [`Overflow`]).
#[derive(Debug)]
pub struct Actions<A> {
    items: Vec<A>,
}

impl<A: Copy> Actions<A> {
    /// Room for `capacity` actions, allocated here and only here.
    pub fn with_capacity(capacity: usize) -> Actions<A> {
        Actions {
            items: Vec::with_capacity(capacity),
        }
    }

    /// How many actions it takes.
    pub fn capacity(&self) -> usize {
        self.items.capacity()
    }

    /// Adds one, unless it is full.
    pub fn push(&mut self, a: A) -> Result<(), Overflow> {
        if self.items.len() == self.items.capacity() {
            return Err(Overflow {
                capacity: self.items.capacity(),
            });
        }
        self.items.push(a);
        Ok(())
    }

    /// The actions, in order.
    pub fn as_slice(&self) -> &[A] {
        &self.items
    }

    /// The `k`-th action.
    pub fn get(&self, k: usize) -> Option<A> {
        self.items.get(k).copied()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Empties it (keeping its room).
    pub fn clear(&mut self) {
        self.items.clear();
    }
}
