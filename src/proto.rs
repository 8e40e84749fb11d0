//! The file protocol: requests and replies carried as opaque headers by any transport.
//!
//! Pure encoding and decoding, no I/O, no `unsafe`: every decoder treats its input as
//! hostile (bounds-checked reads, lengths checked before any allocation, unknown ops and
//! trailing bytes refused), and the fuzz targets call them directly.
//!
//! Request header: `op u8, reserved [u8; 3]`, then the op's fields. Reply header:
//! `status u32` (0 = OK, otherwise an errno value or a [`Status`] code), then the op's
//! fields on success or a UTF-8 message (`u16` length + bytes) on failure. Integers are
//! little-endian; strings are `u16` length + UTF-8 bytes. Bulk data (read and write
//! payload, directory listings) travels as transport payload, never in headers.

use crate::error::{Error, Result};

/// Protocol version spoken by this build.
pub const VERSION: u16 = 1;
/// Longest path accepted.
pub const MAX_PATH: usize = 4096;
/// Length of the hello nonces.
pub const NONCE_LEN: usize = 16;
/// Length of an authentication MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;

/// Non-errno status codes (above the errno range).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// The request could not be decoded.
    BadRequest = 10_001,
    /// Authentication is required first, or failed.
    AuthRequired = 10_002,
    /// The export is read-only.
    ReadOnly = 10_003,
    /// A path leads outside the export.
    OutsideExport = 10_004,
    /// Unknown file handle.
    BadHandle = 10_005,
    /// A limit was exceeded.
    Limit = 10_006,
    /// The server is out of buffers or other resources.
    Busy = 10_007,
    /// The server is shutting down and did not execute the request: reconnect (to it once
    /// it is back, or to another) and send it again. Safe to retry whatever the request.
    ShuttingDown = 10_008,
}

/// Open flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenFlags(pub u32);

impl OpenFlags {
    /// Open for reading.
    pub const READ: OpenFlags = OpenFlags(1);
    /// Open for writing.
    pub const WRITE: OpenFlags = OpenFlags(2);
    /// Create if missing.
    pub const CREATE: OpenFlags = OpenFlags(4);
    /// Truncate to zero on open.
    pub const TRUNCATE: OpenFlags = OpenFlags(8);
    /// O_DIRECT (page-aligned buffers, offsets and lengths).
    pub const DIRECT: OpenFlags = OpenFlags(16);
    /// Fail if it exists (with CREATE).
    pub const EXCL: OpenFlags = OpenFlags(32);
    /// O_APPEND: every write goes to the end of the file.
    pub const APPEND: OpenFlags = OpenFlags(64);
    /// All defined bits.
    pub const ALL: u32 = 127;

    /// True if every bit of `o` is set.
    pub fn contains(self, o: OpenFlags) -> bool {
        self.0 & o.0 == o.0
    }
    /// Read + write.
    pub fn rw() -> OpenFlags {
        OpenFlags::READ | OpenFlags::WRITE
    }
}

impl std::ops::BitOr for OpenFlags {
    type Output = OpenFlags;
    fn bitor(self, o: OpenFlags) -> OpenFlags {
        OpenFlags(self.0 | o.0)
    }
}

/// A request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Req {
    /// First message: version and the client's nonce.
    Hello {
        /// Client's protocol version.
        version: u16,
        /// Random bytes for the challenge.
        client_nonce: [u8; NONCE_LEN],
    },
    /// Proof of the shared token.
    Auth {
        /// HMAC-SHA256 over both nonces, keyed by the token.
        mac: [u8; MAC_LEN],
    },
    /// Open (or create) a file.
    Open {
        /// Path relative to the export.
        path: String,
        /// Flags.
        flags: OpenFlags,
        /// Permission bits for a created file (masked to 0o777 when decoded: no setuid,
        /// setgid or sticky bit; the server also clears its umask).
        mode: u32,
    },
    /// Read `len` bytes at `offset`; the data comes back as reply payload.
    Read {
        /// File handle.
        fh: u64,
        /// Offset.
        offset: u64,
        /// Bytes wanted.
        len: u32,
    },
    /// Write the request payload at `offset`.
    Write {
        /// File handle.
        fh: u64,
        /// Offset.
        offset: u64,
    },
    /// Flush to stable storage.
    Fsync {
        /// File handle.
        fh: u64,
        /// Data only (fdatasync).
        datasync: bool,
    },
    /// Stat a path.
    Stat {
        /// Path relative to the export ("" or "." for the export itself).
        path: String,
    },
    /// Stat an open file.
    Fstat {
        /// File handle.
        fh: u64,
    },
    /// Set an open file's length.
    Truncate {
        /// File handle.
        fh: u64,
        /// New length.
        len: u64,
    },
    /// Close a file handle.
    Close {
        /// File handle.
        fh: u64,
    },
    /// Remove a file.
    Unlink {
        /// Path.
        path: String,
    },
    /// List a directory; entries come back as reply payload.
    List {
        /// Directory path.
        path: String,
        /// Index of the first entry wanted (0 to start).
        cookie: u64,
    },
    /// Create a directory.
    Mkdir {
        /// Path.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// Complete attributes of a path ([`Attr`]); a symlink itself unless `follow`.
    Getattr {
        /// Path.
        path: String,
        /// Follow a symlink in the last component (staying inside the export).
        follow: bool,
    },
    /// Complete attributes of an open file.
    Fgetattr {
        /// File handle.
        fh: u64,
    },
    /// Change attributes; answered with the new [`Attr`].
    Setattr(SetattrReq),
    /// Rename `from` to `to` ([`RENAME_NOREPLACE`], [`RENAME_EXCHANGE`]).
    Rename {
        /// Old path.
        from: String,
        /// New path.
        to: String,
        /// Rename flags.
        flags: u32,
    },
    /// Remove an empty directory.
    Rmdir {
        /// Path.
        path: String,
    },
    /// Create a symlink at `path` whose target is `target`, stored as written.
    Symlink {
        /// The link's content (at most [`MAX_TARGET`] bytes).
        target: String,
        /// Where the link goes.
        path: String,
    },
    /// A symlink's target, as written.
    Readlink {
        /// Path of the link.
        path: String,
    },
    /// Create a hard link `to` for the file at `from`.
    Link {
        /// Existing file.
        from: String,
        /// New name.
        to: String,
    },
    /// File system statistics of the export.
    Statfs,
    /// Preallocate or punch (`fallocate(2)` mode bits) in an open file.
    Fallocate {
        /// File handle.
        fh: u64,
        /// `fallocate(2)` mode: 0, or FALLOC_FL_KEEP_SIZE / PUNCH_HOLE / ZERO_RANGE.
        mode: u32,
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Set an extended attribute (user namespace only); the value is the request payload.
    Setxattr {
        /// Path.
        path: String,
        /// Name, `user.` prefix included.
        name: String,
        /// 0, XATTR_CREATE (1) or XATTR_REPLACE (2).
        flags: u32,
    },
    /// Read an extended attribute; the value comes back as reply payload ([`Resp::Xattr`]).
    Getxattr {
        /// Path.
        path: String,
        /// Name.
        name: String,
    },
    /// List extended attribute names (NUL-terminated, in the reply payload).
    Listxattr {
        /// Path.
        path: String,
    },
    /// Remove an extended attribute.
    Removexattr {
        /// Path.
        path: String,
        /// Name.
        name: String,
    },
    /// Open a directory stream; answered with [`Resp::Open`] (its handle; size 0).
    Opendir {
        /// Directory path.
        path: String,
    },
    /// Next entries of a directory stream ([`Resp::List`]; entries as [`decode_dir_entries`]
    /// payload). A cookie equal to the stream's position continues it, so a whole
    /// directory costs O(entries); any other cookie restarts the stream and skips.
    Readdir {
        /// Directory handle from [`Req::Opendir`].
        dh: u64,
        /// Entries already seen (0 to start).
        cookie: u64,
    },
    /// Close a directory stream.
    Releasedir {
        /// Directory handle.
        dh: u64,
    },
    /// Next entries of a directory stream with their attributes ([`Resp::List`]; entries
    /// as [`decode_dir_plus_entries`] payload), so a listing that needs every entry's
    /// attributes (`ls -l`, FUSE readdirplus) costs a few requests, not one per entry.
    /// Same cookie rules as [`Req::Readdir`]; the two may not be mixed on one stream.
    Readdirplus {
        /// Directory handle from [`Req::Opendir`].
        dh: u64,
        /// Entries already seen (0 to start).
        cookie: u64,
    },
}

/// Longest symlink target accepted (it travels in a header).
pub const MAX_TARGET: usize = 3072;
/// Longest extended attribute name.
pub const MAX_XATTR_NAME: usize = 255;
/// Largest extended attribute value (and name list), the kernel's `XATTR_SIZE_MAX`.
pub const MAX_XATTR_VALUE: usize = 65536;
/// [`Req::Rename`] flag: fail if the target exists.
pub const RENAME_NOREPLACE: u32 = 1;
/// [`Req::Rename`] flag: swap the two names atomically.
pub const RENAME_EXCHANGE: u32 = 2;

/// What [`Req::Setattr`] changes: the `SET_*` bits of `valid` say which fields count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetattrReq {
    /// Path (used when `fh` is 0).
    pub path: String,
    /// An open file to act on instead of the path (0 for none).
    pub fh: u64,
    /// Which fields to apply.
    pub valid: u32,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// New length.
    pub size: u64,
    /// Access time, ns since the epoch.
    pub atime_ns: i64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
}

impl SetattrReq {
    /// Apply `mode`.
    pub const SET_MODE: u32 = 1;
    /// Apply `uid`.
    pub const SET_UID: u32 = 2;
    /// Apply `gid`.
    pub const SET_GID: u32 = 4;
    /// Apply `size` (truncate).
    pub const SET_SIZE: u32 = 8;
    /// Apply `atime_ns`.
    pub const SET_ATIME: u32 = 16;
    /// Set the access time to now.
    pub const SET_ATIME_NOW: u32 = 32;
    /// Apply `mtime_ns`.
    pub const SET_MTIME: u32 = 64;
    /// Set the modification time to now.
    pub const SET_MTIME_NOW: u32 = 128;
    /// All defined bits.
    pub const ALL: u32 = 255;
}

/// The op number and name of every request: one table for [`Req::op`] and [`Req::name`].
macro_rules! op_table {
    ($($variant:ident = $op:literal $name:literal,)*) => {
        fn op(&self) -> u8 {
            match self {
                $(Req::$variant { .. } => $op,)*
            }
        }

        /// The operation's name, for errors and logs.
        pub fn name(&self) -> &'static str {
            match self {
                $(Req::$variant { .. } => $name,)*
            }
        }
    };
}

/// The requests whose fields go on the wire in order with no check beyond the field's own
/// (`Reader` method named after each field): one table for both directions, so an op's
/// encoder and decoder cannot disagree. Requests with cross-field checks are written out in
/// [`Req::encode_into`] and [`Req::decode`].
macro_rules! plain_requests {
    ($($op:literal => $variant:ident { $($field:ident: $get:ident),* },)*) => {
        /// Writes the fields of a request from the table; false for the others.
        fn encode_plain(&self, w: &mut Writer) -> bool {
            match self {
                $(Req::$variant { $($field),* } => {
                    $(Put::put($field, w);)*
                    true
                })*
                _ => false,
            }
        }

        /// Reads the fields of request op `op` if the table has it.
        fn decode_plain(op: u8, r: &mut Reader<'_>) -> Result<Option<Req>> {
            Ok(Some(match op {
                $($op => Req::$variant { $($field: r.$get()?),* },)*
                _ => return Ok(None),
            }))
        }
    };
}

impl Req {
    op_table! {
        Hello = 1 "hello",
        Auth = 2 "auth",
        Open = 3 "open",
        Read = 4 "read",
        Write = 5 "write",
        Fsync = 6 "fsync",
        Stat = 7 "stat",
        Fstat = 8 "fstat",
        Truncate = 9 "truncate",
        Close = 10 "close",
        Unlink = 11 "unlink",
        List = 12 "list",
        Mkdir = 13 "mkdir",
        Getattr = 20 "getattr",
        Fgetattr = 21 "fgetattr",
        Setattr = 22 "setattr",
        Rename = 23 "rename",
        Rmdir = 24 "rmdir",
        Symlink = 25 "symlink",
        Readlink = 26 "readlink",
        Link = 27 "link",
        Statfs = 28 "statfs",
        Fallocate = 29 "fallocate",
        Setxattr = 30 "setxattr",
        Getxattr = 31 "getxattr",
        Listxattr = 32 "listxattr",
        Removexattr = 33 "removexattr",
        Opendir = 34 "opendir",
        Readdir = 35 "readdir",
        Releasedir = 36 "releasedir",
        Readdirplus = 37 "readdirplus",
    }

    plain_requests! {
        1 => Hello { version: u16, client_nonce: array },
        2 => Auth { mac: array },
        4 => Read { fh: u64, offset: u64, len: u32 },
        5 => Write { fh: u64, offset: u64 },
        6 => Fsync { fh: u64, datasync: bool },
        7 => Stat { path: path },
        8 => Fstat { fh: u64 },
        9 => Truncate { fh: u64, len: u64 },
        10 => Close { fh: u64 },
        11 => Unlink { path: path },
        12 => List { path: path, cookie: u64 },
        13 => Mkdir { path: path, mode: mode },
        20 => Getattr { path: path, follow: bool },
        21 => Fgetattr { fh: u64 },
        24 => Rmdir { path: path },
        26 => Readlink { path: path },
        27 => Link { from: path, to: path },
        28 => Statfs {},
        29 => Fallocate { fh: u64, mode: u32, offset: u64, len: u64 },
        31 => Getxattr { path: path, name: xattr_name },
        32 => Listxattr { path: path },
        33 => Removexattr { path: path, name: xattr_name },
        34 => Opendir { path: path },
        35 => Readdir { dh: u64, cookie: u64 },
        36 => Releasedir { dh: u64 },
        37 => Readdirplus { dh: u64, cookie: u64 },
    }

    /// Encodes the request header.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        self.encode_into(&mut out);
        out
    }

    /// [`Req::encode`] into `out` (emptied first), for a caller that reuses its buffer.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut w = Writer(std::mem::take(out));
        w.0.clear();
        w.u8(self.op());
        w.bytes(&[0, 0, 0]);
        match self {
            Req::Open { path, flags, mode } => {
                w.str(path);
                w.u32(flags.0);
                w.u32(*mode);
            }
            Req::Setattr(a) => {
                w.str(&a.path);
                w.u64(a.fh);
                w.u32(a.valid);
                w.u32(a.mode);
                w.u32(a.uid);
                w.u32(a.gid);
                w.u64(a.size);
                w.u64(a.atime_ns as u64);
                w.u64(a.mtime_ns as u64);
            }
            Req::Rename { from, to, flags } => {
                w.str(from);
                w.str(to);
                w.u32(*flags);
            }
            Req::Symlink { target, path } => {
                w.str(target);
                w.str(path);
            }
            Req::Setxattr { path, name, flags } => {
                w.str(path);
                w.str(name);
                w.u32(*flags);
            }
            plain => {
                let known = plain.encode_plain(&mut w);
                debug_assert!(known, "{} is in neither table", plain.name());
            }
        }
        *out = w.0;
    }

    /// Decodes a request header.
    pub fn decode(b: &[u8]) -> Result<Req> {
        let mut r = Reader::new(b, "request header");
        let op = r.u8()?;
        r.bytes(3)?;
        let req = match op {
            3 => {
                let path = r.path()?;
                let flags = r.u32()?;
                if flags & !OpenFlags::ALL != 0 {
                    return Err(Error::decode(
                        "request header",
                        format!("unknown open flags {flags:#x}"),
                    ));
                }
                Req::Open {
                    path,
                    flags: OpenFlags(flags),
                    mode: r.mode()?,
                }
            }
            22 => {
                let a = SetattrReq {
                    path: r.path()?,
                    fh: r.u64()?,
                    valid: r.u32()?,
                    mode: r.u32()? & 0o7777,
                    uid: r.u32()?,
                    gid: r.u32()?,
                    size: r.u64()?,
                    atime_ns: r.u64()? as i64,
                    mtime_ns: r.u64()? as i64,
                };
                if a.valid & !SetattrReq::ALL != 0 {
                    return Err(Error::decode(
                        "request header",
                        format!("unknown setattr bits {:#x}", a.valid),
                    ));
                }
                Req::Setattr(a)
            }
            23 => {
                let (from, to, flags) = (r.path()?, r.path()?, r.u32()?);
                if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
                    || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
                {
                    return Err(Error::decode(
                        "request header",
                        format!("bad rename flags {flags:#x}"),
                    ));
                }
                Req::Rename { from, to, flags }
            }
            25 => {
                let target = r.string(MAX_TARGET)?;
                if target.is_empty() || target.contains('\0') {
                    return Err(Error::decode("request header", "bad symlink target"));
                }
                Req::Symlink {
                    target,
                    path: r.path()?,
                }
            }
            30 => Req::Setxattr {
                path: r.path()?,
                name: r.xattr_name()?,
                flags: match r.u32()? {
                    f @ 0..=2 => f,
                    f => {
                        return Err(Error::decode(
                            "request header",
                            format!("bad setxattr flags {f:#x}"),
                        ))
                    }
                },
            },
            op => match Req::decode_plain(op, &mut r)? {
                Some(req) => req,
                None => return Err(Error::decode("request header", format!("unknown op {op}"))),
            },
        };
        r.finish()?;
        Ok(req)
    }
}

/// What the server says in answer to hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    /// Server's protocol version.
    pub version: u16,
    /// Random bytes for the challenge.
    pub server_nonce: [u8; NONCE_LEN],
    /// True if `Auth` must follow.
    pub auth_required: bool,
    /// The export refuses modifications.
    pub read_only: bool,
    /// Most payload segments per request the server takes.
    pub max_segments: u32,
    /// Most payload bytes per request.
    pub max_payload: u32,
    /// Most requests in flight per connection.
    pub max_in_flight: u32,
}

/// File attributes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    /// Size in bytes.
    pub size: u64,
    /// Mode bits (type and permissions).
    pub mode: u32,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
}

impl Stat {
    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        self.mode & 0o170000 == 0o040000
    }
    /// True for a regular file.
    pub fn is_file(&self) -> bool {
        self.mode & 0o170000 == 0o100000
    }
}

/// A successful reply's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resp {
    /// Answer to hello.
    Hello(HelloReply),
    /// Authentication accepted; the server proves it knows the token too.
    Auth {
        /// HMAC-SHA256 over both nonces (server direction).
        mac: [u8; MAC_LEN],
    },
    /// File opened.
    Open {
        /// Handle.
        fh: u64,
        /// Size at open.
        size: u64,
    },
    /// Bytes read (in the payload) and whether the end of the file was reached.
    Read {
        /// Bytes in the payload.
        len: u32,
        /// End of file reached.
        eof: bool,
    },
    /// Bytes written.
    Write {
        /// Bytes written.
        written: u32,
    },
    /// Attributes.
    Stat(Stat),
    /// Directory entries are in the payload.
    List {
        /// Entries in the payload.
        count: u32,
        /// Cookie for the next batch.
        next_cookie: u64,
        /// No more entries.
        done: bool,
    },
    /// Done, nothing to report.
    Ok,
    /// Complete attributes (getattr, fgetattr, setattr).
    Attr(Attr),
    /// A symlink's target.
    Target(String),
    /// File system statistics.
    Statfs(StatfsReply),
    /// An extended attribute's value or name list: `len` bytes in the payload, or, when
    /// the receive buffer was too small, `len` is the size needed and `fits` is false.
    Xattr {
        /// Bytes of the value (in the payload if `fits`).
        len: u32,
        /// The value is in the payload.
        fits: bool,
    },
}

/// Complete file attributes, as `lstat(2)` (or `stat(2)`) gives them on the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attr {
    /// Inode number on the server (stable while the file exists).
    pub ino: u64,
    /// Mode bits (type and permissions).
    pub mode: u32,
    /// Hard links.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number (device nodes).
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Access time, ns since the epoch.
    pub atime_ns: i64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status change time, ns since the epoch.
    pub ctime_ns: i64,
}

impl Attr {
    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        self.mode & 0o170000 == 0o040000
    }
    /// True for a symlink.
    pub fn is_symlink(&self) -> bool {
        self.mode & 0o170000 == 0o120000
    }
}

/// File system statistics (`statvfs(2)` of the export).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatfsReply {
    /// Total blocks (of `frsize`).
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Free blocks for unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

/// Encodes a success reply for request op `op`.
pub fn encode_ok(resp: &Resp) -> Vec<u8> {
    let mut out = Vec::with_capacity(48);
    encode_ok_into(resp, &mut out);
    out
}

/// [`encode_ok`] into `out` (emptied first), for a caller that reuses its buffer.
pub fn encode_ok_into(resp: &Resp, out: &mut Vec<u8>) {
    let mut w = Writer(std::mem::take(out));
    w.0.clear();
    w.u32(0);
    match resp {
        Resp::Hello(h) => h.put(&mut w),
        Resp::Auth { mac } => w.bytes(mac),
        Resp::Open { fh, size } => {
            w.u64(*fh);
            w.u64(*size);
        }
        Resp::Read { len, eof } => {
            w.u32(*len);
            w.u8(u8::from(*eof));
        }
        Resp::Write { written } => w.u32(*written),
        Resp::Stat(s) => s.put(&mut w),
        Resp::List {
            count,
            next_cookie,
            done,
        } => {
            w.u32(*count);
            w.u64(*next_cookie);
            w.u8(u8::from(*done));
        }
        Resp::Ok => {}
        Resp::Attr(a) => a.put(&mut w),
        Resp::Target(t) => w.str(t),
        Resp::Statfs(f) => f.put(&mut w),
        Resp::Xattr { len, fits } => {
            w.u32(*len);
            w.u8(u8::from(*fits));
        }
    }
    *out = w.0;
}

/// Encodes an error reply.
pub fn encode_err(code: u32, message: &str) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(8 + message.len()));
    w.u32(code.max(1));
    // Messages are ours, but keep them bounded anyway.
    let mut m = message;
    while m.len() > 1024 {
        let mut cut = 1024;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m = &m[..cut];
    }
    w.str(m);
    w.0
}

/// Decodes a reply header to the request `req` (whose op tells the reply's shape).
pub fn decode_reply(req: &Req, b: &[u8]) -> Result<Resp> {
    let mut r = Reader::new(b, "reply header");
    let status = r.u32()?;
    if status != 0 {
        let message = r.string(1024)?;
        r.finish()?;
        return Err(Error::Remote {
            op: req.name(),
            code: status,
            message,
        });
    }
    let resp = match req {
        Req::Hello { .. } => Resp::Hello(HelloReply::get(&mut r)?),
        Req::Auth { .. } => Resp::Auth { mac: r.array()? },
        Req::Open { .. } | Req::Opendir { .. } => Resp::Open {
            fh: r.u64()?,
            size: r.u64()?,
        },
        Req::Read { .. } => Resp::Read {
            len: r.u32()?,
            eof: r.bool()?,
        },
        Req::Write { .. } => Resp::Write { written: r.u32()? },
        Req::Stat { .. } | Req::Fstat { .. } => Resp::Stat(Stat::get(&mut r)?),
        Req::List { .. } | Req::Readdir { .. } | Req::Readdirplus { .. } => Resp::List {
            count: r.u32()?,
            next_cookie: r.u64()?,
            done: r.bool()?,
        },
        Req::Getattr { .. } | Req::Fgetattr { .. } | Req::Setattr(_) => {
            Resp::Attr(Attr::get(&mut r)?)
        }
        Req::Readlink { .. } => Resp::Target(r.string(MAX_TARGET)?),
        Req::Statfs => Resp::Statfs(StatfsReply::get(&mut r)?),
        Req::Getxattr { .. } | Req::Listxattr { .. } => {
            let len = r.u32()?;
            let fits = r.bool()?;
            if len as usize > MAX_XATTR_VALUE {
                return Err(Error::decode(
                    "reply header",
                    format!("extended attribute of {len} bytes, limit {MAX_XATTR_VALUE}"),
                ));
            }
            Resp::Xattr { len, fits }
        }
        _ => Resp::Ok,
    };
    r.finish()?;
    Ok(resp)
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// File name (no slash).
    pub name: String,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// True for a directory.
    pub is_dir: bool,
}

/// Appends one entry to a listing payload: `is_dir u8, size u64, name (u16 + bytes)`.
pub fn encode_dirent(out: &mut Vec<u8>, e: &DirEntry) {
    Writer::append(out, |w| {
        w.u8(u8::from(e.is_dir));
        w.u64(e.size);
        w.str(&e.name);
    });
}

/// Encoded length of an entry.
pub fn dirent_len(e: &DirEntry) -> usize {
    1 + 8 + 2 + e.name.len()
}

/// Decodes `count` entries from a listing payload.
pub fn decode_dirents(b: &[u8], count: u32) -> Result<Vec<DirEntry>> {
    const WHAT: &str = "directory listing";
    // Each entry takes at least 11 bytes.
    decode_entries(b, count, WHAT, 11, |r| {
        let is_dir = r.bool()?;
        let size = r.u64()?;
        let name = r.string(MAX_PATH)?;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Error::decode(WHAT, format!("bad name {name:?}")));
        }
        Ok(DirEntry { name, size, is_dir })
    })
}

/// Decodes `count` entries of at least `min_len` bytes each from a listing payload with
/// `entry`, then checks nothing is left over. A count the payload cannot hold is refused
/// before anything is allocated for it.
fn decode_entries<T>(
    b: &[u8],
    count: u32,
    what: &'static str,
    min_len: usize,
    mut entry: impl FnMut(&mut Reader<'_>) -> Result<T>,
) -> Result<Vec<T>> {
    if (count as usize).saturating_mul(min_len) > b.len() {
        return Err(Error::decode(
            what,
            format!("{count} entries cannot fit in {} bytes", b.len()),
        ));
    }
    let mut r = Reader::new(b, what);
    let mut v = Vec::with_capacity(count as usize);
    for _ in 0..count {
        v.push(entry(&mut r)?);
    }
    r.finish()?;
    Ok(v)
}

/// Reads the `ino u64, kind u8` head of a directory stream entry; `attr` reads what stands
/// between it and the name (nothing for [`Req::Readdir`], the attributes for
/// [`Req::Readdirplus`]).
fn decode_stream_entry<A>(
    r: &mut Reader<'_>,
    what: &'static str,
    attr: impl FnOnce(&mut Reader<'_>) -> Result<A>,
) -> Result<(DirStreamEntry, A)> {
    let ino = r.u64()?;
    let kind = r.u8()?;
    let a = attr(r)?;
    let name = r.string(255)?;
    if name.is_empty() || name.contains('/') || name.contains('\0') || name == "." || name == ".." {
        return Err(Error::decode(what, format!("bad name {name:?}")));
    }
    if kind > 15 {
        return Err(Error::decode(what, format!("bad type {kind}")));
    }
    Ok((DirStreamEntry { ino, kind, name }, a))
}

/// One entry of a directory stream ([`Req::Readdir`]): no attributes, so a listing
/// costs one `getdents` and no `stat` per entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirStreamEntry {
    /// Inode number on the server.
    pub ino: u64,
    /// File type: the `S_IFMT` bits of the mode shifted right by 12 (`DT_*` values), 0 if
    /// unknown.
    pub kind: u8,
    /// File name (no slash, never `.` or `..`).
    pub name: String,
}

/// Appends one entry to a directory stream payload: `ino u64, kind u8, name (u16 + bytes)`.
pub fn encode_dir_entry(out: &mut Vec<u8>, e: &DirStreamEntry) {
    Writer::append(out, |w| {
        w.u64(e.ino);
        w.u8(e.kind);
        w.str(&e.name);
    });
}

/// Encoded length of a directory stream entry.
pub fn dir_entry_len(e: &DirStreamEntry) -> usize {
    8 + 1 + 2 + e.name.len()
}

/// Decodes `count` entries from a directory stream payload.
pub fn decode_dir_entries(b: &[u8], count: u32) -> Result<Vec<DirStreamEntry>> {
    const WHAT: &str = "directory stream";
    // Each entry takes at least 12 bytes (a name has one byte or more).
    decode_entries(b, count, WHAT, 12, |r| {
        Ok(decode_stream_entry(r, WHAT, |_| Ok(()))?.0)
    })
}

/// Encoded length of [`Attr`] on the wire.
pub const ATTR_LEN: usize = 72;

/// One entry of a directory stream read with [`Req::Readdirplus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirPlusEntry {
    /// The entry as [`Req::Readdir`] gives it.
    pub entry: DirStreamEntry,
    /// Its attributes as `lstat(2)` gives them on the server, or `None` when the server
    /// could not stat it (the name is still listed; a lookup will tell why).
    pub attr: Option<Attr>,
}

/// Appends one entry to a readdirplus payload:
/// `ino u64, kind u8, has_attr u8, [attr], name (u16 + bytes)`.
pub fn encode_dir_plus_entry(out: &mut Vec<u8>, e: &DirPlusEntry) {
    Writer::append(out, |w| {
        w.u64(e.entry.ino);
        w.u8(e.entry.kind);
        w.u8(u8::from(e.attr.is_some()));
        if let Some(a) = &e.attr {
            a.put(w);
        }
        w.str(&e.entry.name);
    });
}

/// Encoded length of a readdirplus entry.
pub fn dir_plus_entry_len(e: &DirPlusEntry) -> usize {
    dir_entry_len(&e.entry) + 1 + if e.attr.is_some() { ATTR_LEN } else { 0 }
}

/// Decodes `count` entries from a readdirplus payload.
pub fn decode_dir_plus_entries(b: &[u8], count: u32) -> Result<Vec<DirPlusEntry>> {
    const WHAT: &str = "directory stream with attributes";
    // Each entry takes at least 13 bytes (no attributes, a one-byte name).
    decode_entries(b, count, WHAT, 13, |r| {
        let (entry, attr) = decode_stream_entry(r, WHAT, |r| {
            Ok(if r.bool()? { Some(Attr::get(r)?) } else { None })
        })?;
        Ok(DirPlusEntry { entry, attr })
    })
}

struct Writer(Vec<u8>);

impl Writer {
    /// Runs `f` on a writer that appends to `out`.
    fn append(out: &mut Vec<u8>, f: impl FnOnce(&mut Writer)) {
        let mut w = Writer(std::mem::take(out));
        f(&mut w);
        *out = w.0;
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        // Callers keep strings under MAX_PATH (checked by `Reader::path` on the far side);
        // longer ones are cut at a char boundary rather than mis-framed.
        let mut s = s;
        while s.len() > u16::MAX as usize {
            let mut cut = u16::MAX as usize;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s = &s[..cut];
        }
        self.u16(s.len() as u16);
        self.bytes(s.as_bytes());
    }
}

/// A request field as [`Writer`] puts it on the wire (for `plain_requests!`).
trait Put {
    fn put(&self, w: &mut Writer);
}

impl Put for bool {
    fn put(&self, w: &mut Writer) {
        w.u8(u8::from(*self));
    }
}

impl Put for u16 {
    fn put(&self, w: &mut Writer) {
        w.u16(*self);
    }
}

impl Put for u32 {
    fn put(&self, w: &mut Writer) {
        w.u32(*self);
    }
}

impl Put for u64 {
    fn put(&self, w: &mut Writer) {
        w.u64(*self);
    }
}

impl Put for i64 {
    fn put(&self, w: &mut Writer) {
        w.u64(*self as u64);
    }
}

impl<const N: usize> Put for [u8; N] {
    fn put(&self, w: &mut Writer) {
        w.bytes(self);
    }
}

impl Put for String {
    fn put(&self, w: &mut Writer) {
        w.str(self);
    }
}

/// The reply structures whose fields go on the wire in order (`Reader` method named after
/// each field): one row gives both `put` and `get`, so they cannot disagree.
macro_rules! wire_structs {
    ($($ty:ident { $($field:ident: $get:ident),* $(,)? })*) => {$(
        impl $ty {
            fn put(&self, w: &mut Writer) {
                $(Put::put(&self.$field, w);)*
            }

            fn get(r: &mut Reader<'_>) -> Result<$ty> {
                Ok($ty { $($field: r.$get()?),* })
            }
        }
    )*};
}

wire_structs! {
    HelloReply {
        version: u16,
        server_nonce: array,
        auth_required: bool,
        read_only: bool,
        max_segments: u32,
        max_payload: u32,
        max_in_flight: u32,
    }
    Stat { size: u64, mode: u32, mtime_ns: i64 }
    StatfsReply {
        blocks: u64,
        bfree: u64,
        bavail: u64,
        files: u64,
        ffree: u64,
        bsize: u32,
        namelen: u32,
        frsize: u32,
    }
    Attr {
        ino: u64,
        mode: u32,
        nlink: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        blksize: u32,
        size: u64,
        blocks: u64,
        atime_ns: i64,
        mtime_ns: i64,
        ctime_ns: i64,
    }
}

/// A bounds-checked cursor over hostile bytes.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8], what: &'static str) -> Self {
        Reader { b, what }
    }
    fn short(&self, need: usize) -> Error {
        Error::decode(
            self.what,
            format!("truncated: needed {need} more bytes, {} left", self.b.len()),
        )
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() < n {
            return Err(self.short(n));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::decode(self.what, format!("bad boolean {v}"))),
        }
    }
    pub(crate) fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn string(&mut self, max: usize) -> Result<String> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(Error::decode(
                self.what,
                format!("string of {n} bytes, limit {max}"),
            ));
        }
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| Error::decode(self.what, "string is not UTF-8"))
    }
    fn path(&mut self) -> Result<String> {
        let p = self.string(MAX_PATH)?;
        if p.contains('\0') {
            return Err(Error::decode(self.what, "path contains NUL"));
        }
        Ok(p)
    }
    /// Permission bits: no setuid, setgid or sticky bit.
    fn mode(&mut self) -> Result<u32> {
        Ok(self.u32()? & 0o777)
    }
    fn xattr_name(&mut self) -> Result<String> {
        let n = self.string(MAX_XATTR_NAME)?;
        if n.is_empty() || n.contains('\0') {
            return Err(Error::decode(self.what, "bad extended attribute name"));
        }
        Ok(n)
    }
    pub(crate) fn i64(&mut self) -> Result<i64> {
        Ok(self.u64()? as i64)
    }
    pub(crate) fn finish(self) -> Result<()> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(Error::decode(
                self.what,
                format!("{} unexpected trailing bytes", self.b.len()),
            ))
        }
    }
}

/// The MAC a client sends: HMAC-SHA256(token, "zcio-auth-v1 client" || cn || sn).
pub fn client_mac(token: &[u8], cn: &[u8; NONCE_LEN], sn: &[u8; NONCE_LEN]) -> [u8; MAC_LEN] {
    mac(token, b"zcio-auth-v1 client", cn, sn)
}

/// The MAC the server answers with: HMAC-SHA256(token, "zcio-auth-v1 server" || cn || sn).
pub fn server_mac(token: &[u8], cn: &[u8; NONCE_LEN], sn: &[u8; NONCE_LEN]) -> [u8; MAC_LEN] {
    mac(token, b"zcio-auth-v1 server", cn, sn)
}

fn mac(token: &[u8], label: &[u8], cn: &[u8], sn: &[u8]) -> [u8; MAC_LEN] {
    use hmac::{Hmac, Mac};
    type H = Hmac<sha2::Sha256>;
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut m = match <H as Mac>::new_from_slice(token) {
        Ok(m) => m,
        Err(_) => return [0; MAC_LEN],
    };
    m.update(label);
    m.update(cn);
    m.update(sn);
    m.finalize().into_bytes().into()
}

/// Constant-time comparison of two MACs.
pub fn mac_eq(a: &[u8; MAC_LEN], b: &[u8; MAC_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_reqs() -> Vec<Req> {
        vec![
            Req::Hello {
                version: 1,
                client_nonce: [7; NONCE_LEN],
            },
            Req::Auth { mac: [9; MAC_LEN] },
            Req::Open {
                path: "a/b.txt".into(),
                flags: OpenFlags::rw() | OpenFlags::CREATE,
                mode: 0o644,
            },
            Req::Read {
                fh: 3,
                offset: 1 << 40,
                len: 1 << 20,
            },
            Req::Write { fh: 3, offset: 5 },
            Req::Fsync {
                fh: 3,
                datasync: true,
            },
            Req::Stat { path: "".into() },
            Req::Fstat { fh: 1 },
            Req::Truncate { fh: 1, len: 77 },
            Req::Close { fh: 1 },
            Req::Unlink { path: "x".into() },
            Req::List {
                path: "d".into(),
                cookie: 4,
            },
            Req::Mkdir {
                path: "d2".into(),
                mode: 0o755,
            },
        ]
    }

    /// One request of each op added for the mount (issue 13).
    fn fs_reqs() -> Vec<Req> {
        vec![
            Req::Getattr {
                path: "a".into(),
                follow: true,
            },
            Req::Fgetattr { fh: 4 },
            Req::Setattr(SetattrReq {
                path: "a".into(),
                fh: 2,
                valid: SetattrReq::ALL,
                mode: 0o640,
                uid: 1,
                gid: 2,
                size: 3,
                atime_ns: -4,
                mtime_ns: 5,
            }),
            Req::Rename {
                from: "a".into(),
                to: "b".into(),
                flags: RENAME_EXCHANGE,
            },
            Req::Rmdir { path: "d".into() },
            Req::Symlink {
                target: "../x".into(),
                path: "l".into(),
            },
            Req::Readlink { path: "l".into() },
            Req::Link {
                from: "a".into(),
                to: "c".into(),
            },
            Req::Statfs,
            Req::Fallocate {
                fh: 1,
                mode: 3,
                offset: 4,
                len: 5,
            },
            Req::Setxattr {
                path: "a".into(),
                name: "user.x".into(),
                flags: 1,
            },
            Req::Getxattr {
                path: "a".into(),
                name: "user.x".into(),
            },
            Req::Listxattr { path: "a".into() },
            Req::Removexattr {
                path: "a".into(),
                name: "user.x".into(),
            },
            Req::Opendir { path: "d".into() },
            Req::Readdir { dh: 9, cookie: 7 },
            Req::Releasedir { dh: 9 },
            Req::Readdirplus { dh: 9, cookie: 3 },
        ]
    }

    #[test]
    fn fs_requests_round_trip_and_refuse_truncation() {
        for r in fs_reqs() {
            let b = r.encode();
            assert_eq!(Req::decode(&b).unwrap(), r);
            for n in 0..b.len() {
                assert!(Req::decode(&b[..n]).is_err(), "{r:?} truncated to {n}");
            }
            let mut long = b.clone();
            long.push(0);
            assert!(Req::decode(&long).is_err(), "{r:?} with a trailing byte");
        }
    }

    #[test]
    fn hostile_fs_requests() {
        let bad = |r: Req, patch: &dyn Fn(&mut Vec<u8>)| {
            let mut b = r.encode();
            patch(&mut b);
            assert!(Req::decode(&b).is_err(), "{r:?} patched");
        };
        // Both rename flags at once, and unknown ones.
        for f in [3u32, 4, u32::MAX] {
            bad(
                Req::Rename {
                    from: "a".into(),
                    to: "b".into(),
                    flags: 0,
                },
                &|b| {
                    let at = b.len() - 4;
                    b[at..].copy_from_slice(&f.to_le_bytes());
                },
            );
        }
        // Unknown setattr bits.
        bad(
            Req::Setattr(SetattrReq {
                path: "a".into(),
                ..Default::default()
            }),
            &|b| {
                let at = 4 + 2 + 1 + 8;
                b[at..at + 4].copy_from_slice(&0x100u32.to_le_bytes());
            },
        );
        // Bad setxattr flags; an empty or over-long xattr name; an empty symlink target.
        bad(
            Req::Setxattr {
                path: "a".into(),
                name: "user.x".into(),
                flags: 0,
            },
            &|b| {
                let at = b.len() - 4;
                b[at..].copy_from_slice(&3u32.to_le_bytes());
            },
        );
        let mut w = Writer(vec![31, 0, 0, 0]);
        w.str("a");
        w.str("");
        assert!(Req::decode(&w.0).is_err());
        let mut w = Writer(vec![31, 0, 0, 0]);
        w.str("a");
        w.str(&"n".repeat(MAX_XATTR_NAME + 1));
        assert!(Req::decode(&w.0).is_err());
        let mut w = Writer(vec![25, 0, 0, 0]);
        w.str("");
        w.str("l");
        assert!(Req::decode(&w.0).is_err());
        let mut w = Writer(vec![25, 0, 0, 0]);
        w.str(&"t".repeat(MAX_TARGET + 1));
        w.str("l");
        assert!(Req::decode(&w.0).is_err());
    }

    #[test]
    fn fs_replies_round_trip() {
        let cases = [
            (
                Req::Getattr {
                    path: "a".into(),
                    follow: false,
                },
                Resp::Attr(Attr {
                    ino: 1,
                    mode: 0o100644,
                    nlink: 2,
                    uid: 3,
                    gid: 4,
                    rdev: 5,
                    blksize: 4096,
                    size: 6,
                    blocks: 8,
                    atime_ns: -1,
                    mtime_ns: 2,
                    ctime_ns: 3,
                }),
            ),
            (
                Req::Readlink { path: "l".into() },
                Resp::Target("../t".into()),
            ),
            (
                Req::Statfs,
                Resp::Statfs(StatfsReply {
                    blocks: 1,
                    bfree: 2,
                    bavail: 3,
                    files: 4,
                    ffree: 5,
                    bsize: 4096,
                    namelen: 255,
                    frsize: 4096,
                }),
            ),
            (
                Req::Getxattr {
                    path: "a".into(),
                    name: "user.x".into(),
                },
                Resp::Xattr { len: 9, fits: true },
            ),
            (
                Req::Opendir { path: "d".into() },
                Resp::Open { fh: 3, size: 0 },
            ),
            (
                Req::Readdir { dh: 3, cookie: 0 },
                Resp::List {
                    count: 2,
                    next_cookie: 2,
                    done: true,
                },
            ),
            (
                Req::Readdirplus { dh: 3, cookie: 2 },
                Resp::List {
                    count: 1,
                    next_cookie: 3,
                    done: false,
                },
            ),
            (Req::Rmdir { path: "d".into() }, Resp::Ok),
        ];
        for (req, resp) in cases {
            let b = encode_ok(&resp);
            assert_eq!(decode_reply(&req, &b).unwrap(), resp);
            for n in 0..b.len() {
                assert!(decode_reply(&req, &b[..n]).is_err());
            }
        }
        // An xattr length beyond the limit is refused.
        let b = encode_ok(&Resp::Xattr {
            len: MAX_XATTR_VALUE as u32 + 1,
            fits: false,
        });
        assert!(decode_reply(&Req::Listxattr { path: "a".into() }, &b).is_err());
    }

    #[test]
    fn dir_stream_entries() {
        let es = vec![
            DirStreamEntry {
                ino: 5,
                kind: 8,
                name: "f".into(),
            },
            DirStreamEntry {
                ino: 6,
                kind: 4,
                name: "sub".into(),
            },
        ];
        let mut b = Vec::new();
        for e in &es {
            encode_dir_entry(&mut b, e);
        }
        assert_eq!(b.len(), es.iter().map(dir_entry_len).sum::<usize>());
        assert_eq!(decode_dir_entries(&b, 2).unwrap(), es);
        assert!(decode_dir_entries(&b, 3).is_err());
        assert!(decode_dir_entries(&b, 1).is_err());
        assert!(decode_dir_entries(&b, u32::MAX).is_err());
        for (kind, name) in [(8u8, ".."), (8, "a/b"), (16, "x"), (8, "")] {
            let mut bad = Vec::new();
            encode_dir_entry(
                &mut bad,
                &DirStreamEntry {
                    ino: 1,
                    kind,
                    name: name.into(),
                },
            );
            assert!(decode_dir_entries(&bad, 1).is_err(), "{kind} {name:?}");
        }
    }

    #[test]
    fn dir_plus_entries() {
        let es = vec![
            DirPlusEntry {
                entry: DirStreamEntry {
                    ino: 5,
                    kind: 8,
                    name: "f".into(),
                },
                attr: Some(Attr {
                    ino: 5,
                    mode: 0o100644,
                    nlink: 1,
                    size: 7,
                    atime_ns: -3,
                    ..Attr::default()
                }),
            },
            DirPlusEntry {
                entry: DirStreamEntry {
                    ino: 6,
                    kind: 4,
                    name: "sub".into(),
                },
                attr: None,
            },
        ];
        let mut b = Vec::new();
        for e in &es {
            encode_dir_plus_entry(&mut b, e);
        }
        assert_eq!(b.len(), es.iter().map(dir_plus_entry_len).sum::<usize>());
        assert_eq!(decode_dir_plus_entries(&b, 2).unwrap(), es);
        for n in 0..b.len() {
            assert!(decode_dir_plus_entries(&b[..n], 2).is_err(), "{n}");
        }
        assert!(decode_dir_plus_entries(&b, 3).is_err());
        assert!(decode_dir_plus_entries(&b, 1).is_err());
        assert!(decode_dir_plus_entries(&b, u32::MAX).is_err());
        // A has-attributes flag other than 0 or 1, a bad type or a bad name is refused.
        let mut bad = b.clone();
        bad[9] = 2;
        assert!(decode_dir_plus_entries(&bad, 2).is_err());
        for (kind, name) in [(8u8, ".."), (8, "a/b"), (16, "x"), (8, ""), (8, "a\0")] {
            let mut bad = Vec::new();
            let mut e = es[1].clone();
            e.entry.kind = kind;
            e.entry.name = name.into();
            encode_dir_plus_entry(&mut bad, &e);
            assert!(decode_dir_plus_entries(&bad, 1).is_err(), "{kind} {name:?}");
        }
    }

    #[test]
    fn requests_round_trip() {
        for r in all_reqs() {
            assert_eq!(Req::decode(&r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        for r in all_reqs() {
            let b = r.encode();
            for n in 0..b.len() {
                assert!(Req::decode(&b[..n]).is_err(), "{r:?} truncated to {n}");
            }
            let mut long = b.clone();
            long.push(0);
            assert!(Req::decode(&long).is_err(), "{r:?} with a trailing byte");
        }
    }

    #[test]
    fn hostile_requests() {
        assert!(Req::decode(&[99, 0, 0, 0]).is_err());
        // A path length beyond the limit, with too few bytes behind it.
        let mut b = vec![3, 0, 0, 0];
        b.extend_from_slice(&u16::MAX.to_le_bytes());
        assert!(Req::decode(&b).is_err());
        // Unknown open flag bits.
        let mut o = Req::Open {
            path: "f".into(),
            flags: OpenFlags::READ,
            mode: 0,
        }
        .encode();
        let at = o.len() - 8;
        o[at..at + 4].copy_from_slice(&0x100u32.to_le_bytes());
        assert!(Req::decode(&o).is_err());
        // NUL in a path, bad boolean.
        let mut w = Writer(vec![7, 0, 0, 0]);
        w.str("a\0b");
        assert!(Req::decode(&w.0).is_err());
        let mut f = Req::Fsync {
            fh: 1,
            datasync: false,
        }
        .encode();
        *f.last_mut().unwrap() = 2;
        assert!(Req::decode(&f).is_err());
    }

    #[test]
    fn replies_round_trip_and_errors_decode() {
        let reqs = all_reqs();
        let resps = [
            Resp::Hello(HelloReply {
                version: 1,
                server_nonce: [1; NONCE_LEN],
                auth_required: true,
                read_only: false,
                max_segments: 256,
                max_payload: 1 << 20,
                max_in_flight: 64,
            }),
            Resp::Auth { mac: [3; MAC_LEN] },
            Resp::Open { fh: 9, size: 10 },
            Resp::Read { len: 5, eof: true },
            Resp::Write { written: 5 },
            Resp::Ok,
            Resp::Stat(Stat {
                size: 1,
                mode: 0o100644,
                mtime_ns: -5,
            }),
        ];
        for (req, resp) in reqs.iter().zip(resps.iter()) {
            let b = encode_ok(resp);
            assert_eq!(&decode_reply(req, &b).unwrap(), resp);
            for n in 0..b.len() {
                assert!(decode_reply(req, &b[..n]).is_err());
            }
        }
        let e = decode_reply(&reqs[2], &encode_err(2, "no such file")).unwrap_err();
        match e {
            Error::Remote { op, code, message } => {
                assert_eq!((op, code, message.as_str()), ("open", 2, "no such file"));
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn dirents() {
        let es = vec![
            DirEntry {
                name: "a".into(),
                size: 3,
                is_dir: false,
            },
            DirEntry {
                name: "dir".into(),
                size: 0,
                is_dir: true,
            },
        ];
        let mut b = Vec::new();
        for e in &es {
            encode_dirent(&mut b, e);
        }
        assert_eq!(b.len(), es.iter().map(dirent_len).sum::<usize>());
        assert_eq!(decode_dirents(&b, 2).unwrap(), es);
        assert!(decode_dirents(&b, 3).is_err());
        assert!(decode_dirents(&b, 1).is_err());
        assert!(decode_dirents(&b, u32::MAX).is_err());
        let mut bad = Vec::new();
        encode_dirent(
            &mut bad,
            &DirEntry {
                name: "..".into(),
                size: 0,
                is_dir: true,
            },
        );
        assert!(decode_dirents(&bad, 1).is_err());
    }

    #[test]
    fn macs_bind_token_and_direction() {
        let (c, s) = ([1; NONCE_LEN], [2; NONCE_LEN]);
        let a = client_mac(b"tok", &c, &s);
        assert!(mac_eq(&a, &client_mac(b"tok", &c, &s)));
        assert!(!mac_eq(&a, &client_mac(b"tok2", &c, &s)));
        assert!(!mac_eq(&a, &server_mac(b"tok", &c, &s)));
        assert!(!mac_eq(&a, &client_mac(b"tok", &s, &c)));
    }
}
