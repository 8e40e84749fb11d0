//! Client calls for the operations a mounted file system needs (issue 13): complete
//! attributes, setattr, rename, rmdir, symlinks, hard links, statfs, fallocate, fdatasync,
//! user extended attributes and directory streams. Each is one request.

use super::{check_path, Client, File};
use crate::error::{Error, Result};
use crate::proto::{
    self, Attr, DirPlusEntry, DirStreamEntry, Req, Resp, SetattrReq, StatfsReply, MAX_TARGET,
    MAX_XATTR_VALUE,
};
use crate::transport::{RecvSeg, SendSeg};

fn unexpected<T>(what: &'static str, r: Resp) -> Result<T> {
    Err(Error::decode(what, format!("{r:?}")))
}

impl Client {
    /// Sends `req` (no payload), reconnecting and sending it again when the connection is
    /// lost if it is `idempotent` (see [`Client::retrying`]).
    fn call_again(&self, idempotent: bool, req: &Req) -> Result<Resp> {
        self.retrying(req.name(), idempotent, || self.call_simple(req))
    }

    fn call_ok(&self, idempotent: bool, req: &Req) -> Result<()> {
        self.call_again(idempotent, req).map(drop)
    }

    /// Complete attributes of `path` (a symlink itself unless `follow`).
    pub fn getattr(&self, path: &str, follow: bool) -> Result<Attr> {
        check_path(path)?;
        match self.call_again(
            true,
            &Req::Getattr {
                path: path.into(),
                follow,
            },
        )? {
            Resp::Attr(a) => Ok(a),
            r => unexpected("getattr reply", r),
        }
    }

    /// Changes attributes (the `SET_*` bits of `a.valid` say which); returns the new ones.
    pub fn setattr(&self, a: &SetattrReq) -> Result<Attr> {
        check_path(&a.path)?;
        // Setting values again is harmless ("now" becomes a later now).
        match self.call_again(true, &Req::Setattr(a.clone()))? {
            Resp::Attr(a) => Ok(a),
            r => unexpected("setattr reply", r),
        }
    }

    /// Creates a directory with the given permission bits.
    pub fn mkdir_mode(&self, path: &str, mode: u32) -> Result<()> {
        check_path(path)?;
        self.call_ok(
            false,
            &Req::Mkdir {
                path: path.into(),
                mode: mode & 0o7777,
            },
        )
    }

    /// Renames `from` to `to`; `flags` is 0, [`proto::RENAME_NOREPLACE`] or
    /// [`proto::RENAME_EXCHANGE`].
    pub fn rename(&self, from: &str, to: &str, flags: u32) -> Result<()> {
        check_two(from, to)?;
        self.call_ok(
            false,
            &Req::Rename {
                from: from.into(),
                to: to.into(),
                flags,
            },
        )
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, path: &str) -> Result<()> {
        check_path(path)?;
        self.call_ok(false, &Req::Rmdir { path: path.into() })
    }

    /// Creates a symlink at `path` with content `target` (stored as written).
    pub fn symlink(&self, target: &str, path: &str) -> Result<()> {
        if target.is_empty() || target.len() > MAX_TARGET || target.contains('\0') {
            return Err(Error::InvalidArgument(format!(
                "a symlink target must be 1 to {MAX_TARGET} bytes without NUL"
            )));
        }
        check_two(target, path)?;
        self.call_ok(
            false,
            &Req::Symlink {
                target: target.into(),
                path: path.into(),
            },
        )
    }

    /// A symlink's target, as written.
    pub fn readlink(&self, path: &str) -> Result<String> {
        check_path(path)?;
        match self.call_again(true, &Req::Readlink { path: path.into() })? {
            Resp::Target(t) => Ok(t),
            r => unexpected("readlink reply", r),
        }
    }

    /// Creates the hard link `to` for `from`.
    pub fn link(&self, from: &str, to: &str) -> Result<()> {
        check_two(from, to)?;
        self.call_ok(
            false,
            &Req::Link {
                from: from.into(),
                to: to.into(),
            },
        )
    }

    /// File system statistics of the export.
    pub fn statfs(&self) -> Result<StatfsReply> {
        match self.call_again(true, &Req::Statfs)? {
            Resp::Statfs(s) => Ok(s),
            r => unexpected("statfs reply", r),
        }
    }

    /// Sets a `user.*` extended attribute (`flags`: 0, 1 = create only, 2 = replace only).
    pub fn setxattr(&self, path: &str, name: &str, value: &[u8], flags: u32) -> Result<()> {
        check_path(path)?;
        check_xattr_name(name)?;
        if value.len() > MAX_XATTR_VALUE {
            return Err(Error::InvalidArgument(format!(
                "extended attribute values are at most {MAX_XATTR_VALUE} bytes"
            )));
        }
        let req = Req::Setxattr {
            path: path.into(),
            name: name.into(),
            flags,
        };
        // Setting a value again is harmless; creating or replacing only may not be.
        self.retrying("setxattr", flags == 0, || {
            // A copy (values are small and this is no data path) the request owns: no
            // borrowed view of `value`, so no `unsafe` here.
            let send = if value.is_empty() {
                Vec::new()
            } else {
                vec![SendSeg::Owned(value.to_vec())]
            };
            let reply = self.start(&req, send, Vec::new())?.wait()?;
            proto::decode_reply(&req, &reply.header).map(drop)
        })
    }

    fn xattr_call(&self, req: Req, cap: usize) -> Result<std::result::Result<Vec<u8>, usize>> {
        self.retrying(req.name(), true, || self.xattr_once(&req, cap))
    }

    fn xattr_once(&self, req: &Req, cap: usize) -> Result<std::result::Result<Vec<u8>, usize>> {
        let recv = if cap > 0 {
            vec![RecvSeg::Pool(
                self.inner.pool.get(cap.min(MAX_XATTR_VALUE))?,
            )]
        } else {
            Vec::new()
        };
        let reply = self.start(req, Vec::new(), recv)?.wait()?;
        match proto::decode_reply(req, &reply.header)? {
            Resp::Xattr { len, fits: false } => Ok(Err(len as usize)),
            Resp::Xattr { len, fits: true } => {
                if len == 0 {
                    return Ok(Ok(Vec::new()));
                }
                let Some(RecvSeg::Pool(b)) = reply.recv.into_iter().next() else {
                    return Err(Error::decode("xattr reply", "receive buffer not returned"));
                };
                let n = len as usize;
                if n != reply.payload_len || n > b.len() {
                    return Err(Error::decode(
                        "xattr reply",
                        format!("header says {n} bytes, payload has {}", reply.payload_len),
                    ));
                }
                Ok(Ok(b[..n].to_vec()))
            }
            r => unexpected("xattr reply", r),
        }
    }

    /// A `user.*` extended attribute's value, if it fits in `cap` bytes; otherwise
    /// `Err(size needed)` (`cap` 0 asks for the size only).
    pub fn getxattr(
        &self,
        path: &str,
        name: &str,
        cap: usize,
    ) -> Result<std::result::Result<Vec<u8>, usize>> {
        check_path(path)?;
        check_xattr_name(name)?;
        self.xattr_call(
            Req::Getxattr {
                path: path.into(),
                name: name.into(),
            },
            cap,
        )
    }

    /// The `user.*` attribute names of `path`, each NUL-terminated, if they fit in `cap`
    /// bytes; otherwise `Err(size needed)`.
    pub fn listxattr(&self, path: &str, cap: usize) -> Result<std::result::Result<Vec<u8>, usize>> {
        check_path(path)?;
        self.xattr_call(Req::Listxattr { path: path.into() }, cap)
    }

    /// Removes a `user.*` extended attribute.
    pub fn removexattr(&self, path: &str, name: &str) -> Result<()> {
        check_path(path)?;
        check_xattr_name(name)?;
        self.call_ok(
            false,
            &Req::Removexattr {
                path: path.into(),
                name: name.into(),
            },
        )
    }

    /// Opens a directory stream; read it with [`Client::readdir`], close it with
    /// [`Client::releasedir`].
    pub fn opendir(&self, path: &str) -> Result<u64> {
        check_path(path)?;
        self.opendir_once(path)
    }

    fn opendir_once(&self, path: &str) -> Result<u64> {
        match self.call_simple(&Req::Opendir { path: path.into() })? {
            Resp::Open { fh, .. } => Ok(fh),
            r => unexpected("opendir reply", r),
        }
    }

    /// The next entries of a directory stream from `cookie` (entries seen so far), in one
    /// reply of up to `max_bytes`: the entries, the next cookie, and whether it is done.
    pub fn readdir(
        &self,
        dh: u64,
        cookie: u64,
        max_bytes: usize,
    ) -> Result<(Vec<DirStreamEntry>, u64, bool)> {
        let req = Req::Readdir { dh, cookie };
        let (payload, count, next, done) = self.dir_page(&req, max_bytes, "readdir reply")?;
        Ok((proto::decode_dir_entries(&payload[..], count)?, next, done))
    }

    /// [`Client::readdir`] with each entry's attributes ([`Req::Readdirplus`]): a listing
    /// that needs them costs a few requests instead of one per entry.
    pub fn readdirplus(
        &self,
        dh: u64,
        cookie: u64,
        max_bytes: usize,
    ) -> Result<(Vec<DirPlusEntry>, u64, bool)> {
        let req = Req::Readdirplus { dh, cookie };
        let (payload, count, next, done) =
            self.dir_page(&req, max_bytes, "directory page reply")?;
        Ok((
            proto::decode_dir_plus_entries(&payload[..], count)?,
            next,
            done,
        ))
    }

    /// Sends a directory page request (`List`, `Readdir` or `Readdirplus`) for up to
    /// `max_bytes` (4 KiB at least, unless the negotiated payload limit is less) and returns
    /// its payload, count, next cookie and whether the listing is done; `what` names the
    /// reply in errors.
    pub(super) fn dir_page(
        &self,
        req: &Req,
        max_bytes: usize,
        what: &'static str,
    ) -> Result<(crate::pool::Iobuf, u32, u64, bool)> {
        let size = max_bytes
            .max(4096)
            .min(self.inner.link.limits().max_payload);
        let buf = self.inner.pool.get(size)?;
        let reply = self
            .start(req, Vec::new(), vec![RecvSeg::Pool(buf)])?
            .wait()?;
        let (count, next, done) = match proto::decode_reply(req, &reply.header)? {
            Resp::List {
                count,
                next_cookie,
                done,
            } => (count, next_cookie, done),
            r => return unexpected(what, r),
        };
        let Some(RecvSeg::Pool(mut b)) = reply.recv.into_iter().next() else {
            return Err(Error::decode(what, "receive buffer not returned"));
        };
        let n = reply.payload_len.min(b.len());
        b.set_len(n);
        Ok((b.freeze(), count, next, done))
    }

    /// Every entry of the directory at `path` with its attributes, through one stream
    /// (opendir, readdirplus pages of up to 256 KiB, releasedir). Safe to repeat, so it is
    /// retried as a whole after a reconnect (a directory handle does not survive one).
    pub fn read_dir_plus(&self, path: &str) -> Result<Vec<DirPlusEntry>> {
        check_path(path)?;
        self.retrying("readdirplus", true, || {
            let gen = self.inner.link.gen();
            let dh = self.opendir_once(path)?;
            let out = Self::all_pages(|cookie| self.readdirplus(dh, cookie, 256 << 10))?;
            if self.inner.link.gen() != gen {
                // Reconnected meanwhile (another caller noticed): `dh` named a stream on
                // the old connection, so the pages may not be ours. Read it again.
                return Err(Error::ConnectionClosed(
                    "reconnected while reading a directory".into(),
                ));
            }
            // A close that fails leaves a stream open on the server until the connection
            // ends; the listing itself is complete.
            let _ = self.releasedir(dh);
            Ok(out)
        })
    }

    /// Every page of one directory stream, from cookie 0 until a page says it is the last
    /// (or the cookie stops advancing).
    fn all_pages<T>(mut page: impl FnMut(u64) -> Result<(Vec<T>, u64, bool)>) -> Result<Vec<T>> {
        let mut out = Vec::new();
        let mut cookie = 0;
        loop {
            let (es, next, done) = page(cookie)?;
            out.extend(es);
            if done || next <= cookie {
                return Ok(out);
            }
            cookie = next;
        }
    }

    /// Closes a directory stream.
    pub fn releasedir(&self, dh: u64) -> Result<()> {
        self.call_ok(false, &Req::Releasedir { dh })
    }

    /// Every entry of a directory, through one stream (O(entries) on the server).
    pub fn read_dir(&self, path: &str) -> Result<Vec<DirStreamEntry>> {
        let dh = self.opendir(path)?;
        let r = Self::all_pages(|cookie| self.readdir(dh, cookie, 256 << 10));
        let closed = self.releasedir(dh);
        r.and_then(|out| closed.map(|()| out))
    }
}

impl File {
    /// Complete attributes of the open file.
    pub fn getattr(&self) -> Result<Attr> {
        self.client.retrying("fgetattr", true, || {
            match self.client.call_simple(&Req::Fgetattr {
                fh: self.state.fh()?,
            })? {
                Resp::Attr(a) => Ok(a),
                r => unexpected("fgetattr reply", r),
            }
        })
    }

    /// Changes attributes through this handle (`a.path` is ignored; truncation needs the
    /// file open for writing).
    pub fn setattr(&self, a: &SetattrReq) -> Result<Attr> {
        let mut a = a.clone();
        self.client.retrying("setattr", true, || {
            a.fh = self.state.fh()?;
            match self.client.call_simple(&Req::Setattr(a.clone()))? {
                Resp::Attr(a) => Ok(a),
                r => unexpected("setattr reply", r),
            }
        })
    }

    /// Flushes the file's data (and only the metadata needed to read it back).
    pub fn fdatasync(&self) -> Result<()> {
        self.client.retrying("fdatasync", true, || {
            self.client
                .call_simple(&Req::Fsync {
                    fh: self.state.fh()?,
                    datasync: true,
                })
                .map(drop)
        })
    }

    /// `fallocate(2)` on the file (mode 0 allocates; FALLOC_FL_* bits as the server's
    /// file system allows).
    pub fn fallocate(&self, mode: u32, offset: u64, len: u64) -> Result<()> {
        // Allocating, punching or zeroing the same range again ends the same.
        self.client.retrying("fallocate", true, || {
            self.client
                .call_simple(&Req::Fallocate {
                    fh: self.state.fh()?,
                    mode,
                    offset,
                    len,
                })
                .map(drop)
        })
    }
}

fn check_two(a: &str, b: &str) -> Result<()> {
    check_path(a)?;
    check_path(b)?;
    // Both travel in one header.
    if a.len() + b.len() > crate::transport::MAX_HEADER - 64 {
        return Err(Error::InvalidArgument(format!(
            "the two paths together must be under {} bytes",
            crate::transport::MAX_HEADER - 64
        )));
    }
    Ok(())
}

fn check_xattr_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > proto::MAX_XATTR_NAME || name.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "extended attribute names are 1 to {} bytes without NUL",
            proto::MAX_XATTR_NAME
        )));
    }
    Ok(())
}
