use super::*;
use crate::transport::mem::MemListener;
use crate::Server;

type Setup = (
    tempfile::TempDir,
    crate::ServerHandle,
    Arc<MemListener>,
    Config,
);

fn setup(token: &str) -> Setup {
    setup_carrying(token, Config::default().limits.max_payload)
}

/// [`setup`] over an in-memory transport that carries `max_payload` bytes per request.
fn setup_carrying(token: &str, max_payload: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.server.export = dir.path().to_path_buf();
    cfg.server.token = token.into();
    cfg.client.token = token.into();
    cfg.pool.classes.iter_mut().for_each(|c| {
        c.count = c.count.min(64);
        c.reserve = c.reserve.min(8);
    });
    let pool = Pool::new(&cfg.pool).unwrap();
    let limits = Limits {
        max_segments: cfg.limits.max_segments,
        max_payload,
        max_header: crate::transport::MAX_HEADER,
        max_in_flight: 64,
        inline_threshold: 0,
        rdma_payload: false,
    };
    let l = MemListener::new(pool.clone(), limits);
    let srv = Server::with_listener(&cfg, l.clone(), pool)
        .unwrap()
        .spawn()
        .unwrap();
    (dir, srv, l, cfg)
}

fn client(l: &MemListener, cfg: &Config) -> Result<Client> {
    let pool = Pool::new(&cfg.pool).unwrap();
    Client::from_conn(cfg, l.connect().unwrap(), pool)
}

#[test]
fn plan_requests_packs_segments() {
    assert_eq!(plan_requests(&[4096; 32], 256, 1 << 20).len(), 1);
    assert_eq!(plan_requests(&[4096; 256], 256, 1 << 20).len(), 1);
    let p = plan_requests(&[4096; 300], 256, 1 << 20);
    assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), vec![256, 44]);
    // A segment larger than a request is cut.
    let p = plan_requests(&[3 << 20], 256, 1 << 20);
    assert_eq!(
        p,
        vec![
            vec![(0, 0, 1 << 20)],
            vec![(0, 1 << 20, 1 << 20)],
            vec![(0, 2 << 20, 1 << 20)]
        ]
    );
    let p = plan_requests(&[700_000, 700_000], 256, 1 << 20);
    assert_eq!(p.len(), 2);
    assert_eq!(p[0], vec![(0, 0, 700_000), (1, 0, (1 << 20) - 700_000)]);
    assert!(plan_requests(&[0, 0], 4, 10).is_empty());
}

#[test]
fn end_to_end_over_the_in_memory_transport() {
    let (dir, srv, l, cfg) = setup("");
    let c = client(&l, &cfg).unwrap();
    let f = c
        .open("a.bin", OpenFlags::rw() | OpenFlags::CREATE)
        .unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(f.pwrite(&data, 0).unwrap(), data.len());
    let mut a = vec![0u8; 1000];
    let mut b = vec![0u8; 99_500];
    let n = f
        .preadv(&mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)], 0)
        .unwrap();
    assert_eq!(n, 100_000);
    assert_eq!(&a[..], &data[..1000]);
    assert_eq!(&b[..99_000], &data[1000..]);
    let z = f.zero_readv(5000, 99_000).unwrap();
    assert_eq!(z.to_vec(), &data[99_000..]);
    assert_eq!(std::fs::read(dir.path().join("a.bin")).unwrap(), data);
    assert_eq!(srv.open_files(), 1);
    f.close().unwrap();
    assert_eq!(srv.open_files(), 0);
    assert_eq!(c.list("").unwrap().len(), 1);
    c.unlink("a.bin").unwrap();
    assert!(c.stat("a.bin").is_err());
}

#[test]
fn listings_fit_a_payload_limit_under_4_kib() {
    // Directory pages are sized to what the connection carries, even below the 4 KiB a
    // page asks for at least (readdir's `clamp(4096, max_payload)` panicked here).
    let (dir, _srv, l, cfg) = setup_carrying("", 1024);
    let names: Vec<String> = (0..40)
        .map(|i| format!("entry-with-a-long-name-{i:03}"))
        .collect();
    for n in &names {
        std::fs::write(dir.path().join(n), b"x").unwrap();
    }
    let c = client(&l, &cfg).unwrap();
    assert_eq!(c.limits().max_payload, 1024);
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let listed = c.list("").unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(sorted(listed), names);
    let streamed = c
        .read_dir("")
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(sorted(streamed), names);
    let plus = c.read_dir_plus("").unwrap();
    assert!(plus.iter().all(|e| e.attr.is_some_and(|a| a.size == 1)));
    let plus = plus.into_iter().map(|e| e.entry.name).collect();
    assert_eq!(sorted(plus), names);
}

#[test]
fn token_is_required_and_checked() {
    let (_d, _srv, l, cfg) = setup("right");
    assert!(client(&l, &cfg).is_ok());
    let mut wrong = cfg.clone();
    wrong.client.token = "wrong".into();
    assert!(matches!(client(&l, &wrong), Err(Error::Auth(_))));
    let mut none = cfg.clone();
    none.client.token = String::new();
    let e = client(&l, &none).unwrap_err().to_string();
    assert!(e.contains("requires a token"), "{e}");
}

#[test]
fn one_request_and_many_request_completions_wait_poll_and_map_alike() {
    let (_dir, _srv, l, cfg) = setup("");
    let c = client(&l, &cfg).unwrap();
    let f = c
        .open("c.bin", OpenFlags::rw() | OpenFlags::CREATE)
        .unwrap();
    let data: Vec<u8> = (0..1_300_000u32).map(|i| (i % 251) as u8).collect();
    f.pwrite(&data, 0).unwrap();
    let limits = c.limits();
    // 64 KiB fits one request; more than a request's payload takes several.
    for len in [65_536usize, limits.max_payload + 4096] {
        assert!(len < data.len());
        let one = f.zero_readv_async(len, 0).unwrap();
        assert_eq!(one.wait().unwrap().to_vec(), &data[..len], "wait, {len}");
        let polled = f.zero_readv_async(len, 0).unwrap();
        let got = crate::transport::block_on(polled).unwrap();
        assert_eq!(got.to_vec(), &data[..len], "poll, {len}");
        let mapped = f.zero_readv_async(len, 0).unwrap().map(|b| b.total_len());
        assert_eq!(mapped.wait().unwrap(), len, "map, {len}");
        // Reading past the end: short, in both shapes.
        let tail = f.zero_readv_async(len, (data.len() - 1000) as u64).unwrap();
        assert_eq!(tail.wait().unwrap().to_vec(), &data[data.len() - 1000..]);
        // A write, and its buffers back: the bytes land in the file, and the buffers come
        // back as they went.
        let mut bufs = c.get_buffers(4096, len.div_ceil(4096).min(8)).unwrap();
        let n = bufs.total_len();
        let fresh: Vec<u8> = (0..n).map(|i| (i % 241) as u8 ^ 0x5a).collect();
        for (j, b) in bufs.buffers_mut().iter_mut().enumerate() {
            b.copy_from_slice(&fresh[j * 4096..(j + 1) * 4096]);
        }
        let (written, back) = f.zero_writev_async(bufs, 0).unwrap().wait().unwrap();
        assert_eq!((written, back.total_len()), (n, n));
        assert_eq!(back.to_vec(), fresh, "the buffers came back changed");
        let mut on_file = vec![0u8; n];
        assert_eq!(f.pread(&mut on_file, 0).unwrap(), n);
        assert_eq!(on_file, fresh, "zero_writev_async wrote other bytes");
        f.pwrite(&data, 0).unwrap();
    }
}

#[test]
fn a_client_with_a_token_refuses_a_server_that_cannot_prove_it_knows_it() {
    // The server has no token: it says none is needed, and so proves nothing.
    let (_d, _srv, l, mut cfg) = setup("");
    cfg.client.token = "secret".into();
    match client(&l, &cfg) {
        Err(Error::Auth(m)) => assert!(m.contains("cannot prove"), "{m}"),
        other => panic!("an unproven server was accepted: {:?}", other.err()),
    }
    cfg.client.token = String::new();
    assert!(client(&l, &cfg).is_ok());
}
