//! A one-shot completion: the transport completes it, the caller waits on it (blocking) or
//! awaits it (it implements [`Future`] without tying the core to any runtime).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

struct State<T> {
    value: Option<Result<T>>,
    done: bool,
    waker: Option<Waker>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    cond: Condvar,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// The waiting half.
pub struct Pending<T> {
    shared: Arc<Shared<T>>,
}

/// The completing half. Dropping it without completing fails the waiter with
/// [`Error::ConnectionClosed`], so no waiter hangs on a request a transport forgot.
pub struct Completer<T> {
    shared: Option<Arc<Shared<T>>>,
}

/// A connected pair.
pub fn pair<T>() -> (Completer<T>, Pending<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            value: None,
            done: false,
            waker: None,
        }),
        cond: Condvar::new(),
    });
    (
        Completer {
            shared: Some(shared.clone()),
        },
        Pending { shared },
    )
}

impl<T> Completer<T> {
    /// Delivers the result and wakes the waiter.
    pub fn complete(mut self, r: Result<T>) {
        if let Some(s) = self.shared.take() {
            Self::deliver(&s, r);
        }
    }

    fn deliver(s: &Shared<T>, r: Result<T>) {
        let waker = {
            let mut st = s.lock();
            if st.done {
                return;
            }
            st.value = Some(r);
            st.done = true;
            st.waker.take()
        };
        s.cond.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if let Some(s) = self.shared.take() {
            Self::deliver(
                &s,
                Err(Error::ConnectionClosed(
                    "request dropped by the transport".into(),
                )),
            );
        }
    }
}

impl<T> Pending<T> {
    /// Blocks until the result arrives.
    pub fn wait(self) -> Result<T> {
        let mut st = self.shared.lock();
        while !st.done {
            st = match self.shared.cond.wait(st) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
        take(&mut st)
    }

    /// Blocks up to `timeout`; on timeout gives the handle back.
    pub fn wait_timeout(self, timeout: Duration) -> Result<Result<T>, Pending<T>> {
        let deadline = Instant::now() + timeout;
        {
            let mut st = self.shared.lock();
            while !st.done {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st = match self.shared.cond.wait_timeout(st, deadline - now) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
            }
            if st.done {
                return Ok(take(&mut st));
            }
        }
        Err(self)
    }

    /// True once the result has arrived.
    pub fn is_done(&self) -> bool {
        self.shared.lock().done
    }
}

fn take<T>(st: &mut State<T>) -> Result<T> {
    st.value
        .take()
        .unwrap_or_else(|| Err(Error::InvalidArgument("completion taken twice".into())))
}

impl<T> Future for Pending<T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.shared.lock();
        if st.done {
            return Poll::Ready(take(&mut st));
        }
        match &st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("done", &self.is_done())
            .finish()
    }
}

/// Drives a future to completion on the current thread (for tests and simple callers; any
/// executor works as well).
pub fn block_on<F: Future>(f: F) -> F::Output {
    struct ThreadWaker(std::thread::Thread);
    impl std::task::Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_then_wait() {
        let (c, p) = pair::<u32>();
        c.complete(Ok(5));
        assert_eq!(p.wait().unwrap(), 5);
    }

    #[test]
    fn wait_across_threads_and_future() {
        let (c, p) = pair::<u32>();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c.complete(Ok(9));
        });
        assert_eq!(block_on(p).unwrap(), 9);
        h.join().unwrap();
    }

    #[test]
    fn dropped_completer_fails_the_waiter() {
        let (c, p) = pair::<u32>();
        drop(c);
        assert!(matches!(p.wait(), Err(Error::ConnectionClosed(_))));
    }

    #[test]
    fn wait_timeout_returns_the_handle() {
        let (c, p) = pair::<u32>();
        let p = p.wait_timeout(Duration::from_millis(10)).unwrap_err();
        c.complete(Ok(1));
        assert_eq!(
            p.wait_timeout(Duration::from_secs(1))
                .ok()
                .unwrap()
                .unwrap(),
            1
        );
    }
}
