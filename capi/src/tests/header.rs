//! The committed header `include/zcio.h` is what cbindgen generates from the sources now.
//! Stale: this test fails; `ZCIO_BLESS=1 cargo test -p zcio-capi --test header` rewrites
//! it.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(cfg)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    let path = dir.join("include/zcio.h");
    if std::env::var_os("ZCIO_BLESS").is_some() {
        std::fs::write(&path, &out).expect("write include/zcio.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == out,
        "capi/include/zcio.h is stale: regenerate it with \
         `ZCIO_BLESS=1 cargo test -p zcio-capi --test header` and commit it"
    );
}
