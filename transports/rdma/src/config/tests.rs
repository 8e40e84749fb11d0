use super::*;

fn parse(text: &str) -> zcio::Result<Config> {
    register();
    Config::parse(text)
}

const FULL: &str = r#"
transport = "rdma"

[rdma]
device = "rxe0"
port = 2
gid_index = 1
inline_threshold = 64
busy_poll = true
spin_us = 250
credits = 8
queue_pairs = 3
register_threshold = "1M"
client_exposure = "arena"
"#;

#[test]
fn every_key_parsed() {
    let c = parse(FULL).unwrap();
    let r = RdmaConfig::of(&c);
    assert_eq!(r.device.as_deref(), Some("rxe0"));
    assert_eq!(r.port, 2);
    assert_eq!(r.gid_index, Some(1));
    assert_eq!(r.inline_threshold, 64);
    assert!(r.busy_poll);
    assert_eq!(r.spin, Duration::from_micros(250));
    assert_eq!(r.credits, 8);
    assert_eq!(r.queue_pairs, 3);
    assert_eq!(r.register_threshold, 1 << 20);
    assert_eq!(r.client_exposure, ClientExposure::Arena);
    assert_eq!(
        RdmaConfig::default().client_exposure,
        ClientExposure::Request,
        "per-request exposure is the default"
    );
    assert_eq!(RdmaConfig::of(&parse("").unwrap()), &RdmaConfig::default());
}

#[test]
fn printed_with_docs_and_parsed_back() {
    let c = parse(FULL).unwrap();
    let text = c.to_toml();
    assert_eq!(parse(&text).unwrap(), c, "{text}");
    // Every key is printed, each after its doc.
    let at = text.find("\n[rdma]\n").expect("an [rdma] section");
    let mut lines = text[at + 8..].lines();
    for key in RdmaConfig::KEYS {
        let mut doc = String::new();
        let line = loop {
            let l = lines
                .next()
                .unwrap_or_else(|| panic!("{} missing:\n{text}", key.name));
            match l.strip_prefix("# ") {
                Some(d) => doc = format!("{doc} {d}"),
                None => break l,
            }
        };
        assert!(line.starts_with(&format!("{} = ", key.name)), "{line}");
        let words: Vec<&str> = key.doc.split_whitespace().collect();
        assert_eq!(doc.split_whitespace().collect::<Vec<_>>(), words);
    }
    // The defaults print "no device" and "any GID" as the values that mean them.
    let d = Config::default().to_toml();
    assert!(
        d.contains("\ndevice = \"\"\n") && d.contains("\ngid_index = -1\n"),
        "{d}"
    );
}

#[test]
fn overrides_apply_and_are_checked() {
    register();
    let c = Config::parse_with(FULL, "t", &["rdma.device=rxe1".into()]).unwrap();
    assert_eq!(RdmaConfig::of(&c).device.as_deref(), Some("rxe1"));
    let c = c.with_override("rdma.gid_index=-1").unwrap();
    assert_eq!(RdmaConfig::of(&c).gid_index, None);
    let e = c.with_override("rdma.credits=1").unwrap_err().to_string();
    assert!(e.contains("`rdma.credits`") && e.contains("`1`"), "{e}");
}

#[test]
fn bad_values_name_key_and_value() {
    let cases = [
        ("[rdma]\nport = 0", "rdma.port", "0"),
        ("[rdma]\ngid_index = -2", "rdma.gid_index", "-2"),
        (
            "[rdma]\ninline_threshold = 4097",
            "rdma.inline_threshold",
            "4097",
        ),
        ("[rdma]\ncredits = 1", "rdma.credits", "1"),
        ("[rdma]\nspin_us = 1000001", "rdma.spin_us", "1000001"),
        ("[rdma]\nspin_us = -1", "rdma.spin_us", "-1"),
        ("[rdma]\nqueue_pairs = 0", "rdma.queue_pairs", "0"),
        ("[rdma]\nqueue_pairs = 9", "rdma.queue_pairs", "9"),
        (
            "[rdma]\nregister_threshold = \"5X\"",
            "rdma.register_threshold",
            "5X",
        ),
        ("[rdma]\nbusy_poll = \"yes\"", "rdma.busy_poll", "yes"),
        ("[rdma]\nport = \"one\"", "rdma.port", "one"),
        ("[rdma]\ndevice = 3", "rdma.device", "3"),
        (
            "[rdma]\nclient_exposure = \"pool\"",
            "rdma.client_exposure",
            "pool",
        ),
        ("[rdma]\ndevcie = \"rxe0\"", "rdma.devcie", "rxe0"),
    ];
    for (text, key, value) in cases {
        let e = parse(text).expect_err(text).to_string();
        assert!(e.contains(&format!("`{key}`")), "{text}: {e}");
        assert!(e.contains(&format!("`{value}`")), "{text}: {e}");
    }
}
