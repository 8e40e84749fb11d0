//! The conformance suite over real TCP sockets on 127.0.0.1.

zcio::conformance_tests!(Some(std::sync::Arc::new(zcio_tcp::TcpTransport)));
