//! The exported directory, and the only way the server touches the file system.
//!
//! Every path from a client is resolved with `openat2(2)` relative to the export's
//! directory descriptor with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`: the kernel refuses
//! (with `EXDEV`) any resolution that would leave the export, whether through `..`, an
//! absolute path or a symlink (absolute or relative) that points outside, and does so
//! atomically, with no check-then-use race against a concurrent rename. Symlinks that stay
//! inside the export keep working. Operations on a name (unlink, mkdir) resolve the parent
//! directory that way and then act on the last component with `*at` calls.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::proto::{DirEntry, OpenFlags, Stat, Status};

/// A failed file operation, as sent back to the client.
#[derive(Debug)]
pub(crate) struct OpError {
    pub(crate) code: u32,
    pub(crate) message: String,
}

impl OpError {
    pub(crate) fn new(code: impl Into<u32>, message: impl Into<String>) -> OpError {
        OpError {
            code: code.into(),
            message: message.into(),
        }
    }
    pub(crate) fn errno(e: Errno, what: &str, path: &str) -> OpError {
        if e == Errno::EXDEV {
            return OpError::new(
                Status::OutsideExport as u32,
                format!("{what} {path:?}: path leads outside the export"),
            );
        }
        OpError::new(e as i32 as u32, format!("{what} {path:?}: {}", e.desc()))
    }
}

/// The exported directory.
#[derive(Debug)]
pub(crate) struct Export {
    root: OwnedFd,
    read_only: bool,
    force_direct: bool,
    /// Cleared from the mode of everything created (`server.umask`).
    umask: u32,
}

/// Modes a client may ask for on creation: permission bits only (no setuid, setgid or
/// sticky bit), less the server's umask.
fn create_mode(requested: u32, default: u32, umask: u32) -> u32 {
    let m = if requested == 0 { default } else { requested };
    m & 0o777 & !umask
}

fn how(flags: OFlag, mode: u32) -> OpenHow {
    // openat2 refuses a mode without O_CREAT (EINVAL), unlike open(2).
    let mode = if flags.contains(OFlag::O_CREAT) {
        mode
    } else {
        0
    };
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

/// Checks the textual form of a client path before the kernel sees it.
fn check_path(path: &str) -> Result<&str, OpError> {
    if path.starts_with('/') {
        return Err(OpError::new(
            Status::OutsideExport as u32,
            format!("{path:?}: absolute paths are refused; paths are relative to the export"),
        ));
    }
    if path.contains('\0') {
        return Err(OpError::new(Status::BadRequest as u32, "path contains NUL"));
    }
    Ok(if path.is_empty() { "." } else { path })
}

fn to_stat(st: &FileStat) -> Stat {
    Stat {
        size: st.st_size.max(0) as u64,
        mode: st.st_mode,
        mtime_ns: st.st_mtime.saturating_mul(1_000_000_000) + st.st_mtime_nsec,
    }
}

impl Export {
    pub(crate) fn open_root(
        dir: &Path,
        read_only: bool,
        force_direct: bool,
    ) -> std::io::Result<Export> {
        let f = File::open(dir)?;
        if !f.metadata()?.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(Export {
            root: OwnedFd::from(f),
            read_only,
            force_direct,
            umask: 0o022,
        })
    }

    /// Sets the bits cleared from created files' and directories' modes.
    pub(crate) fn with_umask(mut self, umask: u32) -> Export {
        self.umask = umask & 0o777;
        self
    }

    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    fn refuse_if_read_only(&self, what: &str) -> Result<(), OpError> {
        if self.read_only {
            return Err(OpError::new(
                Status::ReadOnly as u32,
                format!("{what}: the export is read-only"),
            ));
        }
        Ok(())
    }

    fn resolve(&self, path: &str, flags: OFlag, mode: u32, what: &str) -> Result<OwnedFd, OpError> {
        let p = check_path(path)?;
        openat2(self.root.as_fd(), p, how(flags, mode)).map_err(|e| OpError::errno(e, what, path))
    }

    /// Opens a regular file. Returns it and whether it was opened O_DIRECT.
    pub(crate) fn open(
        &self,
        path: &str,
        fl: OpenFlags,
        mode: u32,
    ) -> Result<(File, bool), OpError> {
        let write = fl.contains(OpenFlags::WRITE)
            || fl.contains(OpenFlags::APPEND)
            || fl.contains(OpenFlags::CREATE)
            || fl.contains(OpenFlags::TRUNCATE);
        if write {
            self.refuse_if_read_only("open for writing")?;
        }
        let mut o = match (fl.contains(OpenFlags::READ), fl.contains(OpenFlags::WRITE)) {
            (_, false) => OFlag::O_RDONLY,
            (false, true) => OFlag::O_WRONLY,
            (true, true) => OFlag::O_RDWR,
        };
        if fl.contains(OpenFlags::TRUNCATE) {
            o |= OFlag::O_TRUNC;
        }
        if fl.contains(OpenFlags::APPEND) {
            o |= OFlag::O_APPEND;
        }
        let direct = fl.contains(OpenFlags::DIRECT) || self.force_direct;
        if direct {
            o |= OFlag::O_DIRECT;
        }
        let create = fl.contains(OpenFlags::CREATE);
        let excl = fl.contains(OpenFlags::EXCL);
        // A created file's mode defaults to 0644 when the client sends 0.
        let mode = create_mode(mode, 0o644, self.umask);
        // What exists is first opened O_PATH (no open(2) side effect: a device node's
        // driver, a FIFO's wait for a writer) and checked to be a regular file; only then
        // is that same inode opened for I/O, through its /proc/self/fd link. What does not
        // exist is created with O_CREAT | O_EXCL, which makes a new regular file or fails:
        // it never opens something that appeared meanwhile. A race (created or removed
        // between the two steps) is retried a few times.
        for _ in 0..4 {
            match self.resolve(path, OFlag::O_PATH, 0, "open") {
                Ok(pfd) => {
                    if create && excl {
                        return Err(OpError::errno(Errno::EEXIST, "open", path));
                    }
                    let st = fstat(&pfd).map_err(|e| OpError::errno(e, "stat", path))?;
                    match st.st_mode & libc::S_IFMT {
                        libc::S_IFREG => {}
                        libc::S_IFDIR => return Err(OpError::errno(Errno::EISDIR, "open", path)),
                        _ => {
                            return Err(OpError::errno(
                                Errno::EINVAL,
                                "open (not a regular file)",
                                path,
                            ))
                        }
                    }
                    let link = format!("/proc/self/fd/{}", pfd.as_raw_fd());
                    let fd = nix::fcntl::open(link.as_str(), o | OFlag::O_CLOEXEC, Mode::empty())
                        .map_err(|e| OpError::errno(e, "open", path))?;
                    return Ok((File::from(fd), direct));
                }
                Err(e) if create && e.code == Errno::ENOENT as i32 as u32 => {
                    match self.resolve(path, o | OFlag::O_CREAT | OFlag::O_EXCL, mode, "open") {
                        Ok(fd) => return Ok((File::from(fd), direct)),
                        Err(e) if !excl && e.code == Errno::EEXIST as i32 as u32 => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(OpError::errno(
            Errno::EAGAIN,
            "open (the file kept changing)",
            path,
        ))
    }

    pub(crate) fn stat(&self, path: &str) -> Result<Stat, OpError> {
        let fd = self.resolve(path, OFlag::O_PATH, 0, "stat")?;
        let st = fstat(&fd).map_err(|e| OpError::errno(e, "stat", path))?;
        Ok(to_stat(&st))
    }

    pub(crate) fn fstat(f: &File) -> Result<Stat, OpError> {
        let st = fstat(f).map_err(|e| OpError::errno(e, "fstat", ""))?;
        Ok(to_stat(&st))
    }

    /// Splits `path` into its parent (opened beneath the export) and a plain last name.
    fn parent(&self, path: &str, what: &str) -> Result<(OwnedFd, String), OpError> {
        let p = check_path(path)?.trim_end_matches('/');
        let (dir, name) = match p.rsplit_once('/') {
            Some((d, n)) => (if d.is_empty() { "." } else { d }, n),
            None => (".", p),
        };
        if name.is_empty() || name == "." || name == ".." {
            return Err(OpError::new(
                Status::BadRequest as u32,
                format!("{what} {path:?}: needs a file name"),
            ));
        }
        let fd = self.resolve(dir, OFlag::O_PATH | OFlag::O_DIRECTORY, 0, what)?;
        Ok((fd, name.to_string()))
    }

    pub(crate) fn unlink(&self, path: &str) -> Result<(), OpError> {
        self.refuse_if_read_only("unlink")?;
        let (dir, name) = self.parent(path, "unlink")?;
        unlinkat(&dir, name.as_str(), UnlinkatFlags::NoRemoveDir)
            .map_err(|e| OpError::errno(e, "unlink", path))
    }

    pub(crate) fn mkdir(&self, path: &str, mode: u32) -> Result<(), OpError> {
        self.refuse_if_read_only("mkdir")?;
        let (dir, name) = self.parent(path, "mkdir")?;
        let mode = create_mode(mode, 0o755, self.umask);
        mkdirat(&dir, name.as_str(), Mode::from_bits_truncate(mode))
            .map_err(|e| OpError::errno(e, "mkdir", path))
    }

    /// Entries of a directory, sorted by name, from index `cookie`, as many as fit in
    /// `budget` encoded bytes. Returns the entries and whether the listing is complete.
    pub(crate) fn list(
        &self,
        path: &str,
        cookie: u64,
        budget: usize,
    ) -> Result<(Vec<DirEntry>, bool), OpError> {
        let fd = self.resolve(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0, "list")?;
        let dfd = fd.try_clone().map_err(|e| {
            OpError::errno(Errno::from_raw(e.raw_os_error().unwrap_or(0)), "list", path)
        })?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| OpError::errno(e, "list", path))?;
        let mut names: Vec<String> = Vec::new();
        for ent in dir.iter() {
            let ent = ent.map_err(|e| OpError::errno(e, "list", path))?;
            let Ok(n) = ent.file_name().to_str() else {
                continue; // Non-UTF-8 names cannot be expressed in the protocol.
            };
            if n != "." && n != ".." {
                names.push(n.to_string());
            }
        }
        names.sort_unstable();
        let mut out = Vec::new();
        let mut used = 0;
        let start = usize::try_from(cookie)
            .unwrap_or(usize::MAX)
            .min(names.len());
        let mut done = true;
        for name in &names[start..] {
            let st = fstatat(
                &dfd,
                name.as_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            );
            let (size, is_dir) = match st {
                Ok(st) => (
                    st.st_size.max(0) as u64,
                    st.st_mode & libc::S_IFMT == libc::S_IFDIR,
                ),
                Err(_) => (0, false), // Vanished meanwhile: still listed, size unknown.
            };
            let e = DirEntry {
                name: name.clone(),
                size: if is_dir { 0 } else { size },
                is_dir,
            };
            let n = crate::proto::dirent_len(&e);
            if used + n > budget {
                done = false;
                break;
            }
            used += n;
            out.push(e);
        }
        if !done && out.is_empty() {
            return Err(OpError::new(
                Status::Limit as u32,
                format!("list {path:?}: reply buffer too small for one entry"),
            ));
        }
        Ok((out, done))
    }
}

// ---- The operations a mounted file system needs (issue 13). ----
//
// Every path still goes through `resolve`/`parent` (openat2 beneath the export). An
// operation on an object acts on an `O_PATH | O_NOFOLLOW` descriptor of it, or on a plain
// name in a parent resolved beneath the export with a `*at` call that does not follow a
// symlink in the last component; where Linux has no such call for an `O_PATH` descriptor
// (chmod, extended attributes), it goes through `/proc/self/fd/N`, which names exactly the
// object already opened and is refused for symlinks (whose modes and user xattrs Linux
// does not support anyway).

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::proto::{Attr, DirPlusEntry, DirStreamEntry, SetattrReq, StatfsReply};

pub(crate) fn to_attr(st: &FileStat) -> Attr {
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    Attr {
        ino: st.st_ino,
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        size: st.st_size.max(0) as u64,
        blocks: st.st_blocks.max(0) as u64,
        atime_ns: ns(st.st_atime, st.st_atime_nsec),
        mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
        ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
    }
}

fn io_err(e: std::io::Error, what: &str, path: &str) -> OpError {
    OpError::errno(
        Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        what,
        path,
    )
}

fn proc_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn timespec(ns: i64) -> TimeSpec {
    TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// An open directory stream ([`crate::proto::Req::Opendir`]): read on, page by page, so a
/// whole directory costs O(entries).
pub(crate) struct DirStream {
    path: String,
    iter: nix::dir::OwningIter,
    /// The directory again, for `fstatat` of its entries (readdirplus).
    fd: OwnedFd,
    /// Entries handed out so far (the cookie that continues the stream).
    pos: u64,
    /// An entry read but not sent (it did not fit in the last page).
    held: Option<DirStreamEntry>,
}

impl Export {
    /// An `O_PATH | O_NOFOLLOW` descriptor of the object at `path`, and its stat.
    fn object(&self, path: &str, what: &str) -> Result<(OwnedFd, FileStat), OpError> {
        let fd = self.resolve(path, OFlag::O_PATH | OFlag::O_NOFOLLOW, 0, what)?;
        let st = fstat(&fd).map_err(|e| OpError::errno(e, what, path))?;
        Ok((fd, st))
    }

    /// Complete attributes; a symlink itself unless `follow`.
    pub(crate) fn getattr(&self, path: &str, follow: bool) -> Result<Attr, OpError> {
        let fl = if follow {
            OFlag::O_PATH
        } else {
            OFlag::O_PATH | OFlag::O_NOFOLLOW
        };
        let fd = self.resolve(path, fl, 0, "getattr")?;
        let st = fstat(&fd).map_err(|e| OpError::errno(e, "getattr", path))?;
        Ok(to_attr(&st))
    }

    /// Complete attributes of an open file.
    pub(crate) fn fgetattr(f: &File) -> Result<Attr, OpError> {
        let st = fstat(f).map_err(|e| OpError::errno(e, "fgetattr", ""))?;
        Ok(to_attr(&st))
    }

    /// Applies `a` to the object at `a.path`, or to `file` when one is given.
    pub(crate) fn setattr(&self, a: &SetattrReq, file: Option<&File>) -> Result<Attr, OpError> {
        self.refuse_if_read_only("setattr")?;
        let p = a.path.as_str();
        let (obj, st) = self.object(p, "setattr")?;
        let is_link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if a.valid & SetattrReq::SET_SIZE != 0 {
            match file {
                Some(f) => f.set_len(a.size).map_err(|e| io_err(e, "truncate", p))?,
                None => {
                    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                        return Err(OpError::errno(Errno::EINVAL, "truncate", p));
                    }
                    let fd = self.resolve(
                        p,
                        OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
                        0,
                        "truncate",
                    )?;
                    File::from(fd)
                        .set_len(a.size)
                        .map_err(|e| io_err(e, "truncate", p))?;
                }
            }
        }
        if a.valid & (SetattrReq::SET_UID | SetattrReq::SET_GID) != 0 {
            let uid =
                (a.valid & SetattrReq::SET_UID != 0).then(|| nix::unistd::Uid::from_raw(a.uid));
            let gid =
                (a.valid & SetattrReq::SET_GID != 0).then(|| nix::unistd::Gid::from_raw(a.gid));
            nix::unistd::fchownat(&obj, "", uid, gid, nix::fcntl::AtFlags::AT_EMPTY_PATH)
                .map_err(|e| OpError::errno(e, "chown", p))?;
        }
        if a.valid & SetattrReq::SET_MODE != 0 {
            if is_link {
                return Err(OpError::errno(Errno::EOPNOTSUPP, "chmod (a symlink)", p));
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                proc_path(&obj),
                std::fs::Permissions::from_mode(a.mode & 0o7777),
            )
            .map_err(|e| io_err(e, "chmod", p))?;
        }
        let times = SetattrReq::SET_ATIME
            | SetattrReq::SET_ATIME_NOW
            | SetattrReq::SET_MTIME
            | SetattrReq::SET_MTIME_NOW;
        if a.valid & times != 0 {
            let t = |set: u32, now: u32, ns: i64| {
                if a.valid & now != 0 {
                    TimeSpec::UTIME_NOW
                } else if a.valid & set != 0 {
                    timespec(ns)
                } else {
                    TimeSpec::UTIME_OMIT
                }
            };
            let at = t(SetattrReq::SET_ATIME, SetattrReq::SET_ATIME_NOW, a.atime_ns);
            let mt = t(SetattrReq::SET_MTIME, SetattrReq::SET_MTIME_NOW, a.mtime_ns);
            if is_link {
                let (dir, name) = self.parent(p, "utimens")?;
                utimensat(
                    &dir,
                    name.as_str(),
                    &at,
                    &mt,
                    UtimensatFlags::NoFollowSymlink,
                )
            } else {
                utimensat(
                    nix::fcntl::AT_FDCWD,
                    proc_path(&obj).as_str(),
                    &at,
                    &mt,
                    UtimensatFlags::FollowSymlink,
                )
            }
            .map_err(|e| OpError::errno(e, "utimens", p))?;
        }
        match file {
            Some(f) => Export::fgetattr(f),
            None => {
                let st = fstat(&obj).map_err(|e| OpError::errno(e, "setattr", p))?;
                Ok(to_attr(&st))
            }
        }
    }

    /// Renames with `renameat2` (flags: [`crate::proto::RENAME_NOREPLACE`] or
    /// [`crate::proto::RENAME_EXCHANGE`]).
    pub(crate) fn rename(&self, from: &str, to: &str, flags: u32) -> Result<(), OpError> {
        self.refuse_if_read_only("rename")?;
        let (fd, fname) = self.parent(from, "rename")?;
        let (td, tname) = self.parent(to, "rename")?;
        let mut rf = nix::fcntl::RenameFlags::empty();
        if flags & crate::proto::RENAME_NOREPLACE != 0 {
            rf |= nix::fcntl::RenameFlags::RENAME_NOREPLACE;
        }
        if flags & crate::proto::RENAME_EXCHANGE != 0 {
            rf |= nix::fcntl::RenameFlags::RENAME_EXCHANGE;
        }
        nix::fcntl::renameat2(&fd, fname.as_str(), &td, tname.as_str(), rf)
            .map_err(|e| OpError::errno(e, "rename", from))
    }

    /// Removes an empty directory.
    pub(crate) fn rmdir(&self, path: &str) -> Result<(), OpError> {
        self.refuse_if_read_only("rmdir")?;
        let (dir, name) = self.parent(path, "rmdir")?;
        unlinkat(&dir, name.as_str(), UnlinkatFlags::RemoveDir)
            .map_err(|e| OpError::errno(e, "rmdir", path))
    }

    /// Creates a symlink whose content is `target`, as written; following it later goes
    /// through `resolve`, which refuses to leave the export.
    pub(crate) fn symlink(&self, target: &str, path: &str) -> Result<(), OpError> {
        self.refuse_if_read_only("symlink")?;
        let (dir, name) = self.parent(path, "symlink")?;
        nix::unistd::symlinkat(target, &dir, name.as_str())
            .map_err(|e| OpError::errno(e, "symlink", path))
    }

    /// A symlink's target, as written.
    pub(crate) fn readlink(&self, path: &str) -> Result<String, OpError> {
        let (dir, name) = self.parent(path, "readlink")?;
        let t = nix::fcntl::readlinkat(&dir, name.as_str())
            .map_err(|e| OpError::errno(e, "readlink", path))?;
        let t = t
            .into_string()
            .map_err(|_| OpError::errno(Errno::EILSEQ, "readlink (target is not UTF-8)", path))?;
        if t.len() > crate::proto::MAX_TARGET {
            return Err(OpError::errno(Errno::ENAMETOOLONG, "readlink", path));
        }
        Ok(t)
    }

    /// A hard link `to` for `from` (never following a symlink at `from`).
    pub(crate) fn link(&self, from: &str, to: &str) -> Result<(), OpError> {
        self.refuse_if_read_only("link")?;
        let (fd, fname) = self.parent(from, "link")?;
        let (td, tname) = self.parent(to, "link")?;
        nix::unistd::linkat(
            &fd,
            fname.as_str(),
            &td,
            tname.as_str(),
            nix::fcntl::AtFlags::empty(),
        )
        .map_err(|e| OpError::errno(e, "link", to))
    }

    /// `statvfs` of the export.
    pub(crate) fn statfs(&self) -> Result<StatfsReply, OpError> {
        let s =
            nix::sys::statvfs::fstatvfs(&self.root).map_err(|e| OpError::errno(e, "statfs", ""))?;
        Ok(StatfsReply {
            blocks: s.blocks(),
            bfree: s.blocks_free(),
            bavail: s.blocks_available(),
            files: s.files(),
            ffree: s.files_free(),
            bsize: s.block_size() as u32,
            namelen: s.name_max() as u32,
            frsize: s.fragment_size() as u32,
        })
    }

    /// `fallocate(2)` on an open file.
    pub(crate) fn fallocate(
        &self,
        f: &File,
        mode: u32,
        offset: u64,
        len: u64,
    ) -> Result<(), OpError> {
        self.refuse_if_read_only("fallocate")?;
        let fl = nix::fcntl::FallocateFlags::from_bits(mode as i32).ok_or_else(|| {
            OpError::errno(Errno::EOPNOTSUPP, "fallocate (unknown mode bits)", "")
        })?;
        let off =
            i64::try_from(offset).map_err(|_| OpError::errno(Errno::EINVAL, "fallocate", ""))?;
        let len = i64::try_from(len).map_err(|_| OpError::errno(Errno::EINVAL, "fallocate", ""))?;
        nix::fcntl::fallocate(f, fl, off, len).map_err(|e| OpError::errno(e, "fallocate", ""))
    }

    /// The object for an extended attribute call: user namespace only, never a symlink.
    fn xattr_object(&self, path: &str, name: Option<&str>, what: &str) -> Result<OwnedFd, OpError> {
        if let Some(n) = name {
            if !n.starts_with("user.") || n.len() <= 5 {
                return Err(OpError::errno(
                    Errno::EOPNOTSUPP,
                    &format!("{what} {n:?} (only user.* attributes are served)"),
                    path,
                ));
            }
        }
        let (fd, st) = self.object(path, what)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(OpError::errno(
                Errno::EPERM,
                &format!("{what} (a symlink)"),
                path,
            ));
        }
        Ok(fd)
    }

    pub(crate) fn setxattr(
        &self,
        path: &str,
        name: &str,
        value: &[u8],
        flags: u32,
    ) -> Result<(), OpError> {
        self.refuse_if_read_only("setxattr")?;
        let fd = self.xattr_object(path, Some(name), "setxattr")?;
        let fl = match flags {
            1 => rustix::fs::XattrFlags::CREATE,
            2 => rustix::fs::XattrFlags::REPLACE,
            _ => rustix::fs::XattrFlags::empty(),
        };
        rustix::fs::setxattr(proc_path(&fd).as_str(), name, value, fl)
            .map_err(|e| io_err(e.into(), "setxattr", path))
    }

    /// The value of `name`, or (when it does not fit in `cap` bytes) the size it needs.
    pub(crate) fn getxattr(
        &self,
        path: &str,
        name: &str,
        cap: usize,
    ) -> Result<std::result::Result<Vec<u8>, usize>, OpError> {
        let fd = self.xattr_object(path, Some(name), "getxattr")?;
        let pp = proc_path(&fd);
        let n = rustix::fs::getxattr_query(pp.as_str(), name)
            .map_err(|e| io_err(e.into(), "getxattr", path))?;
        if n > cap {
            return Ok(Err(n));
        }
        let mut v = vec![0u8; n.min(crate::proto::MAX_XATTR_VALUE)];
        let got = rustix::fs::getxattr(pp.as_str(), name, &mut v[..])
            .map_err(|e| io_err(e.into(), "getxattr", path))?;
        v.truncate(got);
        Ok(Ok(v))
    }

    /// The `user.*` attribute names, each NUL-terminated.
    pub(crate) fn listxattr(&self, path: &str) -> Result<Vec<u8>, OpError> {
        let fd = self.xattr_object(path, None, "listxattr")?;
        let pp = proc_path(&fd);
        let mut v = vec![0u8; crate::proto::MAX_XATTR_VALUE];
        let got = rustix::fs::listxattr(pp.as_str(), &mut v[..])
            .map_err(|e| io_err(e.into(), "listxattr", path))?;
        v.truncate(got);
        let mut out = Vec::with_capacity(v.len());
        for n in v.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
            out.extend_from_slice(n);
            out.push(0);
        }
        Ok(out)
    }

    pub(crate) fn removexattr(&self, path: &str, name: &str) -> Result<(), OpError> {
        self.refuse_if_read_only("removexattr")?;
        let fd = self.xattr_object(path, Some(name), "removexattr")?;
        rustix::fs::removexattr(proc_path(&fd).as_str(), name)
            .map_err(|e| io_err(e.into(), "removexattr", path))
    }

    /// Opens a directory stream.
    pub(crate) fn opendir(&self, path: &str) -> Result<DirStream, OpError> {
        let fd = self.resolve(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0, "opendir")?;
        let again = fd.try_clone().map_err(|e| io_err(e, "opendir", path))?;
        let dir = nix::dir::Dir::from_fd(fd).map_err(|e| OpError::errno(e, "opendir", path))?;
        Ok(DirStream {
            path: path.to_string(),
            iter: dir.into_iter(),
            fd: again,
            pos: 0,
            held: None,
        })
    }

    /// The next entries of `ds` from `cookie`, as many as fit in `budget` encoded bytes;
    /// returns them and whether the stream is done. A cookie other than the stream's
    /// position reopens the directory and skips to it.
    pub(crate) fn readdir(
        &self,
        ds: &mut DirStream,
        cookie: u64,
        budget: usize,
    ) -> Result<(Vec<DirStreamEntry>, bool), OpError> {
        self.stream(ds, cookie, budget, |_, e| e, crate::proto::dir_entry_len)
    }

    /// [`Export::readdir`] with each entry's attributes (`fstatat` beneath the directory,
    /// not following a symlink: one component, so it cannot leave the export). An entry
    /// that cannot be stat'ed (removed meanwhile, no search permission) is listed without
    /// attributes.
    pub(crate) fn readdirplus(
        &self,
        ds: &mut DirStream,
        cookie: u64,
        budget: usize,
    ) -> Result<(Vec<DirPlusEntry>, bool), OpError> {
        self.stream(
            ds,
            cookie,
            budget,
            |fd, entry| {
                let attr = fstatat(
                    fd,
                    entry.name.as_str(),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .ok()
                .map(|st| to_attr(&st));
                DirPlusEntry { entry, attr }
            },
            crate::proto::dir_plus_entry_len,
        )
    }

    /// The next entries of a stream from `cookie`, each made into a `T` by `make` and
    /// as many as fit in `budget` bytes by `len`.
    fn stream<T>(
        &self,
        ds: &mut DirStream,
        cookie: u64,
        budget: usize,
        make: impl Fn(&OwnedFd, DirStreamEntry) -> T,
        len: impl Fn(&T) -> usize,
    ) -> Result<(Vec<T>, bool), OpError> {
        if cookie != ds.pos {
            let path = ds.path.clone();
            *ds = self.opendir(&path)?;
            while ds.pos < cookie {
                if next_entry(ds)?.is_none() {
                    break;
                }
                ds.pos += 1;
            }
        }
        let mut out = Vec::new();
        let mut used = 0;
        loop {
            let e = match ds.held.take() {
                Some(e) => e,
                None => match next_entry(ds)? {
                    Some(e) => e,
                    None => return Ok((out, true)),
                },
            };
            let t = make(&ds.fd, e.clone());
            let n = len(&t);
            if used + n > budget {
                if out.is_empty() {
                    return Err(OpError::new(
                        Status::Limit as u32,
                        "readdir: reply buffer too small for one entry",
                    ));
                }
                ds.held = Some(e);
                return Ok((out, false));
            }
            used += n;
            ds.pos += 1;
            out.push(t);
        }
    }
}

/// The next entry of a stream, skipping `.`, `..` and names that are not UTF-8.
fn next_entry(ds: &mut DirStream) -> Result<Option<DirStreamEntry>, OpError> {
    for ent in ds.iter.by_ref() {
        let ent = ent.map_err(|e| OpError::errno(e, "readdir", &ds.path))?;
        let Ok(name) = ent.file_name().to_str() else {
            continue;
        };
        if name == "." || name == ".." || name.len() > 255 {
            continue;
        }
        use nix::dir::Type;
        let kind = match ent.file_type() {
            Some(Type::Fifo) => 1,
            Some(Type::CharacterDevice) => 2,
            Some(Type::Directory) => 4,
            Some(Type::BlockDevice) => 6,
            Some(Type::File) => 8,
            Some(Type::Symlink) => 10,
            Some(Type::Socket) => 12,
            None => 0,
        };
        return Ok(Some(DirStreamEntry {
            ino: ent.ino(),
            kind,
            name: name.to_string(),
        }));
    }
    Ok(None)
}
