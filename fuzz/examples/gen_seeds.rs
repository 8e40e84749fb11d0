//! Writes the seed corpora under `fuzz/corpus/<target>/seed-*` with the real encoders, so
//! the seeds stay valid encodings when the formats change. Run from `fuzz/`:
//!
//! ```text
//! cargo run --example gen_seeds
//! ```
//!
//! It rewrites only the binary targets' seeds (`proto_request`, `proto_reply`, `tcp_frame`,
//! `rdma_endpoint`, `rdma_msg`); the `config` seeds are hand-written TOML files, which it checks still
//! parse (each `seed-*` file: TOML, then optional NUL-separated overrides).

use std::net::Ipv6Addr;
use std::path::Path;

use zcio::proto::{
    encode_dir_entry, encode_dir_plus_entry, encode_dirent, encode_err, encode_ok, Attr, DirEntry,
    DirPlusEntry, DirStreamEntry, HelloReply, OpenFlags, Req, Resp, SetattrReq, Stat, StatfsReply,
    MAC_LEN, NONCE_LEN, VERSION,
};
use zcio::transport::Limits;
use zcio_rdma::transport::bootstrap::{Hello as BootHello, Role};
use zcio_rdma::transport::msg::{self, Desc, RequestHead};
use zcio_rdma::verbs::{Endpoint, Mtu};
use zcio_tcp::wire::{Hello, Kind, Prefix};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

/// One request of each op, in op order; the same list as `proto_reply`'s selector.
fn requests() -> Vec<Req> {
    vec![
        Req::Hello {
            version: VERSION,
            client_nonce: [7; NONCE_LEN],
        },
        Req::Auth { mac: [9; MAC_LEN] },
        Req::Open {
            path: "dir/file".into(),
            flags: OpenFlags::rw() | OpenFlags::CREATE,
            mode: 0o644,
        },
        Req::Read {
            fh: 1,
            offset: 4096,
            len: 65536,
        },
        Req::Write { fh: 1, offset: 0 },
        Req::Fsync {
            fh: 1,
            datasync: true,
        },
        Req::Stat { path: ".".into() },
        Req::Fstat { fh: 2 },
        Req::Truncate { fh: 2, len: 100 },
        Req::Close { fh: 2 },
        Req::Unlink { path: "old".into() },
        Req::List {
            path: "dir".into(),
            cookie: 0,
        },
        Req::Mkdir {
            path: "new".into(),
            mode: 0o755,
        },
    ]
}

/// The success reply to each of `requests()`.
fn replies() -> Vec<Resp> {
    let stat = Resp::Stat(Stat {
        size: 4096,
        mode: 0o100644,
        mtime_ns: 1_700_000_000_000_000_000,
    });
    vec![
        Resp::Hello(HelloReply {
            version: VERSION,
            server_nonce: [3; NONCE_LEN],
            auth_required: true,
            read_only: false,
            max_segments: 256,
            max_payload: 1 << 20,
            max_in_flight: 64,
        }),
        Resp::Auth { mac: [5; MAC_LEN] },
        Resp::Open { fh: 1, size: 4096 },
        Resp::Read {
            len: 65536,
            eof: false,
        },
        Resp::Write { written: 4096 },
        Resp::Ok,
        stat.clone(),
        stat,
        Resp::Ok,
        Resp::Ok,
        Resp::Ok,
        Resp::List {
            count: 2,
            next_cookie: 2,
            done: true,
        },
        Resp::Ok,
    ]
}

/// The mount's ops, in `proto_reply`'s selector order from 13, with a success reply each.
fn fs_ops() -> Vec<(Req, Resp)> {
    let attr = Resp::Attr(Attr {
        ino: 77,
        mode: 0o100644,
        nlink: 1,
        uid: 1000,
        gid: 1000,
        rdev: 0,
        blksize: 4096,
        size: 4096,
        blocks: 8,
        atime_ns: 1_700_000_000_000_000_001,
        mtime_ns: 1_700_000_000_000_000_002,
        ctime_ns: 1_700_000_000_000_000_003,
    });
    let path = |p: &str| p.to_string();
    vec![
        (
            Req::Getattr {
                path: path("f"),
                follow: false,
            },
            attr.clone(),
        ),
        (Req::Fgetattr { fh: 1 }, attr.clone()),
        (
            Req::Setattr(SetattrReq {
                path: path("f"),
                valid: SetattrReq::SET_MODE | SetattrReq::SET_MTIME_NOW,
                mode: 0o600,
                ..Default::default()
            }),
            attr,
        ),
        (
            Req::Rename {
                from: path("a"),
                to: path("b"),
                flags: 1,
            },
            Resp::Ok,
        ),
        (Req::Rmdir { path: path("d") }, Resp::Ok),
        (
            Req::Symlink {
                target: path("../t"),
                path: path("l"),
            },
            Resp::Ok,
        ),
        (
            Req::Readlink { path: path("l") },
            Resp::Target(path("../t")),
        ),
        (
            Req::Link {
                from: path("a"),
                to: path("b"),
            },
            Resp::Ok,
        ),
        (
            Req::Statfs,
            Resp::Statfs(StatfsReply {
                blocks: 1 << 20,
                bfree: 1 << 19,
                bavail: 1 << 19,
                files: 1 << 16,
                ffree: 1 << 15,
                bsize: 4096,
                namelen: 255,
                frsize: 4096,
            }),
        ),
        (
            Req::Fallocate {
                fh: 1,
                mode: 0,
                offset: 0,
                len: 4096,
            },
            Resp::Ok,
        ),
        (
            Req::Setxattr {
                path: path("f"),
                name: path("user.a"),
                flags: 0,
            },
            Resp::Ok,
        ),
        (
            Req::Getxattr {
                path: path("f"),
                name: path("user.a"),
            },
            Resp::Xattr { len: 5, fits: true },
        ),
        (
            Req::Listxattr { path: path("f") },
            Resp::Xattr {
                len: 70_000,
                fits: false,
            },
        ),
        (
            Req::Removexattr {
                path: path("f"),
                name: path("user.a"),
            },
            Resp::Ok,
        ),
        (
            Req::Opendir { path: path("d") },
            Resp::Open { fh: 2, size: 0 },
        ),
        (
            Req::Readdir { dh: 2, cookie: 0 },
            Resp::List {
                count: 2,
                next_cookie: 2,
                done: true,
            },
        ),
        (Req::Releasedir { dh: 2 }, Resp::Ok),
        (
            Req::Readdirplus { dh: 2, cookie: 0 },
            Resp::List {
                count: 2,
                next_cookie: 2,
                done: true,
            },
        ),
    ]
}

fn main() {
    // The transports' own sections, as the config fuzz target registers them, so the
    // config seeds with `[tcp]` or `[rdma]` parse.
    zcio_tcp::config::register();
    zcio_rdma::config::register();
    let reqs = requests();
    for r in &reqs {
        write("proto_request", r.name(), &r.encode());
    }

    for (op, (req, resp)) in reqs.iter().zip(replies()).enumerate() {
        let mut b = vec![op as u8];
        b.extend(encode_ok(&resp));
        write("proto_reply", &format!("{}-ok", req.name()), &b);
    }
    let mut b = vec![2u8]; // open
    b.extend(encode_err(2, "No such file or directory"));
    write("proto_reply", "open-err", &b);
    // A listing payload: selector (list), count, entries.
    let mut b = vec![11u8];
    b.extend(3u32.to_le_bytes());
    for (name, size, is_dir) in [
        ("a.txt", 12, false),
        ("sub", 0, true),
        ("é", 1 << 40, false),
    ] {
        encode_dirent(
            &mut b,
            &DirEntry {
                name: name.into(),
                size,
                is_dir,
            },
        );
    }
    write("proto_reply", "dirents", &b);

    // The mount's ops (selectors 13.. in proto_reply), requests and success replies.
    for (i, (req, resp)) in fs_ops().into_iter().enumerate() {
        write("proto_request", req.name(), &req.encode());
        let mut b = vec![13 + i as u8];
        b.extend(encode_ok(&resp));
        write("proto_reply", &format!("{}-ok", req.name()), &b);
    }
    // A directory stream payload: selector (readdir), count, entries.
    let mut b = vec![28u8];
    b.extend(2u32.to_le_bytes());
    for (ino, kind, name) in [(12u64, 8u8, "a.txt"), (13, 4, "sub")] {
        encode_dir_entry(
            &mut b,
            &DirStreamEntry {
                ino,
                kind,
                name: name.into(),
            },
        );
    }
    write("proto_reply", "dir-entries", &b);
    // A readdirplus payload: selector (readdirplus), count, one entry with attributes and
    // one without.
    let mut b = vec![30u8];
    b.extend(2u32.to_le_bytes());
    for (ino, kind, name, attr) in [
        (
            12u64,
            8u8,
            "a.txt",
            Some(Attr {
                ino: 12,
                mode: 0o100644,
                nlink: 1,
                size: 5,
                ..Attr::default()
            }),
        ),
        (13, 4, "sub", None),
    ] {
        encode_dir_plus_entry(
            &mut b,
            &DirPlusEntry {
                entry: DirStreamEntry {
                    ino,
                    kind,
                    name: name.into(),
                },
                attr,
            },
        );
    }
    write("proto_reply", "dir-plus-entries", &b);

    // tcp_frame: selector (bit 0: 0 = request, 1 = reply; bits 1..=2: limits preset), then
    // a handshake and/or frames.
    let limits = Limits {
        max_segments: 256,
        max_payload: 1 << 20,
        max_header: 4096,
        max_in_flight: 64,
        inline_threshold: 0,
        rdma_payload: false,
    };
    let hello = Hello::from_limits(&limits, 64).encode();
    write("tcp_frame", "hello", &[&[0u8][..], &hello].concat());
    let read = Req::Read {
        fh: 1,
        offset: 0,
        len: 8,
    }
    .encode();
    let write_req = Req::Write { fh: 1, offset: 8 }.encode();
    let mut conn = vec![0u8];
    conn.extend_from_slice(&hello);
    conn.extend(frame(Kind::Request, 1, &read, b"", 8));
    conn.extend(frame(Kind::Request, 2, &write_req, b"payload!", 0));
    write("tcp_frame", "hello-then-requests", &conn);
    let mut b = vec![2u8]; // request, config-default limits
    b.extend(frame(
        Kind::Request,
        7,
        &Req::Close { fh: 1 }.encode(),
        b"",
        0,
    ));
    write("tcp_frame", "request", &b);
    let mut b = vec![1u8]; // reply, small limits
    b.extend(frame(
        Kind::Reply,
        1,
        &encode_ok(&Resp::Read { len: 8, eof: true }),
        b"contents",
        0,
    ));
    write("tcp_frame", "reply", &b);

    let rxe = Endpoint {
        qpn: 0x11,
        psn: 0x00ab_cdef,
        lid: 0,
        port: 1,
        gid_index: 1,
        gid: Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0x7f00, 1]),
        mtu: Mtu::Mtu1024,
    };
    write("rdma_endpoint", "rxe", &rxe.encode());
    let ib = Endpoint {
        qpn: 0x00ff_ffff,
        psn: 0,
        lid: 0x1234,
        port: 2,
        gid_index: 0,
        gid: Ipv6Addr::from([0xfe80, 0, 0, 0, 0x0202, 0xc9ff, 0xfe00, 0x0001]),
        mtu: Mtu::Mtu4096,
    };
    write("rdma_endpoint", "ib", &ib.encode());

    // The bootstrap hello that carries the endpoint, from each side.
    for (role, name) in [
        (Role::Client, "hello-client"),
        (Role::Server, "hello-server"),
    ] {
        let h = BootHello {
            role,
            queue_pairs: 2,
            endpoint: rxe,
            credits: 32,
            max_segments: 256,
            max_payload: 1 << 20,
            max_header: 4096,
            inline_threshold: 128,
            recv_size: 16384,
        };
        write("rdma_endpoint", name, &h.encode());
    }

    // rdma_msg: selector (limits preset 0: 4K header, 256 segments, 1M payload, 128 inline),
    // then one message.
    let desc = |addr: u64, len: u32| Desc {
        addr,
        rkey: 0xabcd,
        len,
    };
    let rdma_request =
        |head: RequestHead, header: &[u8], send: &[Desc], recv: &[Desc], inline: &[u8]| {
            let mut out =
                vec![0u8; 1 + msg::request_len(header.len(), send.len(), recv.len(), inline.len())];
            let at = msg::encode_request(&mut out[1..], &head, header, send, recv).unwrap();
            out[1 + at..].copy_from_slice(inline);
            out
        };
    let read_hdr = Req::Read {
        fh: 1,
        offset: 0,
        len: 65536,
    }
    .encode();
    write(
        "rdma_msg",
        "request-descs",
        &rdma_request(
            RequestHead {
                id: 77,
                inline_len: 0,
                recv_cap: 65536,
                send_total: 4106,
            },
            &write_req,
            &[desc(0x1000, 4096), desc(0x9000, 10)],
            &[desc(0x20000, 65536)],
            b"",
        ),
    );
    write(
        "rdma_msg",
        "request-inline",
        &rdma_request(
            RequestHead {
                id: 1,
                inline_len: 5,
                recv_cap: 100,
                send_total: 5,
            },
            &read_hdr,
            &[],
            &[],
            b"hello",
        ),
    );
    let rdma_reply = |id: u64, header: &[u8], payload: &[u8], inline: bool| {
        let mut out =
            vec![0u8; 1 + msg::reply_len(header.len(), if inline { payload.len() } else { 0 })];
        let at = msg::encode_reply(&mut out[1..], id, header, payload.len(), inline).unwrap();
        if inline {
            out[1 + at..].copy_from_slice(payload);
        }
        out
    };
    let read_ok = encode_ok(&Resp::Read { len: 8, eof: true });
    write(
        "rdma_msg",
        "reply-inline",
        &rdma_reply(1, &read_ok, b"contents", true),
    );
    write(
        "rdma_msg",
        "reply-written",
        &rdma_reply(77, &read_ok, b"contents", false),
    );

    // The RDMA seeds decode (under the limits preset 0 that their selector byte picks).
    let l = msg::MsgLimits {
        max_header: 4096,
        max_segments: 256,
        max_payload: 1 << 20,
        inline_threshold: 128,
    };
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for name in ["request-descs", "request-inline"] {
        let b = std::fs::read(corpus.join(format!("rdma_msg/seed-{name}"))).unwrap();
        msg::decode_request(&b[1..], &l).unwrap();
    }
    for name in ["reply-inline", "reply-written"] {
        let b = std::fs::read(corpus.join(format!("rdma_msg/seed-{name}"))).unwrap();
        msg::decode_reply(&b[1..], &l).unwrap();
    }
    for (role, name) in [
        (Role::Client, "hello-client"),
        (Role::Server, "hello-server"),
    ] {
        let b = std::fs::read(corpus.join(format!("rdma_endpoint/seed-{name}"))).unwrap();
        BootHello::decode(&b, role).unwrap();
    }

    new_targets_seeds();

    let dir = corpus.join("config");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut pieces = text.split('\0');
        let toml = pieces.next().unwrap_or("");
        let overrides: Vec<String> = pieces.map(str::to_owned).collect();
        if let Err(e) = zcio::Config::parse_with(toml, &path.display().to_string(), &overrides) {
            panic!("config seed {} does not parse: {e}", path.display());
        }
    }
}

/// One TCP frame: prefix, header, payload.
fn frame(kind: Kind, id: u64, header: &[u8], payload: &[u8], recv_cap: usize) -> Vec<u8> {
    let mut b = Prefix {
        kind,
        header_len: header.len(),
        id,
        payload_len: payload.len(),
        recv_cap,
    }
    .encode()
    .to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(payload);
    b
}

/// Seeds of the planner, the TCP reader and reply matcher, and the stateful server target.
fn new_targets_seeds() {
    // rdma_plan: max_sge 4, room = max_sge, total 20000, 2 descriptors, 5 pieces.
    let mut b = vec![4u8, 0];
    b.extend(20_000u32.to_le_bytes());
    b.push(2);
    let piece = |b: &mut Vec<u8>, addr: u64, key: u8, len: u16| {
        b.extend(addr.to_le_bytes());
        b.push(key);
        b.extend(len.to_le_bytes());
    };
    piece(&mut b, 0x10_0000, 7, 12_000);
    piece(&mut b, 0x20_0000, 7, 9_000);
    for (i, len) in [4096u16, 4096, 3000, 65535, 100].into_iter().enumerate() {
        piece(&mut b, 0x7f00_0000 + (i as u64) * 0x10000, 1, len);
    }
    write("rdma_plan", "two-descs-five-pieces", &b);
    // Adjacent descriptors (push_desc merges them) and a wrapping address.
    let mut b = vec![1u8, 1];
    b.extend(u32::MAX.to_le_bytes());
    b.push(3);
    piece(&mut b, 0x1000, 3, 4096);
    piece(&mut b, 0x2000, 3, 4096);
    piece(&mut b, u64::MAX - 10, 3, 100);
    piece(&mut b, 0, 2, 65535);
    write("rdma_plan", "adjacent-and-wrapping", &b);

    // tcp_server_reader: budget 8 KiB, authenticated; three requests, one with payload.
    let mut b = vec![8u8];
    b.extend(frame(
        Kind::Request,
        1,
        &Req::Stat { path: "a".into() }.encode(),
        b"",
        64,
    ));
    b.extend(frame(
        Kind::Request,
        2,
        &Req::Write { fh: 1, offset: 0 }.encode(),
        &[0x5a; 10_000],
        0,
    ));
    b.extend(frame(
        Kind::Request,
        3,
        &Req::Close { fh: 1 }.encode(),
        b"",
        0,
    ));
    write("tcp_server_reader", "three-requests", &b);
    // Not authenticated: payload must be refused.
    let mut b = vec![0x88u8];
    b.extend(frame(Kind::Request, 1, b"x", b"payload", 0));
    write("tcp_server_reader", "payload-before-auth", &b);

    // tcp_client_replies: 2 requests (caps 100 and 8), replies in reverse order.
    let mut b = vec![2u8];
    b.extend(100u16.to_le_bytes());
    b.extend(8u16.to_le_bytes());
    b.extend(frame(Kind::Reply, 2, b"ok", b"12345678", 0));
    b.extend(frame(Kind::Reply, 1, b"ok", &[9; 100], 0));
    write("tcp_client_replies", "two-reversed", &b);
    let mut b = vec![1u8];
    b.extend(4u16.to_le_bytes());
    b.extend(frame(Kind::Reply, 1, b"ok", b"too long", 0));
    write("tcp_client_replies", "over-capacity", &b);

    // server_requests: records `op a b c:u16`.
    let rec = |op: u8, a: u8, b: u8, c: u16| {
        let mut v = vec![op, a, b];
        v.extend(c.to_le_bytes());
        v
    };
    let open_rw_create = (OpenFlags::rw() | OpenFlags::CREATE).0 as u8;
    let mut b = Vec::new();
    b.extend(rec(0, 1, 0, 0)); // hello
    b.extend(rec(2, 1, open_rw_create, 0o644)); // open "b" rw create
    b.extend(rec(0x80 | 4, 0, 3, 5000)); // write 5000 bytes to it, in flight
    b.extend(rec(0x80 | 3, 0, 0, 2000)); // read 8000, in flight
    b.extend(rec(7, 0, 0, 0)); // fstat: waits for all
    b.extend(rec(11, 2, 0, 300)); // list "d"
    b.extend(rec(3, 0x81, 0, 10)); // read a made-up handle
    b.extend(rec(9, 0, 0, 0)); // close
    b.extend(rec(9, 0, 0, 0)); // close again: a bad handle now
    b.extend(rec(6, 7, 0, 0)); // stat "/etc/passwd": outside
    b.extend(rec(13, 0, 0, 0)); // an undecodable header
    write("server_requests", "session", &b);
}
