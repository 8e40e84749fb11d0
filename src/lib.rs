//! # zcio: zero-copy file I/O over TCP and RDMA verbs
//!
//! zcio moves file data between a client and a server with as few copies as each transport
//! allows. Both transports draw on one [`pool::Pool`] of pre-allocated, page-aligned buffers
//! whose arenas are registered with the RDMA NIC once, so the zero-copy calls hand the
//! application buffers that the NIC (or the socket) filled or drains directly.
//!
//! Layers, bottom up:
//! - [`pool`]: the registered iobuf pool (`IobufMut`, `Iobuf`, `Iobref`).
//! - [`transport`]: the contract every transport implements (headers plus payload segments,
//!   never file operations), the registry that maps config names to transports, and
//!   [`transport::mem`], an in-memory test double.
//! - [`config`]: the TOML configuration.
//!
//! `unsafe` lives only in the pool (and in `zcio-rdma`'s verbs layer), plus the raw-pointer
//! entry points the C library calls (`client/raw.rs`); every block carries a `// SAFETY:`
//! comment. The other modules forbid it (`unsafe_code`), and the client's own code denies it
//! outside `raw`.

pub mod client;
#[forbid(unsafe_code)]
pub mod error;
#[forbid(unsafe_code)]
pub mod limits;
pub mod pool;
#[forbid(unsafe_code)]
pub mod proto;
#[forbid(unsafe_code)]
pub mod server;

pub use error::{Error, Result};
pub use pool::{Iobref, Iobuf, IobufMut, Pool, PoolConfig};
#[forbid(unsafe_code)]
pub mod config;
#[forbid(unsafe_code)]
pub mod transport;

pub use client::{Client, Completion, File};
pub use config::Config;
pub use proto::{DirEntry, OpenFlags, Stat};
pub use server::{Server, ServerHandle};

#[cfg(feature = "testkit")]
#[forbid(unsafe_code)]
pub mod conformance;
#[cfg(feature = "testkit")]
#[forbid(unsafe_code)]
pub mod conformance_fs;

/// Locks `m`; a poisoned lock (a thread panicked while holding it) is taken over rather
/// than turned into another panic. For state whose critical sections leave it consistent
/// even when they panic (bookkeeping, no half-done updates); the transports use it too.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
