//! zcio-rdma (work in progress).
