//! zcio-rdma (work in progress).

pub mod devices;
pub mod error;
pub mod verbs;

pub use error::RdmaError;
