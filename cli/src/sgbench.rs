//! `zcio sgbench`: the scatter-gather test of the FUSE work in `shared/seeds/`, on any
//! local path (a `zcio mount`, or the server's own file system for comparison): `preadv` /
//! `pwritev` of N segments per call, or the same shapes one `pread`/`pwrite` per segment
//! (what the kernel did before it packed segments into one request). fio cannot do this:
//! it issues one iovec per I/O.
//!
//! Buffers are page-aligned pool buffers, so `--direct` (O_DIRECT) works with any shape of
//! whole pages.

use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use zcio::pool::Pool;

use crate::AnyResult;

/// `zcio sgbench` options.
#[derive(clap::Args, Debug)]
pub(crate) struct SgArgs {
    /// The file to read or write (created and filled for reads if shorter than `--span`).
    file: PathBuf,
    /// Segments per call.
    #[arg(long, default_value_t = 32)]
    segments: usize,
    /// Bytes per segment.
    #[arg(long, default_value_t = 4096)]
    seg_size: usize,
    /// One `pread`/`pwrite` per segment instead of one `preadv`/`pwritev` per call.
    #[arg(long)]
    per_segment: bool,
    /// Write instead of read.
    #[arg(long)]
    write: bool,
    /// Open with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Bytes of the file the calls cycle over.
    #[arg(long, default_value_t = 64 << 20)]
    span: u64,
    /// How long to run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
}

/// Runs `zcio sgbench` and prints one line: shape, calls, MB/s.
pub(crate) fn run(a: SgArgs) -> AnyResult<()> {
    let call = a.segments * a.seg_size;
    if a.segments == 0 || a.seg_size == 0 || call as u64 > a.span {
        return Err("segments and seg-size must be > 0 and a call must fit in --span".into());
    }
    let have = std::fs::metadata(&a.file).map(|m| m.len()).unwrap_or(0);
    if !a.write && have < a.span {
        let chunk = vec![0x5au8; 1 << 20];
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.file)?;
        let mut left = a.span - have;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            std::io::Write::write_all(&mut f, &chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    }
    let mut pcfg = zcio::PoolConfig::default();
    for c in &mut pcfg.classes {
        c.count = c.count.min(512);
    }
    let pool = Pool::new(&pcfg)?;
    let mut bufs = Vec::with_capacity(a.segments);
    for i in 0..a.segments {
        let mut b = pool.get(a.seg_size)?;
        b.fill(i as u8);
        bufs.push(b);
    }
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if a.write {
        o.write(true).create(true);
    }
    if a.direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = o.open(&a.file)?;
    let calls_in_span = (a.span / call as u64).max(1);
    let deadline = Duration::from_secs_f64(a.seconds.max(0.1));
    let t0 = Instant::now();
    let mut calls = 0u64;
    while t0.elapsed() < deadline {
        let off = (calls % calls_in_span) * call as u64;
        let n = if a.per_segment {
            let mut n = 0;
            for (k, b) in bufs.iter_mut().enumerate() {
                let at = (off + (k * a.seg_size) as u64) as i64;
                n += if a.write {
                    nix::sys::uio::pwrite(&f, &b[..], at)?
                } else {
                    nix::sys::uio::pread(&f, &mut b[..], at)?
                };
            }
            n
        } else if a.write {
            let iov: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(&b[..])).collect();
            nix::sys::uio::pwritev(&f, &iov, off as i64)?
        } else {
            let mut iov: Vec<IoSliceMut<'_>> = bufs
                .iter_mut()
                .map(|b| IoSliceMut::new(&mut b[..]))
                .collect();
            nix::sys::uio::preadv(&f, &mut iov, off as i64)?
        };
        if n != call {
            return Err(format!("short transfer: {n} of {call} bytes at {off}").into());
        }
        calls += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "sgbench {} {} x {} B{}{}: {} calls in {:.2} s, {:.1} MB/s, {:.0} calls/s",
        if a.write { "write" } else { "read" },
        a.segments,
        a.seg_size,
        if a.per_segment {
            ", one call per segment"
        } else {
            ", one vectored call"
        },
        if a.direct { ", O_DIRECT" } else { "" },
        calls,
        secs,
        (calls * call as u64) as f64 / secs / 1e6,
        calls as f64 / secs
    );
    Ok(())
}
