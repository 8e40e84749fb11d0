//! The `zcio` command: serve an export, benchmark a server, copy files, mount an export
//! (FUSE), list RDMA devices.
//!
//! `zcio bench` with no `--server` starts an embedded server on 127.0.0.1 over a temporary
//! export, so `cargo run --release -p zcio-cli -- bench` measures the whole stack on this
//! machine with nothing else installed.

mod allocs;
mod baseline;
mod bench;
mod cpus;
mod hostile;
mod logging;
mod mount;
mod plot;
mod serve;
mod sgbench;
mod soak;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use zcio::transport::Registry;
use zcio::{Client, Config, OpenFlags};

/// Counts heap allocations for `zcio bench --count-allocs`.
#[global_allocator]
static GLOBAL: allocs::CountingAlloc = allocs::CountingAlloc;

/// Zero-copy file I/O over TCP and RDMA verbs.
#[derive(Parser, Debug)]
#[command(name = "zcio", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options every command that builds a configuration shares.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct Common {
    /// TOML configuration file (every key is documented in the README).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Transport: tcp or rdma, or a list tried in order such as `rdma,tcp` (overrides
    /// `transport` in the file).
    #[arg(long, short = 't', value_name = "NAME")]
    transport: Option<String>,
    /// Shared authentication token (overrides server.token and client.token).
    #[arg(long, value_name = "TOKEN", env = "ZCIO_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the shared token from the first line of FILE (overrides server.token_file and
    /// client.token_file; wins over --token and ZCIO_TOKEN): unlike --token, the secret
    /// does not show in `ps`.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Any configuration key, e.g. `--set rdma.device=rxe0` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl Common {
    fn load(&self) -> Result<Config, zcio::Error> {
        register_config_sections();
        let mut overrides = self.set.clone();
        if let Some(t) = &self.transport {
            let names: Vec<String> = t.split(',').map(|n| toml_str(n.trim())).collect();
            overrides.push(format!("transport=[{}]", names.join(", ")));
        }
        if let Some(t) = &self.token {
            overrides.push(format!("server.token={}", toml_str(t)));
            overrides.push(format!("client.token={}", toml_str(t)));
        }
        if let Some(f) = &self.token_file {
            let f = toml_str(&f.to_string_lossy());
            overrides.push(format!("server.token_file={f}"));
            overrides.push(format!("client.token_file={f}"));
        }
        match &self.config {
            Some(p) => Config::from_file_with(p, &overrides),
            None => Config::parse_with("", "<defaults>", &overrides),
        }
    }
}

pub(crate) fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve a directory.
    Serve {
        /// The directory to export (confined: nothing outside it is reachable).
        #[arg(long, value_name = "DIR")]
        export: Option<PathBuf>,
        /// Address to listen on (default 127.0.0.1:7700).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Refuse every modification.
        #[arg(long)]
        read_only: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Benchmark: a fio-like load generator against a server (embedded by default).
    Bench(Box<bench::BenchArgs>),
    /// Soak: many connections, mixed verified reads and writes, then a leak check.
    Soak(Box<soak::SoakArgs>),
    /// Copy a file from a server to a local path.
    Get {
        /// Server address.
        addr: String,
        /// Path on the server (relative to its export).
        path: String,
        /// Local destination.
        local: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Copy a local file to a server.
    Put {
        /// Local source.
        local: PathBuf,
        /// Server address.
        addr: String,
        /// Path on the server (relative to its export).
        path: String,
        #[command(flatten)]
        common: Common,
    },
    /// List RDMA devices, ports, states and GIDs, or say why there are none.
    Devices,
    /// Test helper: writes numbered 64 KiB blocks to PATH in order and appends the index of
    /// each acknowledged block to LOG; used to check that killing a client mid-write loses
    /// nothing acknowledged and tears nothing.
    #[command(hide = true)]
    ProbeWriter {
        /// Server address.
        addr: String,
        /// File on the server.
        path: String,
        /// Local log of acknowledged blocks.
        log: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Mount an export as a file system (FUSE) for unmodified programs.
    Mount(Box<mount::MountArgs>),
    /// Scatter-gather test on a local path (a mount, or a local file to compare with):
    /// preadv/pwritev of N segments per call, or one pread/pwrite per segment.
    Sgbench(Box<sgbench::SgArgs>),
    /// Unmount a `zcio mount`.
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Print the effective configuration (defaults, file and flags merged) as TOML.
    Config {
        #[command(flatten)]
        common: Common,
    },
}

/// Registers the configuration sections the transports own (`[tcp]`, `[rdma]`): every build
/// reads and prints them, whether or not it has RDMA support.
pub(crate) fn register_config_sections() {
    zcio_tcp::config::register();
    zcio_rdma::config::register();
}

/// The transports this binary was built with.
pub(crate) fn registry() -> Registry {
    let mut r = Registry::new();
    zcio_tcp::register(&mut r);
    // With the `rdma` feature this registers the transport; without, it records that this
    // build lacks it and how to get it.
    zcio_rdma::register(&mut r);
    r
}

/// Raises this process's soft limit on open files to its hard limit, as servers commonly
/// do: every connection holds descriptors (its socket; over RDMA, per queue pair, a
/// completion channel and two eventfds), and the usual soft limit of 1024 runs out at a few
/// dozen RDMA connections on each side of an embedded bench or soak. Failing to raise it is
/// not an error: connections then fail with "Too many open files" in their error.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!("could not raise the open files limit from {soft} to {hard}: {e}");
            }
        }
    }
}

fn main() -> ExitCode {
    logging::init();
    let cli = Cli::parse();
    raise_open_files_limit();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zcio: error: {e}");
            let mut src = std::error::Error::source(&*e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

pub(crate) type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn run(cli: Cli) -> AnyResult<()> {
    match cli.cmd {
        Cmd::Serve {
            export,
            listen,
            read_only,
            common,
        } => {
            let mut cfg = common.load()?;
            if let Some(e) = export {
                cfg.server.export = e;
            }
            if let Some(l) = listen {
                cfg = cfg.with_override(&format!("server.listen={}", toml_str(&l)))?;
            }
            cfg.server.read_only |= read_only;
            serve::run(&cfg)
        }
        Cmd::Bench(args) => bench::run(*args),
        Cmd::Soak(args) => soak::run(*args),
        Cmd::Get {
            addr,
            path,
            local,
            common,
        } => {
            let c = connect(&common, &addr)?;
            copy_get(&c, &path, &local)
        }
        Cmd::Put {
            local,
            addr,
            path,
            common,
        } => {
            let c = connect(&common, &addr)?;
            copy_put(&c, &local, &path)
        }
        Cmd::Devices => devices(),
        Cmd::ProbeWriter {
            addr,
            path,
            log,
            common,
        } => {
            use std::io::Write;
            let c = connect(&common, &addr)?;
            let f = c.open(&path, OpenFlags::rw() | OpenFlags::CREATE)?;
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?;
            for i in 0u64.. {
                let block = vec![(i % 251) as u8 + 1; 64 << 10];
                // Many segments, so a write is in flight for a while.
                let iov: Vec<std::io::IoSlice<'_>> =
                    block.chunks(4096).map(std::io::IoSlice::new).collect();
                let n = f.pwritev(&iov, (i % 1024) * (64 << 10))?;
                if n != block.len() {
                    return Err(format!("short write {n}").into());
                }
                writeln!(log, "{i}")?;
            }
            Ok(())
        }
        Cmd::Mount(args) => mount::run(*args),
        Cmd::Sgbench(args) => sgbench::run(*args),
        Cmd::Umount { mountpoint } => mount::umount(&mountpoint),
        Cmd::Config { common } => {
            print!("{}", common.load()?.to_toml_redacted());
            Ok(())
        }
    }
}

fn connect(common: &Common, addr: &str) -> AnyResult<Client> {
    let cfg = common
        .load()?
        .with_override(&format!("client.connect={}", toml_str(addr)))?;
    Ok(Client::connect_with(&cfg, &registry())?)
}

/// Copies in chunks of the negotiated payload size, several in flight, into pool buffers
/// that go straight to the local file.
fn copy_get(c: &Client, path: &str, local: &std::path::Path) -> AnyResult<()> {
    use std::io::Write;
    let f = c.open(path, OpenFlags::READ)?;
    let size = f.stat()?.size;
    let chunk = c.limits().max_payload.min(1 << 20) as u64;
    let mut out =
        std::fs::File::create(local).map_err(|e| format!("create {}: {e}", local.display()))?;
    let depth = 8u64;
    let mut inflight = std::collections::VecDeque::new();
    let mut next = 0u64;
    let mut written = 0u64;
    while written < size {
        while next < size && (inflight.len() as u64) < depth {
            let n = chunk.min(size - next) as usize;
            inflight.push_back(f.zero_readv_async(n, next)?);
            next += n as u64;
        }
        let Some(p) = inflight.pop_front() else { break };
        let bufs = p.wait()?;
        if bufs.total_len() == 0 {
            break;
        }
        let iov: Vec<std::io::IoSlice<'_>> = bufs
            .buffers()
            .iter()
            .map(|b| std::io::IoSlice::new(b))
            .collect();
        let mut iov = iov;
        let mut slices = &mut iov[..];
        while !slices.is_empty() {
            let n = out.write_vectored(slices)?;
            if n == 0 {
                return Err("local write made no progress".into());
            }
            std::io::IoSlice::advance_slices(&mut slices, n);
        }
        written += bufs.total_len() as u64;
    }
    out.sync_all()?;
    let got = std::fs::metadata(local)?.len();
    if got != size {
        return Err(format!(
            "length check failed: server has {size} bytes, {} has {got}",
            local.display()
        )
        .into());
    }
    eprintln!(
        "zcio: got {path} -> {} ({size} bytes) over {}",
        local.display(),
        c.transport().unwrap_or("?")
    );
    Ok(())
}

fn copy_put(c: &Client, local: &std::path::Path, path: &str) -> AnyResult<()> {
    use std::io::Read;
    let mut src =
        std::fs::File::open(local).map_err(|e| format!("open {}: {e}", local.display()))?;
    let size = src.metadata()?.len();
    let f = c.open(
        path,
        OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE,
    )?;
    let chunk = c.limits().max_payload.min(1 << 20);
    let mut off = 0u64;
    let mut inflight = std::collections::VecDeque::new();
    loop {
        let mut bufs = c.pool().get_span(chunk)?;
        let mut n = 0;
        for b in bufs.buffers_mut() {
            let mut filled = 0;
            while filled < b.len() {
                let k = src.read(&mut b[filled..])?;
                if k == 0 {
                    break;
                }
                filled += k;
            }
            b.set_len(filled);
            n += filled;
            if filled == 0 {
                break;
            }
        }
        if n == 0 {
            break;
        }
        let bufs = zcio::Iobref::from(
            bufs.into_iter()
                .filter(|b| !b.is_empty())
                .collect::<Vec<_>>(),
        );
        inflight.push_back((n, f.zero_writev_async(bufs, off)?));
        off += n as u64;
        if inflight.len() >= 8 {
            let (want, p) = inflight.pop_front().ok_or("empty queue")?;
            let (wrote, _) = p.wait()?;
            if wrote != want {
                return Err(format!("short write: {wrote} of {want}").into());
            }
        }
    }
    for (want, p) in inflight {
        let (wrote, _) = p.wait()?;
        if wrote != want {
            return Err(format!("short write: {wrote} of {want}").into());
        }
    }
    f.fsync()?;
    let remote = f.stat()?.size;
    if remote != size {
        return Err(format!(
            "length check failed: {} has {size} bytes, server has {remote}",
            local.display()
        )
        .into());
    }
    eprintln!("zcio: put {} -> {path} ({size} bytes)", local.display());
    Ok(())
}

fn devices() -> AnyResult<()> {
    match zcio_rdma::devices::list_devices() {
        Ok(devs) => {
            for d in devs {
                println!("{d}");
            }
            Ok(())
        }
        Err(e) => Err(Box::new(e)),
    }
}
