//! The file server, stateful: each input is a sequence of requests (hello, auth, open,
//! read, write, fsync, stat, fstat, truncate, close, unlink, list, mkdir, undecodable
//! headers; good and bad handles, paths inside and outside the export) that one connection
//! sends through the in-memory transport to a real `zcio::Server` on a temporary export,
//! some waited for one by one, some several in flight at once.
//!
//! Input layout: records of `op u8 | a u8 | b u8 | c u16`. `op % 14` picks the request,
//! bit 7 of `op` leaves it in flight (waited for at the next record without the bit);
//! `a` picks a path or a handle (one the server gave, or a made-up one), `b` flags, a
//! mode or a size, `c` an offset, a length or a cookie.
//!
//! Properties: no panic (the server catches panics in its workers, so its panic counter
//! must stay 0), every request is answered with a reply that decodes, and once the
//! connection is gone the server holds no open file and no pool buffer.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use zcio::proto::{self, OpenFlags, Req, Resp, MAC_LEN, NONCE_LEN};
use zcio::transport::mem::MemListener;
use zcio::transport::{Limits, Request, SendSeg, MAX_HEADER};
use zcio::{Config, Pool, Server, ServerHandle};

struct Env {
    _dir: tempfile::TempDir,
    server: ServerHandle,
    listener: Arc<MemListener>,
    pool: Pool,
}

fn env() -> &'static Env {
    static E: OnceLock<Env> = OnceLock::new();
    E.get_or_init(|| {
        let dir = tempfile::tempdir().expect("export");
        std::fs::write(dir.path().join("a"), vec![7u8; 10_000]).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let mut cfg = Config::default();
        cfg.server.export = dir.path().to_path_buf();
        cfg.server.workers = 2;
        cfg.server.max_open_files = 8;
        cfg.pool.classes.iter_mut().for_each(|c| {
            c.count = c.count.min(64);
            c.reserve = c.reserve.min(8);
        });
        let pool = Pool::new(&cfg.pool).expect("pool");
        let limits = Limits {
            max_segments: 16,
            max_payload: 256 << 10,
            max_header: MAX_HEADER,
            max_in_flight: 16,
            inline_threshold: 0,
            rdma_payload: false,
        };
        let listener = MemListener::new(pool.clone(), limits);
        let server = Server::with_listener(&cfg, listener.clone(), pool.clone())
            .expect("server")
            .spawn()
            .expect("spawn");
        Env {
            _dir: dir,
            server,
            listener,
            pool,
        }
    })
}

const PATHS: [&str; 10] = [
    "a",
    "b",
    "d",
    "d/x",
    "d/",
    "",
    "../x",
    "/etc/passwd",
    "a/b",
    "d/../b",
];

fuzz_target!(|data: &[u8]| {
    let e = env();
    let conn = e.listener.connect().expect("connect");
    let mut fhs: Vec<u64> = Vec::new();
    let mut in_flight = Vec::new();
    for rec in data.chunks_exact(5).take(64) {
        let (op, a, b) = (rec[0], rec[1], rec[2]);
        let c = u16::from_le_bytes([rec[3], rec[4]]);
        let path = PATHS[usize::from(a) % PATHS.len()].to_string();
        let fh = if a & 0x80 == 0 && !fhs.is_empty() {
            fhs[usize::from(a) % fhs.len()]
        } else {
            u64::from(a) * 0x0101_0101 + u64::from(c)
        };
        let mut send = Vec::new();
        let mut cap = 0usize;
        let req = match op % 14 {
            0 => Req::Hello {
                version: if b == 0xff { 0 } else { proto::VERSION },
                client_nonce: [a; NONCE_LEN],
            },
            1 => Req::Auth { mac: [b; MAC_LEN] },
            2 => Req::Open {
                path,
                flags: OpenFlags(u32::from(b) & 0x3f),
                mode: u32::from(c),
            },
            3 => {
                cap = usize::from(c) * 4;
                Req::Read {
                    fh,
                    offset: u64::from(b) * 4096,
                    len: u32::from(c) * 4,
                }
            }
            4 => {
                let n = usize::from(c % 20_000);
                if n > 0 {
                    send.push(SendSeg::Owned(vec![b; n]));
                }
                Req::Write {
                    fh,
                    offset: u64::from(b) * 1000,
                }
            }
            5 => Req::Fsync {
                fh,
                datasync: b & 1 == 1,
            },
            6 => Req::Stat { path },
            7 => Req::Fstat { fh },
            8 => Req::Truncate {
                fh,
                len: u64::from(c) * 8,
            },
            9 => Req::Close { fh },
            10 => Req::Unlink { path },
            11 => {
                cap = usize::from(c) + 1;
                Req::List {
                    path,
                    cookie: u64::from(b),
                }
            }
            12 => Req::Mkdir {
                path,
                mode: u32::from(c),
            },
            _ => {
                // Not a request: the raw record as a header.
                let header = rec.to_vec();
                if let Ok(p) = conn.start(Request {
                    header,
                    send,
                    recv: Vec::new(),
                }) {
                    in_flight.push((None, p));
                }
                continue;
            }
        };
        let recv = if cap > 0 {
            vec![zcio::transport::RecvSeg::Owned(vec![0; cap])]
        } else {
            Vec::new()
        };
        let Ok(p) = conn.start(Request {
            header: req.encode(),
            send,
            recv,
        }) else {
            break;
        };
        in_flight.push((Some(req), p));
        if op & 0x80 == 0 || in_flight.len() >= 8 {
            for (req, p) in in_flight.drain(..) {
                let Ok(reply) = p.wait() else { continue };
                if let Some(req) = req {
                    match proto::decode_reply(&req, &reply.header) {
                        Ok(Resp::Open { fh, .. }) => fhs.push(fh),
                        Ok(_) | Err(zcio::Error::Remote { .. }) => {}
                        Err(err) => panic!("reply to {req:?} does not decode: {err}"),
                    }
                }
            }
        }
    }
    for (_, p) in in_flight {
        let _ = p.wait();
    }
    drop(conn);
    let st = e.server.stats();
    assert_eq!(
        st.panics.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the server panicked serving a request (caught; see its log)"
    );
    // The connection's files close and its buffers come back once the server has seen it
    // go (a hang guard, not a timing check).
    let deadline = Instant::now() + Duration::from_secs(30);
    while e.server.open_files() != 0 || e.pool.stats().slots_in_use() != 0 {
        assert!(
            Instant::now() < deadline,
            "server not clean: {} files open, {} buffers in use",
            e.server.open_files(),
            e.pool.stats().slots_in_use()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
});
