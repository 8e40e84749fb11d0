//! The TCP wire format: the connection handshake and the frame prefix.
//!
//! Everything here is pure (no I/O, no allocation beyond error messages), so that it can
//! be unit-tested with truncated, oversized and garbage input and driven by a fuzz target.
//! All integers are little-endian. See the crate documentation for the layout tables.

use zcio::transport::Limits;

/// The magic number that opens a handshake and every frame: the bytes `Z C I O` on the
/// wire, i.e. `u32::from_le_bytes(*b"ZCIO")` = `0x4F49_435A`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"ZCIO");

/// The transport protocol version this crate speaks.
pub const VERSION: u16 = 1;

/// Length of a handshake message.
pub const HELLO_LEN: usize = 24;

/// Length of the prefix of every frame.
pub const PREFIX_LEN: usize = 24;

/// Largest header a frame can describe (`header_len` is a `u16`).
pub const MAX_WIRE_HEADER: usize = u16::MAX as usize;

/// Largest payload or capacity a frame can describe (`payload_len` is a `u32`).
pub const MAX_WIRE_PAYLOAD: usize = u32::MAX as usize;

/// A malformed handshake or frame prefix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than the structure needs.
    #[error("truncated: need {need} bytes, have {got}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// The magic number is wrong: the peer does not speak zcio over TCP (or the stream is
    /// out of step).
    #[error("bad magic {got:#010x} (expected {MAGIC:#010x}, the bytes \"ZCIO\"): not a zcio peer or a corrupt stream")]
    BadMagic {
        /// The value read.
        got: u32,
    },
    /// The peer speaks another transport version.
    #[error("transport version {theirs} is not ours ({VERSION})")]
    Version {
        /// The peer's version.
        theirs: u16,
    },
    /// The frame kind is not one this side accepts.
    #[error("unexpected frame kind {got} (expected {expected})")]
    Kind {
        /// Kind accepted here.
        expected: u8,
        /// Kind read.
        got: u8,
    },
    /// Flags are reserved and must be zero.
    #[error("unknown frame flags {0:#04x}")]
    Flags(u8),
    /// A length field is over its limit.
    #[error("{field} is {value}, over the limit of {limit}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The negotiated limit.
        limit: u64,
    },
    /// A field has a value that makes no sense.
    #[error("{field} is {value}: {reason}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
}

impl WireError {
    /// The core error for this wire error; `what` names the structure being decoded.
    pub fn into_error(self, what: &'static str) -> zcio::Error {
        match self {
            WireError::Version { theirs } => zcio::Error::Version {
                ours: VERSION,
                theirs,
            },
            e => zcio::Error::decode(what, e.to_string()),
        }
    }
}

/// One side's handshake: the transport version and the limits it can honour.
///
/// Layout (24 bytes): `magic u32 | version u16 | reserved u16 (0) | max_segments u32 |
/// max_payload u32 | max_header u32 | max_in_flight u32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Transport version ([`VERSION`]).
    pub version: u16,
    /// Most payload segments per request or reply.
    pub max_segments: u32,
    /// Most payload bytes per request or reply.
    pub max_payload: u32,
    /// Longest header.
    pub max_header: u32,
    /// Most requests in flight on the connection.
    pub max_in_flight: u32,
}

fn clamp_u32(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl Hello {
    /// The handshake advertising `l` (clamped to what the wire can carry), with
    /// `max_in_flight` replacing `l.max_in_flight` (the server advertises its own
    /// `server.max_in_flight`).
    pub fn from_limits(l: &Limits, max_in_flight: usize) -> Hello {
        Hello {
            version: VERSION,
            max_segments: clamp_u32(l.max_segments),
            max_payload: clamp_u32(l.max_payload),
            max_header: clamp_u32(l.max_header.min(MAX_WIRE_HEADER)),
            max_in_flight: clamp_u32(max_in_flight),
        }
    }

    /// The limits both sides can honour: the minimum of each field, no inline payload,
    /// no RDMA.
    pub fn negotiate(&self, theirs: &Hello) -> Limits {
        let as_limits = |h: &Hello| Limits {
            max_segments: h.max_segments as usize,
            max_payload: h.max_payload as usize,
            max_header: h.max_header as usize,
            max_in_flight: h.max_in_flight as usize,
            inline_threshold: 0,
            rdma_payload: false,
        };
        as_limits(self).min(&as_limits(theirs))
    }

    /// The 24 bytes on the wire.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        // b[6..8]: reserved, zero.
        b[8..12].copy_from_slice(&self.max_segments.to_le_bytes());
        b[12..16].copy_from_slice(&self.max_payload.to_le_bytes());
        b[16..20].copy_from_slice(&self.max_header.to_le_bytes());
        b[20..24].copy_from_slice(&self.max_in_flight.to_le_bytes());
        b
    }

    /// Decodes a handshake: checks the magic, then the version, then that the limits can
    /// carry at least one request. The reserved field is ignored.
    pub fn decode(b: &[u8]) -> Result<Hello, WireError> {
        if b.len() < HELLO_LEN {
            return Err(WireError::Truncated {
                need: HELLO_LEN,
                got: b.len(),
            });
        }
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(WireError::BadMagic { got: magic });
        }
        let version = u16_at(b, 4);
        if version != VERSION {
            return Err(WireError::Version { theirs: version });
        }
        let h = Hello {
            version,
            max_segments: u32_at(b, 8),
            max_payload: u32_at(b, 12),
            max_header: u32_at(b, 16),
            max_in_flight: u32_at(b, 20),
        };
        if h.max_in_flight == 0 {
            return Err(WireError::BadValue {
                field: "max_in_flight",
                value: 0,
                reason: "a connection must allow at least one request in flight",
            });
        }
        Ok(h)
    }
}

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Client to server.
    Request = 1,
    /// Server to client.
    Reply = 2,
}

/// The fixed part of a frame; `header_len` header bytes and then `payload_len` payload
/// bytes follow it.
///
/// Layout (24 bytes): `magic u32 | kind u8 | flags u8 (0) | header_len u16 | id u64 |
/// payload_len u32 | recv_cap u32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// Request or reply.
    pub kind: Kind,
    /// Length of the header that follows.
    pub header_len: usize,
    /// Request id (a reply carries its request's id).
    pub id: u64,
    /// Length of the payload that follows the header.
    pub payload_len: usize,
    /// Request: the most reply payload the client can take. Reply: 0.
    pub recv_cap: usize,
}

impl Prefix {
    /// The 24 bytes on the wire. Lengths must already fit their fields (callers check
    /// them against the negotiated limits, which do).
    pub fn encode(&self) -> [u8; PREFIX_LEN] {
        let mut b = [0u8; PREFIX_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.kind as u8;
        // b[5]: flags, zero.
        b[6..8].copy_from_slice(&(self.header_len as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..20].copy_from_slice(&(self.payload_len as u32).to_le_bytes());
        b[20..24].copy_from_slice(&(self.recv_cap as u32).to_le_bytes());
        b
    }
}

/// Decodes and checks a frame prefix against the negotiated limits, before anything is
/// allocated for the frame: magic, kind (must be `expect`), flags (must be 0),
/// `header_len <= max_header`, `payload_len <= max_payload`, and `recv_cap <= max_payload`
/// for a request or `recv_cap == 0` for a reply. Only the first [`PREFIX_LEN`] bytes are
/// looked at.
pub fn decode_prefix(b: &[u8], expect: Kind, limits: &Limits) -> Result<Prefix, WireError> {
    if b.len() < PREFIX_LEN {
        return Err(WireError::Truncated {
            need: PREFIX_LEN,
            got: b.len(),
        });
    }
    let magic = u32_at(b, 0);
    if magic != MAGIC {
        return Err(WireError::BadMagic { got: magic });
    }
    if b[4] != expect as u8 {
        return Err(WireError::Kind {
            expected: expect as u8,
            got: b[4],
        });
    }
    if b[5] != 0 {
        return Err(WireError::Flags(b[5]));
    }
    let header_len = u16_at(b, 6) as usize;
    let id = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
    let payload_len = u32_at(b, 16) as usize;
    let recv_cap = u32_at(b, 20) as usize;
    check_len("header_len", header_len, limits.max_header)?;
    check_len("payload_len", payload_len, limits.max_payload)?;
    match expect {
        Kind::Request => check_len("recv_cap", recv_cap, limits.max_payload)?,
        Kind::Reply if recv_cap != 0 => {
            return Err(WireError::BadValue {
                field: "recv_cap",
                value: recv_cap as u64,
                reason: "must be 0 in a reply",
            })
        }
        Kind::Reply => {}
    }
    Ok(Prefix {
        kind: expect,
        header_len,
        id,
        payload_len,
        recv_cap,
    })
}

/// A whole frame found in a byte buffer (borrowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The checked prefix.
    pub prefix: Prefix,
    /// The header bytes.
    pub header: &'a [u8],
    /// The payload bytes.
    pub payload: &'a [u8],
}

/// Decodes one whole frame from the front of `b` (prefix checked as by
/// [`decode_prefix`]); returns it and the number of bytes it spans. `Truncated` says how
/// many bytes the frame needs when `b` holds only part of it. The transport itself reads
/// frames piecewise (prefix, header, then payload straight into its destination); this
/// function is the same check over an in-memory buffer, for tests and fuzzing.
pub fn decode_frame<'a>(
    b: &'a [u8],
    expect: Kind,
    limits: &Limits,
) -> Result<(Frame<'a>, usize), WireError> {
    let prefix = decode_prefix(b, expect, limits)?;
    let header_end = PREFIX_LEN + prefix.header_len;
    let end = header_end + prefix.payload_len;
    if b.len() < end {
        return Err(WireError::Truncated {
            need: end,
            got: b.len(),
        });
    }
    Ok((
        Frame {
            prefix,
            header: &b[PREFIX_LEN..header_end],
            payload: &b[header_end..end],
        },
        end,
    ))
}

fn check_len(field: &'static str, value: usize, limit: usize) -> Result<(), WireError> {
    if value > limit {
        return Err(WireError::TooLarge {
            field,
            value: value as u64,
            limit: limit as u64,
        });
    }
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_segments: 256,
            max_payload: 1 << 20,
            max_header: 4096,
            max_in_flight: 64,
            inline_threshold: 0,
            rdma_payload: false,
        }
    }

    fn req(header_len: usize, payload_len: usize, recv_cap: usize) -> Prefix {
        Prefix {
            kind: Kind::Request,
            header_len,
            id: 0x0102_0304_0506_0708,
            payload_len,
            recv_cap,
        }
    }

    #[test]
    fn magic_is_zcio_bytes() {
        assert_eq!(&MAGIC.to_le_bytes(), b"ZCIO");
        assert_eq!(MAGIC, 0x4F49_435A);
        assert_eq!(&req(0, 0, 0).encode()[..4], b"ZCIO");
        assert_eq!(&Hello::from_limits(&limits(), 1).encode()[..4], b"ZCIO");
    }

    #[test]
    fn prefix_round_trip_and_layout() {
        let p = req(17, 4096, 8192);
        let b = p.encode();
        assert_eq!(b[4], 1);
        assert_eq!(b[5], 0);
        assert_eq!(&b[6..8], &17u16.to_le_bytes());
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &4096u32.to_le_bytes());
        assert_eq!(&b[20..24], &8192u32.to_le_bytes());
        assert_eq!(decode_prefix(&b, Kind::Request, &limits()), Ok(p));
        let r = Prefix {
            kind: Kind::Reply,
            recv_cap: 0,
            ..p
        };
        assert_eq!(decode_prefix(&r.encode(), Kind::Reply, &limits()), Ok(r));
    }

    #[test]
    fn prefix_truncated() {
        let b = req(1, 2, 3).encode();
        for n in 0..PREFIX_LEN {
            assert_eq!(
                decode_prefix(&b[..n], Kind::Request, &limits()),
                Err(WireError::Truncated {
                    need: PREFIX_LEN,
                    got: n
                })
            );
        }
    }

    #[test]
    fn prefix_bad_magic_kind_flags() {
        let l = limits();
        let mut b = req(0, 0, 0).encode();
        b[0] ^= 0x20;
        assert!(matches!(
            decode_prefix(&b, Kind::Request, &l),
            Err(WireError::BadMagic { .. })
        ));
        let b = req(0, 0, 0).encode();
        assert_eq!(
            decode_prefix(&b, Kind::Reply, &l),
            Err(WireError::Kind {
                expected: 2,
                got: 1
            })
        );
        for k in [0u8, 3, 255] {
            let mut b = req(0, 0, 0).encode();
            b[4] = k;
            assert!(matches!(
                decode_prefix(&b, Kind::Request, &l),
                Err(WireError::Kind { .. })
            ));
        }
        let mut b = req(0, 0, 0).encode();
        b[5] = 0x80;
        assert_eq!(
            decode_prefix(&b, Kind::Request, &l),
            Err(WireError::Flags(0x80))
        );
    }

    #[test]
    fn prefix_oversized_fields() {
        let l = limits();
        let too_big = |p: Prefix, field| match decode_prefix(&p.encode(), p.kind, &l) {
            Err(WireError::TooLarge { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        };
        too_big(req(4097, 0, 0), "header_len");
        too_big(req(u16::MAX as usize, 0, 0), "header_len");
        too_big(req(0, (1 << 20) + 1, 0), "payload_len");
        too_big(req(0, u32::MAX as usize, 0), "payload_len");
        too_big(req(0, 0, (1 << 20) + 1), "recv_cap");
        // At the limits exactly: accepted.
        assert!(decode_prefix(&req(4096, 1 << 20, 1 << 20).encode(), Kind::Request, &l).is_ok());
        // A reply must not claim a capacity.
        let mut b = req(0, 0, 0).encode();
        b[4] = Kind::Reply as u8;
        b[20] = 1;
        assert!(matches!(
            decode_prefix(&b, Kind::Reply, &l),
            Err(WireError::BadValue {
                field: "recv_cap",
                ..
            })
        ));
    }

    #[test]
    fn frame_whole_and_truncated() {
        let l = limits();
        let mut b = req(3, 6, 0).encode().to_vec();
        b.extend_from_slice(b"hdrpaylo");
        // One byte short.
        assert_eq!(
            decode_frame(&b, Kind::Request, &l),
            Err(WireError::Truncated { need: 33, got: 32 })
        );
        b.push(b'd');
        b.extend_from_slice(b"next frame");
        let (f, n) = decode_frame(&b, Kind::Request, &l).unwrap();
        assert_eq!(n, 33);
        assert_eq!(f.header, b"hdr");
        assert_eq!(f.payload, b"paylod");
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic generator (xorshift) over many buffers and lengths.
        let l = limits();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut accepted = 0;
        for i in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 && b.len() >= 6 {
                // Valid magic and kind, so the later checks get exercised too.
                b[..4].copy_from_slice(b"ZCIO");
                b[4] = 1 + (i % 4 == 0) as u8;
                b[5] = if i % 8 == 0 { 1 } else { 0 };
                if b.len() >= PREFIX_LEN {
                    // Mostly plausible lengths.
                    b[7] &= 0x0f;
                    b[18..20].fill(0);
                    b[22..24].fill(0);
                    if i % 3 == 0 {
                        b[20..22].fill(0);
                    }
                }
            }
            for kind in [Kind::Request, Kind::Reply] {
                if let Ok(p) = decode_prefix(&b, kind, &l) {
                    assert!(p.header_len <= l.max_header && p.payload_len <= l.max_payload);
                    accepted += 1;
                }
                let _ = decode_frame(&b, kind, &l);
            }
            let _ = Hello::decode(&b);
        }
        assert!(accepted > 0, "the generator should hit some valid prefixes");
    }

    #[test]
    fn hello_round_trip_and_negotiation() {
        let mut l = limits();
        l.max_header = 1 << 20; // more than the wire can carry: clamped
        let a = Hello::from_limits(&l, 64);
        assert_eq!(a.max_header, u16::MAX as u32);
        assert_eq!(Hello::decode(&a.encode()), Ok(a));
        let b = Hello {
            version: VERSION,
            max_segments: 16,
            max_payload: 1 << 30,
            max_header: 512,
            max_in_flight: 4,
        };
        let n = a.negotiate(&b);
        assert_eq!(n.max_segments, 16);
        assert_eq!(n.max_payload, 1 << 20);
        assert_eq!(n.max_header, 512);
        assert_eq!(n.max_in_flight, 4);
        assert_eq!(n.inline_threshold, 0);
        assert!(!n.rdma_payload);
        assert_eq!(n, b.negotiate(&a));
    }

    #[test]
    fn hello_bad_input() {
        let h = Hello::from_limits(&limits(), 8);
        let b = h.encode();
        for n in 0..HELLO_LEN {
            assert!(matches!(
                Hello::decode(&b[..n]),
                Err(WireError::Truncated { .. })
            ));
        }
        let mut bad = b;
        bad[3] = b'X';
        assert!(matches!(
            Hello::decode(&bad),
            Err(WireError::BadMagic { .. })
        ));
        let mut v2 = b;
        v2[4] = 2;
        assert_eq!(Hello::decode(&v2), Err(WireError::Version { theirs: 2 }));
        assert!(matches!(
            WireError::Version { theirs: 2 }.into_error("tcp handshake"),
            zcio::Error::Version { ours: 1, theirs: 2 }
        ));
        let mut zero = b;
        zero[20..24].copy_from_slice(&[0; 4]);
        assert!(matches!(
            Hello::decode(&zero),
            Err(WireError::BadValue {
                field: "max_in_flight",
                ..
            })
        ));
        // The reserved field is ignored.
        let mut r = b;
        r[6] = 7;
        assert_eq!(Hello::decode(&r), Ok(h));
        // HTTP is not zcio.
        let e = Hello::decode(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap_err();
        assert!(e.to_string().contains("not a zcio peer"), "{e}");
    }
}
