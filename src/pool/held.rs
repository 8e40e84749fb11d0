//! Buffers held for the transport (part of the pool module because it holds `unsafe`): the
//! owner of the memory behind the raw views a reconnect-surviving async operation sends.
//!
//! A [`Held`] value owns its buffers (the caller's `Vec<u8>`s or pool buffers in an
//! [`Iobref`]) and hands out [`RawSeg`] views of checked ranges of them: a range outside a
//! buffer is an [`Error::Internal`], never a view.
//!
//! # Why the views stay valid
//! A view is an address plus length, so the memory must stay put and alive until the
//! request carrying it completes. Two things make that hold:
//! - *Moving the holder does not move the memory.* A `Vec<u8>`'s bytes live in its heap
//!   block and a pool buffer's in its arena slot; moving the `Vec<Vec<u8>>`, the [`Iobref`]
//!   or the [`Holding`] moves only their handles. Nothing here reallocates a buffer: this
//!   module offers no `&mut Vec<u8>` and no way to resize one while it is held.
//! - *The holder is not dropped, nor its buffers given back, before the transport is done.*
//!   The only users, the client's held operations (`client/held.rs`), move the holder into
//!   the operation's `Completion` together with the requests' pendings, and give the
//!   buffers back ([`Held::unhold`], or the completion's result) only after waiting for
//!   every request; a completion dropped unfinished waits for its requests in its `Drop`
//!   before its fields (the holder among them) are dropped. On the synchronous path the
//!   holder is borrowed `&mut` across the wait, so it cannot go away either. If a request
//!   cannot be started, the ones already started are waited for before the error returns.
//!
//! The trait and types are crate-private, so no code outside the crate can break that
//! rule; inside it, `client/held.rs` is the one place that calls [`Held::view`].

use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::pool::seg::RawSeg;
use crate::pool::Iobref;

/// Buffers a completion holds while the transport uses raw views of them (see the module
/// docs for why the views stay valid).
pub(crate) trait Held: Send + 'static {
    /// How many buffers.
    fn count(&self) -> usize;
    /// The length of buffer `i` (0 for a buffer that does not exist).
    fn len_of(&self, i: usize) -> usize;
    /// Each buffer's length.
    fn lens(&self) -> Vec<usize> {
        (0..self.count()).map(|i| self.len_of(i)).collect()
    }
    /// A raw view of `n` bytes at `off` in buffer `i`; an error when that range is not
    /// inside buffer `i`. The view is valid while the holder keeps the buffers (the module
    /// docs say how its users ensure that).
    fn view(&mut self, i: usize, off: usize, n: usize) -> Result<RawSeg>;
    /// The buffers as a [`Holding`], for a one-request completion.
    fn hold(self) -> Holding;
    /// The buffers back from [`Held::hold`].
    fn unhold(h: Holding) -> Self;
}

/// Checks that `off..off + n` lies within a buffer of `len` bytes (`i` of `count`).
fn check(i: usize, count: usize, off: usize, n: usize, len: usize) -> Result<()> {
    match off.checked_add(n) {
        Some(end) if i < count && end <= len => Ok(()),
        _ => Err(Error::Internal(format!(
            "held view {off}+{n} of buffer {i} is outside it ({count} buffers, this one {len} bytes)"
        ))),
    }
}

/// A view of `n` bytes at `off` in `buf`, whose range [`check`] accepted.
fn view_of(buf: &mut [u8], off: usize, n: usize) -> RawSeg {
    debug_assert!(off + n <= buf.len());
    // A slice's pointer is never null, also when empty; `off <= len` keeps it in bounds.
    let p = NonNull::from(&mut buf[off..off + n]).cast::<u8>();
    // SAFETY: `p..p+n` lies inside `buf` (checked above and by the slice index). The memory
    // stays valid and unmoved until the request completes because the holder owns it, its
    // users keep the holder until then, and moving the holder does not move the bytes (the
    // module docs). The transport gets the only access meanwhile: the holder hands out no
    // references to the bytes while a completion holds it.
    unsafe { RawSeg::new(p, n) }
}

impl Held for Vec<Vec<u8>> {
    fn count(&self) -> usize {
        self.len()
    }
    fn len_of(&self, i: usize) -> usize {
        self.get(i).map_or(0, Vec::len)
    }
    fn view(&mut self, i: usize, off: usize, n: usize) -> Result<RawSeg> {
        check(i, self.len(), off, n, self.len_of(i))?;
        Ok(view_of(&mut self[i], off, n))
    }
    fn hold(self) -> Holding {
        Holding::Vecs(self)
    }
    fn unhold(h: Holding) -> Self {
        match h {
            Holding::Vecs(v) => v,
            // Not reached: a completion unholds what it held.
            Holding::Pool(_) => Vec::new(),
        }
    }
}

impl Held for Iobref {
    fn count(&self) -> usize {
        Iobref::count(self)
    }
    fn len_of(&self, i: usize) -> usize {
        self.buffers().get(i).map_or(0, |b| b.len())
    }
    fn view(&mut self, i: usize, off: usize, n: usize) -> Result<RawSeg> {
        check(i, Iobref::count(self), off, n, self.len_of(i))?;
        let b = &mut self.buffers_mut()[i];
        if off == 0 && n == b.len() {
            // SAFETY: the whole visible buffer, which the holder owns; it stays alive and in
            // its arena slot until the request completes (module docs). A whole pool buffer
            // keeps its registration keys.
            Ok(unsafe { RawSeg::from_pool(b) })
        } else {
            Ok(view_of(b, off, n))
        }
    }
    fn hold(self) -> Holding {
        Holding::Pool(self)
    }
    fn unhold(h: Holding) -> Self {
        match h {
            Holding::Pool(b) => b,
            // Not reached: a completion unholds what it held.
            Holding::Vecs(_) => Iobref::new(),
        }
    }
}

/// The buffers a one-request completion holds, whatever their kind (so that the completion
/// needs no type parameter for them, and no box).
pub(crate) enum Holding {
    /// The caller's own vectors.
    Vecs(Vec<Vec<u8>>),
    /// Pool buffers.
    Pool(Iobref),
}

impl Held for Holding {
    fn count(&self) -> usize {
        match self {
            Holding::Vecs(v) => v.count(),
            Holding::Pool(b) => Held::count(b),
        }
    }
    fn len_of(&self, i: usize) -> usize {
        match self {
            Holding::Vecs(v) => v.len_of(i),
            Holding::Pool(b) => b.len_of(i),
        }
    }
    fn view(&mut self, i: usize, off: usize, n: usize) -> Result<RawSeg> {
        match self {
            Holding::Vecs(v) => v.view(i, off, n),
            Holding::Pool(b) => b.view(i, off, n),
        }
    }
    fn hold(self) -> Holding {
        self
    }
    fn unhold(h: Holding) -> Self {
        h
    }
}
