//! The conformance cases for the file-system operations a mount needs (issue 13), over
//! any transport: `fs_conformance_tests!` expands them like `conformance_tests!`.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use crate::conformance::Harness;
use crate::error::Error;
use crate::proto::{OpenFlags, SetattrReq, Status, RENAME_EXCHANGE, RENAME_NOREPLACE};
use crate::transport::Transport;

fn errno_of<T: std::fmt::Debug>(r: crate::Result<T>) -> u32 {
    match r {
        Err(Error::Remote { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Attributes, setattr, links, symlinks, rename flags, rmdir, statfs, fallocate,
/// fdatasync, O_APPEND, O_EXCL and user xattrs, each checked against the export on disk.
pub fn fs_operations(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    let c = h.client();
    std::fs::write(h.path("f"), b"hello").unwrap();
    let md = std::fs::symlink_metadata(h.path("f")).unwrap();
    let a = c.getattr("f", false).unwrap();
    assert_eq!(
        (a.ino, a.nlink, a.uid, a.gid, a.size, a.blocks, a.mode),
        (md.ino(), 1, md.uid(), md.gid(), 5, md.blocks(), md.mode())
    );
    assert_eq!(a.mtime_ns, md.mtime() * 1_000_000_000 + md.mtime_nsec());
    assert_eq!(a.ctime_ns, md.ctime() * 1_000_000_000 + md.ctime_nsec());
    assert!(c.getattr("", false).unwrap().is_dir());
    // Stable inode numbers: the same file, the same number, through any handle.
    let f = c.open("f", OpenFlags::rw()).unwrap();
    assert_eq!(f.getattr().unwrap().ino, a.ino);

    // setattr: chmod, utimens with nanoseconds, truncate by path and by handle, chown to
    // the owner it has (what any server may do).
    let set = SetattrReq {
        path: "f".into(),
        valid: SetattrReq::SET_MODE
            | SetattrReq::SET_ATIME
            | SetattrReq::SET_MTIME
            | SetattrReq::SET_SIZE
            | SetattrReq::SET_UID
            | SetattrReq::SET_GID,
        mode: 0o640,
        uid: md.uid(),
        gid: md.gid(),
        size: 3,
        atime_ns: 1_000_000_000 * 1_600_000_000 + 123_456_789,
        mtime_ns: 1_000_000_000 * 1_500_000_000 + 987_654_321,
        ..Default::default()
    };
    let a2 = c.setattr(&set).unwrap();
    let md = std::fs::symlink_metadata(h.path("f")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!(md.len(), 3);
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_500_000_000, 987_654_321));
    assert_eq!((md.atime(), md.atime_nsec()), (1_600_000_000, 123_456_789));
    assert_eq!((a2.size, a2.mode & 0o7777), (3, 0o640));
    let a3 = f
        .setattr(&SetattrReq {
            valid: SetattrReq::SET_SIZE | SetattrReq::SET_MTIME_NOW,
            size: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(a3.size, 10);
    assert!(a3.mtime_ns > a2.mtime_ns);
    assert_eq!(std::fs::read(h.path("f")).unwrap(), b"hel\0\0\0\0\0\0\0");

    // fallocate grows the file; fdatasync succeeds.
    f.fallocate(0, 0, 1 << 20).unwrap();
    assert_eq!(std::fs::metadata(h.path("f")).unwrap().len(), 1 << 20);
    f.fdatasync().unwrap();
    f.fsync().unwrap();
    drop(f);

    // Hard links share the inode; nlink counts them.
    c.link("f", "f2").unwrap();
    let l = c.getattr("f2", false).unwrap();
    assert_eq!((l.ino, l.nlink), (a.ino, 2));
    assert_eq!(std::fs::metadata(h.path("f")).unwrap().nlink(), 2);

    // Symlinks: the target stored as written, relative or not, read back the same.
    c.symlink("f", "ln").unwrap();
    c.symlink("../../outside/wherever", "ln_out").unwrap();
    assert_eq!(c.readlink("ln").unwrap(), "f");
    assert_eq!(
        std::fs::read_link(h.path("ln_out")).unwrap().to_str(),
        Some("../../outside/wherever")
    );
    assert!(c.getattr("ln", false).unwrap().is_symlink());
    assert_eq!(c.getattr("ln", true).unwrap().ino, a.ino);
    // ... but following one that leaves the export is refused.
    assert_eq!(
        errno_of(c.getattr("ln_out", true)),
        Status::OutsideExport as u32
    );
    assert_eq!(
        errno_of(c.open("ln_out", OpenFlags::READ)),
        Status::OutsideExport as u32
    );
    assert_eq!(errno_of(c.readlink("f")), libc::EINVAL as u32);

    // rename: plain, NOREPLACE refuses an existing target, EXCHANGE swaps.
    std::fs::write(h.path("a"), b"A").unwrap();
    std::fs::write(h.path("b"), b"B").unwrap();
    assert_eq!(
        errno_of(c.rename("a", "b", RENAME_NOREPLACE)),
        libc::EEXIST as u32
    );
    c.rename("a", "b", RENAME_EXCHANGE).unwrap();
    assert_eq!(std::fs::read(h.path("a")).unwrap(), b"B");
    assert_eq!(std::fs::read(h.path("b")).unwrap(), b"A");
    c.rename("a", "c", RENAME_NOREPLACE).unwrap();
    c.rename("c", "b", 0).unwrap();
    assert_eq!(std::fs::read(h.path("b")).unwrap(), b"B");
    assert!(!h.path("a").exists() && !h.path("c").exists());

    // rmdir: only an empty directory, and never a file.
    c.mkdir_mode("d", 0o700).unwrap();
    assert_eq!(
        std::fs::metadata(h.path("d")).unwrap().mode() & 0o7777,
        0o700
    );
    std::fs::write(h.path("d/x"), b"").unwrap();
    assert_eq!(errno_of(c.rmdir("d")), libc::ENOTEMPTY as u32);
    assert_eq!(errno_of(c.rmdir("b")), libc::ENOTDIR as u32);
    c.unlink("d/x").unwrap();
    c.rmdir("d").unwrap();
    assert!(!h.path("d").exists());

    // statfs of the export.
    let s = c.statfs().unwrap();
    assert!(s.blocks > 0 && s.bsize > 0 && s.namelen >= 255, "{s:?}");

    // O_EXCL refuses an existing file; O_APPEND writes at the end whatever the offset.
    assert_eq!(
        errno_of(c.open("b", OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCL)),
        libc::EEXIST as u32
    );
    let ap = c.open("b", OpenFlags::WRITE | OpenFlags::APPEND).unwrap();
    ap.pwrite(b"++", 0).unwrap();
    drop(ap);
    assert_eq!(std::fs::read(h.path("b")).unwrap(), b"B++");

    // User extended attributes; other namespaces are refused.
    c.setxattr("b", "user.k", b"value", 0).unwrap();
    assert_eq!(
        c.getxattr("b", "user.k", 64).unwrap(),
        Ok(b"value".to_vec())
    );
    assert_eq!(c.getxattr("b", "user.k", 2).unwrap(), Err(5));
    assert_eq!(c.getxattr("b", "user.k", 0).unwrap(), Err(5));
    assert_eq!(
        errno_of(c.setxattr("b", "user.k", b"x", 1)),
        libc::EEXIST as u32
    );
    c.setxattr("b", "user.big", &vec![7u8; 4000], 0).unwrap();
    assert_eq!(
        c.getxattr("b", "user.big", 8192).unwrap(),
        Ok(vec![7u8; 4000])
    );
    let names = c.listxattr("b", 4096).unwrap().unwrap();
    assert_eq!(names, b"user.k\0user.big\0");
    c.removexattr("b", "user.k").unwrap();
    assert_eq!(
        errno_of(c.getxattr("b", "user.k", 64)),
        libc::ENODATA as u32
    );
    assert_eq!(
        errno_of(c.setxattr("b", "trusted.k", b"v", 0)),
        libc::EOPNOTSUPP as u32
    );
    drop(c);
    h.assert_server_clean();
}

/// Directory streams: every entry once, pages continued without rescanning, a stale cookie
/// restarts correctly, bad handles refused.
pub fn fs_readdir(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    std::fs::create_dir(h.path("big")).unwrap();
    let n = 3000;
    for i in 0..n {
        std::fs::write(h.path(&format!("big/file-with-a-longish-name-{i:05}")), b"").unwrap();
    }
    std::fs::create_dir(h.path("big/sub")).unwrap();
    let c = h.client();
    let before = h
        .server
        .stats()
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut all = c.read_dir("big").unwrap();
    let used = h
        .server
        .stats()
        .requests
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    all.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(all.len(), n + 1);
    assert!(
        all.windows(2).all(|w| w[0].name != w[1].name),
        "an entry twice"
    );
    let sub = all.iter().find(|e| e.name == "sub").unwrap();
    assert_eq!(sub.kind, 4);
    assert_eq!(sub.ino, std::fs::metadata(h.path("big/sub")).unwrap().ino());
    // 3001 entries of ~48 bytes in pages of 256 KiB: opendir, one page, releasedir.
    assert!(used <= 4, "{used} requests for one directory");
    // Small pages continue the stream; a stale cookie restarts it and skips.
    let dh = c.opendir("big").unwrap();
    let (p1, next, done) = c.readdir(dh, 0, 4096).unwrap();
    assert!(!done && p1.len() as u64 == next && next > 10);
    let (p2, next2, _) = c.readdir(dh, next, 4096).unwrap();
    assert_eq!(next2, next + p2.len() as u64);
    let (again, _, _) = c.readdir(dh, 0, 4096).unwrap();
    assert_eq!(again, p1);
    let (p2b, _, _) = c.readdir(dh, next, 4096).unwrap();
    assert_eq!(p2b, p2);
    assert!(p1.iter().all(|e| !p2.contains(e)));
    c.releasedir(dh).unwrap();
    assert_eq!(errno_of(c.releasedir(dh)), Status::BadHandle as u32);
    assert_eq!(errno_of(c.readdir(dh, 0, 4096)), Status::BadHandle as u32);
    assert!(c.opendir("big/file-with-a-longish-name-00001").is_err());
    drop(c);
    h.assert_server_clean();
}

/// Directory streams with attributes: every entry once with what `lstat` says on the
/// server (a symlink not followed), a 3001-entry directory in a handful of requests, pages
/// continued, bad handles refused, and a read-only export still lists.
pub fn fs_readdirplus(t: Arc<dyn Transport>) {
    let h = Harness::start(t, |_| {});
    std::fs::create_dir(h.path("big")).unwrap();
    let n = 3000;
    for i in 0..n {
        std::fs::write(
            h.path(&format!("big/file-with-a-longish-name-{i:05}")),
            vec![7u8; i % 50],
        )
        .unwrap();
    }
    std::fs::create_dir(h.path("big/sub")).unwrap();
    std::os::unix::fs::symlink("../../outside", h.path("big/link")).unwrap();
    let c = h.client();
    let requests = || {
        h.server
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = requests();
    let mut all = c.read_dir_plus("big").unwrap();
    let used = requests() - before;
    all.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
    assert_eq!(all.len(), n + 2);
    assert!(
        all.windows(2).all(|w| w[0].entry.name != w[1].entry.name),
        "an entry twice"
    );
    for e in &all {
        let md = std::fs::symlink_metadata(h.path(&format!("big/{}", e.entry.name))).unwrap();
        let a = e.attr.expect("attributes of every entry");
        assert_eq!(
            (a.ino, a.mode, a.size, a.nlink as u64, a.uid, a.gid),
            (
                md.ino(),
                md.mode(),
                md.size(),
                md.nlink(),
                md.uid(),
                md.gid()
            ),
            "{}",
            e.entry.name
        );
        assert_eq!(a.mtime_ns, md.mtime() * 1_000_000_000 + md.mtime_nsec());
        assert_eq!(e.entry.ino, md.ino());
        assert_eq!(u32::from(e.entry.kind), md.mode() >> 12);
    }
    let link = all.iter().find(|e| e.entry.name == "link").unwrap();
    assert!(link.attr.unwrap().is_symlink());
    // ~125 bytes an entry in pages of 256 KiB: opendir, two pages, releasedir.
    assert!(used <= 6, "{used} requests for one directory");
    // Small pages continue the stream; the pages differ; a restart gives the first again.
    let dh = c.opendir("big").unwrap();
    let (p1, next, done) = c.readdirplus(dh, 0, 4096).unwrap();
    assert!(!done && p1.len() as u64 == next && next > 10);
    let (p2, next2, _) = c.readdirplus(dh, next, 4096).unwrap();
    assert_eq!(next2, next + p2.len() as u64);
    assert!(p1.iter().all(|e| !p2.contains(e)));
    let (again, _, _) = c.readdirplus(dh, 0, 4096).unwrap();
    assert_eq!(again, p1);
    c.releasedir(dh).unwrap();
    assert_eq!(
        errno_of(c.readdirplus(dh, 0, 4096)),
        Status::BadHandle as u32
    );
    assert!(c
        .read_dir_plus("big/file-with-a-longish-name-00001")
        .is_err());
    assert!(c.read_dir_plus("../").is_err());
    drop(c);
    h.assert_server_clean();
}

/// A read-only export refuses every new mutating operation; escapes are refused.
pub fn fs_read_only_and_escapes(t: Arc<dyn Transport>) {
    let h = Harness::start(t.clone(), |c| c.server.read_only = true);
    std::fs::write(h.path("f"), b"x").unwrap();
    std::fs::create_dir(h.path("d")).unwrap();
    let c = h.client();
    let ro = Status::ReadOnly as u32;
    assert_eq!(
        errno_of(c.setattr(&SetattrReq {
            path: "f".into(),
            valid: SetattrReq::SET_MODE,
            mode: 0o600,
            ..Default::default()
        })),
        ro
    );
    assert_eq!(errno_of(c.rename("f", "g", 0)), ro);
    assert_eq!(errno_of(c.rmdir("d")), ro);
    assert_eq!(errno_of(c.symlink("f", "s")), ro);
    assert_eq!(errno_of(c.link("f", "l")), ro);
    assert_eq!(errno_of(c.setxattr("f", "user.a", b"1", 0)), ro);
    assert_eq!(errno_of(c.removexattr("f", "user.a")), ro);
    assert_eq!(
        errno_of(c.open("f", OpenFlags::WRITE | OpenFlags::APPEND)),
        ro
    );
    // Reads still work.
    assert_eq!(c.getattr("f", false).unwrap().size, 1);
    assert_eq!(c.read_dir("").unwrap().len(), 2);
    assert_eq!(c.read_dir_plus("").unwrap().len(), 2);
    assert!(h.path("f").exists() && h.path("d").exists());
    drop(c);

    let h = Harness::start(t, |_| {});
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(h.path("f"), b"x").unwrap();
    std::os::unix::fs::symlink(outside.path(), h.path("out")).unwrap();
    let c = h.client();
    let out = Status::OutsideExport as u32;
    assert_eq!(errno_of(c.rename("f", "../f", 0)), out);
    assert_eq!(errno_of(c.rename("f", "out/f", 0)), out);
    assert_eq!(errno_of(c.link("f", "out/l")), out);
    assert_eq!(errno_of(c.symlink("x", "out/s")), out);
    assert_eq!(errno_of(c.rmdir("out/..")), Status::BadRequest as u32);
    assert_eq!(errno_of(c.getattr("out", true)), out);
    assert_eq!(errno_of(c.opendir("out")), out);
    assert_eq!(
        errno_of(c.setxattr("out", "user.a", b"1", 0)),
        libc::EPERM as u32
    );
    assert_eq!(
        errno_of(c.setattr(&SetattrReq {
            path: "out".into(),
            valid: SetattrReq::SET_MODE,
            mode: 0o777,
            ..Default::default()
        })),
        libc::EOPNOTSUPP as u32
    );
    assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    assert!(h.path("f").exists());
}

/// Expands into one `#[test]` per file-system case for a transport factory (as
/// `conformance_tests!`).
#[macro_export]
macro_rules! fs_conformance_tests {
    ($factory:expr) => {
        $crate::fs_conformance_tests!(@cases $factory;
            fs_operations, fs_readdir, fs_readdirplus, fs_read_only_and_escapes);
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let t: Option<::std::sync::Arc<dyn $crate::transport::Transport>> = $factory;
                if let Some(t) = t {
                    $crate::conformance_fs::$case(t);
                }
            }
        )*
    };
}
