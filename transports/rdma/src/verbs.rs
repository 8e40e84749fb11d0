//! The verbs layer: a small, safe wrapper over sideway and rdma-mummy-sys for what the RDMA
//! transport needs, in the spirit of `jonhoo/rust-ibverbs`.
//!
//! - [`Context`] (an open device), [`ProtectionDomain`], [`MemoryRegion`] (caller-provided
//!   memory, registered with [`MrAccess::LocalWrite`] or [`MrAccess::RemoteReadWrite`]).
//! - [`CompletionQueue`]: a basic CQ (not the extended one, which is broken on rxe with
//!   rdma-core 44), optionally with a completion channel so waiting blocks instead of
//!   spinning ([`CqMode`]). Polling fills a caller-provided array of [`WorkCompletion`]s.
//! - [`MemoryWindow`]: a type 2 window, bound over part of a region by
//!   [`QueuePair::post_bind`] and invalidated by [`QueuePair::post_invalidate`]: how a client
//!   exposes exactly one request's buffers to the server, and only while it is in flight.
//! - [`QueuePair`]: an RC queue pair; [`Endpoint`] is what the peer needs to connect to it,
//!   with a fixed binary encoding for the TCP bootstrap exchange.
//!
//! Every handle keeps its parents alive through reference counts (a queue pair keeps its PD,
//! CQs and device open; a memory region keeps its PD), so dropping in any order is sound.
//!
//! The data path (posting SEND / RDMA WRITE / RDMA READ / RECV, polling, waiting) makes no
//! heap allocation: work requests, scatter/gather lists and work completions live on the
//! stack and go straight to `ibv_post_send`, `ibv_post_recv` and `ibv_poll_cq` through the
//! raw pointers sideway exposes (sideway's own post/poll helpers allocate per call).
//!
//! [`Endpoint`], [`Mtu`], [`QpState`] and the memlock check need no RDMA library and compile
//! without the cargo feature `rdma`; everything else needs it.

pub mod endpoint;
pub mod memlock;
pub mod types;

#[cfg(feature = "rdma")]
pub(crate) mod context;
#[cfg(feature = "rdma")]
mod cq;
#[cfg(feature = "rdma")]
mod qp;
#[cfg(feature = "rdma")]
mod registrar;
#[cfg(feature = "rdma")]
mod segment;
#[cfg(feature = "rdma")]
mod window;

pub use endpoint::Endpoint;
pub use memlock::{check_memlock, has_ipc_lock_capability, memlock_limit};
pub use types::{Mtu, QpState};

#[cfg(feature = "rdma")]
pub use context::{Context, DeviceCaps, MemoryRegion, MrAccess, ProtectionDomain};
#[cfg(feature = "rdma")]
pub(crate) use cq::{is_ready, poll_fds, poll_timeout_ms};
#[cfg(feature = "rdma")]
pub use cq::{CompletionQueue, CqMode, WcOpcode, WcStatus, WorkCompletion};
#[cfg(feature = "rdma")]
pub use qp::{QpCaps, QpConfig, QueuePair, Remote, Sge, RNR_RETRY};
#[cfg(feature = "rdma")]
pub(crate) use registrar::ArenaRegistrar;
#[cfg(feature = "rdma")]
pub(crate) use segment::{RegisteredRecv, RegisteredSend};
#[cfg(feature = "rdma")]
pub use window::{MemoryWindow, WindowAccess};
