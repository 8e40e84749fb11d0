//! Tables of live handles: C gets a pointer that is only ever used as a key here, never
//! dereferenced, so a stale, closed or made-up handle is found missing (`EBADF`) instead
//! of touching freed memory.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Live objects by the address handed to C.
pub(crate) struct Handles<T> {
    map: RwLock<HashMap<usize, Arc<T>>>,
}

impl<T> Handles<T> {
    pub(crate) fn new() -> Handles<T> {
        Handles {
            map: RwLock::new(HashMap::new()),
        }
    }

    /// Registers `v`; its address is the handle.
    pub(crate) fn insert(&self, v: Arc<T>) -> *mut T {
        let p = Arc::as_ptr(&v).cast_mut();
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p as usize, v);
        p
    }

    /// The object behind a handle, if live.
    pub(crate) fn get(&self, h: *mut T) -> Option<Arc<T>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(h as usize))
            .cloned()
    }

    /// Unregisters a handle.
    pub(crate) fn remove(&self, h: *mut T) -> Option<Arc<T>> {
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(h as usize))
    }

    /// Unregisters a handle if `ok` says so; `Err(true)` when it is live but `ok` refused,
    /// `Err(false)` when it is not live.
    pub(crate) fn remove_if(&self, h: *mut T, ok: impl FnOnce(&T) -> bool) -> Result<Arc<T>, bool> {
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        match m.get(&(h as usize)) {
            None => Err(false),
            Some(v) if !ok(v) => Err(true),
            Some(_) => m.remove(&(h as usize)).ok_or(false),
        }
    }

    /// Unregisters every handle whose object satisfies `pred`.
    pub(crate) fn remove_where(&self, pred: impl Fn(&T) -> bool) -> Vec<Arc<T>> {
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<usize> = m.iter().filter(|(_, v)| pred(v)).map(|(k, _)| *k).collect();
        keys.into_iter().filter_map(|k| m.remove(&k)).collect()
    }
}
