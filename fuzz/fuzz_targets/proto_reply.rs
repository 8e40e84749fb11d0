//! Reply decoding as a client does it: `zcio::proto::decode_reply` (whose shape depends on
//! the request it answers), `zcio::proto::decode_dirents` (a listing payload) and
//! `zcio::proto::decode_dir_entries` and `decode_dir_plus_entries` (directory stream payloads).
//!
//! Input layout: `op selector u8 | rest`. The selector picks one representative request
//! per op (`selector % 30`: the 13 first ops, then the mount's 17); `rest` is the reply
//! header. For the listing decoders, `rest`
//! is read as `count u32 LE | entries`, so a huge count against a short payload is tried
//! too (it must be refused before anything is allocated for it; run with
//! `-malloc_limit_mb` so an unbounded allocation is a finding).
//! Property: no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcio::proto::{
    decode_dir_entries, decode_dir_plus_entries, decode_dirents, decode_reply, OpenFlags, Req,
    SetattrReq, MAC_LEN, NONCE_LEN,
};

/// One request of each op, in op order (1 = hello ... 13 = mkdir, 20 = getattr ... 36 =
/// releasedir).
fn request(selector: u8) -> Req {
    match selector % 30 {
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
        12 => Req::Mkdir {
            path: "new".into(),
            mode: 0o755,
        },
        13 => Req::Getattr {
            path: "f".into(),
            follow: false,
        },
        14 => Req::Fgetattr { fh: 1 },
        15 => Req::Setattr(SetattrReq {
            path: "f".into(),
            valid: SetattrReq::SET_MODE,
            mode: 0o600,
            ..Default::default()
        }),
        16 => Req::Rename {
            from: "a".into(),
            to: "b".into(),
            flags: 0,
        },
        17 => Req::Rmdir { path: "d".into() },
        18 => Req::Symlink {
            target: "t".into(),
            path: "l".into(),
        },
        19 => Req::Readlink { path: "l".into() },
        20 => Req::Link {
            from: "a".into(),
            to: "b".into(),
        },
        21 => Req::Statfs,
        22 => Req::Fallocate {
            fh: 1,
            mode: 0,
            offset: 0,
            len: 4096,
        },
        23 => Req::Setxattr {
            path: "f".into(),
            name: "user.a".into(),
            flags: 0,
        },
        24 => Req::Getxattr {
            path: "f".into(),
            name: "user.a".into(),
        },
        25 => Req::Listxattr { path: "f".into() },
        26 => Req::Removexattr {
            path: "f".into(),
            name: "user.a".into(),
        },
        27 => Req::Opendir { path: "d".into() },
        28 => Req::Readdir { dh: 1, cookie: 0 },
        29 => Req::Releasedir { dh: 1 },
        _ => Req::Readdirplus { dh: 1, cookie: 0 },
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
        let _ = decode_dir_entries(&rest[4..], count);
        let _ = decode_dir_plus_entries(&rest[4..], count);
    }
});
