//! Reply decoding as a client does it: `zcio::proto::decode_reply` (whose shape depends on
//! the request it answers) and `zcio::proto::decode_dirents` (a listing payload).
//!
//! Input layout: `op selector u8 | rest`. The selector picks one representative request
//! per op (`selector % 13`); `rest` is the reply header. For the listing decoder, `rest`
//! is read as `count u32 LE | entries`, so a huge count against a short payload is tried
//! too (it must be refused before anything is allocated for it; run with
//! `-malloc_limit_mb` so an unbounded allocation is a finding).
//! Property: no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcio::proto::{decode_dirents, decode_reply, OpenFlags, Req, MAC_LEN, NONCE_LEN};

/// One request of each op, in op order (1 = hello ... 13 = mkdir).
fn request(selector: u8) -> Req {
    match selector % 13 {
        0 => Req::Hello {
            version: zcio::proto::VERSION,
            client_nonce: [7; NONCE_LEN],
        },
        1 => Req::Auth { mac: [9; MAC_LEN] },
        2 => Req::Open {
            path: "dir/file".into(),
            flags: OpenFlags::rw() | OpenFlags::CREATE,
            mode: 0o644,
        },
        3 => Req::Read {
            fh: 1,
            offset: 4096,
            len: 65536,
        },
        4 => Req::Write { fh: 1, offset: 0 },
        5 => Req::Fsync {
            fh: 1,
            datasync: true,
        },
        6 => Req::Stat { path: ".".into() },
        7 => Req::Fstat { fh: 2 },
        8 => Req::Truncate { fh: 2, len: 100 },
        9 => Req::Close { fh: 2 },
        10 => Req::Unlink { path: "old".into() },
        11 => Req::List {
            path: "dir".into(),
            cookie: 0,
        },
        _ => Req::Mkdir {
            path: "new".into(),
            mode: 0o755,
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let req = request(selector);
    if let Err(e) = decode_reply(&req, rest) {
        let _ = e.to_string();
    }
    if rest.len() >= 4 {
        let count = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let _ = decode_dirents(&rest[4..], count);
    }
});
