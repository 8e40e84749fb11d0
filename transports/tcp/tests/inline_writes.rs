//! Writes to buffered files through the real server over TCP: served on the connection's
//! receiving thread at any depth (no hand-off to a worker), their replies held and sent
//! together, within the connection's payload budget, and the file holds exactly the bytes
//! sent.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use common::pattern;
use zcio::conformance::Harness;
use zcio::OpenFlags;
use zcio_tcp::TcpTransport;

#[test]
fn buffered_writes_at_depth_are_served_on_the_receiving_thread() {
    const BS: usize = 128 << 10;
    const N: usize = 32;
    // A budget of two payloads: the receiving thread must wait for it (with replies held)
    // whenever the workers' or its own writes are not given back yet.
    let h = Harness::start(Arc::new(TcpTransport), |c| {
        c.server.max_payload_in_flight = 2 * BS
    });
    let data = pattern(21, N * BS);
    let c = h.client();
    let stats = h.server.stats();
    let f = c
        .open("w", OpenFlags::WRITE | OpenFlags::CREATE)
        .expect("open");
    let before = stats.served_inline.load(Relaxed);
    for round in 0..2 {
        // All in flight at once: the server sees them queued behind each other.
        let writes: Vec<_> = data
            .chunks(BS)
            .enumerate()
            .map(|(k, d)| {
                f.pwritev_async(vec![d.to_vec()], (k * BS) as u64)
                    .expect("start")
            })
            .collect();
        for (k, w) in writes.into_iter().enumerate() {
            assert_eq!(w.wait().expect("write").0, BS, "round {round} write {k}");
        }
    }
    assert_eq!(
        stats.served_inline.load(Relaxed) - before,
        2 * N as u64,
        "every write was served on the receiving thread"
    );
    assert_eq!(stats.writes.load(Relaxed), 2 * N as u64);
    let got = std::fs::read(h.path("w")).expect("read back");
    assert!(got == data, "the file holds other bytes than were sent");
    // A write the usual path refuses is still refused (a file opened read-only).
    let ro = c.open("w", OpenFlags::READ).expect("open");
    match ro.pwrite(b"no", 0) {
        Err(zcio::Error::Remote { code, .. }) => assert_eq!(code, libc::EBADF as u32),
        other => panic!("a write to a read-only file: {other:?}"),
    }
    assert_eq!(stats.writes.load(Relaxed), 2 * N as u64);
    drop((f, ro, c));
    h.assert_server_clean();
}
