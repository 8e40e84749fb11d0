//! Registration of a data pool's arenas with a protection domain, as the pool's
//! [`MemoryRegistrar`]: the one place pool memory is handed to the device.

use std::collections::HashMap;
use std::sync::Mutex;

use zcio::error::BoxError;
use zcio::pool::{ArenaInfo, MemoryRegistrar, RegionKeys};

use crate::verbs::context::WeakRegion;
use crate::verbs::{MemoryRegion, MrAccess, ProtectionDomain};

/// Registers every arena of the pools it is installed on with one protection domain, with
/// fixed access rights. Only the pool calls it (through `Pool::add_registrar`), once per
/// arena, and drops the returned keys (deregistering) before it unmaps the arena.
pub(crate) struct ArenaRegistrar {
    pd: ProtectionDomain,
    access: MrAccess,
    label: String,
    /// With [`MrAccess::LocalWriteBind`]: the regions by lkey, so a segment's keys lead to
    /// the region a memory window is bound over (by lkey: a region without remote access
    /// may have no distinct rkey; rxe gives them all 0). Weak: the pool's keys own the
    /// regions.
    by_lkey: Mutex<HashMap<u32, WeakRegion>>,
}

impl ArenaRegistrar {
    /// A registrar for `pd` with `access`, named `label` in errors and logs.
    pub(crate) fn new(pd: ProtectionDomain, access: MrAccess, label: String) -> ArenaRegistrar {
        ArenaRegistrar {
            pd,
            access,
            label,
            by_lkey: Mutex::new(HashMap::new()),
        }
    }

    /// The still registered region with local key `lkey` (that of a segment's keys from
    /// this registrar), for binding a window over part of it. Only kept with
    /// [`MrAccess::LocalWriteBind`].
    pub(crate) fn region(&self, lkey: u32) -> Option<MemoryRegion> {
        let map = self.by_lkey.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&lkey).and_then(WeakRegion::upgrade)
    }
}

impl MemoryRegistrar for ArenaRegistrar {
    fn name(&self) -> String {
        self.label.clone()
    }

    fn register(&self, arena: &ArenaInfo) -> std::result::Result<RegionKeys, BoxError> {
        // SAFETY: the pool keeps the arena mapped for as long as the returned `RegionKeys`
        // (which owns the memory region) lives, so the memory outlives the registration.
        // The device only touches it through work requests this transport posts for buffers
        // it owns at that moment (receives into buffers it holds, RDMA on segments of a
        // request in flight), or, for a client's arenas, through the server's RDMA on
        // buffers the client advertised for a request in flight (with LocalWriteBind, only
        // through a window bound over exactly those buffers until the request completes);
        // the pool's ownership rules keep Rust references away from a buffer while that
        // request holds it.
        let mr = unsafe {
            self.pd
                .register(arena.addr.as_ptr(), arena.len, self.access)
        }
        .map_err(|e| -> BoxError { Box::new(e) })?;
        if self.access == MrAccess::LocalWriteBind {
            let mut map = self.by_lkey.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, w| !w.is_gone());
            map.insert(mr.lkey(), mr.downgrade());
        }
        Ok(RegionKeys {
            lkey: mr.lkey(),
            rkey: mr.rkey(),
            guard: Box::new(mr),
        })
    }
}
