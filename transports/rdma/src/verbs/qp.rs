//! RC queue pairs: creation, the INIT -> RTR -> RTS state machine, and allocation-free posting.

use std::fmt;
use std::io;
use std::mem::{align_of, offset_of, size_of};
use std::ptr;

use rdma_mummy_sys::{
    bind_mw_t, bind_mw_tso_union_t, ibv_mw_bind_info, ibv_post_recv, ibv_post_send, ibv_qp,
    ibv_recv_wr, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wr_opcode,
    imm_data_invalidated_rkey_union_t, qp_type_t, rdma_t, tso_t, wr_t, xrc_t,
};
use sideway::ibverbs::address::{AddressHandleAttribute, Gid};
use sideway::ibverbs::device_context::Mtu as SwMtu;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, CreateQueuePairErrorKind, ModifyQueuePairError, ModifyQueuePairErrorKind,
    QueryQueuePairErrorKind, QueuePair as _, QueuePairAttribute, QueuePairAttributeMask,
    QueuePairState, QueuePairType,
};
use sideway::ibverbs::AccessFlags;

use crate::devices::{LinkLayer, PortState};
use crate::error::RdmaError;
use crate::verbs::context::{MemoryRegion, MrAccess, ProtectionDomain};
use crate::verbs::cq::CompletionQueue;
use crate::verbs::endpoint::{Endpoint, MAX_24BIT};
use crate::verbs::types::{Mtu, QpState};
use crate::verbs::window::{next_rkey, MemoryWindow, WindowAccess};

/// Most pieces one inline SEND may gather (they are collected on the stack).
const MAX_INLINE_PIECES: usize = 32;

/// Hop limit (IP TTL for RoCE v2) of outgoing packets.
const HOP_LIMIT: u8 = 64;

/// One scatter/gather entry: `len` bytes at `addr` inside the memory region whose local key is
/// `lkey`. Layout-compatible with `struct ibv_sge`, so a slice of them is handed to the device
/// as is.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sge {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Local key of the memory region containing `[addr, addr + len)`.
    pub lkey: u32,
}

// `Sge` slices are passed to the device as `ibv_sge` arrays: the layouts must match exactly.
const _: () = {
    assert!(size_of::<Sge>() == size_of::<ibv_sge>());
    assert!(align_of::<Sge>() == align_of::<ibv_sge>());
    assert!(offset_of!(Sge, addr) == offset_of!(ibv_sge, addr));
    assert!(offset_of!(Sge, len) == offset_of!(ibv_sge, length));
    assert!(offset_of!(Sge, lkey) == offset_of!(ibv_sge, lkey));
};

/// The far side of an RDMA READ or WRITE: an address in the peer's memory region and that
/// region's remote key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Remote {
    /// Address in the peer's address space.
    pub addr: u64,
    /// The peer region's rkey.
    pub rkey: u32,
}

/// How to create and connect an RC queue pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QpConfig {
    /// Device port, 1-based.
    pub port: u8,
    /// GID table index to use; `None` picks [`PortInfo::default_gid`]
    /// (first RoCE v2 IPv4-mapped GID on RoCE, index 0 on InfiniBand).
    ///
    /// [`PortInfo::default_gid`]: crate::devices::PortInfo::default_gid
    pub gid_index: Option<u8>,
    /// Send queue depth (SEND, RDMA WRITE, RDMA READ outstanding at once).
    pub max_send_wr: u32,
    /// Receive queue depth.
    pub max_recv_wr: u32,
    /// Scatter/gather entries per send-side work request.
    pub max_send_sge: u32,
    /// Scatter/gather entries per receive.
    pub max_recv_sge: u32,
    /// Largest inline SEND, in bytes.
    pub max_inline_data: u32,
    /// Let the peer RDMA READ/WRITE this side's memory regions (those registered with
    /// [`MrAccess::RemoteReadWrite`]). A server leaves this off.
    pub allow_remote_access: bool,
    /// Outstanding RDMA READs, as initiator and as responder. Must be at least 1 (with 0,
    /// RDMA READs neither fail nor complete); clamped to the device's limits.
    pub max_rd_atomic: u8,
    /// Local ACK timeout, 4.096 us * 2^timeout (0 = infinite; 14 = 67 ms).
    pub timeout: u8,
    /// Transport retries before a work request fails with RetryExceededError (0..=7).
    pub retry_count: u8,
    /// Receiver-not-ready retries (0..=7; 7 = retry forever).
    pub rnr_retry: u8,
    /// Receiver-not-ready NAK timer code (0..=31; 12 = 0.64 ms).
    pub min_rnr_timer: u8,
}

/// Receiver-not-ready retries of every queue pair ([`QpConfig::rnr_retry`]'s default): 6,
/// finite (7 would retry for ever, so a peer that never posts receives would hold a SEND,
/// and everything queued behind it, for good).
///
/// How long a SEND waits before it fails with `RnrRetryExceededError`: the first try
/// plus 6 retries, each retry after the RNR NAK timer that the *receiving* side chose with
/// its own `min_rnr_timer`. With ours (code 12 = 0.64 ms) that is 6 x 0.64 ms = 3.84 ms of
/// timers; a peer that picked the longest timer (code 0 = 655.36 ms) makes it
/// 6 x 655.36 ms = 3.93 s, the most any peer can hold a SEND. zcio's receivers repost a
/// receive buffer before the credit it backs is free again, so a well-behaved peer never
/// answers "not ready" at all.
pub const RNR_RETRY: u8 = 6;

impl Default for QpConfig {
    fn default() -> Self {
        QpConfig {
            port: 1,
            gid_index: None,
            max_send_wr: 128,
            max_recv_wr: 128,
            max_send_sge: 16,
            max_recv_sge: 1,
            max_inline_data: 128,
            allow_remote_access: false,
            max_rd_atomic: 16,
            timeout: 14,
            retry_count: 7,
            rnr_retry: RNR_RETRY,
            min_rnr_timer: 12,
        }
    }
}

impl QpConfig {
    fn validate(&self) -> Result<(), RdmaError> {
        let bad = |what: String| Err(RdmaError::InvalidConfig { what });
        if self.port == 0 {
            return bad("port numbers start at 1".into());
        }
        if self.max_send_wr == 0 || self.max_recv_wr == 0 {
            return bad("max_send_wr and max_recv_wr must be at least 1".into());
        }
        if self.max_send_sge == 0 || self.max_recv_sge == 0 {
            return bad("max_send_sge and max_recv_sge must be at least 1".into());
        }
        if self.max_rd_atomic == 0 {
            return bad("max_rd_atomic must be at least 1 (with 0, RDMA READs stall)".into());
        }
        if self.timeout > 31 || self.min_rnr_timer > 31 {
            return bad(format!(
                "timeout {} / min_rnr_timer {} out of range 0..=31",
                self.timeout, self.min_rnr_timer
            ));
        }
        if self.retry_count > 7 || self.rnr_retry > 7 {
            return bad(format!(
                "retry_count {} / rnr_retry {} out of range 0..=7",
                self.retry_count, self.rnr_retry
            ));
        }
        Ok(())
    }
}

/// The limits a queue pair actually got (the device may round up what was asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QpCaps {
    /// Send queue depth.
    pub max_send_wr: u32,
    /// Receive queue depth.
    pub max_recv_wr: u32,
    /// Scatter/gather entries per send-side work request.
    pub max_send_sge: u32,
    /// Scatter/gather entries per receive.
    pub max_recv_sge: u32,
    /// Largest inline SEND.
    pub max_inline_data: u32,
}

/// A reliable-connected queue pair. Created in INIT (so receives can be posted before the
/// peer connects); [`connect`](Self::connect) moves it through RTR to RTS. Keeps its PD, CQs
/// and device alive.
///
/// Posting takes `&self` (posting is thread-safe in libibverbs) and allocates nothing; state
/// changes take `&mut self`.
pub struct QueuePair {
    qp: BasicQueuePair,
    pd: ProtectionDomain,
    caps: QpCaps,
    cfg: QpConfig,
    local: Endpoint,
    link_layer: LinkLayer,
    max_rd_atomic: u8,
    max_dest_rd_atomic: u8,
    remote: Option<Endpoint>,
}

impl fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuePair")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("caps", &self.caps)
            .finish()
    }
}

fn sideway_mtu(mtu: Mtu) -> SwMtu {
    match mtu {
        Mtu::Mtu256 => SwMtu::Mtu256,
        Mtu::Mtu512 => SwMtu::Mtu512,
        Mtu::Mtu1024 => SwMtu::Mtu1024,
        Mtu::Mtu2048 => SwMtu::Mtu2048,
        Mtu::Mtu4096 => SwMtu::Mtu4096,
    }
}

/// A random 24-bit packet sequence number.
fn random_psn(qpn: u32) -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: `bytes` is a valid, writable buffer of the length passed.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    let value = if got == bytes.len() as isize {
        u32::from_ne_bytes(bytes)
    } else {
        // getrandom(2) is missing or failed: any value works, the PSN only has to be hard
        // to guess for a stale peer.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        nanos ^ qpn.rotate_left(7)
    };
    value & MAX_24BIT
}

/// The send-queue operations this layer posts.
#[derive(Clone, Copy)]
enum SendOp {
    Send,
    Write,
    Read,
}

impl SendOp {
    fn opcode(self) -> u32 {
        match self {
            SendOp::Send => ibv_wr_opcode::IBV_WR_SEND,
            SendOp::Write => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            SendOp::Read => ibv_wr_opcode::IBV_WR_RDMA_READ,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SendOp::Send => "SEND",
            SendOp::Write => "RDMA WRITE",
            SendOp::Read => "RDMA READ",
        }
    }
}

/// How a send-queue work request is posted.
#[derive(Clone, Copy)]
struct Post {
    /// The data is copied into the work request (`IBV_SEND_INLINE`).
    inline: bool,
    /// It produces a completion (`IBV_SEND_SIGNALED`); unsignaled ones only do on failure.
    signaled: bool,
}

/// A send-queue work request `wr_id` of `opcode` with `send_flags`, and nothing else: no
/// scatter/gather list, no remote address, no immediate data, no window (the caller sets
/// what its opcode needs). `next` is NULL: one work request.
fn send_wr(wr_id: u64, opcode: u32, send_flags: u32) -> ibv_send_wr {
    ibv_send_wr {
        wr_id,
        next: ptr::null_mut(),
        sg_list: ptr::null_mut(),
        num_sge: 0,
        opcode,
        send_flags,
        imm_data_invalidated_rkey_union: imm_data_invalidated_rkey_union_t { imm_data: 0 },
        wr: wr_t {
            rdma: rdma_t {
                remote_addr: 0,
                rkey: 0,
            },
        },
        qp_type: qp_type_t {
            xrc: xrc_t { remote_srqn: 0 },
        },
        bind_mw_tso_union: bind_mw_tso_union_t {
            tso: tso_t {
                hdr: ptr::null_mut(),
                hdr_sz: 0,
                mss: 0,
            },
        },
    }
}

/// `IBV_SEND_SIGNALED` if `signaled`, else no flag.
fn signaled_flag(signaled: bool) -> u32 {
    if signaled {
        ibv_send_flags::IBV_SEND_SIGNALED.0
    } else {
        0
    }
}

impl QueuePair {
    /// Creates an RC queue pair on `pd` using `send_cq` and `recv_cq` (they may be the same
    /// CQ), and moves it to INIT. Checks the configuration against the device's limits and
    /// reads the port's LID, active MTU and GID into the [`local_endpoint`](Self::local_endpoint).
    pub fn new(
        pd: &ProtectionDomain,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
        cfg: &QpConfig,
    ) -> Result<QueuePair, RdmaError> {
        cfg.validate()?;
        let ctx = pd.context();
        let dev = ctx.caps()?;
        let too_big = |what: &str, asked: u32, max: u32| -> Result<(), RdmaError> {
            if asked > max {
                return Err(RdmaError::InvalidConfig {
                    what: format!("{what} {asked} exceeds the limit {max} of `{}`", ctx.name()),
                });
            }
            Ok(())
        };
        too_big("max_send_wr", cfg.max_send_wr, dev.max_qp_wr)?;
        too_big("max_recv_wr", cfg.max_recv_wr, dev.max_qp_wr)?;
        too_big("max_send_sge", cfg.max_send_sge, dev.max_sge)?;
        too_big("max_recv_sge", cfg.max_recv_sge, dev.max_sge)?;
        let clamp = |limit: u32| -> u8 {
            u8::try_from(limit)
                .unwrap_or(u8::MAX)
                .min(cfg.max_rd_atomic)
                .max(1)
        };
        let max_rd_atomic = clamp(dev.max_qp_init_rd_atom);
        let max_dest_rd_atomic = clamp(dev.max_qp_rd_atom);

        let port = ctx.port_info(cfg.port)?;
        if !matches!(port.state, PortState::Active | PortState::ActiveDefer) {
            return Err(RdmaError::InvalidConfig {
                what: format!(
                    "port {} of `{}` is {}, not ACTIVE",
                    cfg.port,
                    ctx.name(),
                    port.state
                ),
            });
        }
        let mtu = port.active_mtu.ok_or_else(|| RdmaError::InvalidConfig {
            what: format!(
                "port {} of `{}` reports no active MTU",
                cfg.port,
                ctx.name()
            ),
        })?;
        let gid = match cfg.gid_index {
            Some(index) => port.gid(u32::from(index)),
            None => port.default_gid(),
        }
        .ok_or_else(|| RdmaError::NoGid {
            device: ctx.name().to_owned(),
            port: cfg.port,
            what: match cfg.gid_index {
                Some(index) => format!("at index {index}"),
                None => "at any index".to_owned(),
            },
        })?;
        let gid_index = u8::try_from(gid.index).map_err(|_| RdmaError::NoGid {
            device: ctx.name().to_owned(),
            port: cfg.port,
            what: format!("below index 256 (the first usable is {})", gid.index),
        })?;

        let mut builder = pd.sideway().create_qp_builder();
        builder
            .setup_qp_type(QueuePairType::ReliableConnection)
            .setup_max_send_wr(cfg.max_send_wr)
            .setup_max_recv_wr(cfg.max_recv_wr)
            .setup_max_send_sge(cfg.max_send_sge)
            .setup_max_recv_sge(cfg.max_recv_sge)
            .setup_max_inline_data(cfg.max_inline_data)
            .setup_send_cq(send_cq.sideway().clone())
            .setup_recv_cq(recv_cq.sideway().clone());
        let qp = builder.build().map_err(|e| RdmaError::CreateQp {
            source: match e.0 {
                CreateQueuePairErrorKind::Ibverbs(e) => e,
                other => io::Error::other(other.to_string()),
            },
        })?;
        let qpn = qp.qp_number();

        // What the device really granted (sideway's builder drops it).
        let (_, init) = qp
            .query(QueuePairAttributeMask::Capabilities)
            .map_err(|e| RdmaError::QueryQp {
                qpn,
                source: match e.0 {
                    QueryQueuePairErrorKind::Ibverbs(e) => e,
                    other => io::Error::other(other.to_string()),
                },
            })?;
        let caps = QpCaps {
            max_send_wr: init.max_send_wr(),
            max_recv_wr: init.max_recv_wr(),
            max_send_sge: init.max_send_sge(),
            max_recv_sge: init.max_recv_sge(),
            max_inline_data: init.max_inline_data(),
        };

        let local = Endpoint {
            qpn,
            psn: random_psn(qpn),
            lid: port.lid,
            port: cfg.port,
            gid_index,
            gid: gid.gid,
            mtu,
        };
        let mut qp = QueuePair {
            qp,
            pd: pd.clone(),
            caps,
            cfg: cfg.clone(),
            local,
            link_layer: port.link_layer,
            max_rd_atomic,
            max_dest_rd_atomic,
            remote: None,
        };
        qp.move_to_init()?;
        Ok(qp)
    }

    fn modify(&mut self, attr: &QueuePairAttribute, to_state: QpState) -> Result<(), RdmaError> {
        let qpn = self.local.qpn;
        self.qp.modify(attr).map_err(|e: ModifyQueuePairError| {
            let detail = e.to_string();
            let source = match e.0 {
                ModifyQueuePairErrorKind::Ibverbs(e) => e,
                ModifyQueuePairErrorKind::InvalidTransition { source, .. } => source,
                ModifyQueuePairErrorKind::InvalidAttributeMask { source, .. } => source,
                ModifyQueuePairErrorKind::ResolveRouteTimedout { source, .. } => source,
                ModifyQueuePairErrorKind::NetworkUnreachable { source, .. } => source,
                other => io::Error::other(other.to_string()),
            };
            RdmaError::ModifyQp {
                qpn,
                to_state,
                detail,
                source,
            }
        })
    }

    fn move_to_init(&mut self) -> Result<(), RdmaError> {
        let mut access = AccessFlags::LocalWrite;
        if self.cfg.allow_remote_access {
            access = access | AccessFlags::RemoteRead | AccessFlags::RemoteWrite;
        }
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.cfg.port)
            .setup_access_flags(access);
        self.modify(&attr, QpState::Init)
    }

    /// Connects to the peer's queue pair: INIT -> RTR (with the peer's QPN, PSN, GID, LID;
    /// path MTU the smaller of both sides') -> RTS (with this side's PSN). Both sides must
    /// exchange [`local_endpoint`](Self::local_endpoint)s and call this; post receives
    /// before the peer may start sending.
    pub fn connect(&mut self, remote: &Endpoint) -> Result<(), RdmaError> {
        self.ready_to_receive(remote)?;
        self.ready_to_send()
    }

    /// INIT -> RTR, the first half of [`connect`](Self::connect).
    pub fn ready_to_receive(&mut self, remote: &Endpoint) -> Result<(), RdmaError> {
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(remote.lid)
            .setup_port(self.cfg.port)
            .setup_service_level(0);
        // RoCE always needs a GRH; InfiniBand only to leave the subnet (no LID known).
        if self.link_layer == LinkLayer::Ethernet || remote.lid == 0 {
            ah.setup_grh(
                &Gid::from(remote.gid),
                0,
                self.local.gid_index,
                HOP_LIMIT,
                0,
            );
        }
        let path_mtu = self.local.mtu.min(remote.mtu);
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(sideway_mtu(path_mtu))
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(self.max_dest_rd_atomic)
            .setup_min_rnr_timer(self.cfg.min_rnr_timer)
            .setup_address_vector(&ah);
        self.modify(&attr, QpState::ReadyToReceive)?;
        self.remote = Some(*remote);
        Ok(())
    }

    /// RTR -> RTS, the second half of [`connect`](Self::connect).
    pub fn ready_to_send(&mut self) -> Result<(), RdmaError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.local.psn)
            .setup_timeout(self.cfg.timeout)
            .setup_retry_cnt(self.cfg.retry_count)
            .setup_rnr_retry(self.cfg.rnr_retry)
            .setup_max_read_atomic(self.max_rd_atomic);
        self.modify(&attr, QpState::ReadyToSend)
    }

    /// Moves the queue pair to the error state: every outstanding work request completes
    /// flushed (use it to drain before dropping).
    pub fn set_error(&mut self) -> Result<(), RdmaError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Error);
        self.modify(&attr, QpState::Error)
    }

    /// The real current state, from `ibv_query_qp` (the state cached in `struct ibv_qp`
    /// does not see transitions the device makes on its own, such as into Error).
    pub fn query_state(&self) -> Result<QpState, RdmaError> {
        let (attr, _) =
            self.qp
                .query(QueuePairAttributeMask::State)
                .map_err(|e| RdmaError::QueryQp {
                    qpn: self.local.qpn,
                    source: match e.0 {
                        QueryQueuePairErrorKind::Ibverbs(e) => e,
                        other => io::Error::other(other.to_string()),
                    },
                })?;
        Ok(QpState::from_code(attr.state() as u32))
    }

    /// What the peer needs to connect to this queue pair.
    pub fn local_endpoint(&self) -> Endpoint {
        self.local
    }

    /// The peer's endpoint, once [`ready_to_receive`](Self::ready_to_receive) succeeded.
    pub fn remote_endpoint(&self) -> Option<Endpoint> {
        self.remote
    }

    /// The queue pair number.
    pub fn qp_num(&self) -> u32 {
        self.local.qpn
    }

    /// The limits the queue pair got.
    pub fn caps(&self) -> QpCaps {
        self.caps
    }

    /// The protection domain it was created on.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.pd
    }

    fn raw(&self) -> *mut ibv_qp {
        // SAFETY: only reads the pointer; `self.qp` keeps the QP alive while `self` lives and
        // the pointer is only used within borrows of `self`.
        unsafe { self.qp.qp() }.as_ptr()
    }

    fn check_sges(&self, n: usize) -> Result<(), RdmaError> {
        if n > self.caps.max_send_sge as usize {
            return Err(RdmaError::TooManySges {
                got: n,
                max: self.caps.max_send_sge,
            });
        }
        Ok(())
    }

    /// Posts one send-queue work request.
    ///
    /// # Safety
    ///
    /// `sg_list` must point to `num_sge` readable `ibv_sge`s (any pointer if `num_sge` is 0)
    /// that stay valid for the duration of the call.
    unsafe fn post_one(
        &self,
        wr_id: u64,
        op: SendOp,
        sg_list: *const ibv_sge,
        num_sge: usize,
        remote: Remote,
        how: Post,
    ) -> Result<(), RdmaError> {
        let mut flags = signaled_flag(how.signaled);
        if how.inline {
            flags |= ibv_send_flags::IBV_SEND_INLINE.0;
        }
        if matches!(op, SendOp::Send) {
            // A peer waiting only for messages (its CQ armed for solicited completions) is
            // woken by this one, and not by its own send-queue completions.
            flags |= ibv_send_flags::IBV_SEND_SOLICITED.0;
        }
        let mut wr = send_wr(wr_id, op.opcode(), flags);
        // Providers only read the list; the `*mut` is the C prototype's.
        wr.sg_list = sg_list.cast_mut();
        wr.num_sge = num_sge as i32;
        wr.wr = wr_t {
            rdma: rdma_t {
                remote_addr: remote.addr,
                rkey: remote.rkey,
            },
        };
        // SAFETY: `wr` is one work request on the stack (next = NULL); its scatter/gather
        // list is valid per this function's contract, and with IBV_SEND_INLINE the provider
        // copies the data before returning. The device checks the lkeys and the remote key;
        // memory registration's contract makes what it may touch the caller's
        // responsibility.
        unsafe { self.post_wr(&mut wr, op.name()) }
    }

    /// Posts a signaled SEND gathering `sges` (at most [`QpCaps::max_send_sge`]); the peer
    /// must have a receive posted. Completes on this side's send CQ with `wr_id`.
    pub fn post_send(&self, wr_id: u64, sges: &[Sge]) -> Result<(), RdmaError> {
        self.post_sges(wr_id, SendOp::Send, sges, Remote { addr: 0, rkey: 0 }, true)
    }

    /// Posts a signaled inline SEND of the concatenation of `data` (at most
    /// [`QpCaps::max_inline_data`] bytes in at most [`QpCaps::max_send_sge`] pieces): the data
    /// is copied into the work request, so it needs no registration and may be reused as soon
    /// as this returns.
    pub fn post_send_inline(&self, wr_id: u64, data: &[&[u8]]) -> Result<(), RdmaError> {
        self.send_inline(wr_id, data, true)
    }

    /// Posts an unsignaled inline SEND (see [`QueuePair::post_send_inline`] and
    /// [`QueuePair::post_write_unsignaled`]).
    pub fn post_send_inline_unsignaled(&self, wr_id: u64, data: &[&[u8]]) -> Result<(), RdmaError> {
        self.send_inline(wr_id, data, false)
    }

    fn send_inline(&self, wr_id: u64, data: &[&[u8]], signaled: bool) -> Result<(), RdmaError> {
        let max_pieces = (self.caps.max_send_sge as usize).min(MAX_INLINE_PIECES);
        if data.len() > max_pieces {
            return Err(RdmaError::TooManySges {
                got: data.len(),
                max: max_pieces as u32,
            });
        }
        let total = data
            .iter()
            .fold(0usize, |acc, d| acc.saturating_add(d.len()));
        if total > self.caps.max_inline_data as usize {
            return Err(RdmaError::InlineTooLarge {
                len: total,
                max: self.caps.max_inline_data,
            });
        }
        let mut sges = [ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        }; MAX_INLINE_PIECES];
        for (sge, piece) in sges.iter_mut().zip(data) {
            sge.addr = piece.as_ptr() as u64;
            // Fits: the total was checked against a u32 limit.
            sge.length = piece.len() as u32;
        }
        // SAFETY: the first `data.len()` entries of `sges` describe the borrowed slices in
        // `data`, readable for the whole call; inline data is copied before the call returns.
        unsafe {
            self.post_one(
                wr_id,
                SendOp::Send,
                sges.as_ptr(),
                data.len(),
                Remote { addr: 0, rkey: 0 },
                Post {
                    inline: true,
                    signaled,
                },
            )
        }
    }

    /// Posts a signaled RDMA WRITE of the local `sges`, gathered in order, to `remote`.
    pub fn post_write(&self, wr_id: u64, sges: &[Sge], remote: Remote) -> Result<(), RdmaError> {
        self.post_sges(wr_id, SendOp::Write, sges, remote, true)
    }

    /// Posts an unsignaled RDMA WRITE: it produces no completion unless it fails. Send-queue
    /// work requests complete in order, so the next signaled one's completion also says this
    /// one is done (and its send-queue entry free); the caller must post one.
    pub fn post_write_unsignaled(
        &self,
        wr_id: u64,
        sges: &[Sge],
        remote: Remote,
    ) -> Result<(), RdmaError> {
        self.post_sges(wr_id, SendOp::Write, sges, remote, false)
    }

    /// Posts a signaled RDMA READ from `remote`, scattered in order into the local `sges`.
    pub fn post_read(&self, wr_id: u64, sges: &[Sge], remote: Remote) -> Result<(), RdmaError> {
        self.post_sges(wr_id, SendOp::Read, sges, remote, true)
    }

    /// Posts an unsignaled RDMA READ (see [`QueuePair::post_write_unsignaled`]): its data is
    /// in place once a later signaled work request of this queue pair completes.
    pub fn post_read_unsignaled(
        &self,
        wr_id: u64,
        sges: &[Sge],
        remote: Remote,
    ) -> Result<(), RdmaError> {
        self.post_sges(wr_id, SendOp::Read, sges, remote, false)
    }

    /// Posts an unsignaled SEND gathering `sges` (see [`QueuePair::post_write_unsignaled`]).
    pub fn post_send_unsignaled(&self, wr_id: u64, sges: &[Sge]) -> Result<(), RdmaError> {
        self.post_sges(
            wr_id,
            SendOp::Send,
            sges,
            Remote { addr: 0, rkey: 0 },
            false,
        )
    }

    /// Posts `op` on registered memory described by `sges`.
    fn post_sges(
        &self,
        wr_id: u64,
        op: SendOp,
        sges: &[Sge],
        remote: Remote,
        signaled: bool,
    ) -> Result<(), RdmaError> {
        self.check_sges(sges.len())?;
        // SAFETY: `Sge` is layout-compatible with `ibv_sge` (checked at compile time) and
        // the slice outlives the call.
        unsafe {
            self.post_one(
                wr_id,
                op,
                sges.as_ptr().cast(),
                sges.len(),
                remote,
                Post {
                    inline: false,
                    signaled,
                },
            )
        }
    }

    /// Posts a bind of `window` over `len` bytes at `addr` of `mr` with `access`, and
    /// returns the rkey the peer of this queue pair may use for it once the bind has
    /// executed (work requests execute in order, so a SEND posted after it reaches the peer
    /// only after it). The completion, if `signaled` or failed, has `wr_id`.
    ///
    /// `mr` must be registered [`MrAccess::LocalWriteBind`], the window free
    /// ([`MemoryWindow::is_bound`] false) and all three of this queue pair's protection
    /// domain; `[addr, addr + len)` non-empty and inside `mr`. Safe: what the peer may then
    /// touch is memory the caller registered for exactly this, under the contract of
    /// [`ProtectionDomain::register`].
    #[allow(clippy::too_many_arguments)]
    pub fn post_bind(
        &self,
        wr_id: u64,
        window: &mut MemoryWindow,
        mr: &MemoryRegion,
        addr: u64,
        len: usize,
        access: WindowAccess,
        signaled: bool,
    ) -> Result<u32, RdmaError> {
        let bad = |what: String| Err(RdmaError::Window { what });
        if mr.access() != MrAccess::LocalWriteBind {
            return bad(format!(
                "binding over a region registered {:?}, not LocalWriteBind",
                mr.access()
            ));
        }
        if window.is_bound() {
            return bad("binding a window that is still bound (invalidate it first)".into());
        }
        if window.pd().raw() != self.pd.raw() || mr.pd().raw() != self.pd.raw() {
            return bad(
                "window, region and queue pair belong to different protection domains".into(),
            );
        }
        if len == 0 || !usize::try_from(addr).is_ok_and(|a| mr.contains(a, len)) {
            return bad(format!(
                "{len} bytes at {addr:#x} are not a non-empty part of the region at {:#x} \
                 ({} bytes)",
                mr.addr(),
                mr.len()
            ));
        }
        let rkey = next_rkey(window.rkey());
        let mut wr = send_wr(
            wr_id,
            ibv_wr_opcode::IBV_WR_BIND_MW,
            signaled_flag(signaled),
        );
        wr.bind_mw_tso_union = bind_mw_tso_union_t {
            bind_mw: bind_mw_t {
                mw: window.raw(),
                rkey,
                bind_info: ibv_mw_bind_info {
                    mr: mr.raw(),
                    addr,
                    length: len as u64,
                    mw_access_flags: access.flags(),
                },
            },
        };
        // SAFETY: the window and region handles are live for the call (borrowed), and the
        // provider copies what it needs into the send queue before returning; see `post_wr`.
        unsafe { self.post_wr(&mut wr, "BIND_MW") }?;
        window.set_bound(rkey);
        Ok(rkey)
    }

    /// Posts a local invalidation of `window`'s current binding: once it has executed
    /// (its completion, or that of any later work request of this queue pair), the rkey it
    /// had grants nothing, and the window may be bound again.
    pub fn post_invalidate(
        &self,
        wr_id: u64,
        window: &mut MemoryWindow,
        signaled: bool,
    ) -> Result<(), RdmaError> {
        if !window.is_bound() {
            return Err(RdmaError::Window {
                what: "invalidating a window that is not bound".into(),
            });
        }
        let mut wr = send_wr(
            wr_id,
            ibv_wr_opcode::IBV_WR_LOCAL_INV,
            signaled_flag(signaled),
        );
        wr.imm_data_invalidated_rkey_union = imm_data_invalidated_rkey_union_t {
            invalidated_rkey: window.rkey(),
        };
        // SAFETY: a fully initialized work request without memory; see `post_wr`.
        unsafe { self.post_wr(&mut wr, "LOCAL_INV") }?;
        window.set_unbound();
        Ok(())
    }

    /// Posts one fully built send-queue work request.
    ///
    /// # Safety
    ///
    /// `wr` is one initialized work request (`next` NULL) whose pointers (scatter/gather
    /// list, window, region) are valid for the call.
    unsafe fn post_wr(&self, wr: &mut ibv_send_wr, opcode: &'static str) -> Result<(), RdmaError> {
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the QP pointer is live (owned by `self.qp`); `wr` is valid per this
        // function's contract.
        let ret = unsafe { ibv_post_send(self.raw(), wr, &mut bad) };
        if ret != 0 {
            return Err(RdmaError::PostSend {
                opcode,
                source: io::Error::from_raw_os_error(ret.abs()),
            });
        }
        Ok(())
    }

    /// Posts a receive of one buffer. An incoming SEND lands in it and completes on the
    /// receive CQ with `wr_id` and its length.
    ///
    /// Receives outstanding when the queue pair goes to the error state complete flushed, but
    /// on Soft-RoCE (rxe, Linux 6.1) a receive posted *after* that is accepted and never
    /// completed. So after any error completion stop posting, and take back the buffers of
    /// receives still posted once the queue pair is dropped, not from flush completions.
    pub fn post_recv(&self, wr_id: u64, buf: Sge) -> Result<(), RdmaError> {
        let mut sge = ibv_sge {
            addr: buf.addr,
            length: buf.len,
            lkey: buf.lkey,
        };
        let mut wr = ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: the QP pointer is live (owned by `self.qp`); `wr` and its one-entry list are
        // on the stack for the call (next = NULL). The device checks the lkey; registration's
        // contract covers what it writes.
        let ret = unsafe { ibv_post_recv(self.raw(), &mut wr, &mut bad) };
        if ret != 0 {
            return Err(RdmaError::PostRecv {
                source: io::Error::from_raw_os_error(ret.abs()),
            });
        }
        Ok(())
    }
}
