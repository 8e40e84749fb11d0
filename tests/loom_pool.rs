//! Loom models of the pool's hand-written synchronisation.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test --release --test loom_pool`.
//!
//! Under `--cfg loom` the pool's `sync` module swaps in loom's atomics, `Arc`, `Mutex` and
//! `Condvar`, and a mutex-based slot queue with the contract of crossbeam's `ArrayQueue`
//! (loom cannot see inside crossbeam), so these models check the protocol around the queue:
//!
//! - (a) the per-slot refcount of frozen `Iobuf`s: a clone dropped on another thread, the
//!   slot returns exactly once, the bytes written before `freeze` are what the other thread
//!   reads, and a reuse of the slot (or `try_into_mut`) never races a reader. Slot memory
//!   is plain memory loom cannot see, so each model mirrors its accesses on a loom
//!   `UnsafeCell` ("shadow") that loom checks for causality.
//! - (b) the per-stripe live count / `CLOSED` protocol: the pool handle dropped on one
//!   thread while buffers are dropped on others. The class must be freed exactly once, only
//!   after both (the pool's `loom_probe` counts frees, asserts in `Class`'s drop that every
//!   stripe is closed and empty, and asserts that no buffer or pool touches a freed class).
//! - (c) waking: a `get` waiting on an empty class gets the slot another thread drops (no
//!   lost wake-up). Loom's `Condvar::wait_timeout` never times out (it is `wait`), so a lost
//!   wake-up shows as a deadlock, which loom reports.
//!
//! Arenas are mapped (`mmap`, std `OnceLock`) in `Pool::new`, before any thread spawns;
//! the models use one arena, so `get` never grows the class inside the model.
//!
//! The models are explored exhaustively (no preemption bound); each reports its number of
//! executions on stderr (`-- --nocapture`). Each was checked to fail when the ordering it
//! guards is weakened: `Iobuf` drop's `Release`/`Acquire` fence, `try_into_mut`'s
//! `Acquire`, `put` waking before pushing, `put` dropping its stripe count before pushing
//! or before waking, or with `Relaxed`, `close`'s `fetch_or` with `Relaxed`, `release`
//! without its `Acquire` fence, and `take` not counting itself in `waiting`.
//!
//! Not modelled here: the timeout path of `get` (loom never times out), and crossbeam's own
//! queue. With the real `ArrayQueue` the no-lost-wake-up argument is a store-buffer one:
//! `take` does `waiting.fetch_add(SeqCst)` then `pop` (whose empty path runs a `SeqCst`
//! fence before reading `tail`), `put` does `push` (a `SeqCst` CAS of `tail`) then
//! `waiting.load(SeqCst)`; in the single `SeqCst` order one of the two sees the other.
#![cfg(loom)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;
use zcio::pool::{loom_probe, ClassConfig, Iobuf, Pool, PoolConfig, Priority};

const SIZE: usize = 4096;

/// `loom::model`, reporting how many executions it explored and how long that took.
fn model<F>(f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let executions = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = executions.clone();
    let t0 = Instant::now();
    loom::model(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f();
    });
    eprintln!(
        "{}: {} executions in {:.2?}",
        std::thread::current().name().unwrap_or("model"),
        executions.load(Ordering::Relaxed),
        t0.elapsed()
    );
}

/// One 4 KiB class of `count` slots in one arena, `stripes` data stripes, no reserve.
fn pool(count: usize, stripes: usize) -> Pool {
    Pool::new(&PoolConfig {
        classes: vec![ClassConfig {
            size: SIZE,
            count,
            reserve: 0,
            arena_slots: count,
        }],
        // Irrelevant under loom (waits are untimed), large so a real run never fails.
        wait_timeout: Duration::from_secs(3600),
        stripes,
    })
    .expect("pool")
}

/// A frozen buffer filled with `byte`, its write recorded on `shadow`.
fn frozen(p: &Pool, shadow: &UnsafeCell<()>, byte: u8) -> Iobuf {
    let mut b = p.get(SIZE).expect("get");
    shadow.with_mut(|_| b.fill(byte));
    b.freeze()
}

fn assert_all_free(p: &Pool, slots: usize) {
    let st = p.stats();
    assert_eq!(st.slots_in_use(), 0, "a slot is still counted in use");
    assert_eq!(p.free_slots(), slots, "a slot was lost or returned twice");
}

/// (a) Freeze, clone into another thread, drop on both sides. The reader sees the bytes
/// written before `freeze`; whichever side drops last returns the slot, exactly once; if
/// the main thread gets the slot back while the reader may still run, writing into it must
/// not race the reader's reads.
#[test]
fn a_frozen_clone_dropped_on_two_threads_returns_the_slot_once() {
    model(|| {
        let p = pool(1, 1);
        let shadow = Arc::new(UnsafeCell::new(()));
        let f = frozen(&p, &shadow, 0xab);
        let g = f.clone();
        let sh = shadow.clone();
        let t = thread::spawn(move || {
            sh.with(|_| assert!(g.iter().all(|&x| x == 0xab), "stale bytes"));
            drop(g);
        });
        drop(f);
        // Back only if the reader's handle is gone too: reuse it for writing right away.
        if let Some(mut m) = p.try_get(SIZE, Priority::Data).expect("try_get") {
            shadow.with_mut(|_| m.fill(1));
        }
        t.join().unwrap();
        assert_all_free(&p, 1);
        // The slot is there once: one get succeeds, a second finds the class empty.
        let again = p.try_get(SIZE, Priority::Data).expect("try_get");
        assert!(again.is_some(), "slot not returned");
        assert!(p.try_get(SIZE, Priority::Data).expect("try_get").is_none());
    });
}

/// (a) `try_into_mut` racing the drop of the other handle: it may only succeed once the
/// other handle is gone, and the write that follows must not race that handle's reads.
#[test]
fn a_try_into_mut_waits_for_the_other_handle() {
    model(|| {
        let p = pool(1, 1);
        let shadow = Arc::new(UnsafeCell::new(()));
        let f = frozen(&p, &shadow, 7);
        let g = f.clone();
        let sh = shadow.clone();
        let t = thread::spawn(move || {
            sh.with(|_| assert!(g.iter().all(|&x| x == 7)));
            drop(g);
        });
        match f.try_into_mut() {
            Ok(mut m) => shadow.with_mut(|_| m.fill(8)),
            Err(f) => drop(f),
        }
        t.join().unwrap();
        assert_all_free(&p, 1);
    });
}

/// (b) The pool handle dropped on one thread while a buffer is dropped on another: the
/// class is freed once, after both.
#[test]
fn b_pool_and_last_buffer_dropped_concurrently_free_the_class_once() {
    model(|| {
        let p = pool(2, 1);
        let b = p.get(SIZE).expect("get");
        let t = thread::spawn(move || drop(b));
        drop(p);
        t.join().unwrap();
        assert_eq!(loom_probe::classes_freed(), 1);
    });
}

/// (b) Two data stripes, a buffer live in each, dropped on two threads while the main
/// thread drops the pool: each stripe lets go of the class once, the class goes once.
#[test]
fn b_two_stripes_two_buffers_and_the_pool_dropped_at_once() {
    model(|| {
        // Two slots, one per data stripe: the second get steals from stripe 1.
        let p = pool(2, 2);
        let a = p.get(SIZE).expect("get");
        let b = p.get(SIZE).expect("get");
        let ta = thread::spawn(move || drop(a));
        let tb = thread::spawn(move || drop(b));
        drop(p);
        ta.join().unwrap();
        tb.join().unwrap();
        assert_eq!(loom_probe::classes_freed(), 1);
    });
}

/// (b) with (a): two frozen handles of one slot dropped on two threads, one of which then
/// drops the pool: whichever handle goes last returns the slot, possibly while the pool
/// closes, and the class goes once.
#[test]
fn b_frozen_handles_outlive_the_pool() {
    model(|| {
        let p = pool(1, 1);
        let shadow = Arc::new(UnsafeCell::new(()));
        let f = frozen(&p, &shadow, 3);
        let g = f.clone();
        let sh = shadow.clone();
        let t = thread::spawn(move || {
            sh.with(|_| assert!(g.iter().all(|&x| x == 3)));
            drop(g);
        });
        drop(f);
        drop(p);
        t.join().unwrap();
        assert_eq!(loom_probe::classes_freed(), 1);
    });
}

/// (c) One slot: a thread holds it and drops it while the main thread waits in `get`.
/// The waiter must get it (a lost wake-up deadlocks the model).
#[test]
fn c_a_waiter_gets_the_slot_another_thread_drops() {
    model(|| {
        let p = pool(1, 1);
        let b = p.get(SIZE).expect("get");
        let t = thread::spawn(move || drop(b));
        let c = p.get(SIZE).expect("woken by the put");
        t.join().unwrap();
        drop(c);
        let st = p.stats().classes[0];
        assert_eq!(st.gets, 2);
        assert!(st.waits <= 1 && st.failures == 0, "{st:?}");
        assert_all_free(&p, 1);
    });
}

/// (c) with (a): the waiter is woken by whichever of two frozen handles drops last.
#[test]
fn c_a_waiter_gets_the_slot_when_the_last_shared_handle_drops() {
    model(|| {
        let p = pool(1, 1);
        let shadow = Arc::new(UnsafeCell::new(()));
        let f = frozen(&p, &shadow, 5);
        let g = f.clone();
        let tf = thread::spawn(move || drop(f));
        let sh = shadow.clone();
        let tg = thread::spawn(move || {
            sh.with(|_| assert!(g.iter().all(|&x| x == 5)));
            drop(g);
        });
        let mut c = p.get(SIZE).expect("woken by the last drop");
        shadow.with_mut(|_| c.fill(6));
        tf.join().unwrap();
        tg.join().unwrap();
        drop(c);
        assert_all_free(&p, 1);
    });
}
