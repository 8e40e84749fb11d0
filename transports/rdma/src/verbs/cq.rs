//! Completion queues: polling into a caller-provided array, blocking waits on a completion
//! channel, and busy polling.

use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_mummy_sys::{
    ibv_ack_cq_events, ibv_cq, ibv_get_cq_event, ibv_poll_cq, ibv_req_notify_cq, ibv_wc,
    ibv_wc_flags, ibv_wc_opcode, ibv_wc_status,
};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue as _,
    CreateCompletionChannelErrorKind, CreateCompletionQueueErrorKind,
};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::error::RdmaError;
use crate::verbs::context::Context;

/// Work completions fetched per `ibv_poll_cq` call; they live on the stack.
const POLL_BATCH: usize = 16;

/// How [`CompletionQueue::wait`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CqMode {
    /// Arm the CQ and sleep on its completion channel: an idle connection burns no CPU.
    Event,
    /// Spin on `ibv_poll_cq`: lowest latency, one core per waiting thread.
    BusyPoll,
}

/// Status of a work completion (`enum ibv_wc_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcStatus {
    /// The work request completed.
    Success,
    /// Local length error (e.g. a receive buffer too small for the incoming SEND).
    LocalLengthError,
    /// Local queue pair operation error.
    LocalQpOperationError,
    /// Local protection error: an lkey or address outside its memory region.
    LocalProtectionError,
    /// Flushed: the queue pair was (or went) into the error state.
    WrFlushError,
    /// Memory window bind error.
    MemoryWindowBindError,
    /// Unexpected response from the responder.
    BadResponseError,
    /// Local access error (e.g. writing a region without local write access).
    LocalAccessError,
    /// The responder found the request invalid.
    RemoteInvalidRequestError,
    /// The responder rejected the rkey, address range or access (RDMA READ/WRITE).
    RemoteAccessError,
    /// The responder could not complete the operation.
    RemoteOperationError,
    /// Transport retries exhausted: the peer is gone or unreachable.
    RetryExceededError,
    /// Receiver-not-ready retries exhausted: the peer posted no receive in time.
    RnrRetryExceededError,
    /// The responder aborted the operation.
    RemoteAbortedError,
    /// Fatal device error.
    FatalError,
    /// Response timeout.
    ResponseTimeoutError,
    /// Other error.
    GeneralError,
    /// A status this crate does not know.
    Other(u32),
}

impl WcStatus {
    /// Decodes `enum ibv_wc_status`.
    pub fn from_code(code: u32) -> WcStatus {
        use ibv_wc_status::*;
        match code {
            IBV_WC_SUCCESS => WcStatus::Success,
            IBV_WC_LOC_LEN_ERR => WcStatus::LocalLengthError,
            IBV_WC_LOC_QP_OP_ERR => WcStatus::LocalQpOperationError,
            IBV_WC_LOC_PROT_ERR => WcStatus::LocalProtectionError,
            IBV_WC_WR_FLUSH_ERR => WcStatus::WrFlushError,
            IBV_WC_MW_BIND_ERR => WcStatus::MemoryWindowBindError,
            IBV_WC_BAD_RESP_ERR => WcStatus::BadResponseError,
            IBV_WC_LOC_ACCESS_ERR => WcStatus::LocalAccessError,
            IBV_WC_REM_INV_REQ_ERR => WcStatus::RemoteInvalidRequestError,
            IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccessError,
            IBV_WC_REM_OP_ERR => WcStatus::RemoteOperationError,
            IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExceededError,
            IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExceededError,
            IBV_WC_REM_ABORT_ERR => WcStatus::RemoteAbortedError,
            IBV_WC_FATAL_ERR => WcStatus::FatalError,
            IBV_WC_RESP_TIMEOUT_ERR => WcStatus::ResponseTimeoutError,
            IBV_WC_GENERAL_ERR => WcStatus::GeneralError,
            other => WcStatus::Other(other),
        }
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WcStatus::Other(code) => write!(f, "unknown completion status {code}"),
            known => fmt::Debug::fmt(known, f),
        }
    }
}

/// What a completed work request was (`enum ibv_wc_opcode`). Only meaningful when the status
/// is [`WcStatus::Success`]; error completions carry an undefined opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WcOpcode {
    /// A SEND this side posted.
    Send,
    /// An RDMA WRITE this side posted.
    RdmaWrite,
    /// An RDMA READ this side posted.
    RdmaRead,
    /// A receive consumed by an incoming SEND.
    Recv,
    /// A receive consumed by an incoming RDMA WRITE with immediate data.
    RecvRdmaWithImm,
    /// A memory window bind this side posted.
    BindMw,
    /// A local invalidation this side posted.
    LocalInv,
    /// Anything else.
    Other(u32),
}

impl WcOpcode {
    /// Decodes `enum ibv_wc_opcode`.
    pub fn from_code(code: u32) -> WcOpcode {
        use ibv_wc_opcode::*;
        match code {
            IBV_WC_SEND => WcOpcode::Send,
            IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
            IBV_WC_RDMA_READ => WcOpcode::RdmaRead,
            IBV_WC_RECV => WcOpcode::Recv,
            IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
            IBV_WC_BIND_MW => WcOpcode::BindMw,
            IBV_WC_LOCAL_INV => WcOpcode::LocalInv,
            other => WcOpcode::Other(other),
        }
    }
}

/// One work completion, copied out of the CQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkCompletion {
    /// The `wr_id` the work request was posted with.
    pub wr_id: u64,
    /// Success or why not.
    pub status: WcStatus,
    /// What completed (valid on success only).
    pub opcode: WcOpcode,
    /// Bytes received, for receive completions.
    pub byte_len: u32,
    /// Immediate data (host byte order), if the peer sent any.
    pub imm: Option<u32>,
    /// The local queue pair the work request belonged to.
    pub qp_num: u32,
    /// Vendor-specific error code of failed completions.
    pub vendor_err: u32,
}

impl WorkCompletion {
    /// A placeholder to initialize arrays with before polling into them.
    pub const EMPTY: WorkCompletion = WorkCompletion {
        wr_id: 0,
        status: WcStatus::Success,
        opcode: WcOpcode::Other(u32::MAX),
        byte_len: 0,
        imm: None,
        qp_num: 0,
        vendor_err: 0,
    };

    /// Whether the work request succeeded.
    pub fn is_success(&self) -> bool {
        self.status == WcStatus::Success
    }

    fn from_wc(wc: &ibv_wc) -> WorkCompletion {
        let imm = if wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0 {
            // SAFETY: both members of this union are plain `u32`s, so every bit pattern is a
            // valid value of either; with IBV_WC_WITH_IMM set it holds immediate data.
            Some(u32::from_be(unsafe {
                wc.imm_data_invalidated_rkey_union.imm_data
            }))
        } else {
            None
        };
        WorkCompletion {
            wr_id: wc.wr_id,
            status: WcStatus::from_code(wc.status),
            opcode: WcOpcode::from_code(wc.opcode),
            byte_len: wc.byte_len,
            imm,
            qp_num: wc.qp_num,
            vendor_err: wc.vendor_err,
        }
    }
}

impl Default for WorkCompletion {
    fn default() -> Self {
        WorkCompletion::EMPTY
    }
}

/// A completion queue (the basic `ibv_cq`), with a completion channel in [`CqMode::Event`].
/// Cheap to clone; queue pairs using it keep it alive.
#[derive(Clone)]
pub struct CompletionQueue {
    inner: Arc<BasicCompletionQueue>,
    channel: Option<Arc<CompletionChannel>>,
    cqe: u32,
}

impl fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("cqe", &self.cqe)
            .field("mode", &self.mode())
            .finish()
    }
}

impl CompletionQueue {
    /// Creates a CQ with room for at least `cqe` completions (size it for every work request
    /// that can be outstanding on the queue pairs using it). [`CqMode::Event`] also creates a
    /// completion channel for it alone.
    pub fn new(ctx: &Context, cqe: u32, mode: CqMode) -> Result<CompletionQueue, RdmaError> {
        if cqe == 0 || cqe > i32::MAX as u32 {
            return Err(RdmaError::InvalidConfig {
                what: format!("completion queue size {cqe} (must be 1..=2^31-1)"),
            });
        }
        let sw_ctx = ctx.sideway();
        let channel = match mode {
            CqMode::BusyPoll => None,
            CqMode::Event => {
                let channel =
                    sw_ctx
                        .create_comp_channel()
                        .map_err(|e| RdmaError::CreateCompChannel {
                            source: match e.0 {
                                CreateCompletionChannelErrorKind::Ibverbs(e) => e,
                                other => io::Error::other(other.to_string()),
                            },
                        })?;
                // Non-blocking, so that a wake-up without an event (another thread took it)
                // cannot block in `ibv_get_cq_event`; waiting happens in poll(2).
                channel
                    .set_nonblocking(true)
                    .map_err(|source| RdmaError::CreateCompChannel { source })?;
                Some(channel)
            }
        };
        let mut builder = sw_ctx.create_cq_builder();
        builder.setup_cqe(cqe);
        if let Some(channel) = &channel {
            builder.setup_comp_channel(channel, 0);
        }
        let inner = builder.build().map_err(|e| RdmaError::CreateCq {
            cqe,
            source: match e.0 {
                CreateCompletionQueueErrorKind::Ibverbs(e) => e,
                other => io::Error::other(other.to_string()),
            },
        })?;
        Ok(CompletionQueue {
            inner,
            channel,
            cqe,
        })
    }

    /// How [`wait`](Self::wait) waits.
    pub fn mode(&self) -> CqMode {
        if self.channel.is_some() {
            CqMode::Event
        } else {
            CqMode::BusyPoll
        }
    }

    /// The size asked for at creation.
    pub fn capacity(&self) -> u32 {
        self.cqe
    }

    /// The completion channel's file descriptor ([`CqMode::Event`] only), to wait for it in
    /// an external event loop: call [`request_notify`](Self::request_notify), poll the CQ once
    /// more, wait for the fd to become readable, then [`ack_event`](Self::ack_event).
    pub fn event_fd(&self) -> Option<BorrowedFd<'_>> {
        self.channel.as_ref().map(|c| {
            // SAFETY: the descriptor is the channel's, and `self` keeps the channel (and so
            // the descriptor) open for as long as the returned borrow of `self` lasts.
            unsafe { BorrowedFd::borrow_raw(c.as_raw_fd()) }
        })
    }

    pub(crate) fn sideway(&self) -> &Arc<BasicCompletionQueue> {
        &self.inner
    }

    fn raw(&self) -> NonNull<ibv_cq> {
        // SAFETY: only reads the pointer; `self.inner` keeps the CQ alive for as long as
        // `self` lives, and every use of the pointer below is within a borrow of `self`.
        unsafe { self.inner.cq() }
    }

    /// Takes every available completion, up to `out.len()`, without waiting. Returns how many
    /// were written to the front of `out`. Allocates nothing.
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize, RdmaError> {
        let cq = self.raw();
        let mut wcs = [MaybeUninit::<ibv_wc>::uninit(); POLL_BATCH];
        let mut filled = 0;
        while filled < out.len() {
            let want = (out.len() - filled).min(POLL_BATCH);
            // SAFETY: `cq` is the live CQ owned by `self.inner`; `wcs` has room for
            // `want <= POLL_BATCH` entries and ibv_poll_cq writes at most `want`.
            let ret = unsafe { ibv_poll_cq(cq.as_ptr(), want as i32, wcs.as_mut_ptr().cast()) };
            if ret < 0 {
                let errno = if ret == -1 { libc::EIO } else { -ret };
                return Err(RdmaError::PollCq {
                    source: io::Error::from_raw_os_error(errno),
                });
            }
            let got = (ret as usize).min(want);
            for (slot, wc) in out[filled..filled + got].iter_mut().zip(&wcs[..got]) {
                // SAFETY: ibv_poll_cq initialized the first `got` entries of `wcs`.
                *slot = WorkCompletion::from_wc(unsafe { wc.assume_init_ref() });
            }
            filled += got;
            if got < want {
                break;
            }
        }
        Ok(filled)
    }

    /// Waits until at least one completion is available, then takes up to `out.len()` like
    /// [`poll`](Self::poll). Returns 0 only if `timeout` passed (or `out` is empty). In
    /// [`CqMode::Event`] the thread sleeps on the completion channel; in
    /// [`CqMode::BusyPoll`] it spins. Allocates nothing.
    pub fn wait(
        &self,
        out: &mut [WorkCompletion],
        timeout: Option<Duration>,
    ) -> Result<usize, RdmaError> {
        match self.channel {
            Some(_) => self.wait_event(out, timeout),
            None => self.busy_wait(out, timeout),
        }
    }

    /// Spins on [`poll`](Self::poll) until at least one completion is available or `timeout`
    /// passed, whatever the mode. Allocates nothing.
    pub fn busy_wait(
        &self,
        out: &mut [WorkCompletion],
        timeout: Option<Duration>,
    ) -> Result<usize, RdmaError> {
        if out.is_empty() {
            return Ok(0);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let n = self.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(0);
            }
            std::hint::spin_loop();
        }
    }

    fn wait_event(
        &self,
        out: &mut [WorkCompletion],
        timeout: Option<Duration>,
    ) -> Result<usize, RdmaError> {
        if out.is_empty() {
            return Ok(0);
        }
        let Some(fd) = self.event_fd() else {
            return self.busy_wait(out, timeout);
        };
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let n = self.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            self.request_notify()?;
            // A completion that arrived between the poll above and arming raises no event:
            // poll once more after arming.
            let n = self.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            let Some(timeout_ms) = poll_timeout_ms(deadline) else {
                return Ok(0);
            };
            let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
            let ret = match poll_fds(&mut pfd, timeout_ms) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(RdmaError::GetCqEvent { source: e.into() }),
            };
            if ret > 0 {
                self.ack_event()?;
            }
        }
    }

    /// Like [`wait`](Self::wait), but also returns when `fd` becomes readable (data, end of
    /// stream or an error on it): one thread can watch a connection's completions and its
    /// bootstrap socket. Returns the completions taken (written to the front of `out`; 0 on
    /// timeout or when only `fd` is ready) and whether `fd` is ready. In
    /// [`CqMode::BusyPoll`] it spins and checks `fd` every 256 empty polls. Allocates nothing.
    pub fn wait_or_readable(
        &self,
        out: &mut [WorkCompletion],
        fd: BorrowedFd<'_>,
        timeout: Option<Duration>,
    ) -> Result<(usize, bool), RdmaError> {
        if out.is_empty() {
            return Ok((0, fd_ready(fd, 0)?));
        }
        self.wait_or_readable_with(fd, timeout, || self.poll(out))
    }

    /// Like [`wait_or_readable`](Self::wait_or_readable), but every look at the CQ is a call
    /// of `drain`, which takes the completions and handles them itself (say, under a lock
    /// shared with other threads that poll this CQ, so that completions are handled in the
    /// order the CQ gave them) and returns how many it took. Returns as soon as `drain` took
    /// some, or `fd` is ready, or `timeout` passed: (taken, whether `fd` is ready).
    pub fn wait_or_readable_with(
        &self,
        fd: BorrowedFd<'_>,
        timeout: Option<Duration>,
        drain: impl FnMut() -> Result<usize, RdmaError>,
    ) -> Result<(usize, bool), RdmaError> {
        let (n, ready) = self.wait_fds_with(true, [fd, fd], timeout, drain)?;
        Ok((n, ready[0]))
    }

    /// Waits for completions (when `watch` is true; else only for the descriptors) or for
    /// either of `fds` to become readable, up to `timeout`. Completions are taken by
    /// `drain`, as in [`wait_or_readable_with`](Self::wait_or_readable_with). Returns how
    /// many were taken and which of `fds` are ready. In [`CqMode::BusyPoll`] it spins and
    /// checks the descriptors every 256 empty polls (watching or not). Allocates nothing.
    pub fn wait_fds_with(
        &self,
        watch: bool,
        fds: [BorrowedFd<'_>; 2],
        timeout: Option<Duration>,
        mut drain: impl FnMut() -> Result<usize, RdmaError>,
    ) -> Result<(usize, [bool; 2]), RdmaError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let Some(channel_fd) = self.event_fd() else {
            let mut spins = 0u32;
            loop {
                let n = drain()?;
                if n > 0 {
                    return Ok((n, [false; 2]));
                }
                spins = spins.wrapping_add(1);
                if spins % 256 == 0 {
                    let ready = [fd_ready(fds[0], 0)?, fd_ready(fds[1], 0)?];
                    if ready[0] || ready[1] {
                        return Ok((drain()?, ready));
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok((0, [false; 2]));
                    }
                }
                std::hint::spin_loop();
            }
        };
        loop {
            if watch {
                let n = drain()?;
                if n > 0 {
                    return Ok((n, [false; 2]));
                }
                self.request_notify()?;
                // As in `wait_event`: a completion that raced the arming raises no event.
                let n = drain()?;
                if n > 0 {
                    return Ok((n, [false; 2]));
                }
            }
            let Some(timeout_ms) = poll_timeout_ms(deadline) else {
                return Ok((0, [false; 2]));
            };
            let mut pfds = [
                PollFd::new(fds[0], PollFlags::POLLIN),
                PollFd::new(fds[1], PollFlags::POLLIN),
                PollFd::new(channel_fd, PollFlags::POLLIN),
            ];
            let n = if watch { 3 } else { 2 };
            match poll_fds(&mut pfds[..n], timeout_ms) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(RdmaError::GetCqEvent { source: e.into() }),
            }
            if watch && is_ready(&pfds[2]) {
                self.ack_event()?;
            }
            let ready = [is_ready(&pfds[0]), is_ready(&pfds[1])];
            if ready[0] || ready[1] {
                let n = if watch { drain()? } else { 0 };
                return Ok((n, ready));
            }
        }
    }

    /// Arms the CQ: the next completion added to it raises one event on the completion
    /// channel. ([`wait`](Self::wait) does this itself.)
    pub fn request_notify(&self) -> Result<(), RdmaError> {
        self.notify(false)
    }

    /// Arms the CQ for *solicited* completions only: the next receive completion of a
    /// message sent with the solicited flag (every SEND of [`QueuePair`](crate::verbs::QueuePair)
    /// has it), or the next failed completion, raises an event; successful send-queue
    /// completions do not. (On rxe a CQ already armed for any completion stays so.)
    pub fn request_notify_solicited(&self) -> Result<(), RdmaError> {
        self.notify(true)
    }

    fn notify(&self, solicited_only: bool) -> Result<(), RdmaError> {
        // SAFETY: the CQ pointer is live (owned by `self.inner`); the flag says whether only
        // solicited completions raise the event.
        let ret = unsafe { ibv_req_notify_cq(self.raw().as_ptr(), i32::from(solicited_only)) };
        if ret != 0 {
            return Err(RdmaError::RequestNotify {
                source: io::Error::from_raw_os_error(ret.abs()),
            });
        }
        Ok(())
    }

    /// Takes one pending event from the completion channel, without blocking, and
    /// acknowledges it. Returns whether there was one; `Ok(false)` in [`CqMode::BusyPoll`].
    /// ([`wait`](Self::wait) does this itself.)
    pub fn ack_event(&self) -> Result<bool, RdmaError> {
        let Some(channel) = &self.channel else {
            return Ok(false);
        };
        let mut ev_cq: *mut ibv_cq = ptr::null_mut();
        let mut ev_ctx: *mut libc::c_void = ptr::null_mut();
        // SAFETY: the channel pointer is live (owned by `channel`, which `self` holds); the
        // two out-pointers are valid for writes. The descriptor is non-blocking, so this
        // returns -1/EAGAIN instead of sleeping when no event is pending.
        let ret =
            unsafe { ibv_get_cq_event(channel.comp_channel().as_ptr(), &mut ev_cq, &mut ev_ctx) };
        if ret != 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
                _ => Err(RdmaError::GetCqEvent { source: err }),
            };
        }
        // The channel belongs to this CQ alone, so the event is ours; acknowledge exactly it
        // (every event must be acknowledged before the CQ can be destroyed). Ack our own,
        // known-live pointer rather than trusting `ev_cq`.
        // SAFETY: the CQ pointer is live, and one event for it was just taken and not yet
        // acknowledged.
        unsafe { ibv_ack_cq_events(self.raw().as_ptr(), 1) };
        Ok(true)
    }
}

/// `poll`'s timeout for waiting until `deadline`: -1 (no limit) without one, `None` once it
/// has passed, else the milliseconds left, rounded up so that a sub-millisecond rest does
/// not turn into a busy loop.
pub(crate) fn poll_timeout_ms(deadline: Option<Instant>) -> Option<i32> {
    let Some(d) = deadline else {
        return Some(-1);
    };
    let now = Instant::now();
    if now >= d {
        return None;
    }
    let left = d - now;
    let ms = left.as_millis() + u128::from(left.subsec_nanos() % 1_000_000 != 0);
    Some(ms.min(i32::MAX as u128) as i32)
}

/// Whether `fd` is readable (or at end of stream / in error) within `timeout_ms`.
fn fd_ready(fd: BorrowedFd<'_>, timeout_ms: i32) -> Result<bool, RdmaError> {
    let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match poll_fds(&mut pfd, timeout_ms) {
            Ok(n) => return Ok(n > 0 && is_ready(&pfd[0])),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(RdmaError::GetCqEvent { source: e.into() }),
        }
    }
}

/// `poll(2)` on `fds` for up to `timeout_ms` milliseconds (-1: no limit, as
/// [`poll_timeout_ms`] gives): how many are ready (0: the time ran out). An interrupted wait
/// is `Err(EINTR)`, for the caller to recompute its timeout and call again.
pub(crate) fn poll_fds(fds: &mut [PollFd<'_>], timeout_ms: i32) -> Result<usize, Errno> {
    let timeout = PollTimeout::try_from(timeout_ms.max(-1)).unwrap_or(PollTimeout::NONE);
    poll(fds, timeout).map(|n| usize::try_from(n).unwrap_or(0))
}

/// Whether the last [`poll_fds`] found `fd` ready in any way (readable, end of stream,
/// error): any returned event, as `revents != 0`.
pub(crate) fn is_ready(fd: &PollFd<'_>) -> bool {
    fd.revents().is_none_or(|r| !r.is_empty())
}
