//! The conformance suite over the in-memory test double: checks the client, the server and
//! the suite itself without sockets. The real transports run the same suite in their crates.
#![cfg(feature = "testkit")]

zcio::conformance_tests!(Some(zcio::transport::mem::MemTransport::new()));
zcio::fs_conformance_tests!(Some(zcio::transport::mem::MemTransport::new()));
