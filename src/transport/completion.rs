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
    /// A thread is blocked (or about to block) on the condition variable: only then does
    /// completing signal it (a futex wake-up is a system call, saved when the waiter has
    /// not blocked yet).
    blocked: bool,
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

/// Work a transport can do on the thread that is about to block on one of its
/// completions, so that the completion can arrive without a thread hand-off: say, poll its
/// completion queue, or wait on its completion channel itself (RDMA).
pub trait Progress: Send + Sync {
    /// Works towards completions until `done()` is true, `deadline` has passed or the
    /// transport stops (its budget for one wait is spent, the connection ended); then
    /// returns, and the caller blocks as usual if it is not done. Whatever it leaves
    /// undone, the transport must then complete without further calls.
    fn progress(&self, done: &dyn Fn() -> bool, deadline: Option<Instant>);

    /// The completion is being awaited as a future: its waker will be called, and nobody
    /// calls [`Progress::progress`] for it, so the transport must complete it on its own
    /// threads. The default does nothing.
    fn will_await(&self) {}
}

/// The waiting half.
pub struct Pending<T> {
    shared: Arc<Shared<T>>,
    progress: Option<Arc<dyn Progress>>,
}

/// The completing half. Dropping it without completing fails the waiter with
/// [`Error::ConnectionClosed`], so no waiter hangs on a request a transport forgot.
pub struct Completer<T> {
    shared: Option<Arc<Shared<T>>>,
}

/// A connected pair.
pub fn pair<T>() -> (Completer<T>, Pending<T>) {
    pair_inner(None)
}

/// A connected pair whose blocking waits ([`Pending::wait`], [`Pending::wait_timeout`])
/// first let `progress` work on the waiting thread. Awaiting it as a future does not (it
/// calls [`Progress::will_await`] instead).
pub fn pair_with_progress<T>(progress: Arc<dyn Progress>) -> (Completer<T>, Pending<T>) {
    pair_inner(Some(progress))
}

fn new_shared<T>() -> Arc<Shared<T>> {
    Arc::new(Shared {
        state: Mutex::new(State {
            value: None,
            done: false,
            waker: None,
            blocked: false,
        }),
        cond: Condvar::new(),
    })
}

fn pair_inner<T>(progress: Option<Arc<dyn Progress>>) -> (Completer<T>, Pending<T>) {
    pair_on(new_shared(), progress)
}

fn pair_on<T>(
    shared: Arc<Shared<T>>,
    progress: Option<Arc<dyn Progress>>,
) -> (Completer<T>, Pending<T>) {
    (
        Completer {
            shared: Some(shared.clone()),
        },
        Pending { shared, progress },
    )
}

/// The memory of one completion, kept by a transport (say, one per request slot) and
/// reused from request to request, so that starting a request allocates nothing.
///
/// [`CompletionCell::pair`] reuses the cell when neither half of its previous pair is
/// still alive, which is the steady state of a caller that waits for (or drops) each
/// [`Pending`] before the slot is reused. Otherwise, say when a finished request's
/// [`Pending`] has not been waited on yet, it leaves that one alone and starts a new cell:
/// correct either way, allocation-free in the common case.
pub struct CompletionCell<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Default for CompletionCell<T> {
    fn default() -> Self {
        CompletionCell::new()
    }
}

impl<T> CompletionCell<T> {
    /// A fresh cell.
    pub fn new() -> CompletionCell<T> {
        CompletionCell {
            shared: new_shared(),
        }
    }

    /// A connected pair on this cell, as [`pair`] (or [`pair_with_progress`] when
    /// `progress` is given) makes one.
    pub fn pair(&mut self, progress: Option<Arc<dyn Progress>>) -> (Completer<T>, Pending<T>) {
        match Arc::get_mut(&mut self.shared) {
            Some(s) => {
                let st = match s.state.get_mut() {
                    Ok(st) => st,
                    Err(p) => p.into_inner(),
                };
                st.value = None;
                st.done = false;
                st.waker = None;
                st.blocked = false;
            }
            None => self.shared = new_shared(),
        }
        pair_on(self.shared.clone(), progress)
    }

    /// Whether the next [`CompletionCell::pair`] reuses this cell (nothing else holds it).
    pub fn is_free(&mut self) -> bool {
        Arc::get_mut(&mut self.shared).is_some()
    }
}

impl<T> Completer<T> {
    /// Delivers the result and wakes the waiter.
    pub fn complete(mut self, r: Result<T>) {
        if let Some(s) = self.shared.take() {
            Self::deliver(&s, r);
        }
    }

    fn deliver(s: &Shared<T>, r: Result<T>) {
        let (waker, blocked) = {
            let mut st = s.lock();
            if st.done {
                return;
            }
            st.value = Some(r);
            st.done = true;
            (st.waker.take(), st.blocked)
        };
        if blocked {
            s.cond.notify_all();
        }
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
    /// Lets the transport's [`Progress`] work on this thread before it blocks, at most
    /// until `deadline`.
    fn progress(&self, deadline: Option<Instant>) {
        if let Some(p) = &self.progress {
            p.progress(
                &|| self.is_done() || deadline.is_some_and(|d| Instant::now() >= d),
                deadline,
            );
        }
    }

    /// Blocks until the result arrives.
    pub fn wait(self) -> Result<T> {
        self.progress(None);
        let mut st = self.shared.lock();
        while !st.done {
            st.blocked = true;
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
        self.progress(Some(deadline));
        {
            let mut st = self.shared.lock();
            while !st.done {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st.blocked = true;
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
        drop(st);
        if let Some(p) = &self.progress {
            p.will_await();
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
    fn wait_lets_progress_complete_on_the_waiting_thread() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Deliver {
            completer: Mutex<Option<Completer<u32>>>,
            calls: AtomicUsize,
            waiter: Mutex<Option<std::thread::ThreadId>>,
        }
        impl Progress for Deliver {
            fn progress(&self, done: &dyn Fn() -> bool, _deadline: Option<Instant>) {
                self.calls.fetch_add(1, Ordering::SeqCst);
                *self.waiter.lock().unwrap() = Some(std::thread::current().id());
                assert!(!done());
                if let Some(c) = self.completer.lock().unwrap().take() {
                    c.complete(Ok(3));
                }
                assert!(done());
            }
        }
        let d = Arc::new(Deliver {
            completer: Mutex::new(None),
            calls: AtomicUsize::new(0),
            waiter: Mutex::new(None),
        });
        let (c, p) = pair_with_progress::<u32>(d.clone());
        *d.completer.lock().unwrap() = Some(c);
        // Nobody else completes it: only the progress hook, on this thread, can.
        assert_eq!(p.wait().unwrap(), 3);
        assert_eq!(d.calls.load(Ordering::SeqCst), 1);
        assert_eq!(*d.waiter.lock().unwrap(), Some(std::thread::current().id()));
    }

    #[test]
    fn a_cell_is_reused_once_its_pair_is_gone_and_replaced_while_a_waiter_holds_it() {
        let mut cell = CompletionCell::<u32>::new();
        let first = Arc::as_ptr(&cell.shared);
        let (c, p) = cell.pair(None);
        assert!(!cell.is_free());
        c.complete(Ok(1));
        assert_eq!(p.wait().unwrap(), 1);
        assert!(cell.is_free());
        // Reused: same memory, and the old result is gone.
        let (c, p) = cell.pair(None);
        assert_eq!(Arc::as_ptr(&cell.shared), first);
        assert!(!p.is_done());
        c.complete(Ok(2));
        // The waiter has not taken its result yet: a new pair must not disturb it.
        let (c2, p2) = cell.pair(None);
        assert_ne!(Arc::as_ptr(&cell.shared), first);
        c2.complete(Ok(3));
        assert_eq!(p.wait().unwrap(), 2);
        assert_eq!(p2.wait().unwrap(), 3);
        // A pair dropped without completing frees the cell too (the waiter got an error).
        let (c, p) = cell.pair(None);
        drop(c);
        assert!(matches!(p.wait(), Err(Error::ConnectionClosed(_))));
        assert!(cell.is_free());
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
