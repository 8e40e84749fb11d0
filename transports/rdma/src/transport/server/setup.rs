//! Connection set-up on the server: the listener, the bootstrap handshake (one hello pair
//! per queue pair, then `READY`) and each queue pair's creation, receives and running state.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use crate::config::RdmaConfig;
use zcio::config::Config;
use zcio::pool::RegistrarId;
use zcio::transport::accept::HandshakeListener;
use zcio::transport::{Limits, ServerConn, MAX_HEADER};
use zcio::{Error, IobufMut, Pool, Result};

use super::super::bootstrap::{
    BootstrapError, Hello, Role, HELLO_LEN, MAX_CREDITS, MAX_QUEUE_PAIRS,
};
use super::super::conn::{
    connect_qp, connection_limits, control_bytes, control_pool, create_qp, exchange_ready,
    msg_limits, post_initial_receives, qp_inline, recv_exact, round_page, send_all,
    spawn_conn_thread, tick_for, ConnectedQp, LaneTerms, Poller, QpSizes, SendQueue, MAX_SGE,
};
use super::super::device::{device, registrar_id, Device, Side};
use super::super::lane::receives::Receives;
use super::super::lane::server::ServerLane;
use super::super::msg::{max_request_len, reply_len};
use super::super::{bootstrap_err, handshake_io_err, memlock_err, MAX_INLINE};
use super::{
    spares, Lane, LaneSet, LaneState, PostSide, RdmaServerConn, Shared, Slot, HANDSHAKE_TIMEOUT,
    HEADER_ROOM, LENT, PAYLOAD_ROOM,
};
use crate::verbs::{check_memlock, Endpoint, Mtu};

/// What every connection of a listener shares.
struct ListenCtx {
    dev: Arc<Device>,
    pool: Pool,
    reg: RegistrarId,
    rdma: RdmaConfig,
    limits: Limits,
    idle: Option<Duration>,
}

/// Binds `cfg.server.listen`, installs the server's registrar on `pool` and starts
/// accepting: a [`HandshakeListener`] running this transport's handshake.
pub(crate) fn listen(cfg: &Config, pool: &Pool) -> Result<HandshakeListener> {
    let dev = device(RdmaConfig::of(cfg))?;
    let credits = RdmaConfig::of(cfg).credits.clamp(1, MAX_CREDITS as usize);
    let one_conn = control_bytes(&control_classes(
        credits,
        cfg.limits.max_segments,
        RdmaConfig::of(cfg).inline_threshold.min(MAX_INLINE),
        MAX_HEADER,
    ));
    check_memlock((pool.total_bytes() + one_conn) as u64).map_err(memlock_err)?;
    let reg = registrar_id(&dev, pool, Side::Server)?;
    let addr = &cfg.server.listen;
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| Error::io(format!("listen on {addr} (rdma bootstrap)"), e))?;
    let ctx = Arc::new(ListenCtx {
        dev,
        pool: pool.clone(),
        reg,
        rdma: RdmaConfig::of(cfg).clone(),
        limits: cfg.limits,
        idle: cfg.server.idle_timeout,
    });
    HandshakeListener::spawn(
        listener,
        "rdma",
        Arc::new(move |sock, peer| handshake(sock, peer, &ctx)),
    )
}

/// The classes of a server connection's control pool: request receives, reply messages.
fn control_classes(
    credits: usize,
    max_segments: usize,
    inline: usize,
    max_header: usize,
) -> [(usize, usize); 2] {
    [
        (
            round_page(max_request_len(max_header, max_segments, inline)),
            credits,
        ),
        (round_page(reply_len(max_header, inline)), 2 * credits),
    ]
}

fn hs_error(e: BootstrapError, peer: &str) -> Error {
    bootstrap_err(e, peer)
}

/// One queue pair of a connection being accepted, set up and connected.
struct OpenedLane {
    connected: ConnectedQp,
    write_sge: usize,
    read_sge: usize,
    sq_depth: usize,
}

/// Reads the client's next hello.
fn read_hello(sock: &TcpStream, hs: &dyn Fn(std::io::Error) -> Error) -> Result<[u8; HELLO_LEN]> {
    let mut b = [0u8; HELLO_LEN];
    recv_exact(sock, &mut b).map_err(hs)?;
    Ok(b)
}

/// The server half of the bootstrap, on a fresh socket: one hello pair per queue pair, then
/// `READY` both ways.
fn handshake(sock: TcpStream, peer: SocketAddr, ctx: &ListenCtx) -> Result<Box<dyn ServerConn>> {
    let peer_s = peer.to_string();
    let after = ctx
        .idle
        .map_or(HANDSHAKE_TIMEOUT, |d| d.min(HANDSHAKE_TIMEOUT));
    let setup = |e| Error::io(format!("setting up the bootstrap socket from {peer}"), e);
    sock.set_nodelay(true).map_err(setup)?;
    sock.set_read_timeout(Some(after)).map_err(setup)?;
    sock.set_write_timeout(Some(after)).map_err(setup)?;
    let hs = |e| handshake_io_err(&peer_s, after, e);
    let b = read_hello(&sock, &hs)?;
    let r = &ctx.rdma;
    let first = match Hello::decode(&b, Role::Client) {
        Ok(h) => h,
        Err(e @ BootstrapError::Version { .. }) => {
            // Answer anyway, so that the client can report the mismatch too.
            let dummy = Hello {
                role: Role::Server,
                queue_pairs: 1,
                endpoint: Endpoint {
                    qpn: 0,
                    psn: 0,
                    lid: 0,
                    port: 1,
                    gid_index: 0,
                    gid: std::net::Ipv6Addr::UNSPECIFIED,
                    mtu: Mtu::Mtu1024,
                },
                credits: r.credits.clamp(1, MAX_CREDITS as usize) as u32,
                max_segments: 1,
                max_payload: 1,
                max_header: 1,
                inline_threshold: 0,
                recv_size: 4096,
            };
            let _ = send_all(&sock, &dummy.encode());
            return Err(hs_error(e, &peer_s));
        }
        Err(e) => return Err(hs_error(e, &peer_s)),
    };
    let n = first
        .queue_pairs
        .min(u8::try_from(r.queue_pairs.clamp(1, usize::from(MAX_QUEUE_PAIRS))).unwrap_or(1))
        .max(1);
    let mut lanes: Vec<OpenedLane> = Vec::with_capacity(usize::from(n));
    let mut theirs = first;
    for i in 0..n {
        if i > 0 {
            let b = read_hello(&sock, &hs)?;
            theirs = Hello::decode(&b, Role::Client).map_err(|e| hs_error(e, &peer_s))?;
            if theirs.queue_pairs != n {
                return Err(Error::decode(
                    "rdma handshake",
                    format!(
                        "from {peer}: hello {} says {} queue pairs, {n} were agreed",
                        i + 1,
                        theirs.queue_pairs
                    ),
                ));
            }
        }
        lanes.push(accept_lane(&sock, ctx, &theirs, n, &peer_s, &hs)?);
    }
    exchange_ready(&sock, &format!("the client {peer}"), &hs)?;
    sock.set_read_timeout(None).map_err(setup)?;
    let shared = Arc::new(Shared::new());
    let limits = connection_limits(
        lanes[0].connected.limits,
        lanes[1..].iter().map(|l| l.connected.limits),
    );
    let mut running = Vec::with_capacity(lanes.len());
    for (i, lane) in lanes.into_iter().enumerate() {
        running.push(make_lane(i, lane, ctx, &sock, &shared, &peer_s).map_err(setup)?);
    }
    let _ = shared
        .lanes
        .set(running.iter().map(Arc::downgrade).collect());
    let set = Arc::new(LaneSet { lanes: running });
    for (i, lane) in set.lanes.iter().enumerate() {
        let live_sock = sock.try_clone().map_err(setup)?;
        if let Err(e) = spawn_conn_thread(
            lane.clone(),
            lane.poller.clone(),
            tick_for(ctx.idle.unwrap_or(Duration::from_secs(8))),
            live_sock,
            &format!("zcio-rdma-srv{i}"),
        ) {
            set.close();
            return Err(e);
        }
    }
    tracing::debug!(%peer, ?limits, queue_pairs = n, "rdma connection accepted");
    Ok(Box::new(RdmaServerConn {
        set,
        shared,
        limits,
        next: 0,
        peer: peer_s,
    }))
}

/// Sets up one queue pair for the client's hello `theirs`: creates it, posts its receives,
/// answers with this side's hello and connects it.
fn accept_lane(
    sock: &TcpStream,
    ctx: &ListenCtx,
    theirs: &Hello,
    n: u8,
    peer: &str,
    hs: &dyn Fn(std::io::Error) -> Error,
) -> Result<OpenedLane> {
    let r = &ctx.rdma;
    let credits = r
        .credits
        .div_ceil(usize::from(n))
        .clamp(1, MAX_CREDITS as usize)
        .min(theirs.credits as usize);
    let inline = r.inline_threshold.min(MAX_INLINE);
    let max_header = MAX_HEADER.min(theirs.max_header as usize);
    let inline = inline.min(theirs.inline_threshold as usize);
    let max_segments = ctx
        .limits
        .max_segments
        .min(theirs.max_segments as usize)
        .clamp(1, usize::from(u16::MAX));
    let max_payload = ctx
        .limits
        .max_payload
        .min(theirs.max_payload as usize)
        .min(1 << 30);
    if (theirs.recv_size as usize) < reply_len(max_header, inline) {
        return Err(Error::decode(
            "rdma handshake",
            format!(
                "the client {peer} takes messages of {} bytes, a reply needs up to {}",
                theirs.recv_size,
                reply_len(max_header, inline)
            ),
        ));
    }
    let classes = control_classes(credits, max_segments, inline, max_header);
    let req_size = classes[0].0;
    let ctl = control_pool(&classes)?;
    let ctl_reg = registrar_id(&ctx.dev, &ctl, Side::Control)?;
    let write_sge = (ctx.dev.caps.max_sge as usize).clamp(1, MAX_SGE);
    let read_sge = write_sge.min((ctx.dev.caps.max_sge_rd as usize).max(1));
    // Worst case of one request: one work request per remote descriptor, plus one per
    // `max_sge` local pieces, plus the SEND.
    let worst = max_segments + max_segments.div_ceil(read_sge.min(write_sge)) + 2;
    let sq_depth = worst.max(4 * credits);

    // Declared before the queue pair: on an early return the queue pair goes first.
    let mut recv: Vec<Option<IobufMut>> = Vec::with_capacity(credits);
    let (cq, mut qp) = create_qp(
        &ctx.dev,
        r,
        &QpSizes {
            send_wr: sq_depth,
            recv_wr: credits,
            inline: qp_inline(inline),
            remote_access: false,
        },
    )?;
    let sq_depth = qp.caps().max_send_wr as usize;
    if sq_depth < worst {
        return Err(Error::TransportUnavailable {
            name: "rdma".into(),
            reason: format!(
                "the device gives a send queue of {sq_depth} entries, a request may need {worst}"
            ),
            hint: "lower limits.max_segments".into(),
        });
    }
    post_initial_receives(&qp, &ctl, ctl_reg, req_size, credits, &mut recv)?;
    let terms = LaneTerms {
        credits,
        max_segments,
        max_payload,
        max_header,
        inline,
    };
    let ours = terms.hello(Role::Server, n, qp.local_endpoint(), req_size);
    send_all(sock, &ours.encode()).map_err(hs)?;
    connect_qp(&mut qp, &theirs.endpoint, peer)?;
    Ok(OpenedLane {
        connected: ConnectedQp {
            qp,
            cq,
            recv,
            ctl,
            ctl_reg,
            limits: terms.limits(),
        },
        write_sge,
        read_sge,
        sq_depth,
    })
}

/// The running state of queue pair `lane` of a connection.
fn make_lane(
    lane: usize,
    l: OpenedLane,
    ctx: &ListenCtx,
    sock: &TcpStream,
    shared: &Arc<Shared>,
    peer: &str,
) -> std::io::Result<Arc<Lane>> {
    let OpenedLane {
        connected:
            ConnectedQp {
                qp,
                cq,
                recv,
                ctl,
                ctl_reg,
                limits,
            },
        write_sge,
        read_sge,
        sq_depth,
    } = l;
    let credits = limits.max_in_flight;
    let slots = (0..credits)
        .map(|_| Slot {
            header: Vec::with_capacity(HEADER_ROOM),
            send: Vec::with_capacity(limits.max_segments),
            recv: Vec::with_capacity(limits.max_segments),
            inline: Vec::with_capacity(limits.inline_threshold),
            recv_cap: 0,
            send_total: 0,
            bufs: Vec::new(),
            id: 0,
            admitted: false,
        })
        .collect();
    let max_inline_send = qp.caps().max_inline_data as usize;
    Ok(Arc::new(Lane {
        state: Mutex::new(LaneState {
            dead: None,
            closing: false,
            recv: Receives::new(recv),
            slots,
            requests: ServerLane::new(credits),
            actions: ServerLane::actions_for(credits),
            spare_descs: spares(LENT, credits, limits.max_segments),
            spare_local: spares(LENT, credits, limits.max_segments),
            spare_headers: spares(credits, credits, HEADER_ROOM),
            spare_payloads: spares(credits, credits, PAYLOAD_ROOM),
            spare_bufs: spares(credits, credits, PAYLOAD_ROOM),
        }),
        post: Mutex::new(PostSide {
            sq: SendQueue::new(sq_depth, 4 * credits),
            local: Vec::with_capacity(limits.max_segments.max(64)),
            room_waiters: 0,
        }),
        qp: RwLock::new(Some(qp)),
        posting: AtomicUsize::new(0),
        room_cv: Condvar::new(),
        dead: AtomicBool::new(false),
        sock: sock.try_clone()?,
        shared: shared.clone(),
        lane: lane as u64,
        pool: ctx.pool.clone(),
        reg: ctx.reg,
        ctl,
        ctl_reg,
        limits,
        msg_limits: msg_limits(&limits),
        max_inline_send,
        write_sge,
        read_sge,
        sq_depth,
        idle: ctx.idle,
        peer: peer.to_string(),
        poller: Arc::new(Poller::new(cq, ctx.rdma.spin, true)?),
    }))
}
