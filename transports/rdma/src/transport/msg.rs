//! The messages that travel by SEND on a connected queue pair: requests (client to server)
//! and replies (server to client).
//!
//! Pure (no I/O, no RDMA library, no `unsafe`, no allocation): encoders write into a
//! caller's buffer, decoders return views borrowing the received bytes, after checking every
//! length against the negotiated limits and against the message's own size. A message that
//! fails these checks comes from a broken or hostile peer; the transport fails that
//! connection. Integers are little-endian.
//!
//! **Request** ([`REQUEST_FIXED`] = 32 bytes, then the variable parts in this order):
//!
//! | offset | size | field                                                             |
//! |-------:|-----:|-------------------------------------------------------------------|
//! |      0 |    1 | kind: 1                                                           |
//! |      1 |    1 | reserved, 0                                                       |
//! |      2 |    2 | header_len                                                        |
//! |      4 |    2 | n_send: descriptors of the client's payload (the server READs)    |
//! |      6 |    2 | n_recv: descriptors of the reply landing zone (the server WRITEs) |
//! |      8 |    8 | id                                                                |
//! |     16 |    4 | inline_len: request payload carried in the message                |
//! |     20 |    4 | recv_cap: most reply payload bytes the client takes               |
//! |     24 |    4 | send_total: request payload bytes in all                          |
//! |     28 |    4 | reserved, 0                                                       |
//! |     32 |    … | header, n_send descriptors, n_recv descriptors, inline payload    |
//!
//! A descriptor ([`DESC_LEN`] = 16 bytes) is `addr u64, rkey u32, len u32`: registered
//! memory of the client. Rules: with n_send > 0 there is no inline payload and the send
//! lengths add up to send_total; with n_send = 0, send_total = inline_len (which is at most
//! the inline threshold). With n_recv > 0 the receive lengths add up to recv_cap; with
//! n_recv = 0, recv_cap is at most the inline threshold (the reply must come inline).
//! Every descriptor length is at least 1.
//!
//! **Reply** ([`REPLY_FIXED`] = 16 bytes, then header, then the inline payload if flagged):
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! |      0 |    1 | kind: 2                                                      |
//! |      1 |    1 | flags: bit 0 = payload inline; other bits 0                  |
//! |      2 |    2 | header_len                                                   |
//! |      4 |    4 | payload_len: bytes inline, or bytes already RDMA-WRITten     |
//! |      8 |    8 | id of the request                                            |
#![forbid(unsafe_code)]

/// Fixed part of a request.
pub const REQUEST_FIXED: usize = 32;
/// Fixed part of a reply.
pub const REPLY_FIXED: usize = 16;
/// One memory descriptor.
pub const DESC_LEN: usize = 16;

const KIND_REQUEST: u8 = 1;
const KIND_REPLY: u8 = 2;
const FLAG_INLINE: u8 = 1;

/// A piece of a peer's registered memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    /// Address in the peer's address space.
    pub addr: u64,
    /// The remote key of the memory region holding it.
    pub rkey: u32,
    /// Length in bytes (at least 1).
    pub len: u32,
}

impl Desc {
    fn read(b: &[u8]) -> Desc {
        Desc {
            addr: u64_at(b, 0),
            rkey: u32_at(b, 8),
            len: u32_at(b, 12),
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..12].copy_from_slice(&self.rkey.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
    }
}

/// The limits a decoder enforces (the negotiated ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgLimits {
    /// Longest header.
    pub max_header: usize,
    /// Most descriptors of each kind in a request.
    pub max_segments: usize,
    /// Most payload bytes in a request or reply.
    pub max_payload: usize,
    /// Most payload bytes carried inline.
    pub inline_threshold: usize,
}

/// A malformed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MsgError {
    /// Shorter than the fixed part.
    #[error("message of {got} bytes is shorter than its fixed part of {need}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes received.
        got: usize,
    },
    /// Not the kind of message expected here.
    #[error("message kind {got}, expected {expected}")]
    Kind {
        /// Kind expected.
        expected: u8,
        /// Kind read.
        got: u8,
    },
    /// The lengths in the fixed part do not add up to the message's size.
    #[error("message is {got} bytes but its fields describe {described}")]
    Length {
        /// Size the fields describe.
        described: u64,
        /// Size received.
        got: usize,
    },
    /// A field is over its limit.
    #[error("{field} is {value}, over the limit of {limit}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A field has a value that makes no sense.
    #[error("{field} is {value}: {reason}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The output buffer is too small for the message (an encoder's caller bug).
    #[error("message of {need} bytes does not fit a {have}-byte buffer")]
    NoRoom {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn too_large(field: &'static str, value: usize, limit: usize) -> MsgError {
    MsgError::TooLarge {
        field,
        value: value as u64,
        limit: limit as u64,
    }
}

/// Size of a request with these parts.
pub fn request_len(header_len: usize, n_send: usize, n_recv: usize, inline_len: usize) -> usize {
    REQUEST_FIXED + header_len + DESC_LEN * (n_send + n_recv) + inline_len
}

/// Size of the largest request under these limits.
pub fn max_request_len(max_header: usize, max_segments: usize, inline_threshold: usize) -> usize {
    request_len(max_header, max_segments, max_segments, inline_threshold)
}

/// Size of a reply with these parts.
pub fn reply_len(header_len: usize, inline_len: usize) -> usize {
    REPLY_FIXED + header_len + inline_len
}

/// The fields of a request besides its header and descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// Request id (echoed by the reply).
    pub id: u64,
    /// Payload bytes carried inline (written by the caller after the descriptors).
    pub inline_len: usize,
    /// Most reply payload bytes the client takes.
    pub recv_cap: usize,
    /// Request payload bytes in all.
    pub send_total: usize,
}

/// Encodes a request into `out` (at least [`request_len`] bytes). Returns the offset at which
/// the caller writes the `inline_len` inline payload bytes; the message ends right after
/// them.
pub fn encode_request(
    out: &mut [u8],
    head: &RequestHead,
    header: &[u8],
    send: &[Desc],
    recv: &[Desc],
) -> Result<usize, MsgError> {
    has_room(
        out,
        request_len(header.len(), send.len(), recv.len(), head.inline_len),
    )?;
    let header_len = as_u16("header_len", header.len())?;
    let n_send = as_u16("n_send", send.len())?;
    let n_recv = as_u16("n_recv", recv.len())?;
    let inline_len = as_u32("inline_len", head.inline_len)?;
    let recv_cap = as_u32("recv_cap", head.recv_cap)?;
    let send_total = as_u32("send_total", head.send_total)?;
    out[0] = KIND_REQUEST;
    out[1] = 0;
    out[2..4].copy_from_slice(&header_len.to_le_bytes());
    out[4..6].copy_from_slice(&n_send.to_le_bytes());
    out[6..8].copy_from_slice(&n_recv.to_le_bytes());
    out[8..16].copy_from_slice(&head.id.to_le_bytes());
    out[16..20].copy_from_slice(&inline_len.to_le_bytes());
    out[20..24].copy_from_slice(&recv_cap.to_le_bytes());
    out[24..28].copy_from_slice(&send_total.to_le_bytes());
    out[28..32].fill(0);
    let mut at = REQUEST_FIXED;
    out[at..at + header.len()].copy_from_slice(header);
    at += header.len();
    for d in send.iter().chain(recv) {
        d.write(&mut out[at..at + DESC_LEN]);
        at += DESC_LEN;
    }
    Ok(at)
}

/// A decoded request, borrowing the received bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestView<'a> {
    /// Request id.
    pub id: u64,
    /// The opaque header.
    pub header: &'a [u8],
    send: &'a [u8],
    recv: &'a [u8],
    /// Inline request payload (empty when the payload is described by descriptors).
    pub inline: &'a [u8],
    /// Most reply payload bytes the client takes.
    pub recv_cap: usize,
    /// Request payload bytes in all.
    pub send_total: usize,
}

impl<'a> RequestView<'a> {
    /// Descriptors of the client's request payload, in order.
    pub fn send_descs(&self) -> impl ExactSizeIterator<Item = Desc> + 'a {
        self.send.chunks_exact(DESC_LEN).map(Desc::read)
    }

    /// Descriptors of the client's reply landing zone, in order.
    pub fn recv_descs(&self) -> impl ExactSizeIterator<Item = Desc> + 'a {
        self.recv.chunks_exact(DESC_LEN).map(Desc::read)
    }
}

/// Checks descriptors: each at least 1 byte, adding up to `total`.
fn check_descs(
    descs: &[u8],
    total: usize,
    field: &'static str,
    max_payload: usize,
) -> Result<(), MsgError> {
    let mut sum = 0u64;
    for d in descs.chunks_exact(DESC_LEN).map(Desc::read) {
        if d.len == 0 {
            return Err(MsgError::BadValue {
                field,
                value: 0,
                reason: "a descriptor of zero bytes",
            });
        }
        sum += u64::from(d.len);
        if sum > max_payload as u64 {
            return Err(MsgError::TooLarge {
                field,
                value: sum,
                limit: max_payload as u64,
            });
        }
    }
    if sum != total as u64 {
        return Err(MsgError::BadValue {
            field,
            value: sum,
            reason: "descriptor lengths do not add up to the announced total",
        });
    }
    Ok(())
}

/// Checks that `out` has room for `need` bytes.
fn has_room(out: &[u8], need: usize) -> Result<(), MsgError> {
    if out.len() < need {
        return Err(MsgError::NoRoom {
            need,
            have: out.len(),
        });
    }
    Ok(())
}

/// `field`'s `value` as the u16 the wire holds it in.
fn as_u16(field: &'static str, value: usize) -> Result<u16, MsgError> {
    u16::try_from(value).map_err(|_| too_large(field, value, u16::MAX as usize))
}

/// `field`'s `value` as the u32 the wire holds it in.
fn as_u32(field: &'static str, value: usize) -> Result<u32, MsgError> {
    u32::try_from(value).map_err(|_| too_large(field, value, u32::MAX as usize))
}

/// Checks that `msg` holds at least the `fixed` bytes of its kind's fixed part and is of
/// kind `kind`.
fn check_head(msg: &[u8], fixed: usize, kind: u8) -> Result<(), MsgError> {
    if msg.len() < fixed {
        return Err(MsgError::Truncated {
            need: fixed,
            got: msg.len(),
        });
    }
    if msg[0] != kind {
        return Err(MsgError::Kind {
            expected: kind,
            got: msg[0],
        });
    }
    Ok(())
}

/// Checks that `msg` is as long as its fixed part says (`described` bytes).
fn check_length(described: usize, msg: &[u8]) -> Result<(), MsgError> {
    if described != msg.len() {
        return Err(MsgError::Length {
            described: described as u64,
            got: msg.len(),
        });
    }
    Ok(())
}

/// Checks that `field`'s `value` is at most `limit`.
fn at_most(field: &'static str, value: usize, limit: usize) -> Result<(), MsgError> {
    if value > limit {
        return Err(too_large(field, value, limit));
    }
    Ok(())
}

/// Decodes and checks a request.
pub fn decode_request<'a>(msg: &'a [u8], l: &MsgLimits) -> Result<RequestView<'a>, MsgError> {
    check_head(msg, REQUEST_FIXED, KIND_REQUEST)?;
    if msg[1] != 0 || u32_at(msg, 28) != 0 {
        return Err(MsgError::BadValue {
            field: "reserved",
            value: u64::from(msg[1]) | u64::from(u32_at(msg, 28)),
            reason: "must be 0",
        });
    }
    let header_len = usize::from(u16_at(msg, 2));
    let n_send = usize::from(u16_at(msg, 4));
    let n_recv = usize::from(u16_at(msg, 6));
    let id = u64_at(msg, 8);
    let inline_len = u32_at(msg, 16) as usize;
    let recv_cap = u32_at(msg, 20) as usize;
    let send_total = u32_at(msg, 24) as usize;
    at_most("header_len", header_len, l.max_header)?;
    at_most("n_send", n_send, l.max_segments)?;
    at_most("n_recv", n_recv, l.max_segments)?;
    at_most("inline_len", inline_len, l.inline_threshold)?;
    at_most("recv_cap", recv_cap, l.max_payload)?;
    at_most("send_total", send_total, l.max_payload)?;
    // Every term is bounded by the checks above, so this cannot overflow.
    check_length(request_len(header_len, n_send, n_recv, inline_len), msg)?;
    let mut at = REQUEST_FIXED;
    let header = &msg[at..at + header_len];
    at += header_len;
    let send = &msg[at..at + n_send * DESC_LEN];
    at += n_send * DESC_LEN;
    let recv = &msg[at..at + n_recv * DESC_LEN];
    at += n_recv * DESC_LEN;
    let inline = &msg[at..];
    if n_send > 0 {
        if inline_len != 0 {
            return Err(MsgError::BadValue {
                field: "inline_len",
                value: inline_len as u64,
                reason: "inline payload together with send descriptors",
            });
        }
        check_descs(send, send_total, "send descriptors", l.max_payload)?;
    } else if send_total != inline_len {
        return Err(MsgError::BadValue {
            field: "send_total",
            value: send_total as u64,
            reason: "differs from the inline payload length without send descriptors",
        });
    }
    if n_recv > 0 {
        check_descs(recv, recv_cap, "receive descriptors", l.max_payload)?;
    } else if recv_cap > l.inline_threshold {
        return Err(MsgError::BadValue {
            field: "recv_cap",
            value: recv_cap as u64,
            reason: "above the inline threshold without receive descriptors",
        });
    }
    Ok(RequestView {
        id,
        header,
        send,
        recv,
        inline,
        recv_cap,
        send_total,
    })
}

/// Encodes a reply into `out` (at least [`reply_len`] bytes with the inline length). With
/// `inline`, the caller writes the `payload_len` payload bytes at the returned offset.
pub fn encode_reply(
    out: &mut [u8],
    id: u64,
    header: &[u8],
    payload_len: usize,
    inline: bool,
) -> Result<usize, MsgError> {
    has_room(
        out,
        reply_len(header.len(), if inline { payload_len } else { 0 }),
    )?;
    let header_len = as_u16("header_len", header.len())?;
    let payload = as_u32("payload_len", payload_len)?;
    out[0] = KIND_REPLY;
    out[1] = if inline { FLAG_INLINE } else { 0 };
    out[2..4].copy_from_slice(&header_len.to_le_bytes());
    out[4..8].copy_from_slice(&payload.to_le_bytes());
    out[8..16].copy_from_slice(&id.to_le_bytes());
    out[REPLY_FIXED..REPLY_FIXED + header.len()].copy_from_slice(header);
    Ok(REPLY_FIXED + header.len())
}

/// A decoded reply, borrowing the received bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyView<'a> {
    /// The request's id.
    pub id: u64,
    /// The opaque header.
    pub header: &'a [u8],
    /// Payload bytes (inline, or already written into the client's memory).
    pub payload_len: usize,
    /// The payload when it came inline.
    pub inline: Option<&'a [u8]>,
}

/// Decodes and checks a reply.
pub fn decode_reply<'a>(msg: &'a [u8], l: &MsgLimits) -> Result<ReplyView<'a>, MsgError> {
    check_head(msg, REPLY_FIXED, KIND_REPLY)?;
    let flags = msg[1];
    if flags & !FLAG_INLINE != 0 {
        return Err(MsgError::BadValue {
            field: "flags",
            value: u64::from(flags),
            reason: "unknown flags",
        });
    }
    let inline = flags & FLAG_INLINE != 0;
    let header_len = usize::from(u16_at(msg, 2));
    let payload_len = u32_at(msg, 4) as usize;
    let id = u64_at(msg, 8);
    at_most("header_len", header_len, l.max_header)?;
    at_most("payload_len", payload_len, l.max_payload)?;
    if inline {
        at_most("inline payload_len", payload_len, l.inline_threshold)?;
    }
    check_length(
        reply_len(header_len, if inline { payload_len } else { 0 }),
        msg,
    )?;
    let header = &msg[REPLY_FIXED..REPLY_FIXED + header_len];
    Ok(ReplyView {
        id,
        header,
        payload_len,
        inline: inline.then(|| &msg[REPLY_FIXED + header_len..]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: MsgLimits = MsgLimits {
        max_header: 4096,
        max_segments: 256,
        max_payload: 1 << 20,
        inline_threshold: 128,
    };

    fn d(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            rkey: 0xabcd,
            len,
        }
    }

    fn request(
        head: RequestHead,
        header: &[u8],
        send: &[Desc],
        recv: &[Desc],
        inline: &[u8],
    ) -> Vec<u8> {
        let mut out = vec![0u8; request_len(header.len(), send.len(), recv.len(), inline.len())];
        let at = encode_request(&mut out, &head, header, send, recv).unwrap();
        out[at..].copy_from_slice(inline);
        out
    }

    #[test]
    fn request_round_trip() {
        let send = [d(0x1000, 4096), d(0x9000, 10)];
        let recv = [d(0x20000, 65536)];
        let head = RequestHead {
            id: 77,
            inline_len: 0,
            recv_cap: 65536,
            send_total: 4106,
        };
        let m = request(head, b"hdr", &send, &recv, b"");
        let v = decode_request(&m, &L).unwrap();
        assert_eq!(
            (v.id, v.header, v.recv_cap, v.send_total),
            (77, &b"hdr"[..], 65536, 4106)
        );
        assert_eq!(v.send_descs().collect::<Vec<_>>(), send);
        assert_eq!(v.recv_descs().collect::<Vec<_>>(), recv);
        assert!(v.inline.is_empty());

        let head = RequestHead {
            id: 1,
            inline_len: 5,
            recv_cap: 100,
            send_total: 5,
        };
        let m = request(head, b"", &[], &[], b"hello");
        let v = decode_request(&m, &L).unwrap();
        assert_eq!((v.inline, v.recv_cap), (&b"hello"[..], 100));
        assert_eq!(v.send_descs().len(), 0);
    }

    #[test]
    fn inconsistent_requests_are_refused() {
        let ok = RequestHead {
            id: 1,
            inline_len: 0,
            recv_cap: 4096,
            send_total: 0,
        };
        type Case = (RequestHead, Vec<Desc>, Vec<Desc>, Vec<u8>);
        let cases: Vec<Case> = vec![
            // recv lengths do not add up
            (ok, vec![], vec![d(1, 100)], vec![]),
            // recv_cap over the inline threshold without descriptors
            (ok, vec![], vec![], vec![]),
            // zero-length descriptor
            (
                RequestHead { recv_cap: 0, ..ok },
                vec![],
                vec![d(1, 0)],
                vec![],
            ),
            // send total mismatch
            (
                RequestHead {
                    recv_cap: 0,
                    send_total: 9,
                    ..ok
                },
                vec![d(1, 8)],
                vec![],
                vec![],
            ),
            // inline with send descriptors
            (
                RequestHead {
                    recv_cap: 0,
                    send_total: 8,
                    inline_len: 2,
                    ..ok
                },
                vec![d(1, 8)],
                vec![],
                vec![1, 2],
            ),
            // inline over the threshold
            (
                RequestHead {
                    recv_cap: 0,
                    send_total: 200,
                    inline_len: 200,
                    ..ok
                },
                vec![],
                vec![],
                vec![0; 200],
            ),
            // payload over the limit
            (
                RequestHead {
                    recv_cap: 0,
                    send_total: 2 << 20,
                    ..ok
                },
                vec![d(1, 1 << 20), d(2, 1 << 20)],
                vec![],
                vec![],
            ),
        ];
        for (i, (h, s, r, inl)) in cases.into_iter().enumerate() {
            let m = request(h, b"x", &s, &r, &inl);
            assert!(decode_request(&m, &L).is_err(), "case {i} accepted");
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let head = RequestHead {
            id: 3,
            inline_len: 3,
            recv_cap: 8192,
            send_total: 3,
        };
        let m = request(head, b"header", &[], &[d(5, 8192)], b"abc");
        for n in 0..m.len() {
            assert!(decode_request(&m[..n], &L).is_err(), "{n}");
        }
        let mut long = m.clone();
        long.push(0);
        assert!(decode_request(&long, &L).is_err());
        let r = {
            let mut out = vec![0u8; reply_len(3, 4)];
            let at = encode_reply(&mut out, 9, b"hdr", 4, true).unwrap();
            out[at..].copy_from_slice(b"data");
            out
        };
        assert_eq!(
            decode_reply(&r, &L).unwrap(),
            ReplyView {
                id: 9,
                header: b"hdr",
                payload_len: 4,
                inline: Some(b"data")
            }
        );
        for n in 0..r.len() {
            assert!(decode_reply(&r[..n], &L).is_err(), "{n}");
        }
    }

    #[test]
    fn limits_are_enforced_before_anything_else() {
        let small = MsgLimits {
            max_segments: 1,
            ..L
        };
        let head = RequestHead {
            id: 3,
            inline_len: 0,
            recv_cap: 20,
            send_total: 0,
        };
        let m = request(head, b"", &[], &[d(1, 10), d(2, 10)], b"");
        assert!(matches!(
            decode_request(&m, &small),
            Err(MsgError::TooLarge {
                field: "n_recv",
                ..
            })
        ));
        let mut out = vec![0u8; reply_len(0, 0)];
        encode_reply(&mut out, 1, b"", 2 << 20, false).unwrap();
        assert!(matches!(
            decode_reply(&out, &L),
            Err(MsgError::TooLarge { .. })
        ));
        // An inline reply over the threshold.
        let mut out = vec![0u8; reply_len(0, 200)];
        encode_reply(&mut out, 1, b"", 200, true).unwrap();
        assert!(decode_reply(&out, &L).is_err());
        // Unknown flags, wrong kinds.
        let mut out = vec![0u8; reply_len(0, 0)];
        encode_reply(&mut out, 1, b"", 0, false).unwrap();
        out[1] = 2;
        assert!(decode_reply(&out, &L).is_err());
        out[1] = 0;
        out[0] = 1;
        assert!(decode_reply(&out, &L).is_err());
        assert!(decode_request(&out, &L).is_err());
    }

    #[test]
    fn encoders_refuse_short_buffers() {
        let mut out = [0u8; 10];
        assert!(matches!(
            encode_reply(&mut out, 1, b"0123456789", 0, false),
            Err(MsgError::NoRoom { .. })
        ));
        let head = RequestHead {
            id: 1,
            inline_len: 0,
            recv_cap: 0,
            send_total: 0,
        };
        assert!(matches!(
            encode_request(&mut out, &head, b"", &[], &[]),
            Err(MsgError::NoRoom { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let head = RequestHead {
            id: 3,
            inline_len: 0,
            recv_cap: 8192,
            send_total: 100,
        };
        let base = request(head, b"header", &[d(1, 100)], &[d(5, 8192)], b"");
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..50_000 {
            let mut m = base.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % m.len() as u64) as usize;
                m[i] = (x >> 40) as u8;
            }
            let cut = (x >> 20) as usize % (m.len() + 1);
            let _ = decode_request(&m[..cut], &L);
            let _ = decode_reply(&m[..cut], &L);
            let _ = decode_request(&m, &L);
            let _ = decode_reply(&m, &L);
        }
    }
}
