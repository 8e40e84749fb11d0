//! The locked-memory limit check. Registering memory for RDMA pins its pages, and the kernel
//! charges pinned pages against `RLIMIT_MEMLOCK` unless the process has `CAP_IPC_LOCK`. Common
//! defaults (64 KiB, 8 MiB) are far below a buffer pool, and the failure then surfaces as a
//! bare ENOMEM from `ibv_reg_mr`; checking up front gives an error that says what to change.

use std::io;

use nix::sys::resource::{getrlimit, Resource};

use crate::error::RdmaError;

/// Bit number of `CAP_IPC_LOCK` in the capability sets of `/proc/self/status`.
const CAP_IPC_LOCK: u32 = 14;

/// The soft `RLIMIT_MEMLOCK` of this process in bytes; `None` when it is unlimited.
pub fn memlock_limit() -> Result<Option<u64>, RdmaError> {
    let (soft, _hard) =
        getrlimit(Resource::RLIMIT_MEMLOCK).map_err(|e| RdmaError::MemlockQuery {
            source: io::Error::from(e),
        })?;
    if soft == libc::RLIM_INFINITY {
        Ok(None)
    } else {
        Ok(Some(soft))
    }
}

/// Whether the calling thread has `CAP_IPC_LOCK` in its effective set, which exempts it
/// from the limit. Capabilities are per thread (a thread may have dropped one the main
/// thread still has), so this reads `/proc/thread-self/status`, falling back to
/// `/proc/self/status` on kernels without it; anything unreadable counts as "no".
pub fn has_ipc_lock_capability() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/thread-self/status")
        .or_else(|_| std::fs::read_to_string("/proc/self/status"))
    else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Checks that `need` bytes (the pool's total size) can be pinned: the limit is unlimited, at
/// least `need`, or the process has `CAP_IPC_LOCK`. Otherwise returns
/// [`RdmaError::Memlock`], whose message says how to raise the limit.
pub fn check_memlock(need: u64) -> Result<(), RdmaError> {
    match memlock_limit()? {
        None => Ok(()),
        Some(have) if have >= need => Ok(()),
        Some(_) if has_ipc_lock_capability() => Ok(()),
        Some(have) => Err(RdmaError::Memlock { have, need }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_bytes_always_fit() {
        check_memlock(0).unwrap();
    }

    #[test]
    fn huge_need_fails_unless_exempt() {
        let exempt = memlock_limit().unwrap().is_none() || has_ipc_lock_capability();
        match check_memlock(u64::MAX) {
            Ok(()) => assert!(exempt),
            Err(RdmaError::Memlock { have, need }) => {
                assert!(!exempt);
                assert_eq!(need, u64::MAX);
                assert_eq!(Some(have), memlock_limit().unwrap());
                let msg = RdmaError::Memlock { have, need }.to_string();
                assert!(msg.contains("ulimit -l unlimited"), "{msg}");
                assert!(msg.contains("LimitMEMLOCK"), "{msg}");
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn the_limit_is_the_one_the_kernel_reports() {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let soft = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max locked memory"))
            .and_then(|rest| rest.split_whitespace().next())
            .expect("a 'Max locked memory' line in /proc/self/limits")
            .to_string();
        let want = if soft == "unlimited" {
            None
        } else {
            Some(soft.parse::<u64>().unwrap())
        };
        assert_eq!(memlock_limit().unwrap(), want);
    }
}
