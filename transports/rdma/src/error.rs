//! The one error type of the crate.
//!
//! Every variant is named after the operation that failed and carries the OS error (the errno
//! libibverbs or the provider returned) as its [`source`](std::error::Error::source), so a
//! caller printing the whole chain sees both what zcio tried and what the system said.

use std::io;

use crate::verbs::types::QpState;

/// Everything that can go wrong in the RDMA transport and its verbs layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    /// The binary was compiled without the cargo feature `rdma`.
    #[error("zcio was built without RDMA support (cargo feature `rdma`)")]
    NotBuilt,

    /// libibverbs could not be loaded at run time.
    #[error(
        "libibverbs is not installed or could not be loaded: install rdma-core \
         (Debian/Ubuntu: `apt-get install rdma-core ibverbs-providers`)"
    )]
    LibraryMissing {
        /// The error reported while listing devices (EOPNOTSUPP from the loader stub).
        source: io::Error,
    },

    /// libibverbs is present but the running kernel has no RDMA support at all.
    #[error(
        "the running kernel has no RDMA support (no uverbs devices in sysfs): use a kernel with \
         CONFIG_INFINIBAND, then load a driver, e.g. `modprobe rdma_rxe && rdma link add rxe0 \
         type rxe netdev <interface>` for Soft-RoCE"
    )]
    NoKernelSupport {
        /// The error reported while listing devices (ENOSYS).
        source: io::Error,
    },

    /// The kernel supports RDMA but there is no device.
    #[error(
        "no RDMA device found: check `ibv_devices`, that the provider library is installed \
         (ibverbs-providers), or create a Soft-RoCE device with `rdma link add rxe0 type rxe \
         netdev <interface>`"
    )]
    NoDevice,

    /// A device was asked for by name and is not present.
    #[error("RDMA device `{name}` not found (available: {available})")]
    DeviceNotFound {
        /// The name asked for.
        name: String,
        /// The names of the devices that are present, comma separated.
        available: String,
    },

    /// Listing devices failed for another reason.
    #[error("failed to list RDMA devices")]
    ListDevices {
        /// The OS error.
        source: io::Error,
    },

    /// `ibv_open_device` failed.
    #[error("failed to open RDMA device `{device}`")]
    OpenDevice {
        /// The device name.
        device: String,
        /// The OS error.
        source: io::Error,
    },

    /// `ibv_query_device` failed.
    #[error("failed to query the attributes of RDMA device `{device}`")]
    QueryDevice {
        /// The device name.
        device: String,
        /// The OS error.
        source: io::Error,
    },

    /// `ibv_query_port` failed (for example, a port number the device does not have).
    #[error("failed to query port {port} of RDMA device `{device}`")]
    QueryPort {
        /// The device name.
        device: String,
        /// The port number (1-based).
        port: u8,
        /// The OS error.
        source: io::Error,
    },

    /// Reading the GID table failed.
    #[error("failed to read the GID table of RDMA device `{device}`")]
    QueryGid {
        /// The device name.
        device: String,
        /// The OS error.
        source: io::Error,
    },

    /// No usable GID on the port, or the configured GID index is empty.
    #[error(
        "no usable GID {what} on port {port} of RDMA device `{device}` (see `zcio devices`; \
         a RoCE device needs an IP address on its network interface)"
    )]
    NoGid {
        /// The device name.
        device: String,
        /// The port number.
        port: u8,
        /// What was looked for, e.g. `at index 3`.
        what: String,
    },

    /// A configuration value is out of range for the verbs API or for this device.
    #[error("invalid RDMA configuration: {what}")]
    InvalidConfig {
        /// What is wrong, in words.
        what: String,
    },

    /// `ibv_alloc_pd` failed.
    #[error("failed to allocate an RDMA protection domain on `{device}`")]
    AllocPd {
        /// The device name.
        device: String,
        /// The OS error.
        source: io::Error,
    },

    /// `ibv_alloc_mw` failed (EOPNOTSUPP: the device or its provider has no memory windows).
    #[error("failed to allocate a type 2 memory window on `{device}`")]
    AllocMw {
        /// The device name.
        device: String,
        /// The OS error.
        source: io::Error,
    },

    /// A memory window bind or invalidation that cannot be posted as asked.
    #[error("memory window: {what}")]
    Window {
        /// What is wrong.
        what: String,
    },

    /// A region handed to registration is null or empty.
    #[error("cannot register memory at {addr:#x} with length {len}: {reason}")]
    InvalidRegion {
        /// Start address.
        addr: usize,
        /// Length in bytes.
        len: usize,
        /// Why it is rejected.
        reason: &'static str,
    },

    /// `ibv_reg_mr` failed.
    #[error(
        "failed to register {len} bytes at {addr:#x} for RDMA (ENOMEM here usually means the \
         locked-memory limit is too low: see `ulimit -l`)"
    )]
    RegisterMemory {
        /// Start address.
        addr: usize,
        /// Length in bytes.
        len: usize,
        /// The OS error.
        source: io::Error,
    },

    /// `ibv_create_comp_channel` failed, or the channel's file descriptor could not be set up.
    #[error("failed to create an RDMA completion channel")]
    CreateCompChannel {
        /// The OS error.
        source: io::Error,
    },

    /// `ibv_create_cq` failed.
    #[error("failed to create an RDMA completion queue with {cqe} entries")]
    CreateCq {
        /// Entries asked for.
        cqe: u32,
        /// The OS error.
        source: io::Error,
    },

    /// `ibv_req_notify_cq` failed.
    #[error("failed to arm the RDMA completion queue for an event")]
    RequestNotify {
        /// The OS error.
        source: io::Error,
    },

    /// Waiting for or reading a completion event failed.
    #[error("failed to wait for an RDMA completion event")]
    GetCqEvent {
        /// The OS error.
        source: io::Error,
    },

    /// `ibv_poll_cq` failed.
    #[error("failed to poll the RDMA completion queue")]
    PollCq {
        /// The OS error (or EIO when the provider gave no reason).
        source: io::Error,
    },

    /// `ibv_create_qp` failed.
    #[error("failed to create an RDMA RC queue pair")]
    CreateQp {
        /// The OS error.
        source: io::Error,
    },

    /// `ibv_query_qp` failed.
    #[error("failed to query the RDMA queue pair {qpn:#x}")]
    QueryQp {
        /// The queue pair number.
        qpn: u32,
        /// The OS error.
        source: io::Error,
    },

    /// `ibv_modify_qp` failed.
    #[error("failed to move RDMA queue pair {qpn:#x} to {to_state}: {detail}")]
    ModifyQp {
        /// The queue pair number.
        qpn: u32,
        /// The state asked for.
        to_state: QpState,
        /// What sideway made of the failure (e.g. which attribute masks are wrong).
        detail: String,
        /// The OS error.
        source: io::Error,
    },

    /// More scatter/gather entries than the queue pair was created with.
    #[error("{got} scatter/gather entries in one work request, the queue pair allows {max}")]
    TooManySges {
        /// Entries given.
        got: usize,
        /// The queue pair's limit.
        max: u32,
    },

    /// More inline data than the queue pair was created with.
    #[error("{len} bytes of inline data in one SEND, the queue pair allows {max}")]
    InlineTooLarge {
        /// Bytes given.
        len: usize,
        /// The queue pair's limit.
        max: u32,
    },

    /// `ibv_post_send` failed (ENOMEM: the send queue is full).
    #[error("failed to post an RDMA {opcode} work request")]
    PostSend {
        /// `SEND`, `RDMA WRITE` or `RDMA READ`.
        opcode: &'static str,
        /// The OS error.
        source: io::Error,
    },

    /// `ibv_post_recv` failed (ENOMEM: the receive queue is full).
    #[error("failed to post an RDMA receive")]
    PostRecv {
        /// The OS error.
        source: io::Error,
    },

    /// The locked-memory limit is below what the buffer pool needs.
    #[error(
        "the locked-memory limit (RLIMIT_MEMLOCK) is {have} bytes but RDMA needs {need} bytes \
         of buffer pool pinned: raise it with `ulimit -l unlimited` in the shell that starts \
         zcio, a `memlock` line in /etc/security/limits.conf, or `LimitMEMLOCK=infinity` in the \
         systemd unit"
    )]
    Memlock {
        /// The current soft limit in bytes.
        have: u64,
        /// The bytes the caller needs.
        need: u64,
    },

    /// Reading the locked-memory limit failed.
    #[error("failed to read the locked-memory limit (RLIMIT_MEMLOCK)")]
    MemlockQuery {
        /// The OS error.
        source: io::Error,
    },

    /// An encoded endpoint has the wrong length.
    #[error("RDMA endpoint record is {got} bytes, expected exactly {expected}")]
    EndpointLength {
        /// Bytes received.
        got: usize,
        /// Bytes of the fixed encoding.
        expected: usize,
    },

    /// An encoded endpoint has a field out of range.
    #[error("RDMA endpoint record has an invalid {field}: {value:#x}")]
    EndpointField {
        /// The field's name.
        field: &'static str,
        /// The value found.
        value: u64,
    },
}
