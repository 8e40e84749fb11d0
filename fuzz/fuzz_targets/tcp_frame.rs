//! The TCP transport's wire decoders (`zcio_tcp::wire`): the handshake (`Hello::decode`),
//! the frame prefix (`decode_prefix`) and whole frames (`decode_frame`), as both ends read
//! them from the peer.
//!
//! Input layout: `selector u8 | rest`. Selector bit 0 picks the frame kind expected
//! (0 = request, as a server reads; 1 = reply, as a client reads); bits 1..=2 pick the
//! limits the prefix is checked against (small, the config defaults, everything maximal,
//! everything zero). `rest` is decoded as a prefix and as a sequence of frames; if it opens
//! with a valid handshake, the frames after it are also decoded against the limits
//! negotiated from that handshake, as a connection does. Request headers found in frames
//! go through `zcio::proto::Req::decode`, like the server's. Property: no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcio::proto::Req;
use zcio::transport::Limits;
use zcio_tcp::wire::{decode_frame, decode_prefix, Hello, Kind, HELLO_LEN};

fn limits(preset: u8) -> Limits {
    let all = |n: usize| Limits {
        max_segments: n,
        max_payload: n,
        max_header: n,
        max_in_flight: n,
        inline_threshold: n,
        rdma_payload: false,
    };
    match preset & 3 {
        0 => Limits {
            max_segments: 256,
            max_payload: 1 << 20,
            max_header: 4096,
            max_in_flight: 64,
            inline_threshold: 0,
            rdma_payload: false,
        },
        1 => zcio::Config::default().limits,
        2 => all(usize::MAX),
        _ => all(0),
    }
}

/// Decodes frames back to back until one fails (at most 64, to keep each run short).
fn frames(mut b: &[u8], kind: Kind, l: &Limits) {
    for _ in 0..64 {
        match decode_frame(b, kind, l) {
            Ok((f, n)) => {
                if kind == Kind::Request {
                    let _ = Req::decode(f.header);
                }
                let _ = f.prefix.encode();
                b = &b[n..];
            }
            Err(e) => {
                let _ = e.clone().into_error("tcp frame").to_string();
                return;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let kind = if selector & 1 == 0 {
        Kind::Request
    } else {
        Kind::Reply
    };
    let l = limits(selector >> 1);
    if let Err(e) = decode_prefix(rest, kind, &l) {
        let _ = e.to_string();
    }
    frames(rest, kind, &l);
    match Hello::decode(rest) {
        Ok(theirs) => {
            let ours = Hello::from_limits(&l, l.max_in_flight);
            let negotiated = ours.negotiate(&theirs);
            frames(&rest[HELLO_LEN..], kind, &negotiated);
        }
        Err(e) => {
            let _ = e.into_error("tcp handshake").to_string();
        }
    }
});
