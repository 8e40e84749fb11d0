//! The core's client-server conformance suite (`zcio::conformance`) over RDMA: the real
//! client and server on 127.0.0.1, RC queue pairs on the first device with an active port,
//! once per `rdma.client_exposure` mode (`request::<case>`, `arena::<case>`).
//!
//! Every case needs an RDMA device, so every case is `#[ignore]`d: a host without one
//! reports them as ignored. `ci/rxe-test` runs them (`--include-ignored`) in a guest with
//! Soft-RoCE; run where there is no device, a case fails and says why.
#![cfg(feature = "rdma")]

use std::sync::Arc;

use zcio::config::Config;
use zcio::pool::Pool;
use zcio::transport::{ClientConn, Listener, Transport};
use zcio::Result;
use zcio_rdma::config::{ClientExposure, RdmaConfig};
use zcio_rdma::RdmaTransport;

/// The RDMA transport with its clients in one exposure mode, whatever the suite's
/// configurations say.
#[derive(Debug)]
struct WithExposure {
    inner: RdmaTransport,
    mode: ClientExposure,
}

impl Transport for WithExposure {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn check_available(&self, cfg: &Config) -> Result<()> {
        self.inner.check_available(cfg)
    }

    fn connect(&self, cfg: &Config, pool: &Pool) -> Result<Box<dyn ClientConn>> {
        let mut cfg = cfg.clone();
        RdmaConfig::of_mut(&mut cfg).client_exposure = self.mode;
        self.inner.connect(&cfg, pool)
    }

    fn listen(&self, cfg: &Config, pool: &Pool) -> Result<Box<dyn Listener>> {
        self.inner.listen(cfg, pool)
    }
}

fn rdma_factory(mode: ClientExposure) -> Option<Arc<dyn Transport>> {
    let t = WithExposure {
        inner: RdmaTransport::new(),
        mode,
    };
    match t.check_available(&Config::default()) {
        Ok(()) => Some(Arc::new(t)),
        Err(e) => panic!("no RDMA device: {e}"),
    }
}

mod request {
    use super::*;

    zcio::conformance_tests!(
        rdma_factory(ClientExposure::Request),
        #[ignore = "needs an RDMA device: ci/rxe-test runs it"]
    );
}

mod arena {
    use super::*;

    zcio::conformance_tests!(
        rdma_factory(ClientExposure::Arena),
        #[ignore = "needs an RDMA device: ci/rxe-test runs it"]
    );
}
