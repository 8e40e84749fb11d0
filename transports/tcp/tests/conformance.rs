//! The core's client-server conformance suite (`zcio::conformance`) over TCP: the real
//! client and server, on 127.0.0.1, through this transport.

zcio::conformance_tests!(Some(std::sync::Arc::new(zcio_tcp::TcpTransport)));
zcio::fs_conformance_tests!(Some(std::sync::Arc::new(zcio_tcp::TcpTransport)));
