//! `zcio soak`: many connections, many requests in flight, mixed verified reads and writes
//! for a set time, then a leak check.
//!
//! Each connection owns one file split into blocks and remembers the version of every
//! block it last wrote; a write bumps the version and fills the block with a pattern of
//! (connection, block, version); a read checks the pattern of the version last written.
//! A block with an operation in flight is never picked again until it completes, so every
//! read has exactly one right answer. At the end every block is read once more, then the
//! pools must be back to full, no file or descriptor may be left open and memory must be
//! flat.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use rand::Rng;
use zcio::{Client, Completion, Iobref, OpenFlags, Pool, PoolConfig, Server};

use crate::{registry, toml_str, AnyResult, Common};

/// `zcio soak` options.
#[derive(Args, Debug)]
pub(crate) struct SoakArgs {
    /// Server address; without it an embedded server runs on 127.0.0.1 (and the leak
    /// check covers it too).
    #[arg(long, value_name = "ADDR")]
    server: Option<String>,
    /// Client connections, each on its own thread.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    connections: u32,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    iodepth: u32,
    /// Block size (the unit of every read and write).
    #[arg(long, default_value = "16K", value_parser = crate::bench::size_arg)]
    block: usize,
    /// Blocks per connection's file.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    blocks: u32,
    /// How long to run (with --ops: the longest the run may take).
    #[arg(long, default_value = "30s", value_parser = crate::bench::duration_arg)]
    runtime: Duration,
    /// Stop as soon as N reads have been verified and N writes made, over all connections;
    /// not getting there within --runtime fails the soak. An amount of work instead of an
    /// amount of time, for runs that must prove as much on a slow machine as on a fast one.
    #[arg(long, value_name = "N")]
    ops: Option<u64>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Export directory of the embedded server (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    export: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
}

fn fill(buf: &mut [u8], conn: u32, block: u32, version: u64) {
    let seed = (u64::from(conn) << 40)
        ^ (u64::from(block) << 20)
        ^ version.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (i, c) in buf.chunks_mut(8).enumerate() {
        let w = (seed ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)).to_le_bytes();
        c.copy_from_slice(&w[..c.len()]);
    }
}

fn matches(buf: &[u8], conn: u32, block: u32, version: u64) -> bool {
    let mut want = vec![0u8; buf.len()];
    fill(&mut want, conn, block, version);
    want == buf
}

/// Counters shared by the connections.
#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes: AtomicU64,
    corruptions: AtomicU64,
    errors: AtomicU64,
}

enum Op {
    Read(Completion<Iobref>),
    ReadOwned(Completion<(usize, Vec<Vec<u8>>)>),
    Write(Completion<(usize, Iobref)>),
    WriteOwned(Completion<(usize, Vec<Vec<u8>>)>),
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

fn soak_pool(a: &SoakArgs) -> PoolConfig {
    let mut p = PoolConfig::default();
    // Room for every request in flight at once, plus control messages.
    let need = (a.connections * a.iodepth) as usize + 64;
    for c in &mut p.classes {
        if c.size >= a.block {
            c.count = c.count.max(need);
            break;
        }
    }
    p.classes[0].count = p.classes[0].count.max(need);
    p.wait_timeout = Duration::from_secs(30);
    p
}

pub(crate) fn run(a: SoakArgs) -> AnyResult<()> {
    let mut cfg = a.common.load()?;
    cfg.pool = soak_pool(&a);
    cfg.limits.max_in_flight = cfg.limits.max_in_flight.max(a.iodepth as usize);
    let reg = registry();
    let mut embedded = None;
    let tmp;
    match &a.server {
        Some(addr) => cfg = cfg.with_override(&format!("client.connect={}", toml_str(addr)))?,
        None => {
            cfg.server.export = match &a.export {
                Some(d) => d.clone(),
                None => {
                    tmp = tempfile::Builder::new().prefix("zcio-soak-").tempdir()?;
                    tmp.path().to_path_buf()
                }
            };
            cfg.server.listen = "127.0.0.1:0".into();
            cfg.server.max_connections = cfg.server.max_connections.max(a.connections as usize + 8);
            // Every connection comes from 127.0.0.1 at once: let all of them handshake.
            cfg.server.max_handshakes_per_addr = cfg
                .server
                .max_handshakes_per_addr
                .max(a.connections as usize + 8);
            cfg.server.max_connections_per_addr = cfg
                .server
                .max_connections_per_addr
                .max(a.connections as usize + 8);
            cfg.server.max_in_flight = cfg.server.max_in_flight.max(a.iodepth as usize);
            let s = Server::bind(&cfg, &reg)?.spawn()?;
            cfg.client.connect = s.local_addr().to_string();
            embedded = Some(s);
        }
    }
    let t = reg.get(&cfg.transport, &cfg)?;
    let client_pool = Pool::new(&cfg.pool)?;
    // Descriptors with the server listening and no connection: what must remain at the end.
    let fds_before = open_fds();
    eprintln!(
        "zcio soak: {} connections x iodepth {} over {} to {}, {} blocks of {} each, {:?}",
        a.connections,
        a.iodepth,
        cfg.transport,
        cfg.client.connect,
        a.blocks,
        zcio::pool::human_size(a.block),
        a.runtime
    );
    let tally = Arc::new(Tally::default());
    // Connections that finished setting up (memory is measured once all have).
    let ready = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut rss_warm = 0;
    let t0 = Instant::now();
    let results: Vec<AnyResult<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..a.connections)
            .map(|conn| {
                let (cfg, t, pool, tally, stop, ready) =
                    (&cfg, &t, &client_pool, &tally, &stop, &ready);
                let a = &a;
                s.spawn(move || -> AnyResult<()> {
                    let c = Client::connect_transport(cfg, t.as_ref(), pool.clone());
                    // Counted even on failure, so the memory reference is still taken.
                    let r = c
                        .map_err(Into::into)
                        .and_then(|c| connection(a, &c, conn, tally, stop, ready));
                    if r.is_err() {
                        ready.fetch_add(1, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        // Memory once every connection is set up and has run a while (buffers mapped,
        // queues built) is the reference; it must stay flat from there.
        let mut all_ready_at = None;
        let done = || {
            a.ops.is_some_and(|n| {
                tally.reads.load(Ordering::Relaxed) >= n
                    && tally.writes.load(Ordering::Relaxed) >= n
            })
        };
        while t0.elapsed() < a.runtime && !done() {
            std::thread::sleep(Duration::from_millis(10));
            if all_ready_at.is_none() && ready.load(Ordering::Relaxed) >= u64::from(a.connections) {
                all_ready_at = Some(Instant::now());
            }
            if rss_warm == 0 && all_ready_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(1))
            {
                rss_warm = rss_bytes();
            }
        }
        stop.store(true, Ordering::Relaxed);
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("connection thread panicked".into()))
            })
            .collect()
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| {
            r.err().map(|e| {
                // With its causes: "... failed" alone does not say why.
                let mut text = e.to_string();
                let mut src = e.source();
                while let Some(s) = src {
                    text += &format!(": {s}");
                    src = s.source();
                }
                text
            })
        })
        .collect();
    // Leak checks: everything returns once the connections are gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut leaks = Vec::new();
    loop {
        leaks.clear();
        let cu = client_pool.stats().slots_in_use();
        if cu != 0 {
            leaks.push(format!("client pool: {cu} buffers in use"));
        }
        if let Some(s) = &embedded {
            let su = s.pool().stats().slots_in_use();
            if su != 0 {
                leaks.push(format!("server pool: {su} buffers in use"));
            }
            if s.open_files() != 0 {
                leaks.push(format!("server: {} files open", s.open_files()));
            }
            if s.connections() != 0 {
                leaks.push(format!("server: {} connections open", s.connections()));
            }
            let fds = open_fds();
            if fds > fds_before {
                leaks.push(format!("descriptors: {fds} open, {fds_before} before"));
            }
        }
        if leaks.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rss_end = rss_bytes();
    // "Flat": no more than 32 MiB of growth after warm-up (allocator noise is far below).
    if rss_warm > 0 && rss_end > rss_warm + (32 << 20) {
        leaks.push(format!(
            "memory grew from {} to {} bytes after warm-up",
            rss_warm, rss_end
        ));
    }
    let reads = tally.reads.load(Ordering::Relaxed);
    let writes = tally.writes.load(Ordering::Relaxed);
    let corruptions = tally.corruptions.load(Ordering::Relaxed);
    let errors = tally.errors.load(Ordering::Relaxed) + failed.len() as u64;
    if a.json {
        println!(
            "{:#}",
            serde_json::json!({
                "transport": cfg.transport, "connections": a.connections, "iodepth": a.iodepth,
                "seconds": elapsed, "reads_verified": reads, "writes": writes,
                "bytes": tally.bytes.load(Ordering::Relaxed), "corruptions": corruptions,
                "errors": errors, "leaks": leaks, "rss_after_warmup": rss_warm, "rss_end": rss_end,
                "failures": failed,
            })
        );
    } else {
        println!(
            "soak: {elapsed:.1} s, {reads} reads verified, {writes} writes, {} MB moved, \
             {corruptions} corruptions, {errors} errors, {} leaks",
            tally.bytes.load(Ordering::Relaxed) / 1_000_000,
            leaks.len()
        );
        for l in &leaks {
            println!("  leak: {l}");
        }
        for f in &failed {
            println!("  connection failed: {f}");
        }
        println!(
            "  rss after warm-up {} MiB, at end {} MiB",
            rss_warm >> 20,
            rss_end >> 20
        );
    }
    if corruptions > 0 || errors > 0 || !leaks.is_empty() {
        return Err(format!(
            "soak failed: {corruptions} corruptions, {errors} errors, {} leaks",
            leaks.len()
        )
        .into());
    }
    if let Some(n) = a.ops.filter(|&n| reads < n || writes < n) {
        return Err(format!(
            "soak failed: {reads} reads verified and {writes} writes within {:?}, not {n} of each",
            a.runtime
        )
        .into());
    }
    Ok(())
}

fn connection(
    a: &SoakArgs,
    c: &Client,
    conn: u32,
    tally: &Tally,
    stop: &AtomicBool,
    ready: &AtomicU64,
) -> AnyResult<()> {
    let name = format!("soak.{conn}");
    let f = c.open(
        &name,
        OpenFlags::rw() | OpenFlags::CREATE | OpenFlags::TRUNCATE,
    )?;
    let blocks = a.blocks as usize;
    let bs = a.block;
    // Version 0: write every block once.
    let mut version = vec![0u64; blocks];
    for b in 0..blocks {
        let mut buf = vec![0u8; bs];
        fill(&mut buf, conn, b as u32, 0);
        if f.pwrite(&buf, (b * bs) as u64)? != bs {
            return Err(format!("{name}: short initial write").into());
        }
    }
    ready.fetch_add(1, Ordering::Relaxed);
    let mut busy = vec![false; blocks];
    let mut q: VecDeque<(Op, usize, u64)> = VecDeque::new();
    let mut rng = rand::thread_rng();
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        while q.len() < a.iodepth as usize {
            let mut b = rng.gen_range(0..blocks);
            let mut tries = 0;
            while busy[b] && tries < blocks {
                b = (b + 1) % blocks;
                tries += 1;
            }
            if busy[b] {
                break;
            }
            busy[b] = true;
            k += 1;
            let off = (b * bs) as u64;
            let op = if rng.gen_bool(0.5) {
                version[b] += 1;
                let v = version[b];
                if k % 2 == 0 {
                    let mut bufs = c.get_buffers(bs, 1)?;
                    fill(&mut bufs.buffers_mut()[0], conn, b as u32, v);
                    Op::Write(f.zero_writev_async(bufs, off)?)
                } else {
                    let mut v1 = vec![0u8; bs];
                    fill(&mut v1, conn, b as u32, v);
                    // Two segments, to exercise scatter-gather.
                    let v2 = v1.split_off(bs / 2);
                    Op::WriteOwned(f.pwritev_async(vec![v1, v2], off)?)
                }
            } else if k % 2 == 0 {
                Op::Read(f.zero_readv_async(bs, off)?)
            } else {
                Op::ReadOwned(f.preadv_async(vec![vec![0u8; bs / 2], vec![0u8; bs - bs / 2]], off)?)
            };
            q.push_back((op, b, version[b]));
        }
        let Some((op, b, v)) = q.pop_front() else {
            break;
        };
        finish(op, conn, b, v, bs, tally, &name)?;
        busy[b] = false;
    }
    for (op, b, v) in q {
        finish(op, conn, b, v, bs, tally, &name)?;
    }
    // Final pass: every block holds its last version.
    for (b, &v) in version.iter().enumerate() {
        let got = f.zero_readv(bs, (b * bs) as u64)?;
        tally.reads.fetch_add(1, Ordering::Relaxed);
        if !matches(&got.to_vec(), conn, b as u32, v) {
            tally.corruptions.fetch_add(1, Ordering::Relaxed);
        }
    }
    f.close()?;
    Ok(())
}

fn finish(
    op: Op,
    conn: u32,
    b: usize,
    v: u64,
    bs: usize,
    tally: &Tally,
    name: &str,
) -> AnyResult<()> {
    let block = b as u32;
    let (n, ok) = match op {
        Op::Read(c) => {
            let got = c.wait()?;
            tally.reads.fetch_add(1, Ordering::Relaxed);
            (got.total_len(), matches(&got.to_vec(), conn, block, v))
        }
        Op::ReadOwned(c) => {
            let (n, bufs) = c.wait()?;
            tally.reads.fetch_add(1, Ordering::Relaxed);
            (n, matches(&bufs.concat(), conn, block, v))
        }
        Op::Write(c) => {
            let (n, _) = c.wait()?;
            tally.writes.fetch_add(1, Ordering::Relaxed);
            (n, true)
        }
        Op::WriteOwned(c) => {
            let (n, _) = c.wait()?;
            tally.writes.fetch_add(1, Ordering::Relaxed);
            (n, true)
        }
    };
    tally.bytes.fetch_add(n as u64, Ordering::Relaxed);
    if n != bs {
        tally.errors.fetch_add(1, Ordering::Relaxed);
        return Err(format!("{name} block {b}: moved {n} of {bs} bytes").into());
    }
    if !ok {
        tally.corruptions.fetch_add(1, Ordering::Relaxed);
        eprintln!("zcio soak: CORRUPTION in {name} block {b} version {v}");
    }
    Ok(())
}
