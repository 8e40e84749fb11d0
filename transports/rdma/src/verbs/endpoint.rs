//! The local end of an RC queue pair as the peer needs it to connect (QPN, PSN, GID, LID,
//! port, MTU), and its fixed binary encoding for the TCP bootstrap exchange.
//!
//! The encoding is [`Endpoint::ENCODED_LEN`] bytes, integers big-endian:
//!
//! | bytes  | field                                              |
//! |--------|----------------------------------------------------|
//! | 0..2   | magic `ZQ`                                         |
//! | 2      | version, 1                                         |
//! | 3      | MTU as `enum ibv_mtu` (1 = 256 ... 5 = 4096)       |
//! | 4..8   | queue pair number (24 bits)                        |
//! | 8..12  | initial packet sequence number (24 bits)           |
//! | 12..14 | LID (0 on RoCE)                                    |
//! | 14     | port number (1-based)                              |
//! | 15     | GID index used by the sender                       |
//! | 16..32 | GID (16 bytes, as an IPv6 address)                 |
//!
//! Decoding accepts exactly that many bytes and checks every field, so truncated, oversized or
//! foreign input is an error, never a panic.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::Ipv6Addr;

use crate::error::RdmaError;
use crate::verbs::types::Mtu;

/// Largest queue pair number and packet sequence number: both are 24-bit fields on the wire.
pub const MAX_24BIT: u32 = (1 << 24) - 1;

const MAGIC: [u8; 2] = *b"ZQ";
const VERSION: u8 = 1;

/// What a peer needs to know about one queue pair to connect its own to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// The first packet sequence number this side sends with (24 bits, random).
    pub psn: u32,
    /// Local identifier of the port (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Port number on the device, 1-based.
    pub port: u8,
    /// Index of `gid` in the port's GID table on the sender's side.
    pub gid_index: u8,
    /// The port's GID at `gid_index` (`::ffff:127.0.0.1` for Soft-RoCE on `lo`).
    pub gid: Ipv6Addr,
    /// The port's active MTU; the connection uses the smaller of both sides'.
    pub mtu: Mtu,
}

impl Endpoint {
    /// Length of the binary encoding in bytes.
    pub const ENCODED_LEN: usize = 32;

    /// Encodes into the fixed binary form described in the module documentation.
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = VERSION;
        out[3] = self.mtu.code();
        out[4..8].copy_from_slice(&self.qpn.to_be_bytes());
        out[8..12].copy_from_slice(&self.psn.to_be_bytes());
        out[12..14].copy_from_slice(&self.lid.to_be_bytes());
        out[14] = self.port;
        out[15] = self.gid_index;
        out[16..32].copy_from_slice(&self.gid.octets());
        out
    }

    /// Decodes the fixed binary form. The input must be exactly [`Self::ENCODED_LEN`] bytes
    /// and every field must be in range.
    pub fn decode(bytes: &[u8]) -> Result<Endpoint, RdmaError> {
        let bytes: &[u8; Self::ENCODED_LEN] =
            bytes.try_into().map_err(|_| RdmaError::EndpointLength {
                got: bytes.len(),
                expected: Self::ENCODED_LEN,
            })?;
        if bytes[0..2] != MAGIC {
            return Err(RdmaError::EndpointField {
                field: "magic",
                value: u64::from(u16::from_be_bytes([bytes[0], bytes[1]])),
            });
        }
        if bytes[2] != VERSION {
            return Err(RdmaError::EndpointField {
                field: "version",
                value: u64::from(bytes[2]),
            });
        }
        let mtu = Mtu::from_code(u32::from(bytes[3])).ok_or(RdmaError::EndpointField {
            field: "MTU",
            value: u64::from(bytes[3]),
        })?;
        let qpn = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if qpn > MAX_24BIT {
            return Err(RdmaError::EndpointField {
                field: "queue pair number",
                value: u64::from(qpn),
            });
        }
        let psn = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if psn > MAX_24BIT {
            return Err(RdmaError::EndpointField {
                field: "packet sequence number",
                value: u64::from(psn),
            });
        }
        let lid = u16::from_be_bytes([bytes[12], bytes[13]]);
        let port = bytes[14];
        if port == 0 {
            return Err(RdmaError::EndpointField {
                field: "port",
                value: 0,
            });
        }
        let gid_index = bytes[15];
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&bytes[16..32]);
        Ok(Endpoint {
            qpn,
            psn,
            lid,
            port,
            gid_index,
            gid: Ipv6Addr::from(gid),
            mtu,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "qpn {:#08x} psn {:#08x} lid {} port {} gid[{}] {} mtu {}",
            self.qpn, self.psn, self.lid, self.port, self.gid_index, self.gid, self.mtu
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Endpoint {
        Endpoint {
            qpn: 0x11,
            psn: 0xab_cdef,
            lid: 0,
            port: 1,
            gid_index: 1,
            gid: "::ffff:127.0.0.1".parse().unwrap(),
            mtu: Mtu::Mtu1024,
        }
    }

    #[test]
    fn round_trip() {
        let ep = sample();
        let bytes = ep.encode();
        assert_eq!(bytes.len(), Endpoint::ENCODED_LEN);
        assert_eq!(&bytes[0..3], b"ZQ\x01");
        assert_eq!(Endpoint::decode(&bytes).unwrap(), ep);

        let max = Endpoint {
            qpn: MAX_24BIT,
            psn: MAX_24BIT,
            lid: u16::MAX,
            port: u8::MAX,
            gid_index: u8::MAX,
            gid: Ipv6Addr::from([0xfe; 16]),
            mtu: Mtu::Mtu4096,
        };
        assert_eq!(Endpoint::decode(&max.encode()).unwrap(), max);
    }

    #[test]
    fn truncated_input_is_rejected() {
        let bytes = sample().encode();
        for len in 0..Endpoint::ENCODED_LEN {
            match Endpoint::decode(&bytes[..len]) {
                Err(RdmaError::EndpointLength { got, expected }) => {
                    assert_eq!((got, expected), (len, Endpoint::ENCODED_LEN));
                }
                other => panic!("length {len}: expected a length error, got {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_input_is_rejected() {
        let mut bytes = sample().encode().to_vec();
        bytes.push(0);
        assert!(matches!(
            Endpoint::decode(&bytes),
            Err(RdmaError::EndpointLength { got: 33, .. })
        ));
        let doubled = [sample().encode(), sample().encode()].concat();
        assert!(matches!(
            Endpoint::decode(&doubled),
            Err(RdmaError::EndpointLength { got: 64, .. })
        ));
    }

    fn corrupt(at: usize, value: u8) -> Result<Endpoint, RdmaError> {
        let mut bytes = sample().encode();
        bytes[at] = value;
        Endpoint::decode(&bytes)
    }

    #[test]
    fn bad_fields_are_rejected() {
        let field = |r: Result<Endpoint, RdmaError>| match r {
            Err(RdmaError::EndpointField { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        };
        assert_eq!(field(corrupt(0, b'X')), "magic");
        assert_eq!(field(corrupt(2, 2)), "version");
        assert_eq!(field(corrupt(3, 0)), "MTU");
        assert_eq!(field(corrupt(3, 6)), "MTU");
        assert_eq!(field(corrupt(4, 1)), "queue pair number");
        assert_eq!(field(corrupt(8, 0x80)), "packet sequence number");
        assert_eq!(field(corrupt(14, 0)), "port");
        // Any GID, LID and GID index are accepted.
        assert!(corrupt(13, 7).is_ok());
        assert!(corrupt(15, 200).is_ok());
        assert!(corrupt(31, 9).is_ok());
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let msg = Endpoint::decode(&[0; 5]).unwrap_err().to_string();
        assert!(msg.contains("5 bytes") && msg.contains("32"), "{msg}");
    }
}
