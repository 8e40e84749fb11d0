//! `zcio bench`: a fio-like load generator.
//!
//! Each job is one client connection keeping `--iodepth` operations in flight with the
//! async API. An operation moves `--bs` bytes shaped as `--segments` equal iovec segments,
//! in one of four modes:
//! - `zero-copy`: pool buffers the transport fills or drains (`read_into_async`,
//!   `zero_writev_async`);
//! - `direct`: the caller's own iovecs, filled or drained directly by the transport
//!   (`preadv_async`, `pwritev_async`);
//! - `bounce`: payload lands in pool buffers and is copied into the caller's iovecs (or
//!   copied out of them before sending): the picture before GlusterFS's 2013 patch;
//! - `per-segment`: one request per iovec segment: the picture before the FUSE 2012 patch.
//!
//! Several modes (comma separated) and `--repeat N` interleave runs in one process, so
//! figures are compared side by side; the summary gives medians and ratios to the first
//! mode. `--baseline tcp-stream,tcp-pingpong,tcp-rpc,tcp-sendfile,tcp-file-write,tcp-splice-write`
//! adds raw-socket baselines to the same run.
//!
//! Every run also reports the CPU seconds the process spent per GiB moved (user + system,
//! from `getrusage`): with the embedded server that is client and server together, against a
//! remote server the client alone. The baselines run in this process too, both ends.
//!
//! `--cpus` places the two sides on CPUs (see [`crate::cpus`]): by default the baselines'
//! two ends run on two different CPUs when there are two, so that their latency is that of
//! a round trip between two machines whatever the scheduler would have chosen; `--cpus 0/1`
//! places zcio's client jobs and embedded server the same way. The JSON (`cpus`) and the
//! summary say where each ran.
//!
//! `--sweep iodepth=1,2,4` (or `bs=4k,64k`) runs the whole comparison once per value, and
//! `--plot FILE.svg` draws throughput and p99 latency against the swept value, one line per
//! mode and baseline.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use rand::Rng;
use zcio::{Client, Completion, Config, File, Iobref, OpenFlags, Server};

use crate::{allocs, baseline};
use crate::{registry, toml_str, AnyResult, Common};

/// Read or write, sequential or random.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
}

impl Rw {
    fn is_read(self) -> bool {
        matches!(self, Rw::Read | Rw::Randread)
    }
    fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite)
    }
}

/// How payload reaches the application.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Pool buffers filled or drained by the transport.
    ZeroCopy,
    /// The caller's own iovecs, filled or drained by the transport.
    Direct,
    /// Pool buffers plus a copy to or from the caller's iovecs.
    Bounce,
    /// One request per iovec segment.
    PerSegment,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::ZeroCopy => "zero-copy",
            Mode::Direct => "direct",
            Mode::Bounce => "bounce",
            Mode::PerSegment => "per-segment",
        }
    }
}

/// Raw-socket baselines run in the same process.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Baseline {
    /// A raw TCP stream on loopback: one side writes `bs` chunks, the other reads them.
    #[value(name = "tcp-stream")]
    Stream,
    /// A raw TCP ping-pong: a 32-byte request, a `bs` reply, one at a time.
    #[value(name = "tcp-pingpong")]
    Pingpong,
    /// Raw TCP request/response: `iodepth` 32-byte requests in flight on one socket, each
    /// answered with `bs` bytes from memory.
    #[value(name = "tcp-rpc")]
    Rpc,
    /// `tcp-stream` with the writer sending a file of `--size` bytes from the page cache
    /// with `sendfile(2)`: the ceiling of a zero-copy read.
    #[value(name = "tcp-sendfile")]
    Sendfile,
    /// `tcp-stream` with the reader writing each chunk into a file of `--size` bytes
    /// (`read`, `pwrite`): the ceiling of a write.
    #[value(name = "tcp-file-write")]
    FileWrite,
    /// `tcp-file-write` with `splice(2)` socket -> pipe -> file (no user-space copy).
    #[value(name = "tcp-splice-write")]
    SpliceWrite,
}

/// What `--sweep` varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Axis {
    /// `--iodepth`.
    Iodepth,
    /// `--bs`.
    Bs,
}

/// `--sweep AXIS=V1,V2,...`.
#[derive(Clone, Debug)]
pub(crate) struct Sweep {
    axis: Axis,
    values: Vec<usize>,
}

impl Sweep {
    fn name(&self) -> &'static str {
        match self.axis {
            Axis::Iodepth => "iodepth",
            Axis::Bs => "bs",
        }
    }

    fn show(&self, v: usize) -> String {
        match self.axis {
            Axis::Iodepth => v.to_string(),
            Axis::Bs => zcio::pool::human_size(v),
        }
    }
}

pub(crate) fn sweep_arg(s: &str) -> Result<Sweep, String> {
    let (axis, list) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected iodepth=1,2,4 or bs=4k,64k"))?;
    let axis = match axis.trim() {
        "iodepth" => Axis::Iodepth,
        "bs" => Axis::Bs,
        other => return Err(format!("`{other}`: --sweep varies iodepth or bs")),
    };
    let values = list
        .split(',')
        .map(|v| match axis {
            Axis::Iodepth => match v.trim().parse::<usize>() {
                Ok(n) if (1..=4096).contains(&n) => Ok(n),
                _ => Err(format!("`{v}`: an iodepth is 1 to 4096")),
            },
            Axis::Bs => match size_arg(v.trim()) {
                Ok(n) if n > 0 => Ok(n),
                Ok(_) => Err(format!("`{v}`: a bs is not 0")),
                Err(e) => Err(e),
            },
        })
        .collect::<Result<Vec<_>, _>>()?;
    if values.len() > 64 {
        return Err(format!("{} values: a sweep takes at most 64", values.len()));
    }
    Ok(Sweep { axis, values })
}

/// `zcio bench` options.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Server address; without it an embedded server runs on 127.0.0.1 over a
    /// temporary export.
    #[arg(long, value_name = "ADDR")]
    server: Option<String>,
    /// Workload.
    #[arg(long, value_enum, default_value = "read")]
    rw: Rw,
    /// Bytes per operation.
    #[arg(long, default_value = "128K", value_parser = size_arg)]
    bs: usize,
    /// Operations in flight per job.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    iodepth: u32,
    /// Size of each file.
    #[arg(long, default_value = "64M", value_parser = size_arg)]
    size: usize,
    /// Number of files (jobs spread over them).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    files: u32,
    /// Jobs: client connections, each on its own thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    jobs: u32,
    /// Iovec shape: N segments of bs/N bytes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    segments: u32,
    /// Modes to compare, comma separated; the first is the reference for ratios.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "zero-copy")]
    mode: Vec<Mode>,
    /// Run time of each measurement.
    #[arg(long, default_value = "5s", value_parser = duration_arg)]
    runtime: Duration,
    /// Measurements per mode (interleaved); the summary reports medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Check every byte read (and, after write runs, every byte of the files).
    #[arg(long)]
    verify: bool,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Count heap allocations per operation, in the whole process (client jobs, the
    /// embedded server, transport threads), once every job is connected. Costs an atomic
    /// increment per allocation, so measure speed without it.
    #[arg(long)]
    count_allocs: bool,
    /// Raw-socket baselines to run alongside, comma separated.
    #[arg(long, value_enum, value_delimiter = ',')]
    baseline: Vec<Baseline>,
    /// Runs everything once per value: `iodepth=1,2,4,8` or `bs=4k,64k,1m`.
    #[arg(long, value_name = "AXIS=V1,V2,..", value_parser = sweep_arg)]
    sweep: Option<Sweep>,
    /// With --sweep: draws throughput and p99 latency against the swept value into this
    /// SVG file, one line per mode and baseline.
    #[arg(long, value_name = "FILE.svg", requires = "sweep")]
    plot: Option<PathBuf>,
    /// Hostile TCP peers (garbage, truncated and oversized frames, duplicate ids, floods,
    /// slowloris, clients that never read their replies) attacking the server: each mode is then measured without and with the
    /// attack, side by side.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=256))]
    hostile: u32,
    /// With --hostile: only these attack classes, comma separated (garbage, truncated,
    /// huge, dup-ids, reply, tiny-flood, slowloris, window, slow-handshake, no-auth,
    /// pool-hog, slow-reader); default all, in turn.
    #[arg(long, value_delimiter = ',', value_parser = crate::hostile::class_arg)]
    attack: Vec<usize>,
    /// Export directory of the embedded server (default: a temporary directory in $TMPDIR).
    #[arg(long, value_name = "DIR")]
    export: Option<PathBuf>,
    /// Where the two sides run: `auto` puts the baselines' two ends on two different CPUs
    /// when there are two (as a client and a server on two machines: every reply wakes a
    /// thread on another CPU) and leaves zcio to the scheduler; `C/S` (CPU lists, e.g.
    /// `0/1`, `0/0`, `0,1/2-3`) puts the client side (jobs and their transport threads, a
    /// baseline's requesting end) on C and the server side (the embedded server's threads,
    /// a baseline's answering end) on S, zcio and baselines alike; `none` places nothing.
    /// Latency at a low iodepth depends on it: a thread woken on an idle CPU of a virtual
    /// machine takes tens of microseconds longer than one woken where it already runs.
    #[arg(long, default_value = "auto", value_name = "auto|none|C/S", value_parser = crate::cpus::cpus_arg)]
    cpus: crate::cpus::CpusArg,
    /// The placement `--cpus` resolved to on this machine.
    #[arg(skip)]
    placement: crate::cpus::Placement,
    #[command(flatten)]
    common: Common,
}

impl BenchArgs {
    /// The workload in a few words, leaving out the swept `axis`.
    pub(crate) fn describe(&self, axis: &str) -> String {
        let mut d = format!("{:?}", self.rw).to_lowercase();
        if axis != "bs" {
            d += &format!(" bs={}", zcio::pool::human_size(self.bs));
        }
        if axis != "iodepth" {
            d += &format!(" iodepth={}", self.iodepth);
        }
        if self.segments > 1 {
            d += &format!(" segments={}", self.segments);
        }
        if self.jobs > 1 {
            d += &format!(" jobs={}", self.jobs);
        }
        d
    }
}

pub(crate) fn size_arg(s: &str) -> Result<usize, String> {
    zcio::config::parse_size("--size", s).map_err(|e| e.to_string())
}

pub(crate) fn duration_arg(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mult) = if let Some(v) = t.strip_suffix("ms") {
        (v, 0.001)
    } else if let Some(v) = t.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = t.strip_suffix('m') {
        (v, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: expected a duration like 500ms, 10s or 2m"))?;
    if !(v > 0.0 && v * mult <= 86_400.0) {
        return Err(format!("`{s}`: must be between 1ms and 24h"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// Each mode's and baseline's name and runs, in order.
pub(crate) type Results = Vec<(String, Vec<Run>)>;

/// A swept value and its results.
pub(crate) type Point = (usize, Results);

/// One measurement.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    pub(crate) label: String,
    pub(crate) bytes: u64,
    pub(crate) ops: u64,
    pub(crate) secs: f64,
    /// Operation latencies in nanoseconds, sorted.
    pub(crate) lat: Vec<u64>,
    /// Heap allocations per operation (`--count-allocs`).
    pub(crate) allocs_per_op: Option<f64>,
    /// CPU seconds (user + system) the process spent during the run.
    pub(crate) cpu_s: Option<f64>,
}

/// The process's CPU time so far, user plus system, in seconds.
pub(crate) fn cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |v: nix::sys::time::TimeVal| v.tv_sec() as f64 + v.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => 0.0,
    }
}

impl Run {
    pub(crate) fn mbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
    pub(crate) fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    /// CPU seconds per GiB moved.
    pub(crate) fn cpu_per_gib(&self) -> Option<f64> {
        let gib = self.bytes as f64 / (1u64 << 30) as f64;
        self.cpu_s.filter(|_| gib > 0.0).map(|c| c / gib)
    }
    pub(crate) fn pct(&self, p: f64) -> f64 {
        if self.lat.is_empty() {
            return 0.0;
        }
        let i = ((self.lat.len() as f64 * p / 100.0).ceil() as usize).clamp(1, self.lat.len()) - 1;
        self.lat[i] as f64 / 1000.0
    }
    fn line(&self) -> String {
        let allocs = self
            .allocs_per_op
            .map_or_else(String::new, |a| format!("  allocations/op {a:.2}"));
        let cpu = self
            .cpu_per_gib()
            .map_or_else(String::new, |c| format!("  CPU s/GiB {c:.3}"));
        format!(
            "{:<28} {:>9.1} MB/s {:>9.0} IOPS  lat us p50 {:>8.1} p99 {:>8.1} p99.9 {:>8.1}{cpu}{allocs}",
            self.label,
            self.mbps(),
            self.iops(),
            self.pct(50.0),
            self.pct(99.0),
            self.pct(99.9)
        )
    }
}

/// The byte at `off` of bench file `file`: cheap to make and to check.
fn pattern_fill(buf: &mut [u8], file: u32, off: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let o = off + i as u64;
        *b = (o as u8) ^ ((o >> 8) as u8).wrapping_mul(31) ^ (file as u8).wrapping_mul(101);
    }
}

fn pattern_check(buf: &[u8], file: u32, off: u64) -> Result<(), String> {
    for (i, &b) in buf.iter().enumerate() {
        let o = off + i as u64;
        let want = (o as u8) ^ ((o >> 8) as u8).wrapping_mul(31) ^ (file as u8).wrapping_mul(101);
        if b != want {
            return Err(format!(
                "file {file} offset {o}: read {b:#04x}, expected {want:#04x}"
            ));
        }
    }
    Ok(())
}

fn file_name(i: u32) -> String {
    format!("zcio-bench.{i}")
}

pub(crate) fn run(mut a: BenchArgs) -> AnyResult<()> {
    // Every bs and iodepth the run will use (a sweep's values, or the one of each).
    let (all_bs, all_depths) = match &a.sweep {
        Some(sw) if sw.axis == Axis::Bs => (sw.values.clone(), vec![a.iodepth as usize]),
        Some(sw) => (vec![a.bs], sw.values.clone()),
        None => (vec![a.bs], vec![a.iodepth as usize]),
    };
    for &bs in &all_bs {
        if bs == 0 || bs % a.segments as usize != 0 {
            return Err(format!(
                "bs {bs} must be a non-zero multiple of --segments {}",
                a.segments
            )
            .into());
        }
        if a.size < bs {
            return Err(format!("--size {} is smaller than bs {bs}", a.size).into());
        }
    }
    let max_depth = all_depths.iter().copied().max().unwrap_or(1) as u32;
    a.placement = crate::cpus::Placement::resolve(&a.cpus)?;
    let zcio_place = a.placement.zcio.clone();
    let mut cfg = a.common.load()?;
    let reg = registry();
    // The embedded server, unless one was named.
    let mut _embedded = None;
    let _tmp;
    match &a.server {
        Some(addr) => cfg = cfg.with_override(&format!("client.connect={}", toml_str(addr)))?,
        None => {
            let export = match &a.export {
                Some(d) => d.clone(),
                None => {
                    let t = tempfile::Builder::new().prefix("zcio-bench-").tempdir()?;
                    let p = t.path().to_path_buf();
                    _tmp = t;
                    p
                }
            };
            cfg.server.export = export;
            cfg.server.listen = "127.0.0.1:0".into();
            // Enough in flight for every job's iodepth (x segments in per-segment mode).
            let need = (max_depth * a.segments.max(1)) as usize + 8;
            cfg.server.max_in_flight = cfg.server.max_in_flight.max(need);
            // The embedded server offers the listed transports this host can run (a list
            // such as rdma,tcp then shows the client's fallback); one transport is strict.
            let mut scfg = cfg.clone();
            if !cfg.more_transports.is_empty() {
                let usable: Vec<String> = cfg
                    .transport_list()
                    .into_iter()
                    .filter(|n| reg.get(n, &cfg).is_ok())
                    .map(str::to_string)
                    .collect();
                if let Some((first, rest)) = usable.split_first() {
                    scfg.transport = first.clone();
                    scfg.more_transports = rest.to_vec();
                }
            }
            // Every thread the server makes descends from this one: placed with it.
            let server = {
                let _on = crate::cpus::PinGuard::new(zcio_place.as_ref().map(|p| &p.server[..]))?;
                Server::bind(&scfg, &reg)?.spawn()?
            };
            // One address, or one per transport (`tcp=ADDR rdma=ADDR`): both are what
            // client.connect takes.
            cfg.client.connect = server.local_addr().to_string();
            _embedded = Some(server);
        }
    }
    cfg.limits.max_in_flight = cfg
        .limits
        .max_in_flight
        .max((max_depth * a.segments) as usize + 8);
    // The client side from here on: the jobs and every connection's threads descend from
    // this thread.
    if let Some(p) = &zcio_place {
        crate::cpus::pin_this_thread(&p.client)?;
    }
    eprintln!("zcio bench: {}", a.placement.describe());
    // One client pool shared by every job, as an application would. A transport list
    // falls back in order; every job uses the transport the first connection chose.
    let client_pool = zcio::Pool::new(&cfg.pool)?;
    let setup = Client::connect_pool(&cfg, &reg, client_pool.clone())?;
    let chosen = setup.transport().unwrap_or("?").to_string();
    cfg = cfg.with_override(&format!("transport={}", toml_str(&chosen)))?;
    eprintln!("zcio bench: transport in use: {chosen}");
    let connect = |cfg: &Config| -> AnyResult<Client> {
        Ok(Client::connect_pool(cfg, &reg, client_pool.clone())?)
    };
    eprintln!(
        "zcio bench: {} over {} to {}{}: {:?} bs={} x{} segments iodepth={} jobs={} files={}x{}",
        if a.verify { "verified " } else { "" },
        cfg.transport,
        cfg.client.connect,
        if a.server.is_none() {
            " (embedded server)"
        } else {
            ""
        },
        a.rw,
        zcio::pool::human_size(a.bs),
        a.segments,
        a.iodepth,
        a.jobs,
        a.files,
        zcio::pool::human_size(a.size),
    );
    prepare_files(&setup, &a)?;

    if a.hostile > 0 && cfg.transport != "tcp" {
        return Err("--hostile speaks raw TCP frames: use it with --transport tcp".into());
    }
    // Each mode, then (with --hostile) the same mode under attack.
    let variants: Vec<(Mode, bool)> = a
        .mode
        .iter()
        .flat_map(|m| {
            let under = if a.hostile > 0 {
                vec![false, true]
            } else {
                vec![false]
            };
            under.into_iter().map(move |h| (*m, h))
        })
        .collect();
    let attack_stats = Arc::new(crate::hostile::AttackStats::default());
    let points: Vec<Option<usize>> = match &a.sweep {
        Some(sw) => sw.values.iter().map(|&v| Some(v)).collect(),
        None => vec![None],
    };
    let mut runs = Vec::new();
    let mut swept: Vec<Point> = Vec::new();
    for point in points {
        if let (Some(v), Some(sw)) = (point, &a.sweep) {
            match sw.axis {
                Axis::Iodepth => a.iodepth = v as u32,
                Axis::Bs => a.bs = v,
            }
            eprintln!("sweep: {}={}", sw.name(), sw.show(v));
        }
        let r = run_point(&a, &cfg, &connect, &variants, &attack_stats)?;
        match point {
            Some(v) => swept.push((v, r)),
            None => runs = r,
        }
    }
    if a.verify && !a.rw.is_read() {
        verify_files(&setup, &a)?;
        eprintln!("verify: every byte of {} files checked", a.files);
    }
    let client_stats = client_pool.stats();
    let server_stats = _embedded.as_ref().map(|s| s.pool().stats());
    let queueing = _embedded.as_ref().map(|s| Queueing::of(s.stats()));
    match &a.sweep {
        Some(sw) => {
            report_sweep(&a, sw, &swept, &client_stats, server_stats.as_ref());
            if let Some(path) = &a.plot {
                crate::plot::draw(path, sw.name(), &a, &swept, |v| sw.show(v))?;
                eprintln!("plot: {}", path.display());
            }
        }
        None => report(&a, &runs, &client_stats, server_stats.as_ref(), queueing),
    }
    if a.hostile > 0 {
        println!("attacks (class: tried / contained by close, error reply or back-pressure):");
        for (i, name) in crate::hostile::CLASSES.iter().enumerate() {
            println!(
                "  {name:<36} {:>6} / {:<6}",
                attack_stats.attacks[i].load(Ordering::Relaxed),
                attack_stats.repelled[i].load(Ordering::Relaxed)
            );
        }
        if let Some(s) = &_embedded {
            let st = s.stats();
            println!(
                "server: {} connections accepted, {} ended by protocol errors, {} requests answered, pool {} in use",
                st.accepted.load(Ordering::Relaxed),
                st.failed_connections.load(Ordering::Relaxed),
                st.requests.load(Ordering::Relaxed),
                s.pool().stats().slots_in_use()
            );
            println!(
                "server: {} closed for no authentication in time, {} refused over a connection limit (server.max_connections or max_connections_per_addr), {} authentications refused, {} panics caught",
                st.auth_timeouts.load(Ordering::Relaxed),
                st.refused.load(Ordering::Relaxed),
                st.auth_failures.load(Ordering::Relaxed),
                st.panics.load(Ordering::Relaxed)
            );
        }
    }
    Ok(())
}

/// One comparison at the current bs and iodepth: every mode (and its attacked twin), then
/// every baseline, `--repeat` times interleaved.
fn run_point(
    a: &BenchArgs,
    cfg: &Config,
    connect: &(dyn Fn(&Config) -> AnyResult<Client> + Sync),
    variants: &[(Mode, bool)],
    attack_stats: &Arc<crate::hostile::AttackStats>,
) -> AnyResult<Vec<(String, Vec<Run>)>> {
    let mut runs: Vec<(String, Vec<Run>)> = variants
        .iter()
        .map(|(m, h)| {
            (
                format!("{}{}", m.name(), if *h { "+attack" } else { "" }),
                Vec::new(),
            )
        })
        .chain(
            a.baseline
                .iter()
                .map(|b| (baseline_name(*b).to_string(), Vec::new())),
        )
        .collect();
    for r in 0..a.repeat {
        for (k, (m, hostile)) in variants.iter().enumerate() {
            let label = format!("{} #{}", runs[k].0, r + 1);
            let stop = Arc::new(AtomicBool::new(false));
            let attackers = if *hostile {
                crate::hostile::start(
                    cfg.client.connect.clone(),
                    a.hostile as usize,
                    &a.attack,
                    stop.clone(),
                    attack_stats.clone(),
                )
            } else {
                Vec::new()
            };
            let run = measure(a, cfg, connect, *m, &label);
            stop.store(true, Ordering::Relaxed);
            for t in attackers {
                let _ = t.join();
            }
            let run = run?;
            eprintln!("{}", run.line());
            runs[k].1.push(run);
        }
        for (k, b) in a.baseline.iter().enumerate() {
            let label = format!("{} #{}", baseline_name(*b), r + 1);
            let pin = a.placement.baselines.as_ref();
            let run = match b {
                Baseline::Stream => baseline::tcp_stream(a.bs, a.runtime, &label, pin)?,
                Baseline::Pingpong => baseline::tcp_pingpong(a.bs, a.runtime, &label, pin)?,
                Baseline::Rpc => baseline::tcp_rpc(a.bs, a.iodepth, a.runtime, &label, pin)?,
                Baseline::Sendfile => baseline::tcp_sendfile(a.bs, a.size, a.runtime, &label, pin)?,
                Baseline::FileWrite => {
                    baseline::tcp_file_write(a.bs, a.size, a.runtime, &label, false, pin)?
                }
                Baseline::SpliceWrite => {
                    baseline::tcp_file_write(a.bs, a.size, a.runtime, &label, true, pin)?
                }
            };
            eprintln!("{}", run.line());
            runs[variants.len() + k].1.push(run);
        }
    }
    Ok(runs)
}

fn baseline_name(b: Baseline) -> &'static str {
    match b {
        Baseline::Stream => "raw-tcp-stream",
        Baseline::Pingpong => "raw-tcp-pingpong",
        Baseline::Rpc => "raw-tcp-rpc",
        Baseline::Sendfile => "raw-tcp-sendfile",
        Baseline::FileWrite => "raw-tcp-file-write",
        Baseline::SpliceWrite => "raw-tcp-splice-write",
    }
}

/// Makes sure every bench file exists with its pattern (reusing files of the right size).
fn prepare_files(c: &Client, a: &BenchArgs) -> AnyResult<()> {
    let chunk = c.limits().max_payload.min(1 << 20);
    for i in 0..a.files {
        let name = file_name(i);
        if let Ok(st) = c.stat(&name) {
            if st.size == a.size as u64 {
                continue;
            }
        }
        let f = c.open(
            &name,
            OpenFlags::rw() | OpenFlags::CREATE | OpenFlags::TRUNCATE,
        )?;
        let mut off = 0usize;
        let mut inflight = VecDeque::new();
        while off < a.size {
            let n = chunk.min(a.size - off);
            let mut bufs = c.pool().get_span(n)?;
            let mut o = off as u64;
            for b in bufs.buffers_mut() {
                pattern_fill(b, i, o);
                o += b.len() as u64;
            }
            inflight.push_back(f.zero_writev_async(bufs, off as u64)?);
            if inflight.len() >= 8 {
                inflight.pop_front().ok_or("queue")?.wait()?;
            }
            off += n;
        }
        for p in inflight {
            p.wait()?;
        }
        f.fsync()?;
    }
    Ok(())
}

fn verify_files(c: &Client, a: &BenchArgs) -> AnyResult<()> {
    for i in 0..a.files {
        let f = c.open(&file_name(i), OpenFlags::READ)?;
        let mut off = 0u64;
        while off < a.size as u64 {
            let n = (1usize << 20).min(a.size - off as usize);
            let bufs = f.zero_readv(n, off)?;
            if bufs.total_len() != n {
                return Err(format!("file {i} short at {off}").into());
            }
            let mut o = off;
            for b in bufs.buffers() {
                pattern_check(b, i, o)?;
                o += b.len() as u64;
            }
            off += n as u64;
        }
    }
    Ok(())
}

enum Op {
    Pool(Completion<Iobref>),
    Vecs(Completion<(usize, Vec<Vec<u8>>)>),
    PoolWrite(Completion<(usize, Iobref)>),
    /// Per-segment mode: the first segment's request; the rest follow one by one.
    Chain(usize, Completion<(usize, Vec<Vec<u8>>)>),
}

struct InFlight {
    op: Op,
    start: Instant,
    file: u32,
    off: u64,
}

/// One job: a connection keeping `iodepth` operations in flight until `stop`.
struct Job<'a> {
    a: &'a BenchArgs,
    mode: Mode,
    files: Vec<File>,
    file_ids: Vec<u32>,
    client: Client,
    seg: usize,
    /// Caller-owned iovec sets to reuse (direct, bounce, per-segment).
    spare: Vec<Vec<Vec<u8>>>,
    /// Pool buffer sets to reuse (zero-copy, bounce), as an application recycles its
    /// buffers: an operation then allocates nothing.
    spare_bufs: Vec<Iobref>,
    cursor: u64,
    rng: rand::rngs::ThreadRng,
    lat: Vec<u64>,
    bytes: u64,
    ops: u64,
}

impl Job<'_> {
    fn iovecs(&mut self) -> Vec<Vec<u8>> {
        self.spare
            .pop()
            .unwrap_or_else(|| vec![vec![0u8; self.seg]; self.a.segments as usize])
    }

    /// A set of `--segments` pool buffers of the segment size: one given back by an earlier
    /// operation, or new ones.
    fn buffers(&mut self) -> AnyResult<Iobref> {
        match self.spare_bufs.pop() {
            Some(b) => Ok(b),
            None => Ok(self
                .client
                .get_buffers(self.seg, self.a.segments as usize)?),
        }
    }

    /// Keeps a set of pool buffers for a later operation if it is whole.
    fn keep_buffers(&mut self, b: Iobref) {
        if b.count() == self.a.segments as usize && b.buffers().iter().all(|x| x.len() == self.seg)
        {
            self.spare_bufs.push(b);
        }
    }

    /// Starts the request for segment `k` of a per-segment operation at `off`.
    fn segment(
        &mut self,
        fi: usize,
        file: u32,
        off: u64,
        k: usize,
    ) -> AnyResult<Completion<(usize, Vec<Vec<u8>>)>> {
        let seg = self.seg;
        let at = off + (k * seg) as u64;
        let mut v = self.spare.pop().unwrap_or_else(|| vec![vec![0u8; seg]]);
        v.truncate(1);
        v[0].resize(seg, 0);
        Ok(if self.a.rw.is_read() {
            self.files[fi].preadv_async(v, at)?
        } else {
            if self.a.verify {
                pattern_fill(&mut v[0], file, at);
            }
            self.files[fi].pwritev_async(v, at)?
        })
    }

    fn next_pos(&mut self) -> (usize, u64) {
        let bs = self.a.bs as u64;
        let blocks = (self.a.size as u64 / bs).max(1);
        let k = if self.a.rw.is_random() {
            self.rng.gen_range(0..blocks * self.files.len() as u64)
        } else {
            let k = self.cursor;
            self.cursor = (self.cursor + 1) % (blocks * self.files.len() as u64);
            k
        };
        (
            (k % self.files.len() as u64) as usize,
            (k / self.files.len() as u64) * bs,
        )
    }

    fn submit(&mut self) -> AnyResult<InFlight> {
        let (fi, off) = self.next_pos();
        let file = self.file_ids[fi];
        let start = Instant::now();
        let read = self.a.rw.is_read();
        let verify = self.a.verify;
        let op = match (self.mode, read) {
            (Mode::ZeroCopy | Mode::Bounce, true) => {
                let bufs = self.buffers()?;
                Op::Pool(self.files[fi].read_into_async(bufs, off)?)
            }
            (Mode::Direct, true) => {
                let v = self.iovecs();
                Op::Vecs(self.files[fi].preadv_async(v, off)?)
            }
            (Mode::PerSegment, _) => Op::Chain(fi, self.segment(fi, file, off, 0)?),
            (Mode::ZeroCopy, false) => {
                let mut bufs = self.buffers()?;
                if verify {
                    let mut o = off;
                    for b in bufs.buffers_mut() {
                        pattern_fill(b, file, o);
                        o += b.len() as u64;
                    }
                }
                Op::PoolWrite(self.files[fi].zero_writev_async(bufs, off)?)
            }
            (Mode::Direct, false) => {
                let mut v = self.iovecs();
                if verify {
                    let mut o = off;
                    for b in &mut v {
                        pattern_fill(b, file, o);
                        o += b.len() as u64;
                    }
                }
                Op::Vecs(self.files[fi].pwritev_async(v, off)?)
            }
            (Mode::Bounce, false) => {
                // The application's data is in its own iovecs; bounce copies it into pool
                // buffers before sending.
                let mut v = self.iovecs();
                if verify {
                    let mut o = off;
                    for b in &mut v {
                        pattern_fill(b, file, o);
                        o += b.len() as u64;
                    }
                }
                let mut bufs = self.buffers()?;
                for (d, s) in bufs.buffers_mut().iter_mut().zip(&v) {
                    d.copy_from_slice(s);
                }
                self.spare.push(v);
                Op::PoolWrite(self.files[fi].zero_writev_async(bufs, off)?)
            }
        };
        Ok(InFlight {
            op,
            start,
            file,
            off,
        })
    }

    fn complete(&mut self, f: InFlight) -> AnyResult<usize> {
        let read = self.a.rw.is_read();
        let verify = self.a.verify && read;
        let n = match f.op {
            Op::Pool(c) => {
                let bufs = c.wait()?;
                let n = bufs.total_len();
                if self.mode == Mode::Bounce {
                    // The copy the 2013 patch removed: pool buffer -> caller's iovecs.
                    let mut v = self.iovecs();
                    let mut src = bufs.buffers().iter().flat_map(|b| b.chunks(self.seg));
                    for d in v.iter_mut() {
                        if let Some(s) = src.next() {
                            d[..s.len()].copy_from_slice(s);
                        }
                    }
                    if verify {
                        check_iovecs(&v, n, f.file, f.off)?;
                    }
                    self.spare.push(v);
                } else if verify {
                    let mut o = f.off;
                    for b in bufs.buffers() {
                        pattern_check(b, f.file, o)?;
                        o += b.len() as u64;
                    }
                }
                self.keep_buffers(bufs);
                n
            }
            Op::Vecs(c) => {
                let (n, v) = c.wait()?;
                if verify {
                    check_iovecs(&v, n, f.file, f.off)?;
                }
                self.spare.push(v);
                n
            }
            Op::PoolWrite(c) => {
                let (n, bufs) = c.wait()?;
                self.keep_buffers(bufs);
                n
            }
            Op::Chain(fi, first) => {
                // One request per segment, each issued when the previous one is done: the
                // kernel's FUSE direct I/O before the 2012 scatter-gather patch.
                let mut total = 0;
                let mut cur = first;
                for k in 0..self.a.segments as usize {
                    let (n, v) = cur.wait()?;
                    if verify {
                        check_iovecs(&v, n, f.file, f.off + (k * self.seg) as u64)?;
                    }
                    self.spare.push(v);
                    total += n;
                    if k + 1 == self.a.segments as usize {
                        break;
                    }
                    cur = self.segment(fi, f.file, f.off, k + 1)?;
                }
                total
            }
        };
        if n != self.a.bs {
            return Err(format!(
                "short {} at file {} offset {}: {n} of {} bytes",
                if read { "read" } else { "write" },
                f.file,
                f.off,
                self.a.bs
            )
            .into());
        }
        self.lat.push(f.start.elapsed().as_nanos() as u64);
        self.bytes += n as u64;
        self.ops += 1;
        Ok(n)
    }
}

fn check_iovecs(v: &[Vec<u8>], n: usize, file: u32, off: u64) -> AnyResult<()> {
    let mut o = off;
    let mut left = n;
    for b in v {
        let k = b.len().min(left);
        pattern_check(&b[..k], file, o)?;
        o += k as u64;
        left -= k;
    }
    Ok(())
}

/// What one job did: bytes, operations, latencies in nanoseconds.
type JobTotals = (u64, u64, Vec<u64>);

fn measure(
    a: &BenchArgs,
    cfg: &Config,
    connect: &(dyn Fn(&Config) -> AnyResult<Client> + Sync),
    mode: Mode,
    label: &str,
) -> AnyResult<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    // Jobs connected and ready, and operations done: the allocation count covers the
    // operations from the moment every job is ready.
    let ready = Arc::new(AtomicU64::new(0));
    let ops_done = Arc::new(AtomicU64::new(0));
    allocs::exclude_this_thread();
    let bar = indicatif::ProgressBar::new(a.runtime.as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>20} [{bar:30}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let (results, allocs_per_op): (Vec<AnyResult<JobTotals>>, Option<f64>) =
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..a.jobs)
                .map(|j| {
                    let stop = stop.clone();
                    let progress = progress.clone();
                    let ready = ready.clone();
                    let ops_done = ops_done.clone();
                    s.spawn(move || -> AnyResult<JobTotals> {
                        let client = connect(cfg).map_err(|e| e.to_string())?;
                        let flags = if a.rw.is_read() {
                            OpenFlags::READ
                        } else {
                            OpenFlags::rw()
                        };
                        // Job j starts at file j so jobs spread over the files.
                        let file_ids: Vec<u32> = (0..a.files).map(|k| (k + j) % a.files).collect();
                        let files = file_ids
                            .iter()
                            .map(|&i| client.open(&file_name(i), flags))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| e.to_string())?;
                        let mut job = Job {
                            a,
                            mode,
                            files,
                            file_ids,
                            client,
                            seg: a.bs / a.segments as usize,
                            spare: Vec::new(),
                            spare_bufs: Vec::new(),
                            cursor: 0,
                            rng: rand::thread_rng(),
                            lat: Vec::with_capacity(1 << 16),
                            bytes: 0,
                            ops: 0,
                        };
                        let mut q = VecDeque::with_capacity(a.iodepth as usize);
                        ready.fetch_add(1, Ordering::SeqCst);
                        let r = (|| -> AnyResult<()> {
                            while !stop.load(Ordering::Relaxed) {
                                while q.len() < a.iodepth as usize {
                                    q.push_back(job.submit()?);
                                }
                                if let Some(f) = q.pop_front() {
                                    let n = job.complete(f)?;
                                    progress.fetch_add(n as u64, Ordering::Relaxed);
                                    ops_done.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Ok(())
                        })();
                        // Drain what is in flight (not counted: the clock has stopped).
                        for f in q {
                            let _ = job.complete(f);
                        }
                        r.map_err(|e| e.to_string())?;
                        Ok((job.bytes, job.ops, job.lat))
                    })
                })
                .collect();
            // Once counting has started: the operations done by then.
            let mut counting: Option<u64> = None;
            while t0.elapsed() < a.runtime {
                if a.count_allocs
                    && counting.is_none()
                    && ready.load(Ordering::SeqCst) == u64::from(a.jobs)
                {
                    counting = Some(ops_done.load(Ordering::SeqCst));
                    allocs::start();
                }
                std::thread::sleep(Duration::from_millis(100));
                let el = t0.elapsed();
                bar.set_position(el.as_millis() as u64);
                bar.set_message(format!(
                    "{:.0} MB/s",
                    progress.load(Ordering::Relaxed) as f64 / el.as_secs_f64() / 1e6
                ));
            }
            let counted = counting.map(|ops0| {
                let n = allocs::stop();
                let ops = ops_done.load(Ordering::SeqCst).saturating_sub(ops0);
                n as f64 / ops.max(1) as f64
            });
            stop.store(true, Ordering::Relaxed);
            let results: Vec<_> = handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("job thread panicked".into()))
                })
                .collect();
            (results, counted)
        });
    bar.finish_and_clear();
    let cpu = cpu_seconds() - cpu0;
    let secs = a.runtime.as_secs_f64().min(t0.elapsed().as_secs_f64());
    let mut run = Run {
        label: label.to_string(),
        bytes: 0,
        ops: 0,
        secs,
        lat: Vec::new(),
        allocs_per_op,
        // Over the whole run, job set-up and drain included; those are small next to
        // seconds of transfer. Scaled to the timed part of the bytes, that is an upper bound.
        cpu_s: Some(cpu),
    };
    for r in results {
        let (b, o, l) = r?;
        run.bytes += b;
        run.ops += o;
        run.lat.extend(l);
    }
    run.lat.sort_unstable();
    Ok(run)
}

/// The median allocations per operation of runs that counted them.
fn allocs_median(r: &[Run]) -> Option<f64> {
    let v: Vec<f64> = r.iter().filter_map(|x| x.allocs_per_op).collect();
    (!v.is_empty()).then(|| median(&v))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        0.0
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

/// How deep the embedded server's queues ran, over every run of the bench.
#[derive(Clone, Copy)]
struct Queueing {
    received: u64,
    mean_depth: f64,
    inline_share: f64,
}

impl Queueing {
    fn of(st: &zcio::server::ServerStats) -> Queueing {
        let received = st.received.load(Ordering::Relaxed);
        let inline = st.served_inline.load(Ordering::Relaxed);
        Queueing {
            received,
            mean_depth: st.mean_depth(),
            inline_share: if received == 0 {
                0.0
            } else {
                inline as f64 / received as f64
            },
        }
    }
}

/// The medians of one mode's (or baseline's) runs.
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) mbps: f64,
    iops: f64,
    p50: f64,
    pub(crate) p99: f64,
    p999: f64,
    ratio: f64,
    cpu_per_gib: Option<f64>,
    allocs: Option<f64>,
    runs_mbps: Vec<f64>,
}

pub(crate) fn rows(runs: &[(String, Vec<Run>)]) -> Vec<Row> {
    let reference = runs
        .first()
        .map(|(_, r)| median(&r.iter().map(Run::mbps).collect::<Vec<_>>()))
        .unwrap_or(0.0);
    runs.iter()
        .map(|(name, r)| {
            let med = |f: &dyn Fn(&Run) -> f64| median(&r.iter().map(f).collect::<Vec<_>>());
            let mbps = med(&Run::mbps);
            let cpu: Vec<f64> = r.iter().filter_map(Run::cpu_per_gib).collect();
            Row {
                name: name.clone(),
                mbps,
                iops: med(&Run::iops),
                p50: med(&|x| x.pct(50.0)),
                p99: med(&|x| x.pct(99.0)),
                p999: med(&|x| x.pct(99.9)),
                ratio: if reference > 0.0 {
                    mbps / reference
                } else {
                    0.0
                },
                cpu_per_gib: (!cpu.is_empty()).then(|| median(&cpu)),
                allocs: allocs_median(r),
                runs_mbps: r.iter().map(Run::mbps).collect(),
            }
        })
        .collect()
}

fn rows_json(rows: &[Row]) -> Vec<serde_json::Value> {
    rows.iter()
        .map(|r| {
            serde_json::json!({
                "mode": r.name, "mb_per_s": r.mbps, "iops": r.iops,
                "lat_us": {"p50": r.p50, "p99": r.p99, "p99_9": r.p999},
                "ratio_to_first": r.ratio,
                "runs_mb_per_s": r.runs_mbps,
                "cpu_s_per_gib": r.cpu_per_gib,
                "allocs_per_op": r.allocs,
            })
        })
        .collect()
}

fn print_rows(rows: &[Row]) {
    println!(
        "{:<18} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10}",
        "mode", "MB/s", "IOPS", "p50 us", "p99 us", "p99.9 us", "ratio", "CPU s/GiB"
    );
    for r in rows {
        let cpu = r
            .cpu_per_gib
            .map_or_else(|| "-".to_string(), |c| format!("{c:.3}"));
        println!(
            "{:<18} {:>10.1} {:>10.0} {:>10.1} {:>10.1} {:>10.1} {:>8.3} {cpu:>10}",
            r.name, r.mbps, r.iops, r.p50, r.p99, r.p999, r.ratio
        );
    }
    for r in rows {
        if let Some(n) = r.allocs {
            println!(
                "{}: {n:.2} heap allocations per operation (whole process, median)",
                r.name
            );
        }
    }
}

fn cpu_note(a: &BenchArgs) -> &'static str {
    if a.server.is_some() {
        "CPU s/GiB: this process (the client) only, user + system, per GiB moved"
    } else {
        "CPU s/GiB: client and embedded server together (one process), user + system, per GiB moved"
    }
}

fn report(
    a: &BenchArgs,
    runs: &[(String, Vec<Run>)],
    client: &zcio::pool::PoolStats,
    server: Option<&zcio::pool::PoolStats>,
    queueing: Option<Queueing>,
) {
    let rows = rows(runs);
    if a.json {
        let v = serde_json::json!({
            "rw": format!("{:?}", a.rw).to_lowercase(), "bs": a.bs, "segments": a.segments,
            "iodepth": a.iodepth, "jobs": a.jobs, "files": a.files, "size": a.size,
            "runtime_s": a.runtime.as_secs_f64(), "repeat": a.repeat, "verified": a.verify,
            "cpu_includes_server": a.server.is_none(),
            "cpus": a.placement.json(),
            "results": rows_json(&rows),
            "client_pool": pool_json(client),
            "server_pool": server.map(pool_json),
            "server_queueing": queueing.map(|q| serde_json::json!({
                "requests": q.received, "mean_depth": q.mean_depth,
                "inline_share": q.inline_share,
            })),
        });
        println!("{v:#}");
        return;
    }
    println!(
        "\nsummary: {:?} bs={} segments={} iodepth={} jobs={} (medians of {})",
        a.rw,
        zcio::pool::human_size(a.bs),
        a.segments,
        a.iodepth,
        a.jobs,
        a.repeat
    );
    print_rows(&rows);
    println!("{}", cpu_note(a));
    println!("{}", a.placement.describe());
    if let Some(q) = queueing {
        println!(
            "server: {} requests, {:.1} of their connection's requests in the server when one arrived (mean), {:.0}% served on the receiving thread",
            q.received,
            q.mean_depth,
            q.inline_share * 100.0
        );
    }
    println!("client pool:\n{client}");
    if let Some(s) = server {
        println!("server pool:\n{s}");
    }
}

fn report_sweep(
    a: &BenchArgs,
    sw: &Sweep,
    swept: &[Point],
    client: &zcio::pool::PoolStats,
    server: Option<&zcio::pool::PoolStats>,
) {
    if a.json {
        let points: Vec<serde_json::Value> = swept
            .iter()
            .map(|(v, runs)| serde_json::json!({"value": v, "results": rows_json(&rows(runs))}))
            .collect();
        let v = serde_json::json!({
            "rw": format!("{:?}", a.rw).to_lowercase(), "segments": a.segments,
            "bs": (sw.axis != Axis::Bs).then_some(a.bs),
            "iodepth": (sw.axis != Axis::Iodepth).then_some(a.iodepth),
            "jobs": a.jobs, "files": a.files, "size": a.size,
            "runtime_s": a.runtime.as_secs_f64(), "repeat": a.repeat, "verified": a.verify,
            "cpu_includes_server": a.server.is_none(),
            "cpus": a.placement.json(),
            "sweep": sw.name(), "points": points,
            "client_pool": pool_json(client),
            "server_pool": server.map(pool_json),
        });
        println!("{v:#}");
        return;
    }
    for (v, runs) in swept {
        println!(
            "\nsummary: {:?} {}={} segments={} jobs={} (medians of {})",
            a.rw,
            sw.name(),
            sw.show(*v),
            a.segments,
            a.jobs,
            a.repeat
        );
        print_rows(&rows(runs));
    }
    println!("{}", cpu_note(a));
    println!("{}", a.placement.describe());
}

fn pool_json(s: &zcio::pool::PoolStats) -> serde_json::Value {
    serde_json::json!({
        "bytes_in_use": s.bytes_in_use(),
        "classes": s.classes.iter().map(|c| serde_json::json!({
            "size": c.size, "gets": c.gets, "hits": c.hits, "waits": c.waits,
            "misses": c.failures, "reserve_gets": c.reserve_gets, "in_use": c.in_use,
            "capacity": c.capacity,
        })).collect::<Vec<_>>(),
    })
}
