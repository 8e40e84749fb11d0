//! Connection set-up on the client: the bootstrap connection, one hello pair per queue pair
//! (each queue pair created, its receives posted, connected to the server's), `READY`, and
//! each queue pair's running state.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::config::{ClientExposure, RdmaConfig};
use zcio::config::Config;
use zcio::transport::{CompletionCell, MAX_HEADER};
use zcio::{Error, IobufMut, Pool, Result};

use super::super::bootstrap::{Hello, Role, HELLO_LEN, MAX_CREDITS, MAX_QUEUE_PAIRS};
use super::super::conn::{
    connect_qp, connection_limits, control_bytes, control_pool, create_qp, exchange_ready,
    msg_limits, post_initial_receives, qp_inline, recv_exact, round_page, send_all,
    spawn_conn_thread, tick_for, ConnectedQp, LaneTerms, Poller, QpSizes, SendQueue,
};
use super::super::device::{device, registrar, registrar_id, Device, Side};
use super::super::lane::client::{sq_depth, ClientLane};
use super::super::lane::receives::Receives;
use super::super::msg::{max_request_len, reply_len, DESC_LEN, REQUEST_FIXED};
use super::super::{bootstrap_err, handshake_io_err, memlock_err, Faults, MAX_INLINE};
use super::{Ended, Lane, LaneHandle, LaneState, RdmaClientConn, Scratch, Slot};
use crate::verbs::{check_memlock, MemoryWindow};

fn tcp_connect(target: &str, timeout: Duration) -> Result<TcpStream> {
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .map_err(|e| Error::io(format!("resolving {target}"), e))?
        .collect();
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the name resolved to no address",
    );
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(Error::io(
        format!("tcp connect to {target} (rdma bootstrap)"),
        last,
    ))
}

/// With `rdma.client_exposure = "request"`: refuses a device without type 2 memory
/// windows, by its capabilities and by allocating one (a provider may lack them even when
/// the kernel driver has them).
fn check_windows(dev: &Device) -> Result<()> {
    let refuse = |why: String| Error::TransportUnavailable {
        name: "rdma".into(),
        reason: format!(
            "RDMA device `{}` {why}, which rdma.client_exposure = \"request\" (the default) \
             needs to expose only each request's buffers to the server",
            dev.ctx.name()
        ),
        hint: "set rdma.client_exposure = \"arena\" to let the server reach the whole \
               client pool instead (trusting the server), or use a device with memory windows"
            .into(),
    };
    if !dev.caps.mw_type2 || dev.caps.max_mw == 0 {
        return Err(refuse(format!(
            "has no type 2 memory windows (max_mw {})",
            dev.caps.max_mw
        )));
    }
    MemoryWindow::new(&dev.pd).map(drop).map_err(|e| {
        refuse(format!(
            "cannot allocate a memory window ({})",
            super::super::conn::chain(&e)
        ))
    })
}

/// Connects to `cfg.client.connect`: bootstrap, queue pairs, threads.
pub(crate) fn connect(faults: Faults, cfg: &Config, pool: &Pool) -> Result<RdmaClientConn> {
    let r = RdmaConfig::of(cfg);
    let dev = device(r)?;
    let timeout = cfg.client.timeout;
    let offer = u8::try_from(r.queue_pairs.clamp(1, usize::from(MAX_QUEUE_PAIRS))).unwrap_or(1);
    let p = LaneParams {
        credits: r
            .credits
            .div_ceil(usize::from(offer))
            .clamp(1, MAX_CREDITS as usize),
        inline: r.inline_threshold.min(MAX_INLINE),
        max_segments: cfg.limits.max_segments.clamp(1, usize::from(u16::MAX)),
        max_payload: cfg.limits.max_payload.min(1 << 30),
        windows: r.client_exposure == ClientExposure::Request,
    };
    let classes = p.classes();
    check_memlock((pool.total_bytes() + usize::from(offer) * control_bytes(&classes)) as u64)
        .map_err(memlock_err)?;
    let (reg, windowed) = match r.client_exposure {
        ClientExposure::Arena => (registrar_id(&dev, pool, Side::Client)?, None),
        ClientExposure::Request => {
            check_windows(&dev)?;
            let (id, reg) = registrar(&dev, pool, Side::ClientWindowed)?;
            (id, Some(reg))
        }
    };

    let target = &cfg.client.connect;
    let sock = tcp_connect(target, timeout)?;
    let peer = sock
        .peer_addr()
        .map_or_else(|_| target.clone(), |a| a.to_string());
    let setup = |e| Error::io(format!("setting up the bootstrap socket to {peer}"), e);
    sock.set_nodelay(true).map_err(setup)?;
    sock.set_read_timeout(Some(timeout)).map_err(setup)?;
    sock.set_write_timeout(Some(timeout)).map_err(setup)?;
    let hs = |e| handshake_io_err(&peer, timeout, e);

    // The first hello pair settles how many queue pairs; then one pair per further one.
    let first = open_lane(&sock, &dev, r, &p, offer, &peer, &hs)?;
    let n = first.granted;
    if n == 0 || n > offer {
        return Err(Error::decode(
            "rdma handshake",
            format!("the server {peer} granted {n} queue pairs, {offer} were offered"),
        ));
    }
    let first_limits = first.connected.limits;
    let mut lanes = vec![first];
    for i in 1..n {
        let lane = open_lane(&sock, &dev, r, &p, n, &peer, &hs)?;
        if lane.granted != n {
            return Err(Error::decode(
                "rdma handshake",
                format!(
                    "the server {peer} says {} queue pairs in hello {}, {n} were agreed",
                    lane.granted,
                    i + 1
                ),
            ));
        }
        lanes.push(lane);
    }
    exchange_ready(&sock, &format!("the server {peer}"), &hs)?;
    sock.set_read_timeout(None).map_err(setup)?;

    let limits = connection_limits(first_limits, lanes[1..].iter().map(|l| l.connected.limits));
    let ended = Arc::new(Ended::default());
    let keyed = Arc::new(AtomicU64::new(0));
    let mut running = Vec::with_capacity(lanes.len());
    for l in lanes {
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
            req_size,
            ..
        } = l;
        let credits = limits.max_in_flight;
        let mut slots = Vec::with_capacity(credits);
        for _ in 0..credits {
            slots.push(Slot {
                msg: Some(ctl.get_control(req_size)?),
                scratch: Some(Scratch::with_capacity(limits.max_segments)),
                req: None,
                invalidating: None,
            });
        }
        // What the device granted, within what the ledger would use without windows.
        let sq_total = (qp.caps().max_send_wr as usize)
            .min(sq_depth(credits) + p.window_wrs(limits.max_segments));
        let max_inline_send = qp.caps().max_inline_data as usize;
        running.push(Arc::new(Lane {
            state: Mutex::new(LaneState {
                dead: None,
                qp: Some(qp),
                recv: Receives::new(recv),
                slots,
                requests: ClientLane::new(credits),
                actions: ClientLane::actions_for(credits),
                sq: SendQueue::new(sq_total, 0),
                room_waiters: 0,
                cells: (0..2 * credits).map(|_| CompletionCell::new()).collect(),
                next_cell: 0,
            }),
            cond: Condvar::new(),
            room_cv: Condvar::new(),
            dead: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            ended: ended.clone(),
            sock: sock.try_clone().map_err(setup)?,
            pool: pool.clone(),
            reg,
            windowed: windowed.clone(),
            sq_total,
            ctl_reg,
            pd: dev.pd.clone(),
            limits,
            msg_limits: msg_limits(&limits),
            register_threshold: r.register_threshold.min(pool.max_buffer_size()).max(1),
            max_inline_send,
            timeout,
            peer: peer.clone(),
            faults,
            keyed: keyed.clone(),
            poller: Arc::new(
                Poller::new(cq, r.spin, false)
                    .map_err(|e| Error::io("creating the completion poller's eventfds", e))?,
            ),
            _ctl: ctl,
        }));
    }
    let mut conn = RdmaClientConn {
        lanes: Vec::with_capacity(running.len()),
        limits,
        next: AtomicUsize::new(0),
        peer: peer.clone(),
    };
    for (i, lane) in running.into_iter().enumerate() {
        let live_sock = sock.try_clone().map_err(setup)?;
        let thread = spawn_conn_thread(
            lane.clone(),
            lane.poller.clone(),
            tick_for(timeout),
            live_sock,
            &format!("zcio-rdma-cli{i}"),
        );
        conn.lanes.push(LaneHandle { lane, thread: None });
        match thread {
            Ok(t) => conn.lanes[i].thread = Some(t),
            // Dropping `conn` closes the queue pairs set up so far.
            Err(e) => return Err(e),
        }
    }
    tracing::debug!(%peer, ?limits, queue_pairs = n, "rdma client connected");
    Ok(conn)
}

/// What every queue pair of a client connection asks for.
struct LaneParams {
    credits: usize,
    inline: usize,
    max_segments: usize,
    max_payload: usize,
    /// `rdma.client_exposure = "request"`: requests bind memory windows.
    windows: bool,
}

impl LaneParams {
    /// Send-queue entries for memory windows on top of the requests' SENDs: a request
    /// binds at most one window per descriptor (`max_segments` of each kind), and holds
    /// an entry for each one's invalidation.
    fn window_wrs(&self, max_segments: usize) -> usize {
        if self.windows {
            4 * max_segments
        } else {
            0
        }
    }

    fn reply_size(&self) -> usize {
        round_page(reply_len(MAX_HEADER, self.inline))
    }

    fn req_size(&self) -> usize {
        round_page(max_request_len(MAX_HEADER, self.max_segments, self.inline))
    }

    /// One queue pair's control pool: reply receives, request messages.
    fn classes(&self) -> [(usize, usize); 2] {
        [
            (self.reply_size(), self.credits),
            (self.req_size(), self.credits),
        ]
    }
}

/// One queue pair of a connection being set up, connected.
struct OpenedLane {
    connected: ConnectedQp,
    req_size: usize,
    /// The number of queue pairs the server's hello gives.
    granted: u8,
}

/// Sets up one queue pair: creates it, posts its receives, sends this side's hello (saying
/// `n` queue pairs), reads the server's and connects the queue pair to it.
fn open_lane(
    sock: &TcpStream,
    dev: &Device,
    r: &RdmaConfig,
    p: &LaneParams,
    n: u8,
    peer: &str,
    hs: &dyn Fn(std::io::Error) -> Error,
) -> Result<OpenedLane> {
    let ctl = control_pool(&p.classes())?;
    let ctl_reg = registrar_id(dev, &ctl, Side::Control)?;
    let reply_size = p.reply_size();
    // Declared before the queue pair so that on an early return the queue pair (dropped
    // first) is destroyed before the buffers it may write into go back.
    let mut recv: Vec<Option<IobufMut>> = Vec::with_capacity(p.credits);
    let (cq, mut qp) = create_qp(
        dev,
        r,
        &QpSizes {
            send_wr: sq_depth(p.credits) + p.window_wrs(p.max_segments),
            recv_wr: p.credits,
            inline: qp_inline(p.inline),
            remote_access: true,
        },
    )?;
    post_initial_receives(&qp, &ctl, ctl_reg, reply_size, p.credits, &mut recv)?;
    let offer = LaneTerms {
        credits: p.credits,
        max_segments: p.max_segments,
        max_payload: p.max_payload,
        max_header: MAX_HEADER,
        inline: p.inline,
    };
    let ours = offer.hello(Role::Client, n, qp.local_endpoint(), reply_size);
    send_all(sock, &ours.encode()).map_err(hs)?;
    let mut b = [0u8; HELLO_LEN];
    recv_exact(sock, &mut b).map_err(hs)?;
    let theirs = Hello::decode(&b, Role::Server).map_err(|e| bootstrap_err(e, peer))?;
    let credits = p.credits.min(theirs.credits as usize);
    let max_header = MAX_HEADER.min(theirs.max_header as usize);
    let inline = p.inline.min(theirs.inline_threshold as usize);
    let fit = (theirs.recv_size as usize).saturating_sub(REQUEST_FIXED + max_header + inline)
        / (2 * DESC_LEN);
    let max_segments = p.max_segments.min(theirs.max_segments as usize).min(fit);
    if max_segments == 0 {
        return Err(Error::decode(
            "rdma handshake",
            format!(
                "the server {peer} takes messages of {} bytes: too small for a request",
                theirs.recv_size
            ),
        ));
    }
    connect_qp(&mut qp, &theirs.endpoint, peer)?;
    Ok(OpenedLane {
        connected: ConnectedQp {
            qp,
            cq,
            recv,
            ctl,
            ctl_reg,
            limits: LaneTerms {
                credits,
                max_segments,
                max_payload: p.max_payload.min(theirs.max_payload as usize),
                max_header,
                inline,
            }
            .limits(),
        },
        req_size: p.req_size(),
        granted: theirs.queue_pairs,
    })
}
