//! The `zcio` commands' own behaviour, run as real processes: `config` (every key, `--set`),
//! `serve --read-only --token`, and `devices`.

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, wait_listening, zcio};

use zcio::pool::Pool;
use zcio::proto::{OpenFlags, Status};
use zcio::{Client, Config, Error};

/// Kills the child when dropped (also when the test panics).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn config_prints_every_key_and_set_overrides_them() {
    // The transports own their sections; this process reads them once they are registered.
    zcio_tcp::config::register();
    zcio_rdma::config::register();
    let out = zcio().arg("config").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    // What it prints is the defaults, complete: it parses back to them...
    assert_eq!(Config::parse(&text).unwrap(), Config::default(), "{text}");
    // ...and has every key documented in `zcio::config`, each in its section.
    let mut section = String::new();
    let mut printed = std::collections::BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[') {
            section = name.trim_matches(|c| c == '[' || c == ']').to_string();
        } else if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            printed.insert(if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            });
        }
    }
    let documented = [
        "transport",
        "server.listen",
        "server.export",
        "server.read_only",
        "server.token",
        "server.workers",
        "server.max_connections",
        "server.max_connections_per_addr",
        "server.max_in_flight",
        "server.max_open_files",
        "server.idle_timeout_ms",
        "server.direct_io",
        "client.connect",
        "client.token",
        "client.timeout_ms",
        "limits.max_segments",
        "limits.max_payload",
        "limits.max_in_flight",
        "pool.wait_timeout_ms",
        "pool.stripes",
        "pool.class.size",
        "pool.class.count",
        "pool.class.reserve",
        "pool.class.arena_slots",
        "tcp.nodelay",
        "rdma.device",
        "rdma.port",
        "rdma.gid_index",
        "rdma.inline_threshold",
        "rdma.busy_poll",
        "rdma.spin_us",
        "rdma.credits",
        "rdma.queue_pairs",
        "rdma.register_threshold",
        "rdma.client_exposure",
    ];
    for key in documented {
        assert!(
            printed.contains(key),
            "`{key}` missing from zcio config:\n{text}"
        );
    }
    // The transports' keys are printed each after its doc (a comment).
    let mut doc = false;
    let mut transport_keys = 0;
    for line in text.lines() {
        if line.starts_with("[tcp]") || line.starts_with("[rdma]") {
            transport_keys += 1;
        } else if transport_keys > 0 && !line.starts_with('#') && line.contains(" = ") {
            assert!(doc, "no doc before `{line}`:\n{text}");
            transport_keys += 1;
        }
        doc = line.starts_with("# ");
    }
    assert!(transport_keys >= 2 + 11, "{text}");

    // --set changes the keys it names, and only those.
    let out = zcio()
        .args(["config", "--set", "server.workers=7"])
        .args([
            "--set",
            "client.timeout_ms=1234",
            "--set",
            "transport=\"rdma\"",
            "--set",
            "rdma.credits=8",
            "--set",
            "tcp.nodelay=false",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let set = Config::parse(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let mut want = Config::default();
    want.server.workers = 7;
    want.client.timeout = Duration::from_millis(1234);
    want.transport = "rdma".into();
    want.section_mut::<zcio_rdma::config::RdmaConfig>().credits = 8;
    want.section_mut::<zcio_tcp::config::TcpConfig>().nodelay = false;
    assert_eq!(set, want);

    // An unknown key or section fails, naming it.
    for bad in ["nope.x=1", "server.nope=1", "rdma.nope=1", "tcp.nope=true"] {
        let out = zcio().args(["config", "--set", bad]).output().unwrap();
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("nope"), "{bad}: {err}");
    }
    // A bad value of a transport's key fails, naming the key, the value and the bounds.
    for (bad, needle) in [
        (
            "rdma.credits=1",
            "`rdma.credits` has bad value `1`: must be 2 ..= 4096",
        ),
        ("tcp.nodelay=maybe", "`tcp.nodelay` has bad value `maybe`"),
    ] {
        let out = zcio().args(["config", "--set", bad]).output().unwrap();
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{bad}: {err}");
    }
}

fn client(port: u16, token: &str) -> Result<Client, Error> {
    let mut cfg = Config::default();
    cfg.client.connect = format!("127.0.0.1:{port}");
    cfg.client.token = token.into();
    Client::connect_transport(&cfg, &zcio_tcp::TcpTransport, Pool::new(&cfg.pool)?)
}

#[test]
fn serve_read_only_with_a_token_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"served").unwrap();
    let port = free_port();
    let _server = Killed(
        zcio()
            .args(["serve", "--read-only", "--token", "open sesame", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--export")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(port);
    // The token is required.
    for wrong in ["", "open barley"] {
        match client(port, wrong) {
            Err(Error::Auth(_)) => {}
            other => panic!("token {wrong:?}: {:?}", other.map(|_| ())),
        }
    }
    // Failed attempts slow the next ones from the same address down (the server refuses
    // them for a short back-off): the right token gets in once that has passed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let c = loop {
        match client(port, "open sesame") {
            Ok(c) => break c,
            Err(Error::Auth(m)) if m.contains("try again") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("the right token was refused: {e}"),
        }
    };
    // Reads work; every modification is refused as read-only, and nothing changes.
    assert!(c.read_only());
    let f = c.open("f", OpenFlags::READ).unwrap();
    let mut b = [0u8; 6];
    assert_eq!(f.pread(&mut b, 0).unwrap(), 6);
    assert_eq!(&b, b"served");
    for (what, r) in [
        ("open rw", c.open("f", OpenFlags::rw()).map(drop)),
        (
            "create",
            c.open("n", OpenFlags::WRITE | OpenFlags::CREATE).map(drop),
        ),
        ("unlink", c.unlink("f")),
        ("mkdir", c.mkdir("d")),
    ] {
        match r {
            Err(Error::Remote { code, .. }) => {
                assert_eq!(code, Status::ReadOnly as u32, "{what}")
            }
            other => panic!("{what} allowed on a read-only export: {other:?}"),
        }
    }
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"served");
    assert!(!dir.path().join("n").exists() && !dir.path().join("d").exists());
}

#[test]
fn devices_lists_rdma_devices_or_says_why_not() {
    let out = zcio().arg("devices").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if out.status.success() {
        // A build with RDMA on a host with a device: each device with its ports.
        assert!(!stdout.trim().is_empty(), "success but nothing listed");
        assert!(stdout.contains("port"), "{stdout}");
    } else {
        // Without RDMA in the build or the kernel: one clear error and what to do.
        assert!(stderr.starts_with("zcio: error:"), "{stderr}");
        assert!(
            (stderr.contains("built without RDMA support") && stderr.contains("rdma"))
                || stderr.contains("RDMA"),
            "{stderr}"
        );
        assert!(stdout.is_empty(), "{stdout}");
    }
}

/// The `id=N` value that follows `marker` on the first line containing both.
fn id_after(log: &str, line_has: &str, marker: &str) -> Option<String> {
    log.lines().filter(|l| l.contains(line_has)).find_map(|l| {
        let at = l.find(marker)? + marker.len();
        Some(l[at..].chars().take_while(char::is_ascii_digit).collect())
    })
}

#[test]
fn rust_log_shows_one_request_from_client_to_server() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.path().join("f"), &data).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let server_log = logs.path().join("server.log");
    let port = free_port();
    let server = Killed(
        zcio()
            .env_remove("ZCIO_LOG")
            .env("RUST_LOG", "debug")
            .args(["serve", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--export")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&server_log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_listening(port);
    // ZCIO_LOG is the alias, and wins over RUST_LOG.
    let out = logs.path().join("out");
    let get = zcio()
        .env("RUST_LOG", "off")
        .env("ZCIO_LOG", "debug")
        .args(["get", &format!("127.0.0.1:{port}"), "f"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(get.status.success(), "{get:?}");
    assert!(std::fs::read(&out).unwrap() == data);
    let client = String::from_utf8_lossy(&get.stderr).into_owned();
    // The client's request span names the operation; the transport logs its id in it.
    let id = id_after(&client, "request{op=\"read\"", "tcp request id=")
        .unwrap_or_else(|| panic!("no read request with an id in the client's log:\n{client}"));
    assert!(!id.is_empty(), "{client}");
    assert!(
        client.contains(&format!("tcp reply id={id} ok=true")),
        "the client's log does not show reply {id}:\n{client}"
    );
    // The server's span for the same id names the same operation, and it was replied. The
    // server logs "replied" just after the client may have seen the reply: wait for it.
    let followed = |server: &str| {
        server.contains(&format!("tcp request received id={id}"))
            && server
                .lines()
                .any(|l| l.contains(&format!(" id={id} op=\"read\"}}")) && l.contains("replied"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let server = std::fs::read_to_string(&server_log).unwrap();
        if followed(&server) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "request {id} is not followed through the server's log:\n{server}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(server);

    // A filter that does not parse is reported, not silently ignored.
    let bad = zcio()
        .env("RUST_LOG", "zcio=loud")
        .env_remove("ZCIO_LOG")
        .args(["config"])
        .output()
        .unwrap();
    assert!(bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("ignoring RUST_LOG=\"zcio=loud\""), "{err}");
}
