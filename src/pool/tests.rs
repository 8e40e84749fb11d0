use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::error::Error;

fn small(count: usize, reserve: usize, arena_slots: usize) -> PoolConfig {
    PoolConfig {
        classes: vec![
            ClassConfig {
                size: 4096,
                count,
                reserve,
                arena_slots,
            },
            ClassConfig {
                size: 65536,
                count: 8,
                reserve: 0,
                arena_slots: 2,
            },
        ],
        wait_timeout: Duration::from_millis(200),
        stripes: 2,
    }
}

#[test]
fn class_selection_and_page_alignment() {
    let p = Pool::new(&small(16, 0, 4)).unwrap();
    let a = p.get(1).unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a.capacity(), 4096);
    assert_eq!(a.as_ptr() as usize % PAGE, 0);
    let b = p.get(4097).unwrap();
    assert_eq!(b.capacity(), 65536);
    assert_eq!(b.as_ptr() as usize % PAGE, 0);
    match p.get(65537) {
        Err(Error::NoSizeClass { size, largest }) => {
            assert_eq!((size, largest), (65537, 65536));
        }
        other => panic!("expected NoSizeClass, got {other:?}"),
    }
}

#[test]
fn no_slot_is_handed_out_twice() {
    let p = Pool::new(&small(64, 0, 16)).unwrap();
    let held: Vec<IobufMut> = (0..64).map(|_| p.get(4096).unwrap()).collect();
    let addrs: HashSet<usize> = held.iter().map(|b| b.as_ptr() as usize).collect();
    assert_eq!(addrs.len(), 64, "two handles share a slot");
    // Nothing more without waiting.
    assert!(p.try_get(4096, Priority::Data).unwrap().is_none());
    drop(held);
    assert_eq!(p.stats().classes[0].in_use, 0);
}

#[test]
fn try_get_span_is_all_or_nothing() {
    let p = Pool::new(&small(16, 0, 4)).unwrap();
    // 3.5 buffers of the largest class (64 KiB x 8).
    let a = p
        .try_get_span(3 * 65536 + 32768)
        .unwrap()
        .expect("free buffers");
    assert_eq!(a.total_len(), 3 * 65536 + 32768);
    assert_eq!(a.buffers().len(), 4);
    assert_eq!(p.stats().classes[1].in_use, 4);
    // 5 more do not fit in the 4 left: none is taken.
    assert!(p.try_get_span(5 * 65536).unwrap().is_none());
    assert_eq!(p.stats().classes[1].in_use, 4);
    let b = p.try_get_span(4 * 65536).unwrap().expect("the last four");
    assert_eq!(p.stats().classes[1].in_use, 8);
    drop((a, b));
    assert_eq!(p.stats().classes[1].in_use, 0);
}

#[test]
fn concurrent_owners_never_overlap_and_all_slots_return() {
    let p = Pool::new(&small(32, 0, 8)).unwrap();
    let threads = 4;
    let iters = 2000;
    let live = Arc::new(Mutex::new(HashSet::new()));
    let barrier = Arc::new(Barrier::new(threads));
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let p = p.clone();
            let live = live.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                for i in 0..iters {
                    let mut b = p.get(4096).unwrap();
                    assert!(
                        live.lock().unwrap().insert(b.as_ptr() as usize),
                        "slot shared"
                    );
                    let tag = (t * iters + i) as u8;
                    b.fill(tag);
                    thread::yield_now();
                    assert!(b.iter().all(|&x| x == tag), "another owner wrote our slot");
                    assert!(live.lock().unwrap().remove(&(b.as_ptr() as usize)));
                    // Half the buffers are dropped on another thread.
                    if i % 2 == 0 {
                        thread::spawn(move || drop(b)).join().unwrap();
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let st = p.stats();
    assert_eq!(st.classes[0].in_use, 0);
    assert_eq!(st.classes[0].gets, (threads * iters) as u64);
    assert_eq!(p.free_slots(), st.classes.iter().map(|c| c.created).sum());
}

#[test]
fn frozen_refcounts_across_clones_and_threads() {
    let p = Pool::new(&small(4, 0, 4)).unwrap();
    let mut b = p.get(4096).unwrap();
    b.fill(7);
    let f = b.freeze();
    let clones: Vec<Iobuf> = (0..16).map(|_| f.clone()).collect();
    assert_eq!(p.stats().classes[0].in_use, 1);
    let hs: Vec<_> = clones
        .into_iter()
        .map(|c| thread::spawn(move || assert!(c.iter().all(|&x| x == 7))))
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(
        p.stats().classes[0].in_use,
        1,
        "slot returned while a handle lives"
    );
    let f2 = f.clone();
    let f = match f.try_into_mut() {
        Ok(_) => panic!("try_into_mut succeeded with two handles"),
        Err(f) => f,
    };
    drop(f2);
    let m = f.try_into_mut().expect("sole handle converts back");
    drop(m);
    assert_eq!(p.stats().classes[0].in_use, 0);
}

#[test]
fn views_stay_in_bounds() {
    let p = Pool::new(&small(4, 0, 4)).unwrap();
    let mut b = p.get(100).unwrap();
    for (i, x) in b.iter_mut().enumerate() {
        *x = i as u8;
    }
    let f = b.freeze();
    let v = f.slice(10..20).unwrap();
    assert_eq!(&v[..], &(10u8..20).collect::<Vec<_>>()[..]);
    let vv = v.slice(2..5).unwrap();
    assert_eq!(&vv[..], &[12, 13, 14]);
    assert!(v.slice(5..11).is_none());
    assert!(f.slice(0..101).is_none());
    #[allow(clippy::reversed_empty_ranges)]
    let bad = f.slice(5..4);
    assert!(bad.is_none());
    assert_eq!(f.slice(100..100).unwrap().len(), 0);
    // A view is not the whole slot: cannot become writable.
    assert!(vv.try_into_mut().is_err());
}

#[test]
fn exhaustion_waits_then_fails_naming_the_class() {
    let p = Pool::new(&small(4, 0, 4)).unwrap();
    let held: Vec<_> = (0..4).map(|_| p.get(10).unwrap()).collect();
    let t0 = Instant::now();
    let err = p.get(10).unwrap_err();
    assert!(t0.elapsed() >= Duration::from_millis(200), "did not wait");
    let msg = err.to_string();
    assert!(msg.contains("4096 B exhausted"), "{msg}");
    assert!(msg.contains("4/4 slots in use"), "{msg}");
    let st = p.stats().classes[0];
    assert_eq!((st.waits, st.failures), (1, 1));
    drop(held);
}

#[test]
fn a_waiter_is_woken_by_a_put_from_another_thread() {
    let mut cfg = small(2, 0, 2);
    cfg.wait_timeout = Duration::from_secs(10);
    let p = Pool::new(&cfg).unwrap();
    let a = p.get(1).unwrap();
    let b = p.get(1).unwrap();
    // The put comes once the pool has counted the get's wait (it counts before it blocks),
    // so the get below cannot have found a free slot without waiting.
    let p2 = p.clone();
    let h = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while p2.stats().classes[0].waits == 0 {
            assert!(Instant::now() < deadline, "the get never waited");
            thread::yield_now();
        }
        drop(a);
    });
    let c = p.get(1).expect("woken by the put");
    h.join().unwrap();
    assert_eq!(p.stats().classes[0].waits, 1);
    drop((b, c));
}

#[test]
fn reserve_serves_control_when_data_drained_the_class() {
    let p = Pool::new(&small(8, 2, 8)).unwrap();
    let data: Vec<_> = (0..6).map(|_| p.get(10).unwrap()).collect();
    assert!(
        p.try_get(10, Priority::Data).unwrap().is_none(),
        "data took from the reserve"
    );
    let c1 = p.get_control(10).unwrap();
    let c2 = p.get_control(10).unwrap();
    assert!(p.try_get(10, Priority::Control).unwrap().is_none());
    assert_eq!(p.stats().classes[0].reserve_gets, 2);
    // A control get prefers ordinary slots when there are some.
    drop(data);
    drop((c1, c2));
    let c3 = p.get_control(10).unwrap();
    assert_eq!(p.stats().classes[0].reserve_gets, 2);
    drop(c3);
}

struct CountingRegistrar {
    calls: Mutex<Vec<(usize, usize, usize)>>,
    next_key: AtomicUsize,
}

impl MemoryRegistrar for CountingRegistrar {
    fn name(&self) -> String {
        "counting".into()
    }
    fn register(&self, a: &ArenaInfo) -> Result<RegionKeys, BoxError> {
        self.calls
            .lock()
            .unwrap()
            .push((a.index, a.addr.as_ptr() as usize, a.len));
        let k = self.next_key.fetch_add(1, Ordering::SeqCst) as u32;
        Ok(RegionKeys {
            lkey: 1000 + k,
            rkey: 2000 + k,
            guard: Box::new(()),
        })
    }
}

#[test]
fn registration_once_per_arena_including_later_arenas() {
    // 4K class: 16 slots in arenas of 4 (four arenas, one mapped now); 64K: 8 in arenas of 2.
    let p = Pool::new(&small(16, 0, 4)).unwrap();
    let r = Arc::new(CountingRegistrar {
        calls: Mutex::new(Vec::new()),
        next_key: AtomicUsize::new(0),
    });
    let id = p.add_registrar(r.clone()).unwrap();
    assert_eq!(r.calls.lock().unwrap().len(), 2, "one per existing arena");
    let held: Vec<_> = (0..16).map(|_| p.get(4096).unwrap()).collect();
    let calls = r.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 5, "three more 4K arenas registered as created");
    let mut idx: Vec<_> = calls.iter().map(|c| c.0).collect();
    idx.sort_unstable();
    idx.dedup();
    assert_eq!(idx.len(), 5, "an arena registered twice");
    // Every buffer finds the keys of its own arena.
    for b in &held {
        let k = b.keys(id).expect("keys");
        let (_, addr, len) = calls[(k.lkey - 1000) as usize];
        let p0 = b.as_ptr() as usize;
        assert!(
            p0 >= addr && p0 + 4096 <= addr + len,
            "keys of another arena"
        );
        assert_eq!(k.rkey - 2000, k.lkey - 1000);
    }
    let shared = held.into_iter().next().unwrap().freeze();
    assert!(shared.keys(id).is_some());
    assert!(shared
        .keys(RegistrarId {
            pool: p.id(),
            index: 3
        })
        .is_none());
    // A buffer of another pool does not answer for this pool's registrar.
    let other = Pool::new(&small(4, 0, 4)).unwrap();
    other
        .add_registrar(Arc::new(CountingRegistrar {
            calls: Mutex::new(Vec::new()),
            next_key: AtomicUsize::new(0),
        }))
        .unwrap();
    let ob = other.get(10).unwrap();
    assert_eq!(id.index(), 0);
    assert!(ob.keys(id).is_none(), "keys of another pool's registrar");
}

#[test]
fn registrar_limit_and_failure_are_errors() {
    struct Refuse;
    impl MemoryRegistrar for Refuse {
        fn name(&self) -> String {
            "refuse".into()
        }
        fn register(&self, _: &ArenaInfo) -> Result<RegionKeys, BoxError> {
            Err("no memlock".into())
        }
    }
    let p = Pool::new(&small(4, 0, 4)).unwrap();
    let err = p.add_registrar(Arc::new(Refuse)).unwrap_err();
    assert!(matches!(err, Error::RegisterArena { .. }), "{err:?}");
    let p = Pool::new(&small(4, 0, 4)).unwrap();
    for _ in 0..MAX_REGISTRARS {
        p.add_registrar(Arc::new(CountingRegistrar {
            calls: Mutex::new(Vec::new()),
            next_key: AtomicUsize::new(0),
        }))
        .unwrap();
    }
    let err = p
        .add_registrar(Arc::new(CountingRegistrar {
            calls: Mutex::new(Vec::new()),
            next_key: AtomicUsize::new(0),
        }))
        .unwrap_err();
    assert!(matches!(err, Error::TooManyRegistrars { .. }));
}

#[test]
fn buffers_outlive_the_pool_handle() {
    let p = Pool::new(&small(4, 0, 4)).unwrap();
    let mut b = p.get(4096).unwrap();
    let f = {
        let mut c = p.get(4096).unwrap();
        c.fill(3);
        c.freeze()
    };
    drop(p);
    b.fill(9);
    assert!(b.iter().all(|&x| x == 9));
    let g = f.clone();
    drop(f);
    assert!(g.iter().all(|&x| x == 3));
    drop(b);
    drop(g);
}

#[test]
fn config_validation_names_the_key() {
    let mut c = small(4, 0, 4);
    c.classes[0].reserve = 4;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("pool.classes[0].reserve"), "{e}");
    let mut c = small(4, 0, 4);
    c.classes[1].count = 0;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("pool.classes[1].count"), "{e}");
    let mut c = small(4, 0, 4);
    c.classes[1].size = 4096;
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("duplicate"), "{e}");
    assert_eq!(
        PoolConfig::default().total_bytes(),
        (4 + 16 + 32 + 64) << 20
    );
}

#[test]
fn get_buffers_is_all_or_nothing() {
    let p = Pool::new(&small(4, 0, 4)).unwrap();
    let r = p.get_buffers(4096, 3).unwrap();
    assert_eq!((r.count(), r.total_len()), (3, 3 * 4096));
    assert!(p.get_buffers(4096, 2).is_err());
    assert_eq!(p.stats().classes[0].in_use, 3);
    drop(r);
    assert_eq!(p.stats().classes[0].in_use, 0);
    let span = p.get_span(65536 * 2 + 5).unwrap();
    assert_eq!(span.count(), 3);
    assert_eq!(span.total_len(), 65536 * 2 + 5);
}

/// Views of held buffers: checked ranges only, and the memory they point at stays put when
/// the holder moves (into a completion, or through `hold`/`unhold`).
#[test]
fn held_views_are_checked_and_survive_moving_the_holder() {
    use super::held::{Held, Holding};

    // Caller vectors: a view of a range points into that vector's heap block.
    let mut v: Vec<Vec<u8>> = vec![vec![0u8; 10], vec![0u8; 4]];
    let mut part = v.view(0, 3, 5).unwrap();
    assert_eq!(part.len(), 5);
    assert_eq!(part.addr(), v[0][3..].as_ptr().cast_mut());
    // Out of range, past the end, overflowing, or a buffer that is not there: errors.
    for (i, off, n) in [(0, 6, 5), (1, 0, 5), (2, 0, 0), (0, usize::MAX, 2)] {
        assert!(
            matches!(v.view(i, off, n), Err(Error::Internal(_))),
            "view {i} {off}+{n} must be refused"
        );
    }
    // Move the holder (as the client moves it into a completion) and write through the
    // view, as a transport filling a receive segment does: the bytes land in the buffer.
    let held = v.hold();
    let moved = Box::new(held);
    part.as_mut_slice().copy_from_slice(b"hello");
    let back = <Vec<Vec<u8>>>::unhold(*moved);
    assert_eq!(&back[0], b"\0\0\0hello\0\0");

    // Pool buffers: a whole buffer's view carries its pool (so its keys), a part does not.
    let p = Pool::new(&small(4, 0, 2)).unwrap();
    let mut r = Iobref::new();
    r.push(p.get(100).unwrap());
    let id = RegistrarId {
        pool: r.buffers()[0].pool_id(),
        index: 0,
    };
    let whole = r.view(0, 0, 100).unwrap();
    assert_eq!(whole.addr(), r.buffers()[0].as_ptr().cast_mut());
    assert_eq!(whole.len(), 100);
    let mut tail = r.view(0, 90, 10).unwrap();
    assert!(matches!(r.view(0, 90, 11), Err(Error::Internal(_))));
    assert!(matches!(r.view(1, 0, 1), Err(Error::Internal(_))));
    let mut h: Holding = r.hold();
    assert_eq!(h.lens(), vec![100]);
    tail.as_mut_slice().fill(7);
    assert!(h.view(0, 0, 101).is_err());
    let r = Iobref::unhold(h);
    assert_eq!(&r.buffers()[0][90..], &[7u8; 10]);
    // No registrar is installed, so the view has no keys to carry.
    assert_eq!(whole.keys(id), None);
}
