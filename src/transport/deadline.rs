//! A wait with a deadline, as a client waits for a free request slot (TCP) or credit
//! (RDMA) before it sends: check the condition, fail with a [`Error::Timeout`] naming what
//! was awaited once the time is up, else sleep on a condition variable for the time left.

use std::sync::{Condvar, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The end of a bounded wait that started when it was made.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    /// A deadline `timeout` from now (a timeout too long to add to now never expires).
    pub fn after(timeout: Duration) -> Deadline {
        let now = Instant::now();
        let at = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
        Deadline { at, timeout }
    }

    /// The instant it expires.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// The time left, or, once none is, the timeout error: `what` says what was awaited
    /// (evaluated only then), and the error carries the whole timeout.
    pub fn left(&self, what: impl FnOnce() -> String) -> Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout {
                what: what(),
                after: self.timeout,
            });
        }
        Ok(left)
    }

    /// Sleeps on `cond` for at most the time left, taking over a poisoned lock; the caller
    /// checks its condition again (wake-ups may be spurious or come too late).
    pub fn wait<'a, T>(&self, cond: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        let left = self.at.saturating_duration_since(Instant::now());
        match cond.wait_timeout(guard, left) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn wakes_when_signalled_and_times_out_naming_what_it_awaited() {
        // Woken by another thread: the condition holds well before the deadline.
        let pair = Arc::new((Mutex::new(false), Condvar::new()));
        let d = Deadline::after(Duration::from_secs(600));
        let p2 = pair.clone();
        let t = std::thread::spawn(move || {
            *crate::lock(&p2.0) = true;
            p2.1.notify_all();
        });
        let mut g = crate::lock(&pair.0);
        while !*g {
            d.left(|| "the flag".into()).unwrap();
            g = d.wait(&pair.1, g);
        }
        drop(g);
        t.join().unwrap();
        // Nobody signals: the wait ends at the deadline with the error naming it.
        let d = Deadline::after(Duration::from_millis(20));
        let mut g = crate::lock(&pair.0);
        *g = false;
        let e = loop {
            match d.left(|| "a free slot (8 in flight)".into()) {
                Ok(_) => g = d.wait(&pair.1, g),
                Err(e) => break e,
            }
        };
        assert!(Instant::now() >= d.instant());
        match e {
            Error::Timeout { what, after } => {
                assert_eq!(what, "a free slot (8 in flight)");
                assert_eq!(after, Duration::from_millis(20));
            }
            other => panic!("{other:?}"),
        }
        // A timeout too long to add to now does not overflow.
        assert!(Deadline::after(Duration::MAX).left(String::new).is_ok());
    }
}
