//! The RDMA transport's messages (`zcio_rdma::transport::msg`), which arrive by SEND into
//! posted receive buffers: `decode_request` (as the server reads them, including the
//! client's memory descriptors) and `decode_reply` (as the client reads them). Compiles
//! without the `rdma` cargo feature. Property: no panic.
//!
//! Input layout: `selector u8 | message`. The selector's low two bits pick the limits the
//! message is checked against: typical, the largest a bootstrap hello can announce,
//! everything maximal, everything zero.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcio_rdma::transport::msg::{decode_reply, decode_request, MsgLimits};

fn limits(selector: u8) -> MsgLimits {
    let all = |n: usize| MsgLimits {
        max_header: n,
        max_segments: n,
        max_payload: n,
        inline_threshold: n,
    };
    match selector & 3 {
        0 => MsgLimits {
            max_header: 4096,
            max_segments: 256,
            max_payload: 1 << 20,
            inline_threshold: 128,
        },
        1 => MsgLimits {
            max_header: u16::MAX as usize,
            max_segments: u16::MAX as usize,
            max_payload: 1 << 30,
            inline_threshold: 65536,
        },
        2 => all(usize::MAX),
        _ => all(0),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, msg)) = data.split_first() else {
        return;
    };
    let l = limits(selector);
    match decode_request(msg, &l) {
        Ok(v) => {
            for d in v.send_descs().chain(v.recv_descs()) {
                std::hint::black_box(d);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Err(e) = decode_reply(msg, &l) {
        let _ = e.to_string();
    }
});
