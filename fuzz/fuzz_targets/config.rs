//! `zcio::Config::parse` and `Config::parse_with` (TOML text plus `key=value` overrides, as
//! from `--set`) on UTF-8 input. Non-UTF-8 input is skipped (the file reader refuses it
//! before the parser sees it).
//!
//! Input layout: `toml [NUL override [NUL override ...]]`: without a NUL the whole input
//! goes to `Config::parse`; with one, the text before the first NUL is the TOML and each
//! NUL-separated piece after it an override for `Config::parse_with`. A configuration that
//! parses is also rendered with `to_toml` and has the overrides applied again through
//! `with_override`. Properties: no panic; what `to_toml` renders parses back to the same
//! configuration; applying the last override again changes nothing.
//!
//! `[tcp]` and `[rdma]` are registered first (their crates own them), so their keys are
//! parsed, printed and round-tripped too.
//!
//! Note: `server.listen` / `client.connect` values that are not numeric addresses are
//! resolved (`ToSocketAddrs`), so this target may issue DNS lookups.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcio::Config;

fuzz_target!(|data: &[u8]| {
    // The transports' own sections, as the zcio binary and libzcio register them.
    zcio_tcp::config::register();
    zcio_rdma::config::register();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut pieces = text.split('\0');
    let toml = pieces.next().unwrap_or("");
    let overrides: Vec<String> = pieces.take(8).map(str::to_owned).collect();
    let parsed = if overrides.is_empty() {
        Config::parse(text)
    } else {
        Config::parse_with(toml, "<fuzz>", &overrides)
    };
    match parsed {
        Ok(c) => {
            let text = c.to_toml();
            match Config::parse(&text) {
                Ok(again) => assert_eq!(again, c, "to_toml does not round-trip:\n{text}"),
                Err(e) => panic!("to_toml renders what parse refuses: {e}\n{text}"),
            }
            for o in &overrides {
                let _ = c.with_override(o);
            }
            if let Some(last) = overrides.last() {
                match c.with_override(last) {
                    Ok(again) => assert_eq!(again, c, "the override {last:?} again changed it"),
                    Err(e) => panic!("the override {last:?} again was refused: {e}"),
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
