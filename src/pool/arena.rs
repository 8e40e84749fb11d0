//! Arenas: page-aligned anonymous mappings carved into equal slots.
//!
//! This file and `buf.rs` hold the pool's `unsafe` code; every block says why it is sound.

use std::io;
use std::ptr::NonNull;
use std::sync::OnceLock;

use super::{RegionKeys, MAX_REGISTRARS};

/// One mapping of `slots * slot_size` bytes, plus the keys each registrar gave it.
pub(crate) struct Arena {
    // Declared before `base`/`len` only for readability: `Drop` below releases the keys
    // (deregistering the memory) explicitly before unmapping it.
    pub(crate) keys: [OnceLock<RegionKeys>; MAX_REGISTRARS],
    base: NonNull<u8>,
    len: usize,
    /// Pool-wide arena number, for registrars and errors.
    pub(crate) index: usize,
}

// SAFETY: the arena owns its mapping; the raw pointer is only an address. Access to slot
// memory is governed by the slot ownership protocol of the pool (one unique writer, or
// shared readers), not by the arena.
unsafe impl Send for Arena {}
// SAFETY: as above; `&Arena` exposes only the base address, the length and the keys
// (`OnceLock<RegionKeys>` is Sync since `RegionKeys` is Send + Sync).
unsafe impl Sync for Arena {}

impl Arena {
    /// Maps `len` bytes of zeroed, page-aligned, private anonymous memory.
    pub(crate) fn map(len: usize, index: usize) -> io::Result<Arena> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty arena"));
        }
        // SAFETY: an anonymous private mapping with a null hint touches no existing memory;
        // the result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Arena {
            keys: Default::default(),
            base,
            len,
            index,
        })
    }

    /// First byte of the mapping.
    pub(crate) fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Bytes mapped.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // Deregister (drop the registrars' handles, e.g. RDMA memory regions) while the
        // memory is still mapped.
        for k in &mut self.keys {
            drop(k.take());
        }
        // SAFETY: `base..base+len` is exactly the mapping made in `map`; the pool drops an
        // arena only when no slot handle can exist any more (every handle keeps the class,
        // and so its arenas, alive).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}
