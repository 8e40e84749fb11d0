//! Tests of the C API, called as C calls it (unit tests: the library is built only as
//! `cdylib` and `staticlib`, and the core crate already owns the rlib name `zcio`).

mod ffi;
mod header;

use crate::error::{guard, Failure};

#[test]
fn a_panic_becomes_eio_and_a_message() {
    let r = guard(-1, || -> Result<i32, Failure> {
        panic!("boom in the library")
    });
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EIO)
    );
    // SAFETY: the library returns a valid C string.
    let msg = unsafe { std::ffi::CStr::from_ptr(crate::zcio_last_error()) };
    assert!(
        msg.to_string_lossy().contains("boom in the library"),
        "{msg:?}"
    );
}
