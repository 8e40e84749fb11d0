//! The TCP server's frame reader (`zcio_tcp`'s `ServerConn::recv`, with its handshake and
//! payload admission) on a real loopback socket: each input is what a client sends after a
//! valid handshake, then the client half-closes.
//!
//! Input layout: `budget u8 | rest`: the connection's payload budget is `budget` KiB (at
//! least 4), and payload is admitted (authenticated) unless bit 7 of `budget` is set.
//! `rest` is the byte stream. The server side answers every request it receives with an
//! empty reply (as a server would) and gives its payload budget back.
//!
//! Properties: no panic; every connection ends (the stream's end, or an error for a bad
//! frame) without a hang; every request `recv` returns fits the negotiated limits; nothing
//! of the pool stays in use once the connection is over.
#![no_main]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use zcio::transport::{Admission, Listener, Transport};
use zcio::{Config, Pool};
use zcio_tcp::wire::{Hello, HELLO_LEN};
use zcio_tcp::TcpTransport;

struct Server {
    addr: String,
    pool: Pool,
    /// The next connection's admission settings, and its end.
    admit: Sender<(usize, bool)>,
    done: Mutex<Receiver<()>>,
}

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let mut cfg = Config::default();
        cfg.server.listen = "127.0.0.1:0".into();
        cfg.server.idle_timeout = Some(Duration::from_secs(10));
        cfg.pool.classes.iter_mut().for_each(|c| {
            c.count = c.count.min(64);
            c.reserve = c.reserve.min(8);
        });
        let pool = Pool::new(&cfg.pool).expect("pool");
        let listener: Arc<dyn Listener> =
            Arc::from(TcpTransport.listen(&cfg, &pool).expect("listen"));
        let addr = listener.local_addr();
        let (admit, admit_rx) = channel::<(usize, bool)>();
        let (done_tx, done) = channel();
        std::thread::spawn(move || loop {
            let Ok((budget, authed)) = admit_rx.recv() else {
                return;
            };
            let mut conn = match listener.accept() {
                Ok(Ok(c)) => c,
                Ok(Err(_)) => {
                    let _ = done_tx.send(());
                    continue;
                }
                Err(_) => return,
            };
            let limits = conn.limits();
            let adm = Arc::new(Admission::new(budget, limits.max_in_flight));
            if authed {
                adm.authenticate();
            }
            conn.set_admission(adm.clone());
            let replier = conn.replier();
            while let Ok(Some(inc)) = conn.recv() {
                assert!(inc.header.len() <= limits.max_header);
                let n: usize = inc.payload.iter().map(|b| b.len()).sum();
                assert!(n <= limits.max_payload, "payload {n} over the limit");
                assert!(inc.reply_capacity <= limits.max_payload);
                drop(inc.payload);
                adm.release(inc.id);
                if replier.reply(inc.id, b"ok", &[]).is_err() {
                    break;
                }
            }
            replier.close();
            drop(conn);
            let _ = done_tx.send(());
        });
        Server {
            addr,
            pool,
            admit,
            done: Mutex::new(done),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&budget, rest)) = data.split_first() else {
        return;
    };
    let s = server();
    let done = s.done.lock().unwrap_or_else(|p| p.into_inner());
    s.admit
        .send((usize::from(budget & 0x7f).max(4) << 10, budget & 0x80 == 0))
        .unwrap();
    let mut sock = TcpStream::connect(&s.addr).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // A client's default limits (`[limits]`), 64 requests in flight.
    let l = Config::default().limits;
    let _ = sock.write_all(&Hello::from_limits(&l, 64).encode());
    let mut h = [0u8; HELLO_LEN];
    sock.read_exact(&mut h).expect("server hello");
    // Write from another thread while reading replies here, so neither side blocks on a
    // full socket buffer.
    let mut w = sock.try_clone().unwrap();
    let bytes = rest.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&bytes);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut sink = [0u8; 65536];
    loop {
        match sock.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    writer.join().unwrap();
    done.recv_timeout(Duration::from_secs(30))
        .expect("the server's connection did not end");
    assert_eq!(s.pool.stats().slots_in_use(), 0, "pool buffers leaked");
});
