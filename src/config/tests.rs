use super::*;

/// A section owned by "another crate": what a transport registers.
#[derive(Clone, Debug, Default, PartialEq)]
struct Example {
    level: i64,
    name: String,
}

impl Section for Example {
    const NAME: &'static str = "example";
    const KEYS: &'static [Key<Self>] = &[
        Key {
            name: "level",
            doc: "how much (0 ..= 10)",
            get: |c| section::Value::Integer(c.level),
            set: |c, v| {
                c.level = section::value::int(v, 0, 10)?;
                Ok(())
            },
        },
        Key {
            name: "name",
            doc: "what it is called",
            get: |c| section::Value::String(c.name.clone()),
            set: |c, v| {
                c.name = section::value::string(v)?;
                Ok(())
            },
        },
    ];
}

const FULL: &str = r#"
transport = "rdma"

[server]
listen = "127.0.0.1:9000"
export = "/tmp/exp"
read_only = true
token = "s3cret"
workers = 8
max_connections = 10
max_in_flight = 16
max_open_files = 7
idle_timeout_ms = 1234
direct_io = true

[client]
connect = "127.0.0.1:9001"
token = "t"
timeout_ms = 777

[limits]
max_segments = 512
max_payload = "2M"
max_in_flight = 99

[pool]
wait_timeout_ms = 42
stripes = 3
[[pool.class]]
size = "8K"
count = 10
reserve = 2
arena_slots = 5
[[pool.class]]
size = 2097152
count = 4

[example]
level = 3
name = "x"
"#;

#[test]
fn every_key_parsed() {
    section::register::<Example>();
    let c = Config::parse(FULL).unwrap();
    assert_eq!(c.transport, "rdma");
    assert_eq!(c.server.listen, "127.0.0.1:9000");
    assert_eq!(c.server.export, PathBuf::from("/tmp/exp"));
    assert!(c.server.read_only);
    assert_eq!(c.server.token, "s3cret");
    assert_eq!(c.server.workers, 8);
    assert_eq!(c.server.max_connections, 10);
    assert_eq!(c.server.max_in_flight, 16);
    assert_eq!(c.server.max_open_files, 7);
    assert_eq!(c.server.idle_timeout, Some(Duration::from_millis(1234)));
    assert!(c.server.direct_io);
    assert_eq!(c.client.connect, "127.0.0.1:9001");
    assert_eq!(c.client.token, "t");
    assert_eq!(c.client.timeout, Duration::from_millis(777));
    assert_eq!(c.limits.max_segments, 512);
    assert_eq!(c.limits.max_payload, 2 << 20);
    assert_eq!(c.limits.max_in_flight, 99);
    assert_eq!(c.pool.wait_timeout, Duration::from_millis(42));
    assert_eq!(c.pool.stripes, 3);
    assert_eq!(
        c.pool.classes,
        vec![
            ClassConfig {
                size: 8192,
                count: 10,
                reserve: 2,
                arena_slots: 5
            },
            ClassConfig {
                size: 2 << 20,
                count: 4,
                reserve: 0,
                arena_slots: 0
            },
        ]
    );
    assert_eq!(
        c.section::<Example>(),
        &Example {
            level: 3,
            name: "x".into()
        }
    );
}

#[test]
fn empty_file_gives_defaults_and_round_trips() {
    section::register::<Example>();
    let c = Config::parse("").unwrap();
    assert_eq!(c, Config::default());
    let full = Config::parse(FULL).unwrap();
    assert_eq!(Config::parse(&full.to_toml()).unwrap(), full);
    assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
}

#[test]
fn every_bad_value_rejected_naming_key_and_value() {
    section::register::<Example>();
    let cases: &[(&str, &str, &str)] = &[
        ("transport = \"t cp\"", "transport", "t cp"),
        ("[server]\nlisten = \"nohost\"", "server.listen", "nohost"),
        (
            "[server]\nlisten = \"1.2.3.4:99999\"",
            "server.listen",
            "1.2.3.4:99999",
        ),
        ("[server]\nexport = \"\"", "server.export", ""),
        ("[server]\nworkers = 0", "server.workers", "0"),
        (
            "[server]\nmax_connections = -1",
            "server.max_connections",
            "-1",
        ),
        (
            "[server]\nmax_in_flight = 70000",
            "server.max_in_flight",
            "70000",
        ),
        (
            "[server]\nidle_timeout_ms = -5",
            "server.idle_timeout_ms",
            "-5",
        ),
        ("[client]\nconnect = \":80\"", "client.connect", ":80"),
        ("[client]\ntimeout_ms = 0", "client.timeout_ms", "0"),
        ("[limits]\nmax_segments = 0", "limits.max_segments", "0"),
        (
            "[limits]\nmax_payload = \"12Q\"",
            "limits.max_payload",
            "12Q",
        ),
        (
            "[limits]\nmax_payload = \"1G\"",
            "limits.max_payload",
            "1073741824",
        ),
        ("[limits]\nmax_payload = -4", "limits.max_payload", "-4"),
        ("[limits]\nmax_in_flight = 0", "limits.max_in_flight", "0"),
        ("[pool]\nwait_timeout_ms = -1", "pool.wait_timeout_ms", "-1"),
        ("[pool]\nstripes = 65", "pool.stripes", "65"),
        (
            "[[pool.class]]\nsize = \"x\"\ncount = 1",
            "pool.class[0].size",
            "x",
        ),
        (
            "[[pool.class]]\nsize = 4096\ncount = 0",
            "pool.class[0].count",
            "0",
        ),
        (
            "[[pool.class]]\nsize = 4096\ncount = 4\nreserve = 4",
            "pool.class[0].reserve",
            "4",
        ),
        (
            "[[pool.class]]\nsize = 4096\ncount = 4\narena_slots = 5",
            "pool.class[0].arena_slots",
            "5",
        ),
        (
            "[[pool.class]]\nsize = 0\ncount = 4",
            "pool.class[0].size",
            "0",
        ),
        ("[example]\nlevel = 11", "example.level", "11"),
        ("[example]\nlevle = 1", "example.levle", "1"),
    ];
    for (text, key, value) in cases {
        let e = Config::parse(text).expect_err(text).to_string();
        assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
        assert!(e.contains(&format!("`{value}`")), "{text}: {e}");
    }
}

#[test]
fn unknown_keys_and_wrong_types_are_named() {
    section::register::<Example>();
    for (text, needle) in [
        ("bogus = 1", "bogus"),
        ("[server]\nlisten_addr = \"x\"", "listen_addr"),
        ("[nosuch]\na = 1", "nosuch"),
        ("[example]\nname = 5", "example.name"),
        ("[tcp]\nnodelay = true", "tcp"),
        ("[server]\nworkers = \"four\"", "workers"),
        ("transport = ", "line 1"),
    ] {
        let e = Config::parse(text).expect_err(text).to_string();
        assert!(e.contains(needle), "{text}: {e}");
    }
}

#[test]
fn overrides_apply_and_are_checked() {
    section::register::<Example>();
    let c = Config::parse_with(
        FULL,
        "t",
        &[
            "transport=tcp".into(),
            "server.workers=2".into(),
            "example.name=y".into(),
        ],
    )
    .unwrap();
    assert_eq!((c.transport.as_str(), c.server.workers), ("tcp", 2));
    assert_eq!(c.section::<Example>().name, "y");
    let c2 = c.with_override("limits.max_payload=512K").unwrap();
    assert_eq!(c2.limits.max_payload, 512 << 10);
    for bad in [
        "server.workers",
        "a.b.c=1",
        "server.nope=1",
        "server.workers=-3",
    ] {
        assert!(c.with_override(bad).is_err(), "{bad}");
    }
    let e = c
        .with_override("server.workers=-3")
        .unwrap_err()
        .to_string();
    assert!(e.contains("server.workers") && e.contains("-3"), "{e}");
}

#[test]
fn sizes() {
    section::register::<Example>();
    for (s, v) in [
        ("4096", 4096),
        ("4K", 4096),
        ("64KiB", 65536),
        ("1M", 1 << 20),
        ("2 GiB", 2 << 30),
        ("7b", 7),
    ] {
        assert_eq!(parse_size("k", s).unwrap(), v, "{s}");
    }
    for s in ["", "K", "-1", "1T", "99999999999999999999", "4096G"] {
        assert!(parse_size("k", s).is_err(), "{s}");
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    section::register::<Example>();
    let e = Config::from_file(Path::new("/nonexistent/zcio.toml")).unwrap_err();
    assert!(matches!(e, Error::ReadConfig { .. }));
    assert!(e.to_string().contains("/nonexistent/zcio.toml"));
}

#[test]
fn tokens_come_from_files_and_config_prints_them_redacted() {
    section::register::<Example>();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("tok");
    std::fs::write(&f, "fr0m-file\nignored second line\n").unwrap();
    let text = format!(
        "[server]\ntoken_file = {0:?}\n[client]\ntoken_file = {0:?}\n",
        f.display().to_string()
    );
    let c = Config::parse(&text).unwrap();
    assert_eq!(c.server.token, "fr0m-file");
    assert_eq!(c.client.token, "fr0m-file");
    let shown = c.to_toml_redacted();
    assert!(!shown.contains("fr0m-file"), "{shown}");
    assert!(shown.contains("token = \"<redacted>\""), "{shown}");
    // The unredacted form still round-trips (overrides rebuild from it).
    assert_eq!(
        Config::parse(&c.to_toml()).unwrap().server.token,
        "fr0m-file"
    );
    // A missing or empty file is a clear error naming the key.
    std::fs::write(&f, "\n").unwrap();
    let e = Config::parse(&text).unwrap_err().to_string();
    assert!(e.contains("server.token_file"), "{e}");
    let e = Config::parse("[client]\ntoken_file = \"/nonexistent/zcio-token\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("client.token_file"), "{e}");
}

#[test]
fn hardening_keys_parse_and_round_trip() {
    section::register::<Example>();
    let c = Config::parse(
        "[server]\nauth_timeout_ms = 1500\nmax_handshakes_per_addr = 4\n\
         max_connections_per_addr = 3\nmax_payload_in_flight = \"2M\"\nmax_open_files_total = 99\numask = 0o077\n",
    )
    .unwrap();
    assert_eq!(
        c.server.auth_timeout,
        Some(std::time::Duration::from_millis(1500))
    );
    assert_eq!(c.server.max_handshakes_per_addr, 4);
    assert_eq!(c.server.max_connections_per_addr, 3);
    assert_eq!(Config::default().server.max_connections_per_addr, 128);
    assert_eq!(c.server.max_payload_in_flight, 2 << 20);
    assert_eq!(c.server.max_open_files_total, 99);
    assert_eq!(c.server.umask, 0o077);
    assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    for bad in [
        "[server]\numask = 0o1000\n",
        "[server]\nmax_payload_in_flight = 100\n",
        "[server]\nmax_handshakes_per_addr = 0\n",
        "[server]\nmax_connections_per_addr = 0\n",
        "[server]\nmax_connections_per_addr = -5\n",
    ] {
        assert!(Config::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn transport_lists_and_lifecycle_keys() {
    section::register::<Example>();
    let c = Config::parse(r#"transport = ["rdma", "tcp"]"#).unwrap();
    assert_eq!(c.transport_list(), ["rdma", "tcp"]);
    assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    let c = Config::parse(r#"transports = ["tcp"]"#).unwrap();
    assert_eq!(c.transport_list(), ["tcp"]);
    assert!(c.more_transports.is_empty());
    for bad in [
        r#"transport = []"#,
        r#"transport = ["tcp", "tcp"]"#,
        r#"transport = ["tcp", "no way"]"#,
        "transport = \"tcp\"\ntransports = [\"rdma\"]",
        r#"transport = ["a", "b", "c", "d", "e", "f", "g", "h", "i"]"#,
        "[client]\nkeepalive_ms = -1",
        "[client]\nreconnect_max_delay_ms = 0",
        "[server]\ndrain_timeout_ms = -5",
    ] {
        assert!(Config::parse(bad).is_err(), "accepted: {bad}");
    }
    let c = Config::parse(
        "[server]\ndrain_timeout_ms = 250\n[client]\nkeepalive_ms = 0\nreconnect = false\nreconnect_max_delay_ms = 50\nreconnect_give_up_ms = 700",
    )
    .unwrap();
    assert_eq!(c.server.drain_timeout, Duration::from_millis(250));
    assert_eq!(c.client.keepalive, None);
    assert!(!c.client.reconnect);
    assert_eq!(c.client.reconnect_max_delay, Duration::from_millis(50));
    assert_eq!(c.client.reconnect_give_up, Duration::from_millis(700));
    assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
}

#[test]
fn client_connect_takes_one_address_per_transport() {
    section::register::<Example>();
    let c = Config::parse("[client]\nconnect = \"tcp=127.0.0.1:7700 rdma=10.0.0.2:7701\"").unwrap();
    assert_eq!(c.client.connect_for("tcp"), Some("127.0.0.1:7700"));
    assert_eq!(c.client.connect_for("rdma"), Some("10.0.0.2:7701"));
    assert_eq!(c.client.connect_for("other"), None);
    assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    let one = Config::parse("[client]\nconnect = \"h:1\"").unwrap();
    assert_eq!(one.client.connect_for("rdma"), Some("h:1"));
    for bad in ["tcp=", "tcp=h:1 rdma", "=h:1", "tcp=h:x", "t p=h:1"] {
        let text = format!("[client]\nconnect = \"{bad}\"");
        assert!(Config::parse(&text).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn registered_sections_print_every_key_with_its_doc() {
    section::register::<Example>();
    section::register::<Example>(); // again: nothing happens
    let text = Config::default().to_toml();
    assert!(
        text.contains(
            "\n[example]\n# how much (0 ..= 10)\nlevel = 0\n# what it is called\nname = \"\"\n"
        ),
        "{text}"
    );
    // A configuration made before the section was registered equals one at its defaults.
    let mut c = Config::default();
    c.section_mut::<Example>().level = 2;
    assert_ne!(c, Config::default());
    c.section_mut::<Example>().level = 0;
    assert_eq!(c, Config::default());
}

#[test]
fn a_section_name_is_taken_once() {
    #[derive(Clone, Debug, Default, PartialEq)]
    struct Impostor;
    impl Section for Impostor {
        const NAME: &'static str = "example";
        const KEYS: &'static [Key<Self>] = &[];
    }
    #[derive(Clone, Debug, Default, PartialEq)]
    struct Server;
    impl Section for Server {
        const NAME: &'static str = "server";
        const KEYS: &'static [Key<Self>] = &[];
    }
    section::register::<Example>();
    assert!(std::panic::catch_unwind(section::register::<Impostor>).is_err());
    assert!(std::panic::catch_unwind(section::register::<Server>).is_err());
}
