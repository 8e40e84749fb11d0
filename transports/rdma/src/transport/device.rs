//! Per-process, per-device state: one open device and one protection domain per device,
//! opened lazily and kept for the life of the process, and one memory registrar per
//! (device, pool, role) installed on the pool.
//!
//! The client's registrar registers arenas `LOCAL_WRITE | MW_BIND` with
//! `rdma.client_exposure = "request"` (the server reaches only the buffers of a request in
//! flight, through memory windows the connection binds per request), or
//! `LOCAL_WRITE | REMOTE_READ | REMOTE_WRITE` with `"arena"` (the server may read and write
//! every buffer of the pool at any time); the
//! server's registers them `LOCAL_WRITE` only, so no client can touch server memory: every
//! RDMA operation is initiated by the server. Registrations last as long as the pool (the
//! memory region lives in the arena's [`RegionKeys::guard`](zcio::pool::RegionKeys::guard)); a buffer's keys are
//! `buf.keys(id)`, found in O(1).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::config::RdmaConfig;
use zcio::pool::RegistrarId;
use zcio::{Error, Pool, Result};

use super::{lock, unavailable};
use crate::devices::{list_devices, PortState};
use crate::verbs::{ArenaRegistrar, Context, DeviceCaps, MrAccess, ProtectionDomain};
use crate::RdmaError;

/// An open device with its protection domain.
pub(crate) struct Device {
    pub(crate) ctx: Context,
    pub(crate) pd: ProtectionDomain,
    pub(crate) caps: DeviceCaps,
}

/// Which side registers: decides the access rights of pool memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Side {
    /// A client's data pool with `rdma.client_exposure = "arena"`: the server may READ and
    /// WRITE it.
    Client,
    /// A client's data pool with `"request"`: memory windows are bound over it per request.
    ClientWindowed,
    /// A server's data pool: local access only.
    Server,
    /// A connection's private control pool (messages): local access only.
    Control,
}

fn devices() -> &'static Mutex<HashMap<String, Arc<Device>>> {
    static D: OnceLock<Mutex<HashMap<String, Arc<Device>>>> = OnceLock::new();
    D.get_or_init(|| Mutex::new(HashMap::new()))
}

/// (device name, pool id, side).
type RegKey = (String, u64, Side);
/// The registrar's id on its pool, and the registrar (alive as long as the pool is).
type RegMap = HashMap<RegKey, (RegistrarId, Weak<ArenaRegistrar>)>;

fn registrars() -> &'static Mutex<RegMap> {
    static R: OnceLock<Mutex<RegMap>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The name of the device to use: the configured one, or the first whose port
/// `cfg.port` is active.
fn pick_device(cfg: &RdmaConfig) -> std::result::Result<String, Error> {
    if let Some(name) = &cfg.device {
        return Ok(name.clone());
    }
    let list = list_devices().map_err(|e| unavailable(&e))?;
    if let Some(d) = list.iter().find(|d| {
        d.ports
            .iter()
            .any(|p| p.port == cfg.port && matches!(p.state, PortState::Active))
    }) {
        return Ok(d.name.clone());
    }
    let seen = list
        .iter()
        .map(|d| {
            let state = d
                .ports
                .iter()
                .find(|p| p.port == cfg.port)
                .map_or_else(|| "no such port".to_string(), |p| p.state.to_string());
            format!("{} port {}: {state}", d.name, cfg.port)
        })
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::TransportUnavailable {
        name: "rdma".into(),
        reason: format!("no RDMA device has port {} active ({seen})", cfg.port),
        hint: "check the link with `rdma link` / `ibv_devinfo`, or set rdma.device and \
               rdma.port to a device whose port is ACTIVE"
            .into(),
    })
}

/// The device `cfg` names (opened on first use), with its port checked to be active.
pub(crate) fn device(cfg: &RdmaConfig) -> Result<Arc<Device>> {
    let name = pick_device(cfg)?;
    let dev = {
        let mut map = lock(devices());
        match map.get(&name) {
            Some(d) => d.clone(),
            None => {
                let ctx = Context::open(Some(&name)).map_err(|e| unavailable(&e))?;
                let caps = ctx.caps().map_err(|e| unavailable(&e))?;
                let pd = ctx.alloc_pd().map_err(|e| unavailable(&e))?;
                let d = Arc::new(Device { ctx, pd, caps });
                map.insert(name.clone(), d.clone());
                d
            }
        }
    };
    let port = dev.ctx.port_info(cfg.port).map_err(|e| unavailable(&e))?;
    if !matches!(port.state, PortState::Active | PortState::ActiveDefer) {
        return Err(Error::TransportUnavailable {
            name: "rdma".into(),
            reason: format!(
                "port {} of RDMA device `{name}` is {}",
                cfg.port, port.state
            ),
            hint: "bring the link up (for Soft-RoCE: `ip link set <netdev> up`), or pick \
                   another port or device with rdma.port / rdma.device"
                .into(),
        });
    }
    Ok(dev)
}

/// The id of the registrar of (`dev`, `pool`, `side`), installing it on first use.
pub(crate) fn registrar_id(dev: &Device, pool: &Pool, side: Side) -> Result<RegistrarId> {
    registrar(dev, pool, side).map(|(id, _)| id)
}

/// The registrar of (`dev`, `pool`, `side`) and its id, installing it on first use.
pub(crate) fn registrar(
    dev: &Device,
    pool: &Pool,
    side: Side,
) -> Result<(RegistrarId, Arc<ArenaRegistrar>)> {
    let key = (dev.ctx.name().to_string(), pool.id(), side);
    let mut regs = lock(registrars());
    if let Some((id, w)) = regs.get(&key) {
        if let Some(r) = w.upgrade() {
            return Ok((*id, r));
        }
    }
    // Forget registrars of pools that are gone (pool ids are never reused).
    regs.retain(|_, (_, w)| w.strong_count() > 0);
    let access = match side {
        Side::Client => MrAccess::RemoteReadWrite,
        Side::ClientWindowed => MrAccess::LocalWriteBind,
        Side::Server | Side::Control => MrAccess::LocalWrite,
    };
    let r = Arc::new(ArenaRegistrar::new(
        dev.pd.clone(),
        access,
        format!(
            "rdma:{}:{}",
            dev.ctx.name(),
            match side {
                Side::Client => "client",
                Side::ClientWindowed => "client-windowed",
                Side::Server => "server",
                Side::Control => "control",
            }
        ),
    ));
    let weak = Arc::downgrade(&r);
    let id = pool.add_registrar(r.clone())?;
    regs.insert(key, (id, weak));
    Ok((id, r))
}

/// The error a failed on-the-fly registration becomes.
pub(crate) fn register_err(e: RdmaError) -> Error {
    Error::Transport {
        transport: "rdma",
        what: "registering caller memory for RDMA".into(),
        source: Box::new(e),
    }
}
