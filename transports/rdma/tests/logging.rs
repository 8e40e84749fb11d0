//! Request-id logging over RDMA: with debug logging on, one request can be followed from
//! the client through the transport to the server. The client logs `rdma request` with its
//! id; the server's transport logs `rdma request received` with the same id as `wire_id`
//! and the id the core serves it under (the queue pair's index in the top byte) as `id`;
//! the core's `request` span carries that `id`, and the reply is logged on both sides.
//!
//! Its own test binary with one test, because the subscriber is process-wide. It needs a
//! device, so it is `#[ignore]`d: `ci/rxe-test` runs it in the Soft-RoCE guest.
#![cfg(feature = "rdma")]

use std::io::Write;
use std::sync::{Arc, Mutex};

use zcio::conformance::{pattern, Harness};
use zcio::proto::OpenFlags;
use zcio_rdma::config::RdmaConfig;
use zcio_rdma::RdmaTransport;

/// Where the subscriber writes: every line, kept for the test to read.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The value of ` key=` in `line` (the first one), as a number.
fn field(line: &str, key: &str) -> Option<u64> {
    let pat = format!(" {key}=");
    let at = line.find(&pat)? + pat.len();
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
#[ignore = "needs an RDMA device: ci/rxe-test runs it"]
fn a_request_is_followed_by_its_id_from_client_to_server_at_debug_level() {
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("zcio=debug,zcio_rdma=debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    let t = RdmaTransport::default();
    let device = std::env::var("ZCIO_RDMA_DEVICE")
        .ok()
        .filter(|n| !n.is_empty());
    let h = Harness::start(Arc::new(t), |c| RdmaConfig::of_mut(c).device = device);
    {
        let c = h.client();
        let f = c
            .open("logged", OpenFlags::rw() | OpenFlags::CREATE)
            .unwrap();
        let want = pattern(9, 64 << 10);
        assert_eq!(f.pwrite(&want, 0).unwrap(), want.len());
        let mut got = vec![0u8; want.len()];
        assert_eq!(f.pread(&mut got, 0).unwrap(), want.len());
        assert!(got == want, "read back other bytes");
        f.close().unwrap();
    }
    drop(h);

    let log =
        String::from_utf8_lossy(&sink.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    let lines: Vec<&str> = log.lines().collect();
    let sent: Vec<u64> = lines
        .iter()
        .filter(|l| l.contains("rdma request") && !l.contains("rdma request received"))
        .filter_map(|l| field(l, "id"))
        .collect();
    // Hello, open, write, read, close at least.
    assert!(sent.len() >= 4, "client requests logged: {sent:?}\n{log}");
    for wire in sent {
        let received = lines
            .iter()
            .find(|l| l.contains("rdma request received") && field(l, "wire_id") == Some(wire))
            .unwrap_or_else(|| panic!("request {wire} not logged by the server\n{log}"));
        let id = field(received, "id").expect("the server's id");
        assert_eq!(id & ((1 << 56) - 1), wire, "{received}");
        // The core serves it in a span with that id, and the reply is logged both ends.
        assert!(
            lines
                .iter()
                .any(|l| l.contains("request{") && field(l, "id") == Some(id)),
            "no core span for request {id}\n{log}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("rdma reply posted") && field(l, "id") == Some(id)),
            "no reply logged for request {id}\n{log}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("rdma reply arrived") && field(l, "id") == Some(wire)),
            "no reply arrival logged for request {wire}\n{log}"
        );
    }
}
