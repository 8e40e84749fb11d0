//! Registration of a data pool's arenas with a protection domain, as the pool's
//! [`MemoryRegistrar`]: the one place pool memory is handed to the device.

use zcio::error::BoxError;
use zcio::pool::{ArenaInfo, MemoryRegistrar, RegionKeys};

use crate::verbs::{MrAccess, ProtectionDomain};

/// Registers every arena of the pools it is installed on with one protection domain, with
/// fixed access rights. Only the pool calls it (through `Pool::add_registrar`), once per
/// arena, and drops the returned keys (deregistering) before it unmaps the arena.
pub(crate) struct ArenaRegistrar {
    pd: ProtectionDomain,
    access: MrAccess,
    label: String,
}

impl ArenaRegistrar {
    /// A registrar for `pd` with `access`, named `label` in errors and logs.
    pub(crate) fn new(pd: ProtectionDomain, access: MrAccess, label: String) -> ArenaRegistrar {
        ArenaRegistrar { pd, access, label }
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
        // buffers the client advertised for a request in flight; the pool's ownership rules
        // keep Rust references away from a buffer while that request holds it.
        let mr = unsafe {
            self.pd
                .register(arena.addr.as_ptr(), arena.len, self.access)
        }
        .map_err(|e| -> BoxError { Box::new(e) })?;
        Ok(RegionKeys {
            lkey: mr.lkey(),
            rkey: mr.rkey(),
            guard: Box::new(mr),
        })
    }
}
