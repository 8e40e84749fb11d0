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
