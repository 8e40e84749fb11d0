//! Serving the operations a mounted file system needs beyond open/read/write (issue 13):
//! complete attributes, setattr, rename, rmdir, symlinks, hard links, statfs, fallocate,
//! user extended attributes and directory streams. The export (`export.rs`) confines every
//! path; this module checks handles, limits and read-only mode, and shapes the replies.

use std::sync::{Arc, Mutex};

use super::export::{Export, OpError};
use super::{file, Conn};
use crate::lock;
use crate::pool::Iobuf;
use crate::proto::{self, Req, Resp, Status};
use crate::transport::Incoming;

type Served = Result<(Resp, Vec<Iobuf>), OpError>;

fn ok(r: Resp) -> Served {
    Ok((r, Vec::new()))
}

/// Copies `bytes` into one pool buffer for a reply payload.
fn payload(conn: &Conn, bytes: &[u8]) -> Result<Vec<Iobuf>, OpError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let mut buf = conn
        .shared
        .pool
        .get(bytes.len())
        .map_err(|e| OpError::new(Status::Busy as u32, e.to_string()))?;
    buf.set_len(bytes.len());
    buf.copy_from_slice(bytes);
    Ok(vec![buf.freeze()])
}

/// A directory page's reply: `entries` encoded into the payload, the next cookie after them.
fn list_reply<E>(
    conn: &Conn,
    cookie: u64,
    budget: usize,
    entries: &[E],
    done: bool,
    encode: fn(&mut Vec<u8>, &E),
) -> Served {
    let mut bytes = Vec::with_capacity(budget.min(64 << 10));
    for e in entries {
        encode(&mut bytes, e);
    }
    Ok((
        Resp::List {
            count: entries.len() as u32,
            next_cookie: cookie + entries.len() as u64,
            done,
        },
        payload(conn, &bytes)?,
    ))
}

/// The most a reply payload may carry for this request.
fn reply_budget(conn: &Conn, inc: &Incoming) -> usize {
    inc.reply_capacity
        .min(conn.shared.pool.max_buffer_size())
        .min(conn.shared.cfg.limits.max_payload)
}

fn dir(conn: &Conn, dh: u64) -> Result<Arc<Mutex<super::export::DirStream>>, OpError> {
    lock(&conn.dirs).get(&dh).cloned().ok_or_else(|| {
        OpError::new(
            Status::BadHandle as u32,
            format!("no open directory handle {dh}"),
        )
    })
}

pub(super) fn execute(conn: &Conn, req: &Req, inc: &Incoming) -> Served {
    let export = &conn.shared.export;
    match req {
        Req::Getattr { path, follow } => ok(Resp::Attr(export.getattr(path, *follow)?)),
        Req::Fgetattr { fh } => ok(Resp::Attr(Export::fgetattr(&file(conn, *fh)?.file)?)),
        Req::Setattr(a) => {
            let f = if a.fh != 0 {
                Some(file(conn, a.fh)?)
            } else {
                None
            };
            if let Some(f) = &f {
                if a.valid & proto::SetattrReq::SET_SIZE != 0 && !f.writable {
                    return Err(OpError::new(
                        nix::errno::Errno::EBADF as i32 as u32,
                        "truncate: file not opened for writing",
                    ));
                }
            }
            ok(Resp::Attr(
                export.setattr(a, f.as_deref().map(|f| &f.file))?,
            ))
        }
        Req::Rename { from, to, flags } => {
            export.rename(from, to, *flags)?;
            ok(Resp::Ok)
        }
        Req::Rmdir { path } => {
            export.rmdir(path)?;
            ok(Resp::Ok)
        }
        Req::Symlink { target, path } => {
            export.symlink(target, path)?;
            ok(Resp::Ok)
        }
        Req::Readlink { path } => ok(Resp::Target(export.readlink(path)?)),
        Req::Link { from, to } => {
            export.link(from, to)?;
            ok(Resp::Ok)
        }
        Req::Statfs => ok(Resp::Statfs(export.statfs()?)),
        Req::Fallocate {
            fh,
            mode,
            offset,
            len,
        } => {
            let f = file(conn, *fh)?;
            if !f.writable {
                return Err(OpError::new(
                    nix::errno::Errno::EBADF as i32 as u32,
                    "fallocate: file not opened for writing",
                ));
            }
            export.fallocate(&f.file, *mode, *offset, *len)?;
            ok(Resp::Ok)
        }
        Req::Setxattr { path, name, flags } => {
            let total: usize = inc.payload.iter().map(|b| b.len()).sum();
            if total > proto::MAX_XATTR_VALUE {
                return Err(OpError::new(
                    Status::Limit as u32,
                    format!(
                        "setxattr: value of {total} bytes, limit {}",
                        proto::MAX_XATTR_VALUE
                    ),
                ));
            }
            let mut value = Vec::with_capacity(total);
            for b in &inc.payload {
                value.extend_from_slice(b);
            }
            export.setxattr(path, name, &value, *flags)?;
            ok(Resp::Ok)
        }
        Req::Getxattr { path, name } => {
            match export.getxattr(path, name, reply_budget(conn, inc))? {
                Ok(v) => Ok((
                    Resp::Xattr {
                        len: v.len() as u32,
                        fits: true,
                    },
                    payload(conn, &v)?,
                )),
                Err(need) => ok(Resp::Xattr {
                    len: need.min(proto::MAX_XATTR_VALUE) as u32,
                    fits: false,
                }),
            }
        }
        Req::Listxattr { path } => {
            let v = export.listxattr(path)?;
            if v.len() > reply_budget(conn, inc) {
                return ok(Resp::Xattr {
                    len: v.len() as u32,
                    fits: false,
                });
            }
            Ok((
                Resp::Xattr {
                    len: v.len() as u32,
                    fits: true,
                },
                payload(conn, &v)?,
            ))
        }
        Req::Removexattr { path, name } => {
            export.removexattr(path, name)?;
            ok(Resp::Ok)
        }
        Req::Opendir { path } => {
            let max = conn.shared.cfg.server.max_open_files;
            if lock(&conn.files).len() + lock(&conn.dirs).len() >= max {
                return Err(OpError::new(
                    Status::Limit as u32,
                    format!("opendir {path:?}: this connection already has {max} files and directories open (server.max_open_files)"),
                ));
            }
            let ds = export.opendir(path)?;
            let dh = conn
                .next_fh
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            lock(&conn.dirs).insert(dh, Arc::new(Mutex::new(ds)));
            ok(Resp::Open { fh: dh, size: 0 })
        }
        Req::Readdir { dh, cookie } => {
            let ds = dir(conn, *dh)?;
            let budget = reply_budget(conn, inc);
            let (entries, done) = export.readdir(&mut lock(&ds), *cookie, budget)?;
            list_reply(
                conn,
                *cookie,
                budget,
                &entries,
                done,
                proto::encode_dir_entry,
            )
        }
        Req::Readdirplus { dh, cookie } => {
            let ds = dir(conn, *dh)?;
            let budget = reply_budget(conn, inc);
            let (entries, done) = export.readdirplus(&mut lock(&ds), *cookie, budget)?;
            list_reply(
                conn,
                *cookie,
                budget,
                &entries,
                done,
                proto::encode_dir_plus_entry,
            )
        }
        Req::Releasedir { dh } => {
            if lock(&conn.dirs).remove(dh).is_none() {
                return Err(OpError::new(
                    Status::BadHandle as u32,
                    format!("no open directory handle {dh}"),
                ));
            }
            ok(Resp::Ok)
        }
        other => Err(OpError::new(
            Status::BadRequest as u32,
            format!("{} is not served here", other.name()),
        )),
    }
}
