//! Plain value types of the verbs layer that need no RDMA library: they compile without the
//! `rdma` feature, so the endpoint codec, the device listing types and the error type can use
//! them everywhere.
#![forbid(unsafe_code)]

use std::fmt;

/// An RDMA path MTU. Only these five sizes exist; they count RDMA payload bytes per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mtu {
    /// 256 bytes.
    Mtu256,
    /// 512 bytes.
    Mtu512,
    /// 1024 bytes (Soft-RoCE on `lo`).
    Mtu1024,
    /// 2048 bytes.
    Mtu2048,
    /// 4096 bytes.
    Mtu4096,
}

impl Mtu {
    /// The MTU in bytes.
    pub const fn bytes(self) -> u32 {
        match self {
            Mtu::Mtu256 => 256,
            Mtu::Mtu512 => 512,
            Mtu::Mtu1024 => 1024,
            Mtu::Mtu2048 => 2048,
            Mtu::Mtu4096 => 4096,
        }
    }

    /// The verbs encoding (`enum ibv_mtu`: 1 = 256 ... 5 = 4096).
    pub const fn code(self) -> u8 {
        match self {
            Mtu::Mtu256 => 1,
            Mtu::Mtu512 => 2,
            Mtu::Mtu1024 => 3,
            Mtu::Mtu2048 => 4,
            Mtu::Mtu4096 => 5,
        }
    }

    /// Decodes the verbs encoding; `None` for anything else (0 means "no MTU" in port
    /// attributes of a port that is down).
    pub const fn from_code(code: u32) -> Option<Mtu> {
        match code {
            1 => Some(Mtu::Mtu256),
            2 => Some(Mtu::Mtu512),
            3 => Some(Mtu::Mtu1024),
            4 => Some(Mtu::Mtu2048),
            5 => Some(Mtu::Mtu4096),
            _ => None,
        }
    }
}

impl fmt::Display for Mtu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes())
    }
}

/// The state of a queue pair, as `ibv_query_qp` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QpState {
    /// Just created, or reset.
    Reset,
    /// Initialized: receives may be posted.
    Init,
    /// Ready to receive: connected to the remote queue pair.
    ReadyToReceive,
    /// Ready to send: fully connected.
    ReadyToSend,
    /// Send queue drained.
    SendQueueDrain,
    /// Send queue error.
    SendQueueError,
    /// Error: every outstanding and later work request completes flushed.
    Error,
    /// A value this crate does not know.
    Unknown(u32),
}

impl QpState {
    /// Decodes `enum ibv_qp_state`.
    pub const fn from_code(code: u32) -> QpState {
        match code {
            0 => QpState::Reset,
            1 => QpState::Init,
            2 => QpState::ReadyToReceive,
            3 => QpState::ReadyToSend,
            4 => QpState::SendQueueDrain,
            5 => QpState::SendQueueError,
            6 => QpState::Error,
            other => QpState::Unknown(other),
        }
    }
}

impl fmt::Display for QpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QpState::Reset => f.write_str("RESET"),
            QpState::Init => f.write_str("INIT"),
            QpState::ReadyToReceive => f.write_str("RTR"),
            QpState::ReadyToSend => f.write_str("RTS"),
            QpState::SendQueueDrain => f.write_str("SQD"),
            QpState::SendQueueError => f.write_str("SQE"),
            QpState::Error => f.write_str("ERROR"),
            QpState::Unknown(code) => write!(f, "unknown state {code}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtu_codes_round_trip_and_order() {
        for code in 1..=5 {
            let mtu = Mtu::from_code(code).unwrap();
            assert_eq!(u32::from(mtu.code()), code);
            assert_eq!(mtu.bytes(), 128 << code);
        }
        assert_eq!(Mtu::from_code(0), None);
        assert_eq!(Mtu::from_code(6), None);
        assert_eq!(Mtu::Mtu1024.min(Mtu::Mtu4096), Mtu::Mtu1024);
    }

    #[test]
    fn qp_state_decodes_without_panicking() {
        assert_eq!(QpState::from_code(3), QpState::ReadyToSend);
        assert_eq!(QpState::from_code(6), QpState::Error);
        assert_eq!(QpState::from_code(99), QpState::Unknown(99));
        assert_eq!(QpState::Error.to_string(), "ERROR");
    }
}
