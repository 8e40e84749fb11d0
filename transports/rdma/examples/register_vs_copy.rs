//! The measurement behind `rdma.register_threshold`: registering and deregistering caller
//! memory on the fly (what a registered segment costs per request) versus copying it
//! through a pool buffer (what a bounced one costs), per size. Prints a table of medians;
//! the threshold belongs where the ratio crosses 1. A measurement, not a test: it asserts
//! nothing, so it lives here rather than in the test suite.
//!
//! Needs an RDMA device (`ZCIO_RDMA_DEVICE` picks one); on this project's hosts that means
//! the rxe guest:
//!
//! ```text
//! cargo build --release -p zcio-rdma --features rdma --example register_vs_copy
//! ZCIO_RXE_BENCH_CMD=target/release/examples/register_vs_copy ci/rxe-bench
//! ```

use std::time::Instant;

use zcio::conformance::{pattern, test_pool};
use zcio::Pool;
use zcio_rdma::verbs::{Context, MrAccess};

fn main() {
    let device = std::env::var("ZCIO_RDMA_DEVICE")
        .ok()
        .filter(|n| !n.is_empty());
    let ctx = match Context::open(device.as_deref()) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("register_vs_copy: no RDMA device: {e}");
            std::process::exit(2);
        }
    };
    let pd = ctx.alloc_pd().unwrap();
    let pool = Pool::new(&test_pool()).unwrap();
    println!("   size    reg+dereg  bounce copy  reg/copy   (medians)");
    for size in [
        4096usize,
        16 << 10,
        64 << 10,
        128 << 10,
        256 << 10,
        512 << 10,
        1 << 20,
    ] {
        let src = pattern(size as u64, size);
        let mut mem = vec![1u8; size];
        let runs = 25;
        let mut reg = Vec::with_capacity(runs);
        let mut copy = Vec::with_capacity(runs);
        for i in 0..runs + 3 {
            let t0 = Instant::now();
            // SAFETY: `mem` outlives the region, which is dropped on the next line, and
            // nothing posts work requests on it.
            let mr =
                unsafe { pd.register(mem.as_mut_ptr(), size, MrAccess::RemoteReadWrite) }.unwrap();
            drop(mr);
            let r = t0.elapsed();
            let t0 = Instant::now();
            let mut b = pool.get(size).unwrap();
            b.copy_from_slice(&src);
            std::hint::black_box(&mut b);
            drop(b);
            let c = t0.elapsed();
            // The first rounds warm caches and fault the pool's pages in.
            if i >= 3 {
                reg.push(r);
                copy.push(c);
            }
        }
        mem[0] = 0;
        reg.sort();
        copy.sort();
        let (r, c) = (reg[runs / 2], copy[runs / 2]);
        println!(
            "{:>7} {:>12.1?} {:>12.1?} {:>9.2}",
            zcio::pool::human_size(size),
            r,
            c,
            r.as_secs_f64() / c.as_secs_f64().max(1e-9)
        );
    }
}
