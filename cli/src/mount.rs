//! `zcio mount`: a zcio export as a FUSE file system, so unmodified programs use it.
//!
//! Built on `fuser` (pure Rust: no libfuse; as root it mounts with mount(2), otherwise
//! through `fusermount3`). The kernel's requests are served by several threads
//! (`--threads`, each with its own `/dev/fuse` clone), each making blocking zcio calls on
//! one shared connection, so as many zcio requests are in flight as the kernel has FUSE
//! requests outstanding (up to the thread count).
//!
//! Sizes: the session asks for `max_write` and `max_readahead` of 1 MiB, so the kernel
//! negotiates `max_pages` 256; a 1 MiB read or write, and an O_DIRECT `preadv` of up to 256
//! pages (any number of segments), arrives as one FUSE request and leaves as one zcio
//! request.
//!
//! Copies on the client side, per byte:
//! - read: the transport lands the reply payload in a pool buffer (TCP: one `readv` from
//!   the socket; RDMA: the NIC), and the reply to the kernel is written from that buffer
//!   (the kernel copies it into the page cache or the reader's pages): no user-space copy.
//!   A reply spanning several pool buffers (only when no pool class holds the whole read)
//!   is gathered into one vector first: one copy, counted by `gathered_reads`.
//! - write: the kernel copies the caller's data into the session's request buffer (the
//!   FUSE protocol has no other way), and the zcio request is sent from that buffer
//!   (`pwritev` on the caller's memory: TCP `writev` straight from it): no user-space copy.
//!
//! Inodes are the server's inode numbers (the export's root is swapped with FUSE's 1), so
//! they are stable and hard links share one. The mount keeps, per inode the kernel knows,
//! one path and the kernel's lookup count; `forget` drops it. Renames move the paths below
//! them; a hard link makes the new name the inode's path (what `git` needs: link, then
//! unlink the old name).
//!
//! Caching: by default the kernel's page cache and readahead are used (attributes and
//! entries are cached for one second); `--direct-io` turns both off (every read and write
//! goes to the server, any size and alignment), as does opening a file `O_DIRECT`.
//! Writes go through to the server as they are made unless `--writeback-cache` is given:
//! then the kernel keeps dirty pages and sends them later in big batches, and it trusts
//! its own idea of each file's size and mtime over the server's. That is only safe when
//! this mount is the export's only writer, so it is off by default. With it, files opened
//! write-only are opened read-write on the server (the kernel reads a partly written page
//! before writing it back) and `O_APPEND` is the kernel's to place.
//!
//! Listings use readdirplus: a directory is read at opendir with every entry's attributes
//! (a few zcio requests however many entries), and each entry the kernel is handed counts
//! as a lookup, so `ls -l` costs no request per entry.
//!
//! Server restarts: every operation goes through the client's reconnecting path
//! (`zcio::client::reconnect`). When the connection is lost, the client redials with
//! backoff, reopens the mount's open files by path, and sends again what is safe to repeat
//! (reads, writes at an offset, attributes, setattr, fsync, listings, xattr reads); a
//! program reading and writing through the mount sees nothing. An operation that is not
//! safe to repeat (create, mkdir, unlink, rename, link, symlink, rmdir) fails with
//! ENOTCONN when the connection drops under it. A server gone for good: each operation
//! fails with ENOTCONN after `client.reconnect_give_up_ms`, and `zcio umount` works. The
//! client's keepalive keeps an idle mount's connection open.
//!
//! A background mount (without `--foreground`) logs to `--log-file`, or nowhere: once it
//! is ready, its standard output and error no longer lead to the terminal it started from.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use zcio::proto::{self, Attr, DirPlusEntry, SetattrReq, Status};
use zcio::{Client, OpenFlags};

use crate::{AnyResult, Common};

/// Why a mount could not be made (each says what is missing and what to do).
#[derive(Debug, thiserror::Error)]
pub(crate) enum MountError {
    /// `/dev/fuse` is missing.
    #[error("no /dev/fuse: the fuse kernel module is not loaded (modprobe fuse) or the device is not in this container")]
    NoDevice(#[source] std::io::Error),
    /// `/dev/fuse` cannot be opened.
    #[error("no permission to open /dev/fuse: run as root, or install fuse3 (fusermount3) and be allowed to use it")]
    DevicePermission(#[source] std::io::Error),
    /// Not root, and no `fusermount3` to mount for us.
    #[error("mounting needs root or fusermount3 (Debian package fuse3), and neither is available")]
    NoFusermount,
    /// The mount point is not a directory.
    #[error("mount point {0}: not an existing directory")]
    MountPoint(PathBuf),
    /// The server could not be reached or refused us.
    #[error("cannot reach the zcio server at {addr}")]
    Connect {
        /// Address tried.
        addr: String,
        /// Why.
        #[source]
        source: zcio::Error,
    },
    /// The kernel refused the mount.
    #[error("mounting {path} failed")]
    Mount {
        /// Mount point.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The background mount process failed before the mount was ready.
    #[error("the mount process exited before the file system was ready ({0})")]
    Daemon(String),
    /// Unmounting failed.
    #[error("unmounting {path} failed")]
    Umount {
        /// Mount point.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// `zcio mount` options.
#[derive(clap::Args, Debug)]
pub(crate) struct MountArgs {
    /// Server address (host:port).
    addr: String,
    /// Where to mount (an existing directory).
    mountpoint: PathBuf,
    /// No page cache, no readahead: every read and write goes to the server as issued.
    #[arg(long)]
    direct_io: bool,
    /// Mount read-only (the server may also be read-only).
    #[arg(long)]
    read_only: bool,
    /// Let the kernel cache writes and send them in big batches (FUSE writeback cache).
    /// Off by default: the kernel then trusts its own file sizes and mtimes over the
    /// server's, so it is safe only when this mount is the export's only writer (nothing
    /// else, no other mount or client, changes the files it has cached).
    #[arg(long, conflicts_with = "direct_io")]
    writeback_cache: bool,
    /// Stay in the foreground (otherwise the command returns once the mount is ready and a
    /// background process serves it until `zcio umount`).
    #[arg(long)]
    foreground: bool,
    /// Where a background mount writes its log (warnings such as a reconnect); without
    /// it a background mount is silent. A foreground mount logs to stderr.
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Internal: this process is the background mount that `zcio mount` started.
    #[arg(long, hide = true)]
    background_child: bool,
    /// Threads serving kernel requests: the most zcio requests in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
    #[command(flatten)]
    common: Common,
}

/// Runs `zcio mount`.
pub(crate) fn run(args: MountArgs) -> AnyResult<()> {
    preflight(&args.mountpoint)?;
    if !args.foreground && !args.background_child {
        return spawn_background(args.log_file.as_deref());
    }
    let cfg = args
        .common
        .load()?
        .with_override(&format!("client.connect={}", crate::toml_str(&args.addr)))?;
    let client =
        Client::connect_with(&cfg, &crate::registry()).map_err(|e| MountError::Connect {
            addr: args.addr.clone(),
            source: e,
        })?;
    let read_only = args.read_only || client.read_only();
    let root = client
        .getattr("", true)
        .map_err(|e| MountError::Connect {
            addr: args.addr.clone(),
            source: e,
        })?
        .ino;
    let mut fs = ZcioFs::new(client, root, args.direct_io, read_only);
    fs.writeback = args.writeback_cache;
    let mut opts = vec![
        MountOption::FSName(format!("zcio:{}", args.addr)),
        MountOption::Subtype("zcio".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if read_only {
        opts.push(MountOption::RO);
    }
    let mut config = fuser::Config::default();
    config.mount_options = opts;
    config.n_threads = Some(args.threads as usize);
    config.clone_fd = true;
    if nix::unistd::geteuid().is_root() {
        // Let every user in, as a root-made mount of a shared export should (permissions
        // are still checked by the kernel against the server's modes).
        config.acl = fuser::SessionACL::All;
    }
    let session =
        fuser::Session::new(fs, &args.mountpoint, &config).map_err(|e| MountError::Mount {
            path: args.mountpoint.clone(),
            source: e,
        })?;
    if !args.direct_io {
        raise_readahead(&args.mountpoint);
    }
    // Tell a waiting parent (`spawn_background`) that the mount is up.
    println!(
        "zcio: mounted {} on {}",
        args.addr,
        args.mountpoint.display()
    );
    let _ = std::io::stdout().flush();
    if args.background_child {
        // The parent has read that line and is gone: our stdout and stderr are pipes
        // nobody reads (a write would fail with EPIPE). From now on they go to the log
        // file, or nowhere.
        detach_output(args.log_file.as_deref())?;
    }
    session.run()?;
    Ok(())
}

/// The kernel caps a FUSE mount's readahead at its default (128 KiB) whatever `init`
/// asks for; as root, raise it to 1 MiB in sysfs so buffered sequential reads become
/// 1 MiB requests too. The device number comes from `/proc/self/mountinfo` (a `stat` of
/// the mount point here would wait for this process to answer it).
fn raise_readahead(mountpoint: &Path) {
    let Ok(mp) = mountpoint.canonicalize() else {
        return;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let want = mp.to_string_lossy();
    // Fields: id, parent, major:minor, root, mount point, ... (the last mount wins).
    let dev = info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && f[4] == want).then(|| f[2].to_string())
    });
    if let Some(dev) = dev {
        let p = format!("/sys/class/bdi/{dev}/read_ahead_kb");
        if let Err(e) = std::fs::write(&p, "1024") {
            tracing::info!("readahead stays at the kernel's default: {p}: {e}");
        }
    }
}

/// Checks what a mount needs before anything is mounted, with a clear error for each.
fn preflight(mountpoint: &Path) -> Result<(), MountError> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Err(match e.kind() {
            std::io::ErrorKind::NotFound => MountError::NoDevice(e),
            _ => MountError::DevicePermission(e),
        });
    }
    if !nix::unistd::geteuid().is_root() && find_in_path("fusermount3").is_none() {
        return Err(MountError::NoFusermount);
    }
    if !mountpoint.is_dir() {
        return Err(MountError::MountPoint(mountpoint.to_path_buf()));
    }
    Ok(())
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Points stdout and stderr at `log` (appended to, created 0600) or `/dev/null`.
fn detach_output(log: Option<&Path>) -> AnyResult<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let target = match log {
        Some(p) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(p)
            .map_err(|e| format!("log file {}: {e}", p.display()))?,
        None => std::fs::OpenOptions::new().write(true).open("/dev/null")?,
    };
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2 of a descriptor we own onto a standard one; it closes the old pipe
        // atomically, and the standard streams' Rust handles keep using the same numbers.
        if unsafe { libc::dup2(target.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}

/// Starts this mount again as its background process (own process group) and waits until
/// it says the mount is ready; if it exits first, its error output becomes ours. A log
/// file is checked here, so a bad one is an error before anything is mounted.
fn spawn_background(log: Option<&Path>) -> AnyResult<()> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    if let Some(p) = log {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| format!("log file {}: {e}", p.display()))?;
    }
    let me = std::env::current_exe()?;
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    argv.push("--background-child".into());
    let mut child = std::process::Command::new(me)
        .args(argv)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()?;
    let out = child
        .stdout
        .take()
        .ok_or("no pipe from the mount process")?;
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line)?;
    if line.starts_with("zcio: mounted") {
        // The background process keeps running; its later output goes nowhere.
        eprint!("{line}");
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait()?;
    eprint!("{err}");
    Err(MountError::Daemon(status.to_string()).into())
}

/// `zcio umount MOUNTPOINT`.
pub(crate) fn umount(mountpoint: &Path) -> AnyResult<()> {
    let r = if nix::unistd::geteuid().is_root() {
        nix::mount::umount(mountpoint).map_err(std::io::Error::from)
    } else {
        let st = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(mountpoint)
            .status()?;
        if st.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("fusermount3 -u: {st}")))
        }
    };
    r.map_err(|e| {
        MountError::Umount {
            path: mountpoint.to_path_buf(),
            source: e,
        }
        .into()
    })
}

/// Cache lifetime of attributes and entries with the page cache on.
const TTL: Duration = Duration::from_secs(1);

struct Node {
    path: String,
    lookups: u64,
}

/// An open directory: its path and every entry with its attributes, read in one stream
/// at opendir (a few zcio requests for thousands of entries; nothing stays open on the
/// server, so a reconnect does not strand it).
struct DirHandle {
    path: String,
    entries: Vec<DirPlusEntry>,
}

/// Counters of a mount, for tests and figures.
#[derive(Default)]
struct FsStats {
    gathered_reads: AtomicU64,
}

/// The file system: a zcio connection and the kernel's view of it.
struct ZcioFs {
    client: Client,
    /// The export root's inode number on the server (shown to the kernel as 1).
    root: u64,
    direct_io: bool,
    read_only: bool,
    /// `--writeback-cache` asked for (and the kernel has it: see `init`).
    writeback: bool,
    nodes: Mutex<HashMap<u64, Node>>,
    files: Mutex<HashMap<u64, Arc<zcio::File>>>,
    dirs: Mutex<HashMap<u64, Arc<Mutex<DirHandle>>>>,
    next_fh: AtomicU64,
    stats: FsStats,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The errno a zcio error becomes for the kernel.
fn errno(e: &zcio::Error) -> Errno {
    match e {
        zcio::Error::Remote { code, .. } => match *code {
            c if c > 0 && c < 4096 => Errno::from_i32(c as i32),
            c if c == Status::ReadOnly as u32 => Errno::EROFS,
            c if c == Status::OutsideExport as u32 => Errno::EACCES,
            c if c == Status::BadHandle as u32 => Errno::EBADF,
            c if c == Status::Busy as u32 => Errno::EAGAIN,
            c if c == Status::AuthRequired as u32 => Errno::EACCES,
            c if c == Status::Limit as u32 => Errno::EMFILE,
            _ => Errno::EINVAL,
        },
        zcio::Error::InvalidArgument(_) => Errno::EINVAL,
        zcio::Error::ConnectionClosed(_) => Errno::ENOTCONN,
        _ => Errno::EIO,
    }
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn time_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

/// The setattr bits and time for one of atime/mtime: `set` with the time, `now`, or none.
fn time_bits(t: Option<TimeOrNow>, set: u32, now: u32) -> (u32, i64) {
    match t {
        Some(TimeOrNow::Now) => (now, 0),
        Some(TimeOrNow::SpecificTime(t)) => (set, time_ns(t)),
        None => (0, 0),
    }
}

fn kind_of_mode(mode: u32) -> FileType {
    match mode & 0o170000 {
        0o040000 => FileType::Directory,
        0o120000 => FileType::Symlink,
        0o010000 => FileType::NamedPipe,
        0o020000 => FileType::CharDevice,
        0o060000 => FileType::BlockDevice,
        0o140000 => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn kind_of_dtype(t: u8) -> FileType {
    kind_of_mode(u32::from(t) << 12)
}

/// Joins a directory path and a name from the kernel (one component, UTF-8).
fn join(dir: &str, name: &OsStr) -> Result<String, Errno> {
    let n = name.to_str().ok_or(Errno::EILSEQ)?;
    if n.is_empty() || n.contains('/') || n == "." || n == ".." {
        return Err(Errno::EINVAL);
    }
    Ok(if dir.is_empty() {
        n.to_string()
    } else {
        format!("{dir}/{n}")
    })
}

impl ZcioFs {
    fn new(client: Client, root: u64, direct_io: bool, read_only: bool) -> ZcioFs {
        let mut nodes = HashMap::new();
        nodes.insert(
            1,
            Node {
                path: String::new(),
                lookups: 1,
            },
        );
        ZcioFs {
            client,
            root,
            direct_io,
            read_only,
            writeback: false,
            nodes: Mutex::new(nodes),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            stats: FsStats::default(),
        }
    }

    /// Server inode number -> kernel inode number (the root and 1 swap places).
    fn ino_out(&self, server: u64) -> u64 {
        if server == self.root {
            1
        } else if server == 1 {
            self.root
        } else {
            server
        }
    }

    fn path_of(&self, ino: INodeNo) -> Result<String, Errno> {
        lock(&self.nodes)
            .get(&ino.0)
            .map(|n| n.path.clone())
            .ok_or(Errno::ESTALE)
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.ino_out(a.ino)),
            size: a.size,
            blocks: a.blocks,
            atime: time(a.atime_ns),
            mtime: time(a.mtime_ns),
            ctime: time(a.ctime_ns),
            crtime: time(a.ctime_ns),
            kind: kind_of_mode(a.mode),
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: a.blksize.max(4096),
            flags: 0,
        }
    }

    /// The open directory `fh` (from `opendir`), if it is one.
    fn dir(&self, fh: FileHandle) -> Option<Arc<Mutex<DirHandle>>> {
        lock(&self.dirs).get(&fh.0).cloned()
    }

    fn ttl(&self) -> Duration {
        if self.direct_io {
            Duration::ZERO
        } else {
            TTL
        }
    }

    /// Records one more kernel reference to the inode at `path` and replies with it.
    fn remember(&self, path: String, a: &Attr) -> FileAttr {
        let fa = self.attr(a);
        self.count_lookup(path, fa.ino.0);
        fa
    }

    /// One more kernel reference (a lookup, or an entry of a readdirplus reply) to `ino`,
    /// now known at `path`.
    fn count_lookup(&self, path: String, ino: u64) {
        let mut nodes = lock(&self.nodes);
        let n = nodes.entry(ino).or_insert(Node {
            path: path.clone(),
            lookups: 0,
        });
        n.path = path;
        n.lookups += 1;
    }

    fn entry(&self, path: String, reply: ReplyEntry) {
        match self.client.getattr(&path, false) {
            Ok(a) => {
                let fa = self.remember(path, &a);
                reply.entry(&self.ttl(), &fa, Generation(0));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<zcio::File>, Errno> {
        lock(&self.files).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// The path of `name` in `parent`, for an operation that changes the tree.
    fn new_name(&self, parent: INodeNo, name: &OsStr) -> Result<String, Errno> {
        self.refuse_if_read_only()?;
        join(&self.path_of(parent)?, name)
    }

    fn refuse_if_read_only(&self) -> Result<(), Errno> {
        if self.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// Moves every remembered path at or below `from` to `to` (and, for an exchange, the
    /// other way too).
    fn moved(&self, from: &str, to: &str, exchange: bool) {
        let below = |p: &str, root: &str| {
            p == root
                || (p.len() > root.len() && p.starts_with(root) && p.as_bytes()[root.len()] == b'/')
        };
        let mut nodes = lock(&self.nodes);
        for n in nodes.values_mut() {
            if below(&n.path, from) {
                n.path = format!("{to}{}", &n.path[from.len()..]);
            } else if exchange && below(&n.path, to) {
                n.path = format!("{from}{}", &n.path[to.len()..]);
            }
        }
    }

    fn open_flags(&self, flags: i32) -> (OpenFlags, bool) {
        let mut f = match flags & libc::O_ACCMODE {
            libc::O_WRONLY => OpenFlags::WRITE,
            libc::O_RDWR => OpenFlags::rw(),
            _ => OpenFlags::READ,
        };
        if self.writeback {
            // The kernel fills partly written pages by reading them, even through a
            // write-only descriptor, and it places appends itself (it owns the size).
            if f == OpenFlags::WRITE {
                f = OpenFlags::rw();
            }
        } else if flags & libc::O_APPEND != 0 {
            f = f | OpenFlags::APPEND;
        }
        if flags & libc::O_TRUNC != 0 {
            f = f | OpenFlags::TRUNCATE;
        }
        let direct = self.direct_io || flags & libc::O_DIRECT != 0;
        (f, direct)
    }

    fn fopen_flags(&self, direct: bool) -> FopenFlags {
        if direct {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        } else {
            FopenFlags::empty()
        }
    }

    fn add_file(&self, f: zcio::File) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.files).insert(fh, Arc::new(f));
        fh
    }
}

impl Filesystem for ZcioFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // 1 MiB requests: max_pages 256 follows from these (fuser asks for FUSE_MAX_PAGES
        // whenever the kernel has it).
        let _ = config.set_max_write(1 << 20);
        if let Err(max) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Async direct I/O: an O_DIRECT aio (fio libaio) is submitted without waiting, so
        // iodepth 32 keeps 32 requests in flight. Parallel directory operations.
        for cap in [InitFlags::FUSE_ASYNC_DIO, InitFlags::FUSE_PARALLEL_DIROPS] {
            let _ = config.add_capabilities(cap);
        }
        // Listings with attributes (always, not the kernel's adaptive choice): `ls -l` of
        // a big directory is a few zcio requests instead of a lookup per entry.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        if self.writeback {
            if let Err(missing) = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE) {
                tracing::warn!(
                    "the kernel has no FUSE writeback cache ({missing:?}): writes go through"
                );
                self.writeback = false;
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        let files: Vec<_> = lock(&self.files).drain().collect();
        for (_, f) in files {
            drop(f);
        }
        self.client.close();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.path_of(parent).and_then(|d| join(&d, name)) {
            Ok(p) => self.entry(p, reply),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino.0 == 1 {
            return;
        }
        let mut nodes = lock(&self.nodes);
        if let Some(n) = nodes.get_mut(&ino.0) {
            n.lookups = n.lookups.saturating_sub(nlookup);
            if n.lookups == 0 {
                nodes.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = match fh.map(|fh| self.file(fh)) {
            Some(Ok(f)) => f.getattr(),
            _ => match self.path_of(ino) {
                Ok(p) => self.client.getattr(&p, false),
                Err(e) => return reply.error(e),
            },
        };
        match r {
            Ok(a) => reply.attr(&self.ttl(), &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if let Err(e) = self.refuse_if_read_only() {
            return reply.error(e);
        }
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let mut a = SetattrReq {
            path,
            ..Default::default()
        };
        if let Some(m) = mode {
            a.valid |= SetattrReq::SET_MODE;
            a.mode = m & 0o7777;
        }
        if let Some(u) = uid {
            a.valid |= SetattrReq::SET_UID;
            a.uid = u;
        }
        if let Some(g) = gid {
            a.valid |= SetattrReq::SET_GID;
            a.gid = g;
        }
        if let Some(s) = size {
            a.valid |= SetattrReq::SET_SIZE;
            a.size = s;
        }
        let (v, ns) = time_bits(atime, SetattrReq::SET_ATIME, SetattrReq::SET_ATIME_NOW);
        a.valid |= v;
        a.atime_ns = ns;
        let (v, ns) = time_bits(mtime, SetattrReq::SET_MTIME, SetattrReq::SET_MTIME_NOW);
        a.valid |= v;
        a.mtime_ns = ns;
        // Truncation through an open handle when there is one (the server checks it was
        // opened for writing); everything else by path.
        let r = match fh.map(|fh| self.file(fh)) {
            Some(Ok(f)) if size.is_some() => f.setattr(&a),
            _ => self.client.setattr(&a),
        };
        match r {
            Ok(at) => reply.attr(&self.ttl(), &self.attr(&at)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.path_of(ino).map(|p| self.client.readlink(&p)) {
            Ok(Ok(t)) => reply.data(t.as_bytes()),
            Ok(Err(e)) => reply.error(errno(&e)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let p = match self.new_name(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        match self.client.mkdir_mode(&p, mode & !umask & 0o7777) {
            Ok(()) => self.entry(p, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            self.new_name(parent, name).map(|p| self.client.unlink(&p)),
            reply,
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            self.new_name(parent, name).map(|p| self.client.rmdir(&p)),
            reply,
        );
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let p = match self.new_name(parent, link_name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let Some(t) = target.to_str() else {
            return reply.error(Errno::EILSEQ);
        };
        match self.client.symlink(t, &p) {
            Ok(()) => self.entry(p, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let paths = self.refuse_if_read_only().and_then(|()| {
            Ok((
                join(&self.path_of(parent)?, name)?,
                join(&self.path_of(newparent)?, newname)?,
            ))
        });
        let (from, to) = match paths {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let mut f = 0;
        if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            f |= proto::RENAME_NOREPLACE;
        }
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        if exchange {
            f |= proto::RENAME_EXCHANGE;
        }
        if flags.bits() & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return reply.error(Errno::EINVAL);
        }
        match self.client.rename(&from, &to, f) {
            Ok(()) => {
                self.moved(&from, &to, exchange);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let paths = self.refuse_if_read_only().and_then(|()| {
            Ok((
                self.path_of(ino)?,
                join(&self.path_of(newparent)?, newname)?,
            ))
        });
        let (from, to) = match paths {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        match self.client.link(&from, &to) {
            // The new name becomes the inode's path: the old one is often removed next.
            Ok(()) => self.entry(to, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: fuser::OpenFlags, reply: ReplyOpen) {
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let (fl, direct) = self.open_flags(flags.0);
        if fl.contains(OpenFlags::WRITE) && self.read_only {
            return reply.error(Errno::EROFS);
        }
        let opened = match self.client.open(&path, fl) {
            // Write-only made read-write for the writeback cache, and the server may not
            // read it: write-only then (the kernel reads such a file's partial pages only
            // when it has no other way, and gets the error then).
            Err(e)
                if self.writeback
                    && errno(&e) == Errno::EACCES
                    && flags.0 & libc::O_ACCMODE == libc::O_WRONLY =>
            {
                let mut wo = OpenFlags(fl.0 & !OpenFlags::READ.0);
                if flags.0 & libc::O_APPEND != 0 {
                    wo = wo | OpenFlags::APPEND;
                }
                self.client.open(&path, wo)
            }
            r => r,
        };
        match opened {
            Ok(f) => {
                let fh = self.add_file(f);
                reply.opened(FileHandle(fh), self.fopen_flags(direct));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let p = match self.new_name(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let (mut fl, direct) = self.open_flags(flags);
        fl = fl | OpenFlags::CREATE;
        if flags & libc::O_EXCL != 0 {
            fl = fl | OpenFlags::EXCL;
        }
        let f = match self.client.open_mode(&p, fl, mode & !umask & 0o7777) {
            Ok(f) => f,
            Err(e) => return reply.error(errno(&e)),
        };
        match f.getattr() {
            Ok(a) => {
                let fa = self.remember(p, &a);
                let fh = self.add_file(f);
                reply.created(
                    &self.ttl(),
                    &fa,
                    Generation(0),
                    FileHandle(fh),
                    self.fopen_flags(direct),
                );
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let f = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // One zcio request; the payload lands in pool buffers and is replied from them.
        match f.zero_readv(size as usize, offset) {
            Ok(bufs) => match bufs.buffers() {
                [] => reply.data(&[]),
                [one] => reply.data(&one[..]),
                _ => {
                    self.stats.gathered_reads.fetch_add(1, Ordering::Relaxed);
                    reply.data(&bufs.to_vec())
                }
            },
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let f = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // Sent straight from the kernel's request buffer: no copy here.
        match f.pwrite(data, offset) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes are not buffered here (each is answered once the server has it), so a
        // close has nothing to flush; an unknown handle is still an error.
        match self.file(fh) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let f = lock(&self.files).remove(&fh.0);
        match f.map(Arc::try_unwrap) {
            Some(Ok(f)) => match f.close() {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            },
            // Still in use by a request in flight: it closes when that one drops it.
            Some(Err(_)) => reply.ok(),
            None => reply.error(Errno::EBADF),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self
            .file(fh)
            .map(|f| if datasync { f.fdatasync() } else { f.fsync() });
        reply_empty(r, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: fuser::OpenFlags, reply: ReplyOpen) {
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        match self.client.read_dir_plus(&path) {
            Ok(entries) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                lock(&self.dirs).insert(fh, Arc::new(Mutex::new(DirHandle { path, entries })));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(d) = self.dir(fh) else {
            return reply.error(Errno::EBADF);
        };
        let d = lock(&d);
        // Offsets: 1 after ".", 2 after "..", 3 + i after entry i.
        if offset == 0 && reply.add(ino, 1, FileType::Directory, ".") {
            return reply.ok();
        }
        if offset <= 1 && reply.add(INodeNo(1), 2, FileType::Directory, "..") {
            return reply.ok();
        }
        let start = offset.saturating_sub(2) as usize;
        for (i, e) in d.entries.iter().enumerate().skip(start) {
            let ino = INodeNo(self.ino_out(e.entry.ino));
            if reply.add(
                ino,
                3 + i as u64,
                kind_of_dtype(e.entry.kind),
                &e.entry.name,
            ) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(d) = self.dir(fh) else {
            return reply.error(Errno::EBADF);
        };
        let d = lock(&d);
        // "." and "..": the kernel links neither, so they need no attributes.
        let dot = |ino: INodeNo| FileAttr {
            ino,
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        let ttl = self.ttl();
        if offset == 0 && reply.add(ino, 1, ".", &ttl, &dot(ino), Generation(0)) {
            return reply.ok();
        }
        if offset <= 1 && reply.add(INodeNo(1), 2, "..", &ttl, &dot(INodeNo(1)), Generation(0)) {
            return reply.ok();
        }
        let start = offset.saturating_sub(2) as usize;
        for (i, e) in d.entries.iter().enumerate().skip(start) {
            let Ok(path) = join(&d.path, OsStr::new(&e.entry.name)) else {
                continue;
            };
            // An entry the server could not stat in the listing is looked up alone (and
            // left out if that fails too: the kernel could not use it).
            let a = match e.attr {
                Some(a) => a,
                None => match self.client.getattr(&path, false) {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            let fa = self.attr(&a);
            if reply.add(
                fa.ino,
                3 + i as u64,
                &e.entry.name,
                &ttl,
                &fa,
                Generation(0),
            ) {
                break;
            }
            // The kernel takes a reference to every entry it is given (a lookup).
            self.count_lookup(path, fa.ino.0);
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: fuser::OpenFlags,
        reply: ReplyEmpty,
    ) {
        match lock(&self.dirs).remove(&fh.0) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::EBADF),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.client.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let Some(n) = name.to_str() else {
            return reply.error(Errno::EILSEQ);
        };
        let fl = match flags {
            0 => 0,
            libc::XATTR_CREATE => 1,
            libc::XATTR_REPLACE => 2,
            _ => return reply.error(Errno::EINVAL),
        };
        let r = self
            .refuse_if_read_only()
            .and_then(|()| self.path_of(ino))
            .map(|p| self.client.setxattr(&p, n, value, fl));
        reply_empty(r, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(n) = name.to_str() else {
            return reply.error(Errno::EILSEQ);
        };
        let r = self
            .path_of(ino)
            .map(|p| self.client.getxattr(&p, n, size as usize));
        xattr_reply(r, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = self
            .path_of(ino)
            .map(|p| self.client.listxattr(&p, size as usize));
        xattr_reply(r, size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(n) = name.to_str() else {
            return reply.error(Errno::EILSEQ);
        };
        let r = self
            .refuse_if_read_only()
            .and_then(|()| self.path_of(ino))
            .map(|p| self.client.removexattr(&p, n));
        reply_empty(r, reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self
            .file(fh)
            .map(|f| f.fallocate(mode as u32, offset, length));
        reply_empty(r, reply);
    }
}

/// Replies to an operation with nothing to return: a local refusal, a zcio error, or OK.
fn reply_empty(r: Result<zcio::Result<()>, Errno>, reply: ReplyEmpty) {
    match r {
        Ok(Ok(())) => reply.ok(),
        Ok(Err(e)) => reply.error(errno(&e)),
        Err(e) => reply.error(e),
    }
}

/// Replies to getxattr/listxattr: the size when asked (`size` 0), the value when it fits,
/// ERANGE when it does not.
fn xattr_reply(
    r: Result<zcio::Result<std::result::Result<Vec<u8>, usize>>, Errno>,
    size: u32,
    reply: ReplyXattr,
) {
    match r {
        Err(e) => reply.error(e),
        Ok(Err(e)) => reply.error(errno(&e)),
        Ok(Ok(Ok(v))) if size == 0 => reply.size(v.len() as u32),
        Ok(Ok(Ok(v))) => reply.data(&v),
        Ok(Ok(Err(need))) if size == 0 => reply.size(need as u32),
        Ok(Ok(Err(_))) => reply.error(Errno::ERANGE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn errors_map_to_errnos() {
        let remote = |code| zcio::Error::Remote {
            op: "x",
            code,
            message: String::new(),
        };
        assert_eq!(errno(&remote(libc::ENOENT as u32)), Errno::ENOENT);
        assert_eq!(errno(&remote(Status::ReadOnly as u32)), Errno::EROFS);
        assert_eq!(errno(&remote(Status::OutsideExport as u32)), Errno::EACCES);
        assert_eq!(
            errno(&zcio::Error::ConnectionClosed("gone".into())),
            Errno::ENOTCONN
        );
    }

    #[test]
    fn times_round_trip_both_sides_of_the_epoch() {
        for ns in [0i64, 1, -1, 1_700_000_000_123_456_789, -5_000_000_001] {
            assert_eq!(time_ns(time(ns)), ns);
        }
    }

    #[test]
    fn names_join_and_hostile_ones_are_refused() {
        assert_eq!(join("", OsStr::new("a")).unwrap(), "a");
        assert_eq!(join("d/e", OsStr::new("a")).unwrap(), "d/e/a");
        for bad in ["", ".", "..", "a/b"] {
            assert!(join("d", OsStr::new(bad)).is_err(), "{bad:?}");
        }
        assert!(join("d", OsStr::from_bytes(b"\xff")).is_err());
    }
}
