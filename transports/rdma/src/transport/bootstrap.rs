//! The TCP bootstrap exchange: the fixed-size hello each side sends before the queue pairs
//! are connected, and the one-byte "ready" that follows.
//!
//! Pure (no I/O, no RDMA library, no `unsafe`), so it compiles without the `rdma` feature
//! and can be unit-tested and fuzzed with hostile input. Integers are little-endian.
//!
//! | offset | size | field                                                          |
//! |-------:|-----:|----------------------------------------------------------------|
//! |      0 |    4 | magic `ZCRD`                                                   |
//! |      4 |    2 | bootstrap version (2)                                          |
//! |      6 |    1 | role: 1 client, 2 server                                       |
//! |      7 |    1 | queue pairs of the connection, 1 ..= [`MAX_QUEUE_PAIRS`]       |
//! |      8 |   32 | the queue pair's [`Endpoint`] (its own encoding: GID, QPN, ...) |
//! |     40 |    4 | credits: receives this side has posted for messages            |
//! |     44 |    4 | max_segments per request                                       |
//! |     48 |    4 | max_payload per request or reply                               |
//! |     52 |    4 | max_header                                                     |
//! |     56 |    4 | inline_threshold                                               |
//! |     60 |    4 | recv_size: bytes each posted receive holds (largest message)   |
//!
//! A connection has one or more queue pairs, and one hello per queue pair each way: the
//! client's first hello offers a number of queue pairs, the server's first hello grants at
//! most that many, and the remaining hellos, alternating client then server, carry the
//! granted number and one queue pair each. Each pair of hellos negotiates its queue pair's
//! limits and credits on its own. After the last hello, each side moves its queue pairs to
//! RTR and RTS and sends [`READY`]; nobody SENDs on a queue pair before it has read the
//! peer's [`READY`], i.e. before the peer's queue pairs are known to be RTR.
#![forbid(unsafe_code)]

use crate::verbs::Endpoint;

/// The magic that opens a hello: the bytes `Z C R D`.
pub const MAGIC: [u8; 4] = *b"ZCRD";

/// The bootstrap version this crate speaks.
pub const VERSION: u16 = 2;

/// Most queue pairs one connection may have.
pub const MAX_QUEUE_PAIRS: u8 = 8;

/// Length of a hello in bytes.
pub const HELLO_LEN: usize = 64;

/// The byte each side sends once its queue pair is ready to send.
pub const READY: u8 = b'R';

/// Most credits (posted receives) a side may announce: slot numbers travel in 16 bits.
pub const MAX_CREDITS: u32 = 4096;

/// Smallest receive a side may announce (a reply's fixed part plus a little header).
pub const MIN_RECV_SIZE: u32 = 64;

/// Largest receive a side may announce.
pub const MAX_RECV_SIZE: u32 = 16 << 20;

/// Which end of the connection sent a hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that connected.
    Client,
    /// The side that accepted.
    Server,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Client => 1,
            Role::Server => 2,
        }
    }
}

/// One side's hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Who sends it.
    pub role: Role,
    /// The connection's number of queue pairs: offered (the client's first hello), granted
    /// (the server's first hello), agreed (every later hello).
    pub queue_pairs: u8,
    /// The sender's queue pair.
    pub endpoint: Endpoint,
    /// Receives the sender has posted (its flow-control credits).
    pub credits: u32,
    /// Most payload segments per request the sender accepts.
    pub max_segments: u32,
    /// Most payload bytes per request or reply the sender accepts.
    pub max_payload: u32,
    /// Longest header the sender accepts.
    pub max_header: u32,
    /// Payload up to this many bytes may travel inside messages.
    pub inline_threshold: u32,
    /// Bytes of each posted receive: the largest message the sender can take.
    pub recv_size: u32,
}

/// A malformed hello.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// Not exactly [`HELLO_LEN`] bytes.
    #[error("hello is {got} bytes, expected {HELLO_LEN}")]
    Length {
        /// Bytes given.
        got: usize,
    },
    /// The magic is wrong: the peer is not a zcio RDMA peer.
    #[error("bad magic {got:02x?} (expected \"ZCRD\"): the peer is not a zcio RDMA transport (a tcp server or client on that port?)")]
    BadMagic {
        /// The four bytes read.
        got: [u8; 4],
    },
    /// Another bootstrap version.
    #[error("bootstrap version {theirs} is not ours ({VERSION})")]
    Version {
        /// The peer's version.
        theirs: u16,
    },
    /// The hello comes from the wrong side.
    #[error("hello has role {got}, expected {expected}")]
    Role {
        /// Role code expected.
        expected: u8,
        /// Role code read.
        got: u8,
    },
    /// A field is out of range.
    #[error("hello field {field} is {value}: {reason}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The endpoint record is invalid.
    #[error("hello carries an invalid queue pair endpoint: {0}")]
    Endpoint(String),
}

fn u32_at(b: &[u8; HELLO_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Hello {
    /// The fixed binary form.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6] = self.role.code();
        out[7] = self.queue_pairs;
        out[8..40].copy_from_slice(&self.endpoint.encode());
        for (at, v) in [
            (40, self.credits),
            (44, self.max_segments),
            (48, self.max_payload),
            (52, self.max_header),
            (56, self.inline_threshold),
            (60, self.recv_size),
        ] {
            out[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Decodes and checks a hello that must come from `expected`.
    pub fn decode(bytes: &[u8], expected: Role) -> Result<Hello, BootstrapError> {
        let b: &[u8; HELLO_LEN] = bytes
            .try_into()
            .map_err(|_| BootstrapError::Length { got: bytes.len() })?;
        if b[0..4] != MAGIC {
            return Err(BootstrapError::BadMagic {
                got: [b[0], b[1], b[2], b[3]],
            });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(BootstrapError::Version { theirs: version });
        }
        if b[6] != expected.code() {
            return Err(BootstrapError::Role {
                expected: expected.code(),
                got: b[6],
            });
        }
        let bad = |field, value: u32, reason| BootstrapError::BadValue {
            field,
            value: u64::from(value),
            reason,
        };
        let queue_pairs = b[7];
        if queue_pairs == 0 || queue_pairs > MAX_QUEUE_PAIRS {
            return Err(bad(
                "queue_pairs",
                u32::from(queue_pairs),
                "must be 1 ..= 8",
            ));
        }
        let endpoint =
            Endpoint::decode(&b[8..40]).map_err(|e| BootstrapError::Endpoint(e.to_string()))?;
        let credits = u32_at(b, 40);
        if credits == 0 || credits > MAX_CREDITS {
            return Err(bad("credits", credits, "must be 1 ..= 4096"));
        }
        let max_segments = u32_at(b, 44);
        if max_segments == 0 || max_segments > u32::from(u16::MAX) {
            return Err(bad("max_segments", max_segments, "must be 1 ..= 65535"));
        }
        let max_payload = u32_at(b, 48);
        if max_payload == 0 || max_payload > (1 << 30) {
            return Err(bad("max_payload", max_payload, "must be 1 ..= 1 GiB"));
        }
        let max_header = u32_at(b, 52);
        if max_header == 0 || max_header > u32::from(u16::MAX) {
            return Err(bad("max_header", max_header, "must be 1 ..= 65535"));
        }
        let inline_threshold = u32_at(b, 56);
        if inline_threshold > 65536 {
            return Err(bad(
                "inline_threshold",
                inline_threshold,
                "must be 0 ..= 64 KiB",
            ));
        }
        let recv_size = u32_at(b, 60);
        if !(MIN_RECV_SIZE..=MAX_RECV_SIZE).contains(&recv_size) {
            return Err(bad("recv_size", recv_size, "must be 64 B ..= 16 MiB"));
        }
        Ok(Hello {
            role: expected,
            queue_pairs,
            endpoint,
            credits,
            max_segments,
            max_payload,
            max_header,
            inline_threshold,
            recv_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verbs::Mtu;

    fn sample(role: Role) -> Hello {
        Hello {
            role,
            queue_pairs: 2,
            endpoint: Endpoint {
                qpn: 0x12,
                psn: 0x34_5678,
                lid: 0,
                port: 1,
                gid_index: 1,
                gid: "::ffff:127.0.0.1".parse().unwrap(),
                mtu: Mtu::Mtu4096,
            },
            credits: 32,
            max_segments: 256,
            max_payload: 1 << 20,
            max_header: 4096,
            inline_threshold: 128,
            recv_size: 16384,
        }
    }

    #[test]
    fn round_trip() {
        for role in [Role::Client, Role::Server] {
            let h = sample(role);
            let b = h.encode();
            assert_eq!(&b[0..4], b"ZCRD");
            assert_eq!(Hello::decode(&b, role).unwrap(), h);
        }
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let b = sample(Role::Client).encode();
        for n in 0..HELLO_LEN {
            assert_eq!(
                Hello::decode(&b[..n], Role::Client),
                Err(BootstrapError::Length { got: n })
            );
        }
        let mut long = b.to_vec();
        long.push(0);
        assert!(Hello::decode(&long, Role::Client).is_err());
    }

    #[test]
    fn bad_fields_are_refused() {
        let b = sample(Role::Client).encode();
        let with = |at: usize, v: u8| {
            let mut c = b;
            c[at] = v;
            Hello::decode(&c, Role::Client)
        };
        assert!(matches!(
            with(0, b'X'),
            Err(BootstrapError::BadMagic { .. })
        ));
        assert!(matches!(
            with(4, 1),
            Err(BootstrapError::Version { theirs: 1 })
        ));
        assert!(matches!(with(6, 2), Err(BootstrapError::Role { .. })));
        assert!(matches!(with(7, 0), Err(BootstrapError::BadValue { .. })));
        assert!(matches!(with(7, 9), Err(BootstrapError::BadValue { .. })));
        assert_eq!(with(7, 8).unwrap().queue_pairs, 8);
        assert!(matches!(with(8, b'X'), Err(BootstrapError::Endpoint(_))));
        let with32 = |at: usize, v: u32| {
            let mut c = b;
            c[at..at + 4].copy_from_slice(&v.to_le_bytes());
            Hello::decode(&c, Role::Client)
        };
        for (at, v) in [
            (40, 0),
            (40, 5000),
            (44, 0),
            (44, 70000),
            (48, 0),
            (48, u32::MAX),
            (52, 0),
            (56, 1 << 20),
            (60, 10),
            (60, u32::MAX),
        ] {
            assert!(
                matches!(with32(at, v), Err(BootstrapError::BadValue { .. })),
                "offset {at} value {v}"
            );
        }
        // A server's hello is not a client's.
        assert!(matches!(
            Hello::decode(&sample(Role::Server).encode(), Role::Client),
            Err(BootstrapError::Role { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut b = sample(Role::Server).encode();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b[(x % HELLO_LEN as u64) as usize] = (x >> 32) as u8;
            }
            let _ = Hello::decode(&b, Role::Server);
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let mut b = sample(Role::Client).encode();
        b[0..4].copy_from_slice(b"ZCIO");
        let msg = Hello::decode(&b, Role::Client).unwrap_err().to_string();
        assert!(msg.contains("not a zcio RDMA transport"), "{msg}");
    }
}
