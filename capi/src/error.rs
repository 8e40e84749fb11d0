//! errno, the thread-local last-error message, and the panic guard every entry point runs
//! in.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

thread_local! {
    static LAST: RefCell<CString> = RefCell::new(CString::default());
}

/// Why a C call failed: an errno value and a message for [`crate::zcio_last_error`].
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) errno: c_int,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(errno: c_int, message: impl Into<String>) -> Failure {
        Failure {
            errno,
            message: message.into(),
        }
    }

    /// `EINVAL` with a message.
    pub(crate) fn inval(message: impl Into<String>) -> Failure {
        Failure::new(libc::EINVAL, message)
    }

    /// `EBADF` with a message.
    pub(crate) fn badf(message: impl Into<String>) -> Failure {
        Failure::new(libc::EBADF, message)
    }
}

impl From<zcio_core::Error> for Failure {
    fn from(e: zcio_core::Error) -> Failure {
        let errno = errno_of(&e);
        let mut message = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            message.push_str(": ");
            message.push_str(&s.to_string());
            src = s.source();
        }
        Failure { errno, message }
    }
}

/// The errno a C caller sees for a zcio error.
pub(crate) fn errno_of(e: &zcio_core::Error) -> c_int {
    use zcio_core::proto::Status;
    use zcio_core::Error as E;
    match e {
        E::InvalidArgument(_)
        | E::LimitExceeded { .. }
        | E::ParseConfig { .. }
        | E::ConfigValue { .. }
        | E::NoSizeClass { .. } => libc::EINVAL,
        E::PoolExhausted { .. } | E::MapArena { .. } => libc::ENOMEM,
        E::ReadConfig { source, .. } | E::Io { source, .. } => {
            source.raw_os_error().unwrap_or(libc::EIO)
        }
        E::UnknownTransport { .. } | E::TransportUnavailable { .. } => libc::EPROTONOSUPPORT,
        E::Auth(_) => libc::EACCES,
        E::ConnectionClosed(_) => libc::ENOTCONN,
        E::Timeout { .. } => libc::ETIMEDOUT,
        E::Decode { .. } | E::Version { .. } => libc::EPROTO,
        E::Remote { code, .. } => match *code {
            c if c > 0 && c < 4096 => c as c_int,
            c if c == Status::ReadOnly as u32 => libc::EROFS,
            c if c == Status::OutsideExport as u32 || c == Status::AuthRequired as u32 => {
                libc::EACCES
            }
            c if c == Status::BadHandle as u32 => libc::EBADF,
            c if c == Status::Limit as u32 || c == Status::BadRequest as u32 => libc::EINVAL,
            c if c == Status::Busy as u32 => libc::EAGAIN,
            _ => libc::EIO,
        },
        E::Transport { source, .. } => source
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .unwrap_or(libc::EIO),
        _ => libc::EIO,
    }
}

/// Sets `errno` and this thread's last-error message.
pub(crate) fn set(f: &Failure) {
    let msg = CString::new(f.message.replace('\0', " ")).unwrap_or_default();
    LAST.with(|l| *l.borrow_mut() = msg);
    // SAFETY: `__errno_location` returns this thread's errno, always valid to write.
    unsafe { *libc::__errno_location() = f.errno };
}

/// This thread's last-error message (valid until this thread's next failing call).
pub(crate) fn last() -> *const c_char {
    LAST.with(|l| l.borrow().as_ptr())
}

/// Runs `f`; a failure or a panic (logged, turned into `EIO`) sets errno and the message
/// and yields `on_err`. No panic crosses the FFI boundary.
pub(crate) fn guard<T>(on_err: T, f: impl FnOnce() -> Result<T, Failure>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set(&e);
            on_err
        }
        Err(p) => {
            set(&panic_failure(&*p));
            on_err
        }
    }
}

/// The failure a caught panic becomes (`EIO`), logged.
pub(crate) fn panic_failure(p: &(dyn std::any::Any + Send)) -> Failure {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    tracing::error!("libzcio: internal panic caught at the C boundary: {what}");
    Failure::new(libc::EIO, format!("internal error (panic): {what}"))
}
