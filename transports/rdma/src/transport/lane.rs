//! The request state machines of one queue pair (a *lane*), one per side, as plain data.
//!
//! A lane is a queue pair's worth of state: its slots (one per credit), the requests in
//! them, their ids and stages. These modules hold that state and the protocol checks on
//! it, and nothing else: no locks, no threads, no verbs, no `unsafe`, no allocation after
//! set-up. The drivers (`client.rs`, `server.rs`) keep them under their lane lock, feed
//! them what happened (a message arrived, a work request completed, the connection failed)
//! and carry out what they answer (post, complete, fail). So the protocol logic is tested
//! here, on any host, without a device; the drivers' tests need one.
//!
//! - [`server::ServerLane`]: which slot holds which request at which stage (queued,
//!   reading its payload, ready, handed out), the checks on a client's request ids and
//!   credits, and what `recv` does next.
//! - [`client::ClientLane`]: free slots (credits), the ids of requests in flight, which
//!   request SEND is signaled, and the checks on a server's replies.
#![forbid(unsafe_code)]

pub mod client;
pub mod receives;
pub mod send_queue;
pub mod server;

#[cfg(test)]
mod props;
