//! `zcio::proto::Req::decode` on arbitrary bytes (a request header as a server reads it
//! from a client). Property: no panic, and whatever decodes re-encodes to something that
//! decodes to the same request. (Not byte equality: reserved bytes are ignored and mode
//! bits above 0o777 dropped on decode.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use zcio::proto::Req;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Req::decode(data) {
        match Req::decode(&r.encode()) {
            Ok(again) => assert_eq!(again, r, "request does not round-trip"),
            Err(e) => panic!("re-encoded {r:?} does not decode: {e}"),
        }
    }
});
