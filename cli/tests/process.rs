//! Real processes killed mid-run: the `zcio` binary as a client or as a server, SIGKILLed.

mod support;

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    free_port, run_ok, server_cfg, small_pool, spawn_serve, tcp_server, wait_until, zcio,
};

use zcio::pool::Pool;
use zcio::{Client, Config, Error, OpenFlags};

fn kill(mut c: Child) {
    // SIGKILL: no destructors, no clean shutdown.
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn client_process_killed_mid_write_leaves_server_clean() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_cfg(dir.path());
    let srv = tcp_server(&cfg);
    let child = zcio()
        .args([
            "bench",
            "--server",
            srv.local_addr(),
            "--rw",
            "randwrite",
            "--bs",
            "256K",
        ])
        .args([
            "--size",
            "8M",
            "--files",
            "2",
            "--iodepth",
            "16",
            "--runtime",
            "60s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Mid-transfer: files open and writes flowing.
    wait_until("the client's writes", Duration::from_secs(60), || {
        srv.open_files() >= 2
            && srv
                .stats()
                .requests
                .load(std::sync::atomic::Ordering::Relaxed)
                > 200
    });
    kill(child);
    wait_until("the server to clean up", Duration::from_secs(20), || {
        srv.open_files() == 0 && srv.connections() == 0 && srv.pool().stats().slots_in_use() == 0
    });
    // And it still serves.
    let mut ccfg = cfg.clone();
    ccfg.client.connect = srv.local_addr().to_string();
    let c = Client::connect_transport(
        &ccfg,
        &zcio_tcp::TcpTransport,
        Pool::new(&ccfg.pool).unwrap(),
    )
    .unwrap();
    assert_eq!(c.stat("zcio-bench.0").unwrap().size, 8 << 20);
    // Served byte for byte as the file now is on disk (no write is in flight any more).
    let f = c.open("zcio-bench.0", OpenFlags::READ).unwrap();
    let on_disk = std::fs::read(dir.path().join("zcio-bench.0")).unwrap();
    assert!(f.zero_readv(8 << 20, 0).unwrap().to_vec() == on_disk);
}

#[test]
fn server_process_killed_mid_run_fails_requests_promptly_and_clients_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let data: Arc<Vec<u8>> = Arc::new((0..(8u32 << 20)).map(|i| (i % 251) as u8).collect());
    std::fs::write(dir.path().join("f"), &*data).unwrap();
    let port = free_port();
    let server = spawn_serve(dir.path(), port);
    let mut cfg = Config::default();
    cfg.client.connect = format!("127.0.0.1:{port}");
    cfg.pool = small_pool();
    let c = Client::connect_transport(&cfg, &zcio_tcp::TcpTransport, Pool::new(&cfg.pool).unwrap())
        .unwrap();
    let f = Arc::new(c.open("f", OpenFlags::READ).unwrap());
    // A reader keeps 8 requests in flight until it sees an error, checking every byte, and
    // says when its first batch is in (so the kill comes mid-run, not before it).
    let (started, first_batch) = std::sync::mpsc::channel();
    let reader = {
        let (f, data) = (f.clone(), data.clone());
        std::thread::spawn(move || -> (u64, Error, Instant) {
            let mut ok = 0u64;
            loop {
                let p: Vec<_> = (0..8usize)
                    .map(|i| (i, f.zero_readv_async(1 << 20, (i as u64) << 20)))
                    .collect();
                for (i, p) in p {
                    match p.and_then(|p| p.wait()) {
                        Ok(b) => {
                            assert!(
                                b.to_vec() == data[i << 20..(i + 1) << 20],
                                "read {i} differs"
                            );
                            ok += 1;
                        }
                        Err(e) => return (ok, e, Instant::now()),
                    }
                }
                let _ = started.send(());
            }
        })
    };
    first_batch
        .recv_timeout(Duration::from_secs(120))
        .expect("the reader's first 8 reads did not complete");
    let killed_at = Instant::now();
    kill(server);
    let (ok, err, failed_at) = reader.join().unwrap();
    assert!(ok > 0, "no read completed before the kill");
    assert!(
        matches!(
            err,
            Error::ConnectionClosed(_) | Error::Io { .. } | Error::Transport { .. }
        ),
        "unclear error after the server died: {err:?}"
    );
    assert!(
        failed_at.duration_since(killed_at) < Duration::from_secs(10),
        "requests hung after the server died"
    );
    // New requests on the dead connection fail at once too.
    assert!(f.zero_readv(4096, 0).is_err());
    // A restarted server takes a new connection; the file is intact.
    let server = spawn_serve(dir.path(), port);
    let c2 =
        Client::connect_transport(&cfg, &zcio_tcp::TcpTransport, Pool::new(&cfg.pool).unwrap())
            .unwrap();
    let f2 = c2.open("f", OpenFlags::READ).unwrap();
    assert!(f2.zero_readv(8 << 20, 0).unwrap().to_vec() == *data);
    kill(server);
}

#[test]
fn cli_errors_are_clear() {
    let out = zcio()
        .args(["bench", "--transport", "carrier-pigeon", "--runtime", "1s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown transport `carrier-pigeon`"), "{err}");
    // Built without RDMA, the error says how to get it; built with it on a host without
    // RDMA, it says why it cannot run and what to do. Either way: clear, and no panic.
    let out = zcio()
        .args(["bench", "--transport", "rdma", "--runtime", "1s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        (err.contains("built without RDMA") && err.contains("--features rdma"))
            || err.contains("transport `rdma` is unavailable"),
        "{err}"
    );
    let out = zcio().args(["bench", "--bs", "12Q"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("12Q"));
    let out = zcio()
        .args(["config", "--set", "server.workers=0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.workers") && err.contains("`0`"),
        "{err}"
    );
    let out = zcio()
        .args(["get", "127.0.0.1:1", "x", "/tmp/zcio-never"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("zcio: error"));
}

#[test]
fn get_and_put_copy_files_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_cfg(dir.path());
    let srv = tcp_server(&cfg);
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    let data: Vec<u8> = (0..3_000_017u32).map(|i| (i * 13 % 256) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let st = zcio()
        .arg("put")
        .arg(&src)
        .args([srv.local_addr(), "copy"])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(std::fs::read(dir.path().join("copy")).unwrap() == data);
    let back = local.path().join("back");
    let st = zcio()
        .args(["get", srv.local_addr(), "copy"])
        .arg(&back)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(std::fs::read(&back).unwrap() == data);
    let st = zcio()
        .args(["get", srv.local_addr(), "../etc/passwd"])
        .arg(local.path().join("x"))
        .output()
        .unwrap();
    assert!(!st.status.success());
    assert!(String::from_utf8_lossy(&st.stderr).contains("outside the export"));
}

#[test]
fn client_killed_mid_write_loses_nothing_acknowledged_and_tears_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_cfg(dir.path());
    let srv = tcp_server(&cfg);
    let logdir = tempfile::tempdir().unwrap();
    let log = logdir.path().join("acked");
    let child = zcio()
        .args(["probe-writer", srv.local_addr(), "blocks"])
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("acknowledged writes", Duration::from_secs(60), || {
        std::fs::read_to_string(&log)
            .map(|s| s.lines().count() > 300)
            .unwrap_or(false)
    });
    kill(child);
    wait_until("the server to clean up", Duration::from_secs(20), || {
        srv.open_files() == 0 && srv.pool().stats().slots_in_use() == 0
    });
    let acked: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let data = std::fs::read(dir.path().join("blocks")).unwrap();
    let block = 64usize << 10;
    // The last acknowledged write to each slot must be there, whole.
    let mut last = std::collections::HashMap::new();
    for &i in &acked {
        last.insert(i % 1024, i);
    }
    for (&slot, &i) in &last {
        let b = &data[slot as usize * block..(slot as usize + 1) * block];
        let want = (i % 251) as u8 + 1;
        // A later, unacknowledged write may have landed too, but only whole.
        let next = ((i + 1024) % 251) as u8 + 1;
        assert!(
            b.iter().all(|&x| x == want) || b.iter().all(|&x| x == next),
            "slot {slot}: acknowledged write {i} lost or torn"
        );
    }
    // The write in flight when the client died: all of it or none of it.
    let n = *acked.last().unwrap() + 1;
    let slot = (n % 1024) as usize;
    if data.len() >= (slot + 1) * block {
        let b = &data[slot * block..(slot + 1) * block];
        let first = b[0];
        assert!(b.iter().all(|&x| x == first), "write {n} torn by the kill");
    }
}

#[test]
fn bench_counts_heap_allocations_per_operation() {
    // The embedded server over TCP: the count covers the client job, the server and the
    // transport threads, and only once the job is connected, so it is per operation, not
    // the setup's thousands. The file API, TCP and the server allocate nothing per
    // operation once warm: what is left is the warm-up inside the counted second (a queue
    // or cache reaching its high-water mark), far below one allocation per operation (the
    // file API made 4 before it reused its vectors).
    let dir = tempfile::tempdir().unwrap();
    let allocs_per_op = |extra: &[&str]| -> serde_json::Value {
        let (stdout, _) = run_ok(
            zcio()
                .args(["bench", "--rw", "read", "--bs", "64K", "--iodepth", "4"])
                .args(["--size", "4M", "--files", "1", "--runtime", "1s", "--json"])
                .args(extra)
                .arg("--export")
                .arg(dir.path()),
        );
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        v["results"][0]["allocs_per_op"].clone()
    };
    let n = allocs_per_op(&["--count-allocs"])
        .as_f64()
        .expect("allocs_per_op in the JSON");
    assert!((0.0..0.05).contains(&n), "allocations per operation: {n}");
    // Without the flag nothing is counted.
    assert!(allocs_per_op(&[]).is_null());
}

/// The file baselines run next to a mode and report bytes and CPU like the others.
#[test]
fn bench_file_baselines_run_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let out = zcio()
        .args([
            "bench",
            "--rw",
            "write",
            "--bs",
            "128K",
            "--mode",
            "zero-copy",
        ])
        .args(["--baseline", "tcp-sendfile,tcp-file-write,tcp-splice-write"])
        .args([
            "--size",
            "1M",
            "--files",
            "1",
            "--runtime",
            "200ms",
            "--json",
        ])
        .arg("--export")
        .arg(dir.path())
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = v["results"].as_array().expect("results");
    let names: Vec<&str> = results
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "zero-copy",
            "raw-tcp-sendfile",
            "raw-tcp-file-write",
            "raw-tcp-splice-write"
        ]
    );
    for r in results {
        assert!(r["mb_per_s"].as_f64().unwrap() > 0.0, "{r}");
        let cpu = r["cpu_s_per_gib"].as_f64().expect("cpu_s_per_gib");
        assert!(cpu > 0.0 && cpu.is_finite(), "{r}");
    }
}

#[test]
fn bench_sweeps_reports_cpu_per_gib_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("sweep.svg");
    let (stdout, _) = run_ok(
        zcio()
            .args(["bench", "--rw", "randread", "--bs", "4K"])
            .args(["--sweep", "iodepth=1,2"])
            .args(["--baseline", "tcp-rpc", "--size", "1M", "--files", "1"])
            .args(["--runtime", "200ms", "--json", "--plot"])
            .arg(&svg)
            .arg("--export")
            .arg(dir.path()),
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["sweep"], "iodepth");
    let points = v["points"].as_array().expect("points");
    assert_eq!(points.len(), 2);
    for (p, depth) in points.iter().zip([1, 2]) {
        assert_eq!(p["value"], depth);
        let names: Vec<&str> = p["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["mode"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["zero-copy", "raw-tcp-rpc"]);
        for r in p["results"].as_array().unwrap() {
            assert!(r["mb_per_s"].as_f64().unwrap() > 0.0, "{r}");
            let cpu = r["cpu_s_per_gib"].as_f64().expect("cpu_s_per_gib");
            assert!(cpu > 0.0 && cpu.is_finite(), "{r}");
        }
    }
    let plot = std::fs::read_to_string(&svg).expect("the plot was written");
    assert!(plot.starts_with("<svg"));
    for name in ["zero-copy", "raw-tcp-rpc", "throughput", "p99"] {
        assert!(plot.contains(name), "{name} missing from the plot");
    }
    // Bad sweeps are clear errors.
    for (bad, says) in [
        ("depth=1,2", "iodepth or bs"),
        ("iodepth=0", "1 to 4096"),
        ("bs=4k,12Q", "12Q"),
    ] {
        let out = zcio()
            .args(["bench", "--sweep", bad, "--runtime", "1s"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "--sweep {bad}: {err}");
    }
    // --plot needs --sweep.
    let out = zcio()
        .args(["bench", "--plot", "x.svg", "--runtime", "1s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// The first CPU this process may run on, and how many it may (from /proc/self/status).
fn allowed_cpus() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim()
        .to_string();
    let mut first = None;
    let mut n = 0;
    for part in list.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
        first.get_or_insert(a);
        n += b - a + 1;
    }
    (first.unwrap(), n)
}

/// `--cpus C/S` places zcio and the baselines alike and says so; the default places the
/// baselines' ends on two CPUs (when there are two) and not zcio; bad lists and CPUs the
/// process may not use are clear errors.
#[test]
fn bench_places_both_sides_on_the_cpus_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let (first, count) = allowed_cpus();
    let bench = |cpus: Option<String>| {
        let mut c = zcio();
        c.args(["bench", "--rw", "randread", "--bs", "4K", "--iodepth", "1"])
            .args(["--baseline", "tcp-pingpong", "--size", "1M", "--files", "1"])
            .args(["--runtime", "200ms", "--json", "--export"])
            .arg(dir.path());
        if let Some(cpus) = cpus {
            c.args(["--cpus", &cpus]);
        }
        let (stdout, _) = run_ok(&mut c);
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        v["cpus"].clone()
    };
    let placed = bench(Some(format!("{first}/{first}")));
    for side in ["zcio", "baselines"] {
        assert_eq!(
            placed[side]["client"],
            serde_json::json!([first]),
            "{placed}"
        );
        assert_eq!(
            placed[side]["server"],
            serde_json::json!([first]),
            "{placed}"
        );
    }
    let auto = bench(None);
    assert!(auto["zcio"].is_null(), "{auto}");
    if count >= 2 {
        let (c, s) = (&auto["baselines"]["client"], &auto["baselines"]["server"]);
        assert!(c.is_array() && s.is_array() && c != s, "{auto}");
    } else {
        assert!(auto["baselines"].is_null(), "{auto}");
    }
    for (bad, says) in [
        ("0", "CLIENT/SERVER"),
        ("0/x", "`x`"),
        ("2-1/0", "range"),
        ("1023/0", "not available"),
    ] {
        let out = zcio()
            .args(["bench", "--cpus", bad, "--runtime", "1s", "--size", "1M"])
            .arg("--export")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "--cpus {bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "--cpus {bad}: {err}");
    }
}
