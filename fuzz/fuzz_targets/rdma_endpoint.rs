//! The RDMA transport's bootstrap exchange (over TCP, before any verbs traffic), as each
//! side reads the peer's half: `zcio_rdma::verbs::Endpoint::decode` (the queue-pair
//! endpoint record) and `zcio_rdma::transport::bootstrap::Hello::decode` (the 64-byte
//! hello that carries it), expecting either role. Both compile without the `rdma` cargo
//! feature, so the target needs no cmake, libclang or sideway. Properties: no panic; what
//! decodes encodes to something that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcio_rdma::transport::bootstrap::{Hello, Role};
use zcio_rdma::verbs::Endpoint;

fuzz_target!(|data: &[u8]| {
    match Endpoint::decode(data) {
        Ok(ep) => {
            let _ = ep.to_string();
            assert_eq!(Endpoint::decode(&ep.encode()).ok(), Some(ep), "{ep}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    for role in [Role::Client, Role::Server] {
        match Hello::decode(data, role) {
            Ok(h) => assert_eq!(Hello::decode(&h.encode(), role), Ok(h)),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
