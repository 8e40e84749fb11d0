//! Devices, contexts, protection domains and memory regions.

use std::fmt;
use std::io;
use std::net::Ipv6Addr;
use std::sync::Arc;

use rdma_mummy_sys::{
    ibv_gid, ibv_gid_entry, ibv_query_gid_table, IBV_GID_TYPE_IB, IBV_GID_TYPE_ROCE_V1,
    IBV_GID_TYPE_ROCE_V2, IBV_GID_TYPE_SYSFS_IB_ROCE_V1, IBV_GID_TYPE_SYSFS_ROCE_V2,
};
use sideway::ibverbs::address::Gid;
use sideway::ibverbs::device::{
    DeviceInfo as _, DeviceList, GetDeviceListError, GetDeviceListErrorKind, OpenDeviceError,
    OpenDeviceErrorKind,
};
use sideway::ibverbs::device_context::{
    DeviceContext, QueryDeviceError, QueryDeviceErrorKind, QueryGidError, QueryGidErrorKind,
    QueryPortError, QueryPortErrorKind,
};
use sideway::ibverbs::memory_region::{
    MemoryRegion as SwMemoryRegion, RegisterMemoryRegionError, RegisterMemoryRegionErrorKind,
};
use sideway::ibverbs::protection_domain::ProtectionDomain as SwProtectionDomain;
use sideway::ibverbs::AccessFlags;

use crate::devices::{DeviceInfo, GidInfo, GidType, LinkLayer, PortInfo, PortState};
use crate::error::RdmaError;
use crate::verbs::qp::Sge;
use crate::verbs::types::Mtu;

// sideway wraps every OS error in a per-call `...ErrorKind` enum (non-exhaustive); these take
// the `io::Error` back out so it can be the `source` of an `RdmaError`.

fn device_list_os_error(err: GetDeviceListError) -> io::Error {
    match err.0 {
        GetDeviceListErrorKind::Ibverbs(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn open_os_error(err: OpenDeviceError) -> io::Error {
    match err.0 {
        OpenDeviceErrorKind::Ibverbs(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn query_device_os_error(err: QueryDeviceError) -> io::Error {
    match err.0 {
        QueryDeviceErrorKind::Ibverbs(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn query_port_os_error(err: QueryPortError) -> io::Error {
    match err.source {
        QueryPortErrorKind::Ibverbs(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn query_gid_os_error(err: QueryGidError) -> io::Error {
    match err.source {
        QueryGidErrorKind::Ibverbs(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn register_os_error(err: RegisterMemoryRegionError) -> io::Error {
    match err.0 {
        RegisterMemoryRegionErrorKind::Ibverbs(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// Gets the device list, turning "nothing there" into an error that says why.
fn device_list() -> Result<DeviceList, RdmaError> {
    match DeviceList::new() {
        Ok(list) if list.is_empty() => Err(RdmaError::NoDevice),
        Ok(list) => Ok(list),
        Err(err) => {
            let source = device_list_os_error(err);
            Err(match source.raw_os_error() {
                // rdma-mummy-sys' loader stub answers EOPNOTSUPP when libibverbs.so.1 could
                // not be dlopen'ed.
                Some(libc::EOPNOTSUPP) => RdmaError::LibraryMissing { source },
                // libibverbs answers ENOSYS when the kernel has no uverbs class in sysfs.
                Some(libc::ENOSYS) => RdmaError::NoKernelSupport { source },
                _ => RdmaError::ListDevices { source },
            })
        }
    }
}

/// Lists devices with ports and GIDs (the implementation of [`crate::devices::list_devices`]).
pub(crate) fn list_devices() -> Result<Vec<DeviceInfo>, RdmaError> {
    let list = device_list()?;
    let mut devices = Vec::with_capacity(list.len());
    for device in list.iter() {
        let name = device.name();
        let ctx = device.open().map_err(|e| RdmaError::OpenDevice {
            device: name.clone(),
            source: open_os_error(e),
        })?;
        let ports = query_ports(&ctx, &name)?;
        devices.push(DeviceInfo { name, ports });
    }
    Ok(devices)
}

/// Number of physical ports of an open device.
fn port_count(ctx: &DeviceContext, name: &str) -> Result<u8, RdmaError> {
    let attr = ctx.query_device().map_err(|e| RdmaError::QueryDevice {
        device: name.to_owned(),
        source: query_device_os_error(e),
    })?;
    Ok(attr.attr.orig_attr.phys_port_cnt)
}

/// Port attributes without GIDs, read from the raw `ibv_port_attr` (sideway's accessors panic
/// on values they do not know), and the length of the port's GID table.
fn query_port_attrs(
    ctx: &DeviceContext,
    name: &str,
    port: u8,
) -> Result<(PortInfo, usize), RdmaError> {
    let attr = ctx
        .query_port(port)
        .map_err(|e| RdmaError::QueryPort {
            device: name.to_owned(),
            port,
            source: query_port_os_error(e),
        })?
        .attr;
    let info = PortInfo {
        port,
        state: PortState::from_code(attr.state),
        active_mtu: Mtu::from_code(attr.active_mtu),
        link_layer: LinkLayer::from_code(attr.link_layer),
        lid: attr.lid,
        gids: Vec::new(),
    };
    Ok((info, usize::try_from(attr.gid_tbl_len).unwrap_or(0)))
}

/// Every port of the device, with its GIDs.
fn query_ports(ctx: &DeviceContext, name: &str) -> Result<Vec<PortInfo>, RdmaError> {
    let count = port_count(ctx, name)?;
    let mut ports = Vec::with_capacity(usize::from(count));
    let mut table_lens = Vec::with_capacity(usize::from(count));
    for port in 1..=count {
        let (info, table_len) = query_port_attrs(ctx, name, port)?;
        ports.push(info);
        table_lens.push(table_len);
    }
    fill_gids(ctx, name, &mut ports, &table_lens)?;
    Ok(ports)
}

fn netdev_name(ifindex: u32) -> Option<String> {
    if ifindex == 0 {
        return None;
    }
    // nix 0.30 gives an empty name, not an error, for an index with no interface.
    let name = nix::net::if_::if_indextoname(ifindex).ok()?;
    (!name.as_bytes().is_empty()).then(|| name.to_string_lossy().into_owned())
}

/// Reads the GID tables of all ports into `ports`, with `ibv_query_gid_table` (one call) or,
/// where the library lacks it, entry by entry.
fn fill_gids(
    ctx: &DeviceContext,
    name: &str,
    ports: &mut [PortInfo],
    table_lens: &[usize],
) -> Result<(), RdmaError> {
    let empty = ibv_gid_entry {
        gid: ibv_gid { raw: [0; 16] },
        gid_index: 0,
        port_num: 0,
        gid_type: 0,
        ndev_ifindex: 0,
    };
    let mut entries = vec![empty; table_lens.iter().sum()];
    // SAFETY: `ctx.context()` is the open device context `ctx` owns, alive for this call;
    // `entries` is a writable array of `entries.len()` `ibv_gid_entry`s and the wrapper passes
    // the entry size, so the library writes at most that many entries.
    let ret = unsafe {
        ibv_query_gid_table(
            ctx.context().as_ptr(),
            entries.as_mut_ptr(),
            entries.len(),
            0,
        )
    };
    if ret == -(libc::EOPNOTSUPP as isize) {
        return fill_gids_one_by_one(ctx, name, ports, table_lens);
    }
    let count = usize::try_from(ret).map_err(|_| RdmaError::QueryGid {
        device: name.to_owned(),
        source: io::Error::from_raw_os_error(ret.unsigned_abs() as i32),
    })?;
    for entry in entries.iter().take(count) {
        let gid = Ipv6Addr::from(Gid::from(entry.gid).raw);
        if gid.is_unspecified() {
            continue;
        }
        let gid_type = match entry.gid_type {
            IBV_GID_TYPE_IB => GidType::InfiniBand,
            IBV_GID_TYPE_ROCE_V1 => GidType::RoceV1,
            IBV_GID_TYPE_ROCE_V2 => GidType::RoceV2,
            other => GidType::Unknown(other),
        };
        if let Some(port) = ports
            .iter_mut()
            .find(|p| u32::from(p.port) == entry.port_num)
        {
            port.gids.push(GidInfo {
                index: entry.gid_index,
                gid,
                gid_type,
                netdev: netdev_name(entry.ndev_ifindex),
            });
        }
    }
    for port in ports.iter_mut() {
        port.gids.sort_by_key(|g| g.index);
    }
    Ok(())
}

/// Fallback for libraries without `ibv_query_gid_table`: `ibv_query_gid` and
/// `ibv_query_gid_type` per index.
fn fill_gids_one_by_one(
    ctx: &DeviceContext,
    name: &str,
    ports: &mut [PortInfo],
    table_lens: &[usize],
) -> Result<(), RdmaError> {
    for (port, &len) in ports.iter_mut().zip(table_lens) {
        for index in 0..u32::try_from(len).unwrap_or(0) {
            let gid = ctx
                .query_gid(port.port, index)
                .map_err(|e| RdmaError::QueryGid {
                    device: name.to_owned(),
                    source: query_gid_os_error(e),
                })?;
            let gid = Ipv6Addr::from(gid.raw);
            if gid.is_unspecified() {
                continue;
            }
            let gid_type = match ctx.query_gid_type(port.port, index) {
                Ok(IBV_GID_TYPE_SYSFS_ROCE_V2) => GidType::RoceV2,
                Ok(IBV_GID_TYPE_SYSFS_IB_ROCE_V1) if port.link_layer == LinkLayer::Ethernet => {
                    GidType::RoceV1
                }
                Ok(IBV_GID_TYPE_SYSFS_IB_ROCE_V1) => GidType::InfiniBand,
                Ok(other) => GidType::Unknown(other),
                Err(_) => GidType::Unknown(u32::MAX),
            };
            port.gids.push(GidInfo {
                index,
                gid,
                gid_type,
                netdev: None,
            });
        }
    }
    Ok(())
}

/// The limits of a device that matter for sizing queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCaps {
    /// Number of physical ports.
    pub ports: u8,
    /// Maximum work requests per queue.
    pub max_qp_wr: u32,
    /// Maximum scatter/gather entries per send or receive work request.
    pub max_sge: u32,
    /// Maximum scatter/gather entries per RDMA READ.
    pub max_sge_rd: u32,
    /// Maximum completion queue entries.
    pub max_cqe: u32,
    /// Maximum bytes in one memory region.
    pub max_mr_size: u64,
    /// Maximum outstanding RDMA READs a queue pair can receive (responder side).
    pub max_qp_rd_atom: u32,
    /// Maximum outstanding RDMA READs a queue pair can issue (initiator side).
    pub max_qp_init_rd_atom: u32,
    /// Maximum memory windows (0: none).
    pub max_mw: u32,
    /// Whether the device has type 2 memory windows (`IBV_DEVICE_MEM_WINDOW_TYPE_2A` or
    /// `_2B` in its capability flags): windows bound by a work request on one queue pair
    /// and invalidated by a work request, which is what [`MemoryWindow`] uses.
    ///
    /// [`MemoryWindow`]: crate::verbs::MemoryWindow
    pub mw_type2: bool,
}

/// `IBV_DEVICE_MEM_WINDOW_TYPE_2A | IBV_DEVICE_MEM_WINDOW_TYPE_2B` (verbs.h).
const MW_TYPE2_FLAGS: u32 = (1 << 23) | (1 << 24);

fn non_negative(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// An open RDMA device. Cheap to clone; the device stays open while any clone, PD, CQ, MR or
/// QP made from it is alive.
#[derive(Clone)]
pub struct Context {
    inner: Arc<DeviceContext>,
    name: Arc<str>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context").field("name", &self.name).finish()
    }
}

impl Context {
    /// Opens the device called `name`, or the first device when `name` is `None`.
    pub fn open(name: Option<&str>) -> Result<Context, RdmaError> {
        let list = device_list()?;
        let device = match name {
            None => list.get(0).ok_or(RdmaError::NoDevice)?,
            Some(wanted) => list.iter().find(|d| d.name() == wanted).ok_or_else(|| {
                RdmaError::DeviceNotFound {
                    name: wanted.to_owned(),
                    available: list.iter().map(|d| d.name()).collect::<Vec<_>>().join(", "),
                }
            })?,
        };
        let dev_name = device.name();
        let inner = device.open().map_err(|e| RdmaError::OpenDevice {
            device: dev_name.clone(),
            source: open_os_error(e),
        })?;
        Ok(Context {
            inner,
            name: dev_name.into(),
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's limits.
    pub fn caps(&self) -> Result<DeviceCaps, RdmaError> {
        let attr = self
            .inner
            .query_device()
            .map_err(|e| RdmaError::QueryDevice {
                device: self.name.to_string(),
                source: query_device_os_error(e),
            })?
            .attr
            .orig_attr;
        Ok(DeviceCaps {
            ports: attr.phys_port_cnt,
            max_qp_wr: non_negative(attr.max_qp_wr),
            max_sge: non_negative(attr.max_sge),
            max_sge_rd: non_negative(attr.max_sge_rd),
            max_cqe: non_negative(attr.max_cqe),
            max_mr_size: attr.max_mr_size,
            max_qp_rd_atom: non_negative(attr.max_qp_rd_atom),
            max_qp_init_rd_atom: non_negative(attr.max_qp_init_rd_atom),
            max_mw: non_negative(attr.max_mw),
            mw_type2: attr.device_cap_flags & MW_TYPE2_FLAGS != 0,
        })
    }

    /// One port with its GIDs. Port numbers start at 1.
    pub fn port_info(&self, port: u8) -> Result<PortInfo, RdmaError> {
        let mut ports = self.ports()?;
        match ports.iter().position(|p| p.port == port) {
            Some(i) => Ok(ports.swap_remove(i)),
            None => Err(RdmaError::QueryPort {
                device: self.name.to_string(),
                port,
                source: io::Error::from_raw_os_error(libc::EINVAL),
            }),
        }
    }

    /// All ports with their GIDs.
    pub fn ports(&self) -> Result<Vec<PortInfo>, RdmaError> {
        query_ports(&self.inner, &self.name)
    }

    /// Allocates a protection domain.
    pub fn alloc_pd(&self) -> Result<ProtectionDomain, RdmaError> {
        let inner = self.inner.alloc_pd().map_err(|e| RdmaError::AllocPd {
            device: self.name.to_string(),
            source: match e.0 {
                sideway::ibverbs::device_context::AllocateProtectionDomainErrorKind::Ibverbs(e) => {
                    e
                }
                other => io::Error::other(other.to_string()),
            },
        })?;
        Ok(ProtectionDomain {
            inner,
            ctx: self.clone(),
        })
    }

    pub(crate) fn sideway(&self) -> &Arc<DeviceContext> {
        &self.inner
    }
}

/// A protection domain: memory regions and queue pairs of one PD can be used together.
/// Cheap to clone.
#[derive(Clone)]
pub struct ProtectionDomain {
    inner: Arc<SwProtectionDomain>,
    ctx: Context,
}

impl fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.ctx.name)
            .finish()
    }
}

/// What a memory region allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MrAccess {
    /// The local device may read and write it (SEND source, RECV target, local side of RDMA
    /// READ/WRITE); no peer can touch it. What a server registers.
    LocalWrite,
    /// Also a peer holding the rkey may RDMA READ and RDMA WRITE it (a client's buffers,
    /// which the server reads from and writes into).
    RemoteReadWrite,
    /// Only a peer holding the rkey may RDMA READ it; the local device may read it too
    /// (SEND source, local side of an RDMA WRITE) but nothing may write it. For memory a
    /// client only sends from: it may be read-only, and the peer cannot modify it.
    RemoteRead,
    /// Local access, and memory windows may be bound over it ([`MemoryWindow`]): no peer
    /// can touch it through the region itself, only through a window while it is bound, in
    /// the window's direction. What a client registers with `rdma.client_exposure =
    /// "request"`.
    ///
    /// [`MemoryWindow`]: crate::verbs::MemoryWindow
    LocalWriteBind,
    /// Local access, and a peer holding the rkey may RDMA WRITE it (not READ it): a
    /// client's caller memory registered for one request's reply.
    RemoteWrite,
}

impl MrAccess {
    fn flags(self) -> AccessFlags {
        match self {
            MrAccess::LocalWrite => AccessFlags::LocalWrite,
            MrAccess::RemoteReadWrite => {
                AccessFlags::LocalWrite | AccessFlags::RemoteRead | AccessFlags::RemoteWrite
            }
            MrAccess::RemoteRead => AccessFlags::RemoteRead,
            MrAccess::LocalWriteBind => AccessFlags::LocalWrite | AccessFlags::MemoryWindowBind,
            MrAccess::RemoteWrite => AccessFlags::LocalWrite | AccessFlags::RemoteWrite,
        }
    }
}

impl ProtectionDomain {
    /// The device this PD belongs to.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Registers `len` bytes at `addr` with the device.
    ///
    /// # Safety
    ///
    /// The region `[addr, addr + len)` is handed to the device until the returned
    /// [`MemoryRegion`] and all its clones are dropped. The caller must ensure that:
    ///
    /// - the memory stays allocated (not freed, unmapped or remapped) for as long as the
    ///   region is registered, i.e. it outlives the `MemoryRegion`;
    /// - while registered, the memory may be written by the device at any time a work request
    ///   targets it (a posted RECV, the local side of an RDMA READ) and, with
    ///   [`MrAccess::RemoteReadWrite`] or [`MrAccess::RemoteWrite`], whenever a peer holding
    ///   the rkey decides to, and with [`MrAccess::LocalWriteBind`], whenever a peer holding
    ///   the rkey of a window bound over it decides to, while it is bound; so Rust
    ///   code must not hold references (`&[u8]`/`&mut [u8]`) to parts of it that the device
    ///   may write concurrently, and must only read a buffer after the completion of the work
    ///   request that filled it.
    ///
    /// Posting work requests is safe given this contract, because the device checks every
    /// lkey and rkey against the bounds and access rights of the region it names.
    pub unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        access: MrAccess,
    ) -> Result<MemoryRegion, RdmaError> {
        if addr.is_null() {
            return Err(RdmaError::InvalidRegion {
                addr: 0,
                len,
                reason: "null address",
            });
        }
        if len == 0 {
            return Err(RdmaError::InvalidRegion {
                addr: addr as usize,
                len,
                reason: "empty region",
            });
        }
        if (addr as usize).checked_add(len).is_none() {
            return Err(RdmaError::InvalidRegion {
                addr: addr as usize,
                len,
                reason: "region wraps around the address space",
            });
        }
        // SAFETY: the caller upholds this function's contract (the memory outlives the
        // registration and is shared with the device), which is exactly what sideway's
        // `reg_mr` requires; the address range was checked to be non-null, non-empty and
        // not wrapping.
        let inner =
            unsafe { self.inner.reg_mr(addr as usize, len, access.flags()) }.map_err(|e| {
                RdmaError::RegisterMemory {
                    addr: addr as usize,
                    len,
                    source: register_os_error(e),
                }
            })?;
        Ok(MemoryRegion {
            inner,
            pd: self.clone(),
            access,
            addr: addr as usize,
            len,
        })
    }

    pub(crate) fn sideway(&self) -> &Arc<SwProtectionDomain> {
        &self.inner
    }

    /// The `ibv_pd` handle. Valid while `self` lives.
    pub(crate) fn raw(&self) -> *mut rdma_mummy_sys::ibv_pd {
        // SAFETY: only reads the pointer; `self.inner` keeps the PD allocated while `self`
        // lives, and callers use it only within borrows of `self` (or keep a clone).
        unsafe { self.inner.pd() }.as_ptr()
    }
}

/// A registered memory region. Keeps its protection domain (and device) alive; deregisters
/// when the last clone is dropped. Cheap to clone.
#[derive(Clone)]
pub struct MemoryRegion {
    inner: Arc<SwMemoryRegion>,
    pd: ProtectionDomain,
    access: MrAccess,
    addr: usize,
    len: usize,
}

/// A [`MemoryRegion`] that is not kept registered: [`WeakRegion::upgrade`] gives it back
/// while some other handle keeps it registered.
pub(crate) struct WeakRegion {
    inner: std::sync::Weak<SwMemoryRegion>,
    pd: ProtectionDomain,
    access: MrAccess,
    addr: usize,
    len: usize,
}

impl WeakRegion {
    /// The region, if it is still registered.
    pub(crate) fn upgrade(&self) -> Option<MemoryRegion> {
        Some(MemoryRegion {
            inner: self.inner.upgrade()?,
            pd: self.pd.clone(),
            access: self.access,
            addr: self.addr,
            len: self.len,
        })
    }

    /// Whether the region was deregistered.
    pub(crate) fn is_gone(&self) -> bool {
        self.inner.strong_count() == 0
    }
}

impl fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("access", &self.access)
            .field("lkey", &self.lkey())
            .field("rkey", &self.rkey())
            .finish()
    }
}

impl MemoryRegion {
    /// The local key, for scatter/gather entries of local work requests.
    pub fn lkey(&self) -> u32 {
        self.inner.lkey()
    }

    /// The remote key a peer names in RDMA READ/WRITE. Only meaningful with
    /// [`MrAccess::RemoteReadWrite`]; the device rejects remote access to other regions.
    pub fn rkey(&self) -> u32 {
        self.inner.rkey()
    }

    /// Start address of the region.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never: registration rejects empty regions).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The access the region was registered with.
    pub fn access(&self) -> MrAccess {
        self.access
    }

    /// The protection domain it belongs to.
    pub fn pd(&self) -> &ProtectionDomain {
        &self.pd
    }

    /// The `ibv_mr` handle, for a work request that names the region (a window bind).
    /// Valid while `self` lives.
    pub(crate) fn raw(&self) -> *mut rdma_mummy_sys::ibv_mr {
        // SAFETY: only reads the pointer; `self.inner` keeps the region registered while
        // `self` lives, and callers use it only within borrows of `self`.
        unsafe { self.inner.mr() }.as_ptr()
    }

    /// A handle that does not keep the region registered.
    pub(crate) fn downgrade(&self) -> WeakRegion {
        WeakRegion {
            inner: Arc::downgrade(&self.inner),
            pd: self.pd.clone(),
            access: self.access,
            addr: self.addr,
            len: self.len,
        }
    }

    /// Whether `[addr, addr + len)` lies inside the region.
    pub fn contains(&self, addr: usize, len: usize) -> bool {
        addr >= self.addr
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.addr + self.len)
    }

    /// A scatter/gather entry for `len` bytes at `offset` into the region, or `None` if that
    /// is out of bounds.
    pub fn sge(&self, offset: usize, len: u32) -> Option<Sge> {
        let addr = self.addr.checked_add(offset)?;
        if !self.contains(addr, len as usize) {
            return None;
        }
        Some(Sge {
            addr: addr as u64,
            len,
            lkey: self.lkey(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_interfaces_are_named_by_index() {
        assert_eq!(netdev_name(0), None, "index 0 is no interface");
        let lo = nix::net::if_::if_nametoindex("lo").expect("a loopback interface");
        assert_eq!(netdev_name(lo).as_deref(), Some("lo"));
        assert_eq!(netdev_name(u32::MAX), None);
    }
}
