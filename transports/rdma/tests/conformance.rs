//! The core's client-server conformance suite (`zcio::conformance`) over RDMA: the real
//! client and server on 127.0.0.1, RC queue pairs on the first device with an active port.
//!
//! Every case needs an RDMA device, so every case is `#[ignore]`d: a host without one
//! reports them as ignored. `ci/rxe-test` runs them (`--include-ignored`) in a guest with
//! Soft-RoCE; run where there is no device, a case fails and says why.
#![cfg(feature = "rdma")]

use std::sync::Arc;

use zcio::config::Config;
use zcio::transport::Transport;
use zcio_rdma::RdmaTransport;

fn rdma_factory() -> Option<Arc<dyn Transport>> {
    let t = RdmaTransport::new();
    match t.check_available(&Config::default()) {
        Ok(()) => Some(Arc::new(t)),
        Err(e) => panic!("no RDMA device: {e}"),
    }
}

zcio::conformance_tests!(
    rdma_factory(),
    #[ignore = "needs an RDMA device: ci/rxe-test runs it"]
);
