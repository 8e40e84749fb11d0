//! # zcio-rdma: the RDMA verbs transport of zcio
//!
//! - [`verbs`]: a small, safe, allocation-free wrapper over sideway and rdma-mummy-sys
//!   (devices, protection domains, memory regions, completion queues, RC queue pairs);
//! - [`config`]: the `[rdma]` configuration section, its keys, bounds and docs;
//! - [`devices`]: device discovery for `zcio devices`;
//! - [`transport`]: the `rdma` transport itself ([`transport::RdmaTransport`], with the
//!   `rdma` feature), and its pure wire codecs, which compile without it.
//!
//! Register it with [`register`]. Built without the cargo feature `rdma`, [`register`]
//! records `rdma` as a transport this binary lacks, with the way to get it.

// Without the `rdma` feature the verbs types and the transport are not built, so the
// module docs' links to them have no target; ci/test checks the docs with the feature too,
// where every link must resolve.
#![cfg_attr(not(feature = "rdma"), allow(rustdoc::broken_intra_doc_links))]

pub mod config;
pub mod devices;
pub mod error;
pub mod transport;
pub mod verbs;

pub use error::RdmaError;
#[cfg(feature = "rdma")]
pub use transport::RdmaTransport;

/// Registers the `rdma` transport in `registry` (with the `rdma` feature), or records that
/// this build lacks it and how to get it; either way registers the `[rdma]` configuration
/// section ([`config::register`]).
pub fn register(registry: &mut zcio::transport::Registry) {
    config::register();
    #[cfg(feature = "rdma")]
    registry.register(std::sync::Arc::new(transport::RdmaTransport::new()));
    #[cfg(not(feature = "rdma"))]
    registry.register_missing(
        "rdma",
        "this binary was built without RDMA support",
        "rebuild with `cargo build --release --features rdma` (needs cmake and libclang-dev)",
    );
}
