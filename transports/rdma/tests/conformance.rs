//! The core's client-server conformance suite (`zcio::conformance`) over RDMA: the real
//! client and server on 127.0.0.1, RC queue pairs on the first device with an active port.
//!
//! Without a device each case prints `SKIP <case>: no RDMA device (<reason>)` and passes,
//! unless `ZCIO_RDMA_REQUIRED=1` (set by `ci/rxe-test`), which makes it a failure.
#![cfg(feature = "rdma")]

use std::sync::Arc;

use zcio::config::Config;
use zcio::transport::Transport;
use zcio_rdma::RdmaTransport;

fn rdma_factory() -> Option<Arc<dyn Transport>> {
    let name = std::thread::current()
        .name()
        .unwrap_or("conformance")
        .to_string();
    let t = RdmaTransport::new();
    match t.check_available(&Config::default()) {
        Ok(()) => Some(Arc::new(t)),
        Err(e) if std::env::var("ZCIO_RDMA_REQUIRED").is_ok_and(|v| v == "1") => {
            panic!("{name}: ZCIO_RDMA_REQUIRED=1 but no RDMA device: {e}")
        }
        Err(e) => {
            println!("SKIP {name}: no RDMA device ({e})");
            None
        }
    }
}

zcio::conformance_tests!(rdma_factory());
