//! `zcio mount` for real: the `zcio` binary mounts (as root, on `/dev/fuse`) an export
//! served on 127.0.0.1, and real programs (cp, diff, tar, rsync, git, dd, fio) work in it.
//!
//! They need root and `/dev/fuse`, so they are `#[ignore]`d in a plain `cargo test` and
//! `ci/test` runs them with `--ignored` (where a missing tool or device is a failure, not
//! a skip).

mod support;

use std::io::IoSliceMut;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::{free_port, run_ok, tcp_server, wait_until, zcio};
use zcio::pool::Pool;
use zcio::{Config, ServerHandle};

const NEEDS: &str = "needs root, /dev/fuse and the programs ci/setup installs; ci/test runs it";

/// Runs a shell command line; panics with its output if it fails.
fn sh(cmd: &str) -> String {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", cmd])
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "`{cmd}` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_mounted(mnt: &Path) -> bool {
    let m = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let want = mnt.to_str().unwrap();
    m.lines().any(|l| l.split(' ').nth(1) == Some(want))
}

/// A server in this process (so the test reads its statistics), over TCP on 127.0.0.1.
fn server(export: &Path) -> ServerHandle {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.export = export.to_path_buf();
    cfg.server.workers = 4;
    tcp_server(&cfg)
}

/// A mount made by `zcio mount`; unmounted (by `zcio umount`, else lazily) when dropped.
struct Mounted {
    dir: tempfile::TempDir,
}

impl Mounted {
    fn new(addr: &str, extra: &[&str]) -> Mounted {
        Mounted::with_env(addr, extra, &[])
    }

    fn with_env(addr: &str, extra: &[&str], env: &[(&str, &str)]) -> Mounted {
        let dir = tempfile::Builder::new()
            .prefix("zcio-mnt-")
            .tempdir()
            .unwrap();
        run_ok(
            zcio()
                .envs(env.iter().copied())
                .arg("mount")
                .arg(addr)
                .arg(dir.path())
                .args(extra),
        );
        assert!(
            is_mounted(dir.path()),
            "zcio mount returned, nothing mounted"
        );
        Mounted { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn umount(&self) {
        let out = zcio().arg("umount").arg(self.dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "zcio umount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until("the mount to go", Duration::from_secs(30), || {
            !is_mounted(self.dir.path())
        });
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(self.dir.path()) {
            let _ = zcio().arg("umount").arg(self.dir.path()).status();
            if is_mounted(self.dir.path()) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(self.dir.path())
                    .status();
            }
        }
    }
}

/// A tree of `n` files (sizes 0 to ~40 KiB, a few of 1 MiB) in nested directories, with
/// symlinks, a hard link, odd modes and an mtime in the past.
fn make_tree(root: &Path, n: usize) {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(13);
    for i in 0..n {
        let d = root.join(format!("d{:02}/e{}", i % 40, i % 7));
        std::fs::create_dir_all(&d).unwrap();
        let len = if i % 500 == 0 {
            1 << 20
        } else {
            r.gen_range(0..40_000)
        };
        let data: Vec<u8> = (0..len).map(|_| r.gen()).collect();
        let p = d.join(format!("f{i}.bin"));
        std::fs::write(&p, &data).unwrap();
        if i % 97 == 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
    std::os::unix::fs::symlink("d00/e0/f0.bin", root.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("d01", root.join("link-dir")).unwrap();
    std::fs::hard_link(root.join("d00/e0/f0.bin"), root.join("hard")).unwrap();
    sh(&format!(
        "touch -d '2001-02-03 04:05:06.123456789' {}/hard",
        root.display()
    ));
}

#[test]
#[ignore = "needs root, /dev/fuse and the programs ci/setup installs; ci/test runs it"]
fn real_programs_leave_identical_data() {
    let _ = NEEDS;
    let export = tempfile::tempdir().unwrap();
    let srv = server(export.path());
    let m = Mounted::new(srv.local_addr(), &[]);
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    make_tree(&src, 3000);
    let (s, mp) = (src.display(), m.dir.path().display());

    // cp -a of ~3000 files, then diff -r through the mount and on the server's disk.
    sh(&format!(
        "cp -a {s} {mp}/cp && diff -r --no-dereference {s} {mp}/cp"
    ));
    sh(&format!(
        "diff -r --no-dereference {s} {}/cp",
        export.path().display()
    ));
    // Modes, mtimes (ns), symlink targets and the hard link survived.
    let a = std::fs::symlink_metadata(src.join("hard")).unwrap();
    let b = std::fs::symlink_metadata(m.path("cp/hard")).unwrap();
    assert_eq!((a.mtime(), a.mtime_nsec()), (b.mtime(), b.mtime_nsec()));
    assert_eq!(b.nlink(), 2);
    assert_eq!(
        b.ino(),
        std::fs::metadata(m.path("cp/d00/e0/f0.bin")).unwrap().ino()
    );
    assert_eq!(
        std::fs::read_link(m.path("cp/link-rel")).unwrap(),
        Path::new("d00/e0/f0.bin")
    );
    assert_eq!(
        std::fs::metadata(m.path("cp/d00/e0/f0.bin"))
            .unwrap()
            .mode()
            & 0o777,
        0o600
    );

    // tar create from the mount, extract into the mount.
    sh(&format!(
        "tar -C {mp}/cp -cf {l}/t.tar . && mkdir {mp}/untar && tar -C {mp}/untar -xf {l}/t.tar \
         && diff -r --no-dereference {s} {mp}/untar",
        l = local.path().display()
    ));
    // rsync -a, and a second run that finds nothing to do.
    sh(&format!(
        "rsync -a {s}/ {mp}/rs/ && diff -r --no-dereference {s} {mp}/rs"
    ));
    let again = sh(&format!("rsync -a --itemize-changes {s}/ {mp}/rs/"));
    assert!(again.trim().is_empty(), "rsync found changes: {again}");

    // git init, add, commit, fsck inside the mount.
    sh(&format!(
        "cd {mp} && mkdir repo && cd repo && git init -q && cp -a {s}/d00 . && git add -A \
         && git -c user.name=t -c user.email=t@t commit -qm one && git fsck --strict \
         && echo more >> d00/e0/f0.bin && git -c user.name=t -c user.email=t@t commit -qam two \
         && git fsck --strict && test \"$(git rev-list --count HEAD)\" = 2 && git gc -q \
         && git fsck --strict"
    ));

    // dd, buffered and O_DIRECT, read back and compared.
    sh(&format!(
        "head -c 8M /dev/urandom > {l}/r && dd if={l}/r of={mp}/dd1 bs=1M status=none \
         && dd if={l}/r of={mp}/dd2 bs=1M oflag=direct status=none \
         && cmp {l}/r {mp}/dd1 && cmp {l}/r {mp}/dd2 \
         && dd if={mp}/dd2 of={l}/back bs=1M iflag=direct status=none && cmp {l}/r {l}/back",
        l = local.path().display()
    ));

    // fio with crc32c verification, buffered and direct, several jobs in flight.
    for direct in [0, 1] {
        sh(&format!(
            "fio --name=v --directory={mp} --filename=fio{direct} --size=16M --bs=64k \
             --rw=randwrite --ioengine=libaio --iodepth=8 --direct={direct} \
             --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
             --output=/dev/null"
        ));
    }
    drop(m);
    srv.shutdown();
}

/// The file operations through the kernel, each result checked on both sides.
#[test]
#[ignore = "needs root, /dev/fuse and the programs ci/setup installs; ci/test runs it"]
fn rename_link_symlink_chmod_truncate_xattr() {
    let export = tempfile::tempdir().unwrap();
    let srv = server(export.path());
    let m = Mounted::new(srv.local_addr(), &[]);
    let e = |p: &str| export.path().join(p);
    std::fs::write(m.path("a"), b"alpha").unwrap();
    std::fs::write(m.path("b"), b"beta").unwrap();

    // rename, RENAME_NOREPLACE, RENAME_EXCHANGE.
    std::fs::rename(m.path("a"), m.path("c")).unwrap();
    assert!(!e("a").exists() && std::fs::read(e("c")).unwrap() == b"alpha");
    let nr = nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &m.path("c"),
        nix::fcntl::AT_FDCWD,
        &m.path("b"),
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    );
    assert_eq!(nr, Err(nix::errno::Errno::EEXIST));
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &m.path("c"),
        nix::fcntl::AT_FDCWD,
        &m.path("b"),
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .unwrap();
    assert_eq!(std::fs::read(m.path("b")).unwrap(), b"alpha");
    assert_eq!(std::fs::read(e("c")).unwrap(), b"beta");
    // A directory renamed with files below it: paths below move too.
    std::fs::create_dir_all(m.path("d1/d2")).unwrap();
    std::fs::write(m.path("d1/d2/f"), b"deep").unwrap();
    std::fs::rename(m.path("d1"), m.path("x1")).unwrap();
    assert_eq!(std::fs::read(m.path("x1/d2/f")).unwrap(), b"deep");
    assert!(!m.path("d1").exists());

    // Hard link: same inode, nlink 2 on both sides, survives the old name's removal.
    std::fs::hard_link(m.path("b"), m.path("h")).unwrap();
    let (x, y) = (
        std::fs::metadata(m.path("b")).unwrap(),
        std::fs::metadata(m.path("h")).unwrap(),
    );
    assert_eq!((x.ino(), y.nlink()), (y.ino(), 2));
    assert_eq!(std::fs::metadata(e("h")).unwrap().ino(), x.ino());
    std::fs::remove_file(m.path("b")).unwrap();
    assert_eq!(std::fs::read(m.path("h")).unwrap(), b"alpha");

    // Symlinks: relative target stored as written; one pointing out of the export is
    // stored too, but does not lead out of it on the server.
    std::os::unix::fs::symlink("h", m.path("s")).unwrap();
    assert_eq!(std::fs::read_link(e("s")).unwrap(), Path::new("h"));
    assert_eq!(std::fs::read(m.path("s")).unwrap(), b"alpha");

    // chmod, truncate, utimens.
    std::fs::set_permissions(m.path("h"), std::fs::Permissions::from_mode(0o604)).unwrap();
    assert_eq!(std::fs::metadata(e("h")).unwrap().mode() & 0o777, 0o604);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("h"))
        .unwrap();
    f.set_len(2).unwrap();
    drop(f);
    assert_eq!(std::fs::read(e("h")).unwrap(), b"al");
    sh(&format!("truncate -s 100000 {}", m.path("h").display()));
    assert_eq!(std::fs::metadata(e("h")).unwrap().len(), 100_000);
    sh(&format!(
        "touch -m -d '1999-12-31 23:59:59.5' {}",
        m.path("h").display()
    ));
    let md = std::fs::metadata(e("h")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (946_684_799, 500_000_000));

    // O_APPEND and O_EXCL.
    sh(&format!(
        "echo one > {p} && echo two >> {p}",
        p = m.path("ap").display()
    ));
    assert_eq!(std::fs::read(e("ap")).unwrap(), b"one\ntwo\n");
    let excl = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.path("ap"));
    assert_eq!(excl.unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);

    // rmdir: refused while not empty.
    assert!(std::fs::remove_dir(m.path("x1/d2")).is_err());
    std::fs::remove_file(m.path("x1/d2/f")).unwrap();
    std::fs::remove_dir(m.path("x1/d2")).unwrap();
    assert!(!e("x1/d2").exists());

    // User extended attributes, through setfattr/getfattr.
    let hp = m.path("h");
    sh(&format!("setfattr -n user.color -v blue {}", hp.display()));
    let got = sh(&format!(
        "getfattr --only-values -n user.color {}",
        hp.display()
    ));
    assert_eq!(got, "blue");
    let all = sh(&format!("getfattr -d {}", hp.display()));
    assert!(all.contains("user.color=\"blue\""), "{all}");
    sh(&format!("setfattr -x user.color {}", hp.display()));
    assert!(!sh(&format!("getfattr -d {}", hp.display())).contains("color"));

    // statfs and fallocate.
    sh(&format!("df {} >/dev/null", m.dir.path().display()));
    sh(&format!("fallocate -l 3M {}", m.path("fa").display()));
    assert_eq!(std::fs::metadata(e("fa")).unwrap().len(), 3 << 20);
    m.umount();
    srv.shutdown();
}

/// Reads `segs` segments of `seg` bytes at `offset` with one O_DIRECT `preadv` into pool
/// buffers (page-aligned) and returns the bytes.
fn direct_preadv(path: &Path, segs: usize, seg: usize, offset: u64) -> Vec<u8> {
    use std::os::unix::fs::OpenOptionsExt;
    let pool = Pool::new(&zcio::PoolConfig::default()).unwrap();
    let mut bufs: Vec<_> = (0..segs).map(|_| pool.get(seg).unwrap()).collect();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut iov: Vec<IoSliceMut<'_>> = bufs
        .iter_mut()
        .map(|b| IoSliceMut::new(&mut b[..]))
        .collect();
    let n = nix::sys::uio::preadv(&f, &mut iov, offset as i64).unwrap();
    assert_eq!(n, segs * seg);
    bufs.iter().flat_map(|b| b.iter().copied()).collect()
}

/// The kernel's request sizes, as the server counts them: a 1 MiB read is one zcio
/// request, and so is an O_DIRECT `preadv` of 256 x 4 KiB (and of 32 x 4 KiB).
#[test]
#[ignore = "needs root, /dev/fuse and the programs ci/setup installs; ci/test runs it"]
fn big_requests_arrive_as_one() {
    let export = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(export.path().join("big"), &data).unwrap();
    let srv = server(export.path());
    let st = srv.stats();
    let reads = || {
        (
            st.reads.load(Ordering::Relaxed),
            st.read_bytes.load(Ordering::Relaxed),
        )
    };
    let m = Mounted::new(srv.local_addr(), &[]);
    for (segs, seg, offset) in [
        (1usize, 1usize << 20, 0u64),
        (256, 4096, 1 << 20),
        (32, 4096, 3 << 20),
    ] {
        let before = reads();
        let got = direct_preadv(&m.path("big"), segs, seg, offset);
        let after = reads();
        assert_eq!(got, data[offset as usize..offset as usize + segs * seg]);
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (1, (segs * seg) as u64),
            "{segs} x {seg} O_DIRECT preadv: server saw (requests, bytes)"
        );
    }
    // A buffered 1 MiB read of a 1 MiB file: one read request of 1 MiB (the mount raises
    // the kernel's 128 KiB readahead to 1 MiB).
    std::fs::write(export.path().join("one"), &data[..1 << 20]).unwrap();
    let before = reads();
    let pool = Pool::new(&zcio::PoolConfig::default()).unwrap();
    let mut buf = pool.get(1 << 20).unwrap();
    let f = std::fs::File::open(m.path("one")).unwrap();
    assert_eq!(nix::sys::uio::pread(&f, &mut buf, 0).unwrap(), 1 << 20);
    assert_eq!(&buf[..], &data[..1 << 20]);
    drop(f);
    let after = reads();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 1 << 20),
        "buffered 1 MiB read: server saw (requests, bytes)"
    );

    // A 1 MiB write with O_DIRECT: one write request of 1 MiB.
    let (w0, wb0) = (
        st.writes.load(Ordering::Relaxed),
        st.write_bytes.load(Ordering::Relaxed),
    );
    sh(&format!(
        "dd if=/dev/zero of={} bs=1M count=1 oflag=direct status=none",
        m.path("w").display()
    ));
    assert_eq!(
        (
            st.writes.load(Ordering::Relaxed) - w0,
            st.write_bytes.load(Ordering::Relaxed) - wb0
        ),
        (1, 1 << 20)
    );
    drop(m);

    // With --direct-io, a plain (buffered-API) 1 MiB read is one request as well.
    let m = Mounted::new(srv.local_addr(), &["--direct-io"]);
    let before = reads();
    // Page-aligned (a pool buffer): an unaligned one spans 257 pages, two requests.
    let mut buf = pool.get(1 << 20).unwrap();
    let f = std::fs::File::open(m.path("big")).unwrap();
    let n = nix::sys::uio::pread(&f, &mut buf, 0).unwrap();
    assert_eq!((n, &buf[..]), (1 << 20, &data[..1 << 20]));
    let after = reads();
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 1 << 20));
    drop(f);
    m.umount();
    srv.shutdown();
}

/// `--writeback-cache`: a tree copied in and a file written in odd pieces through a
/// write-only descriptor read back identical, through the mount and on the server's disk.
/// The mount runs in the background at debug level, logging every request to its log file
/// (a background mount once died at its first log line); one without a log file is silent
/// and survives too.
#[test]
#[ignore = "needs root, /dev/fuse and the programs ci/setup installs; ci/test runs it"]
fn writeback_cache_and_background_logging() {
    let export = tempfile::tempdir().unwrap();
    let srv = server(export.path());
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("mount.log");
    let debug = [("ZCIO_LOG", "debug")];
    let m = Mounted::with_env(
        srv.local_addr(),
        &["--writeback-cache", "--log-file", log.to_str().unwrap()],
        &debug,
    );
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    make_tree(&src, 300);
    let (s, mp, ex) = (
        src.display(),
        m.dir.path().display(),
        export.path().display(),
    );
    sh(&format!(
        "cp -a {s} {mp}/cp && diff -r --no-dereference {s} {mp}/cp"
    ));
    // Pieces of 1000 bytes at odd offsets through O_WRONLY (dd conv=notrunc): the kernel
    // must read the partly written pages, through a descriptor opened write-only.
    let base: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(local.path().join("base"), &base).unwrap();
    sh(&format!("cp {}/base {mp}/w", local.path().display()));
    let mut want = base.clone();
    for (k, off) in [(1u8, 333usize), (2, 4095), (3, 150_001)] {
        let piece = vec![k; 1000];
        std::fs::write(local.path().join("piece"), &piece).unwrap();
        sh(&format!(
            "dd if={}/piece of={mp}/w bs=1 seek={off} conv=notrunc status=none",
            local.path().display()
        ));
        want[off..off + 1000].copy_from_slice(&piece);
    }
    // Appends, placed by the kernel.
    sh(&format!(
        "printf abc >> {mp}/w && printf de >> {mp}/w && sync {mp}/w"
    ));
    want.extend_from_slice(b"abcde");
    assert_eq!(std::fs::read(m.path("w")).unwrap(), want);
    sh(&format!("sync {mp}/w"));
    assert_eq!(std::fs::read(export.path().join("w")).unwrap(), want);
    sh(&format!("sync && diff -r --no-dereference {s} {ex}/cp"));
    assert!(is_mounted(m.dir.path()), "the background mount died");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("request"), "nothing logged: {logged:?}");
    m.umount();

    // No log file: silent, and alive after many requests that would have logged.
    let m = Mounted::with_env(srv.local_addr(), &[], &debug);
    sh(&format!(
        "cp -a {s} {}/cp2 && diff -r {s} {}/cp2",
        m.dir.path().display(),
        m.dir.path().display()
    ));
    assert!(is_mounted(m.dir.path()), "the silent background mount died");
    m.umount();
    srv.shutdown();
}

/// `ls -ln` of a 3000-entry directory: readdirplus brings every entry's attributes in the
/// listing, so the server sees a handful of requests (not a lookup per entry), and the
/// listing is what the server's disk says.
#[test]
#[ignore = "needs root, /dev/fuse and the programs ci/setup installs; ci/test runs it"]
fn ls_of_a_big_directory_is_a_few_requests() {
    let export = tempfile::tempdir().unwrap();
    let big = export.path().join("big");
    std::fs::create_dir(&big).unwrap();
    for i in 0..3000 {
        std::fs::write(big.join(format!("entry-{i:05}")), vec![1u8; i % 300]).unwrap();
    }
    std::fs::create_dir(big.join("sub")).unwrap();
    std::os::unix::fs::symlink("entry-00001", big.join("link")).unwrap();
    let srv = server(export.path());
    let st = srv.stats();
    let m = Mounted::new(srv.local_addr(), &[]);
    let ls = |dir: &Path| sh(&format!("ls -ln --time-style=full-iso {}", dir.display()));
    let before = st.requests.load(Ordering::Relaxed);
    let listed = ls(&m.path("big"));
    let used = st.requests.load(Ordering::Relaxed) - before;
    assert_eq!(listed.lines().count(), 3003, "total line and 3002 entries");
    assert_eq!(
        listed,
        ls(&big),
        "the mount's listing differs from the server's"
    );
    assert!(used < 30, "ls -ln of 3002 entries took {used} requests");
    // The entries are usable afterwards (the kernel holds references from the listing).
    assert_eq!(
        std::fs::read(m.path("big/entry-00299")).unwrap(),
        vec![1u8; 299]
    );
    assert_eq!(
        std::fs::read_link(m.path("big/link")).unwrap(),
        Path::new("entry-00001")
    );
    m.umount();
    srv.shutdown();
}

/// Starts `zcio serve` on `addr` for `export` and waits until it listens.
fn serve_at(addr: &str, export: &Path) -> Child {
    let c = zcio()
        .args(["serve", "--listen", addr, "--export"])
        .arg(export)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("zcio serve to listen", Duration::from_secs(60), || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    c
}

fn free_port_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A program reading one file and writing another through the mount (threads of this
/// test, on descriptors opened before) while the server is SIGKILLed and restarted on
/// the same port, then SIGTERMed and restarted: no call fails, every byte read is right,
/// and the written file on the server's disk is byte-identical to what was written.
#[test]
#[ignore = "needs root, /dev/fuse and the programs ci/setup installs; ci/test runs it"]
fn mount_survives_server_restarts() {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;
    const BLOCK: usize = 64 << 10;
    const BLOCKS: usize = 64;
    let export = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..(BLOCK * BLOCKS) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(export.path().join("f"), &data).unwrap();
    std::fs::write(export.path().join("out"), b"").unwrap();
    let addr = free_port_addr();
    let mut serve = serve_at(&addr, export.path());
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("mount.log");
    let m = Mounted::new(
        &addr,
        &[
            "--direct-io",
            "--set",
            "client.reconnect_give_up_ms=60000",
            "--log-file",
            log.to_str().unwrap(),
        ],
    );
    let reader = std::fs::File::open(m.path("f")).unwrap();
    let writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("out"))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let read_thread = {
        let (stop, done, data) = (stop.clone(), done.clone(), data.clone());
        let (fpath, root) = (m.path("f"), m.path(""));
        std::thread::spawn(move || -> Result<(), String> {
            let mut buf = vec![0u8; BLOCK];
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let off = (k % BLOCKS) * BLOCK;
                reader
                    .read_exact_at(&mut buf, off as u64)
                    .map_err(|e| format!("read of block {k}: {e}"))?;
                if buf[..] != data[off..off + BLOCK] {
                    return Err(format!("block {k} read wrong"));
                }
                // Metadata too (no attribute cache with --direct-io): a lookup and a
                // getattr, and a listing (opendir, readdirplus) now and then.
                let len = std::fs::metadata(&fpath)
                    .map_err(|e| format!("stat after block {k}: {e}"))?
                    .len();
                if len != data.len() as u64 {
                    return Err(format!("stat says {len} bytes"));
                }
                if k % 8 == 0 {
                    let n = std::fs::read_dir(&root)
                        .and_then(|d| d.collect::<Result<Vec<_>, _>>())
                        .map_err(|e| format!("listing after block {k}: {e}"))?
                        .len();
                    if n != 2 {
                        return Err(format!("listing has {n} entries"));
                    }
                }
                k += 1;
                done.0.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let write_thread = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || -> Result<Vec<u8>, String> {
            let mut image = vec![0u8; BLOCK * BLOCKS];
            let mut back = vec![0u8; BLOCK];
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let off = (k % BLOCKS) * BLOCK;
                let block: Vec<u8> = (0..BLOCK).map(|i| (i + 7 * k) as u8).collect();
                writer
                    .write_all_at(&block, off as u64)
                    .map_err(|e| format!("write of block {k}: {e}"))?;
                writer
                    .read_exact_at(&mut back, off as u64)
                    .map_err(|e| format!("read back of block {k}: {e}"))?;
                if back != block {
                    return Err(format!("block {k} read back wrong"));
                }
                image[off..off + BLOCK].copy_from_slice(&block);
                k += 1;
                done.1.fetch_add(1, Ordering::Relaxed);
            }
            writer.sync_all().map_err(|e| format!("fsync: {e}"))?;
            Ok(image)
        })
    };
    // Both make progress (again) past `n` more operations each.
    let progress = |what: &str, n: u64| {
        let (r0, w0) = (
            done.0.load(Ordering::Relaxed),
            done.1.load(Ordering::Relaxed),
        );
        wait_until(what, Duration::from_secs(120), || {
            read_thread.is_finished()
                || write_thread.is_finished()
                || (done.0.load(Ordering::Relaxed) >= r0 + n
                    && done.1.load(Ordering::Relaxed) >= w0 + n)
        });
    };
    progress("reads and writes before any restart", 50);
    serve.kill().unwrap();
    serve.wait().unwrap();
    serve = serve_at(&addr, export.path());
    progress("reads and writes after a SIGKILL and restart", 50);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(serve.wait().unwrap().success(), "zcio serve after SIGTERM");
    serve = serve_at(&addr, export.path());
    progress("reads and writes after a SIGTERM and restart", 50);
    stop.store(true, Ordering::Relaxed);
    let r = read_thread.join().unwrap();
    let w = write_thread.join().unwrap();
    assert_eq!(r, Ok(()), "the reader");
    let image = w.expect("the writer");
    assert_eq!(
        std::fs::read(export.path().join("out")).unwrap(),
        image,
        "the written file on the server's disk"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("reconnected"), "mount log: {logged}");
    m.umount();
    serve.kill().unwrap();
    serve.wait().unwrap();
}

/// The server dies for good while a program reads: the mount tries to reconnect for
/// `client.reconnect_give_up_ms` (2 s here), then the program gets an error, not a hang,
/// and `zcio umount` works afterwards. Bad addresses and tokens fail clearly, mounting nothing.
#[test]
#[ignore = "needs root, /dev/fuse and the programs ci/setup installs; ci/test runs it"]
fn failures_are_clear_and_leave_nothing_mounted() {
    let export = tempfile::tempdir().unwrap();
    std::fs::write(export.path().join("f"), vec![7u8; 8 << 20]).unwrap();
    // A real `zcio serve` process, with a token.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut serve: Child = zcio()
        .args(["serve", "--token", "s3cret", "--listen", &addr, "--export"])
        .arg(export.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("zcio serve to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&addr).is_ok()
    });

    // Unmounted however this test ends.
    let guard = Mounted {
        dir: tempfile::tempdir().unwrap(),
    };
    let mnt = &guard.dir;
    let try_mount = |args: &[&str]| {
        let out = zcio().arg("mount").args(args).output().unwrap();
        assert!(!out.status.success(), "mount {args:?} succeeded");
        assert!(!is_mounted(mnt.path()), "left mounted after {args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let m = mnt.path().to_str().unwrap();
    let e = try_mount(&["127.0.0.1:1", m]);
    assert!(e.contains("cannot reach the zcio server"), "{e}");
    let e = try_mount(&[&addr, m, "--token", "wrong"]);
    assert!(e.contains("authentication failed"), "{e}");
    let e = try_mount(&[&addr, m]);
    assert!(e.contains("token"), "{e}");
    let e = try_mount(&[&addr, "/nonexistent/zcio-mnt", "--token", "s3cret"]);
    assert!(e.contains("not an existing directory"), "{e}");

    let out = zcio()
        .args([
            "mount",
            &addr,
            m,
            "--direct-io",
            "--token",
            "s3cret",
            "--set",
            "client.reconnect_give_up_ms=2000",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A reader that loops until it fails, saying so after each whole pass.
    let mut reader = Command::new("bash")
        .args([
            "-c",
            &format!(
                "while dd if={m}/f of=/dev/null bs=1M status=none; do echo pass; done; exit 1"
            ),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once it has read the file through once (and is reading again), kill the server.
    // (Its stdout stays open: a closed pipe would end it by SIGPIPE instead.)
    let mut out = std::io::BufReader::new(reader.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    assert_eq!(first, "pass\n");
    serve.kill().unwrap();
    serve.wait().unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = reader.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the reader hung after the server died"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut reader.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("Transport endpoint is not connected") || err.contains("Input/output error"),
        "reader's error: {err}"
    );
    let out = zcio().args(["umount", m]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("the mount to go", Duration::from_secs(30), || {
        !is_mounted(mnt.path())
    });
}
