//! RDMA device discovery, for `zcio devices` and for choosing a device and GID.
//!
//! [`list_devices`] always compiles: without the cargo feature `rdma` it returns
//! [`RdmaError::NotBuilt`], so the CLI can call it unconditionally. With the feature it lists
//! every device with its ports and GIDs, or says why there are none: libibverbs missing
//! ([`RdmaError::LibraryMissing`]), a kernel without RDMA ([`RdmaError::NoKernelSupport`]),
//! or simply no device ([`RdmaError::NoDevice`]).
#![forbid(unsafe_code)]

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::error::RdmaError;
use crate::verbs::types::Mtu;

/// One RDMA device and its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device name, e.g. `mlx5_0` or `rxe0`.
    pub name: String,
    /// Its ports, in port-number order.
    pub ports: Vec<PortInfo>,
}

/// One port of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Port number, 1-based.
    pub port: u8,
    /// Logical port state; only [`PortState::Active`] ports carry traffic.
    pub state: PortState,
    /// Active MTU; `None` if the port reports none (e.g. it is down).
    pub active_mtu: Option<Mtu>,
    /// InfiniBand or Ethernet (RoCE).
    pub link_layer: LinkLayer,
    /// Local identifier (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The non-empty entries of the port's GID table, by index.
    pub gids: Vec<GidInfo>,
}

/// Logical state of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortState {
    /// Link down.
    Down,
    /// Link up, not configured by a subnet manager yet.
    Init,
    /// Configured, not active yet.
    Armed,
    /// Carries traffic.
    Active,
    /// Active, link temporarily lost.
    ActiveDefer,
    /// A value this crate does not know (including 0, "no state change").
    Unknown(u32),
}

impl PortState {
    /// Decodes `enum ibv_port_state`.
    pub const fn from_code(code: u32) -> PortState {
        match code {
            1 => PortState::Down,
            2 => PortState::Init,
            3 => PortState::Armed,
            4 => PortState::Active,
            5 => PortState::ActiveDefer,
            other => PortState::Unknown(other),
        }
    }
}

impl fmt::Display for PortState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortState::Down => f.write_str("DOWN"),
            PortState::Init => f.write_str("INIT"),
            PortState::Armed => f.write_str("ARMED"),
            PortState::Active => f.write_str("ACTIVE"),
            PortState::ActiveDefer => f.write_str("ACTIVE_DEFER"),
            PortState::Unknown(code) => write!(f, "unknown state {code}"),
        }
    }
}

/// Link layer of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkLayer {
    /// InfiniBand.
    InfiniBand,
    /// Ethernet: RoCE (including Soft-RoCE, rxe).
    Ethernet,
    /// Not reported by the driver (older drivers; means InfiniBand).
    Unspecified,
    /// A value this crate does not know.
    Unknown(u8),
}

impl LinkLayer {
    /// Decodes `IBV_LINK_LAYER_*`.
    pub const fn from_code(code: u8) -> LinkLayer {
        match code {
            0 => LinkLayer::Unspecified,
            1 => LinkLayer::InfiniBand,
            2 => LinkLayer::Ethernet,
            other => LinkLayer::Unknown(other),
        }
    }
}

impl fmt::Display for LinkLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkLayer::InfiniBand => f.write_str("InfiniBand"),
            LinkLayer::Ethernet => f.write_str("Ethernet"),
            LinkLayer::Unspecified => f.write_str("unspecified"),
            LinkLayer::Unknown(code) => write!(f, "unknown link layer {code}"),
        }
    }
}

/// Type of a GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GidType {
    /// InfiniBand GID.
    InfiniBand,
    /// RoCE v1 (Ethernet frames, not routable).
    RoceV1,
    /// RoCE v2 (UDP/IP, routable; what Soft-RoCE uses for IPv4 addresses).
    RoceV2,
    /// A value this crate does not know.
    Unknown(u32),
}

impl fmt::Display for GidType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GidType::InfiniBand => f.write_str("IB"),
            GidType::RoceV1 => f.write_str("RoCE v1"),
            GidType::RoceV2 => f.write_str("RoCE v2"),
            GidType::Unknown(code) => write!(f, "unknown GID type {code}"),
        }
    }
}

/// One entry of a port's GID table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidInfo {
    /// Index in the table (what a queue pair's `sgid_index` names).
    pub index: u32,
    /// The GID. IPv4 addresses of RoCE devices appear IPv4-mapped (`::ffff:a.b.c.d`).
    pub gid: Ipv6Addr,
    /// IB, RoCE v1 or RoCE v2.
    pub gid_type: GidType,
    /// The network interface the GID belongs to (RoCE), if known.
    pub netdev: Option<String>,
}

impl GidInfo {
    /// The IPv4 address, if the GID is IPv4-mapped.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.gid.to_ipv4_mapped()
    }
}

impl fmt::Display for GidInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GID[{}] {} {}", self.index, self.gid, self.gid_type)?;
        if let Some(netdev) = &self.netdev {
            write!(f, " ({netdev})")?;
        }
        Ok(())
    }
}

impl PortInfo {
    /// The GID at `index`, if that entry is populated.
    pub fn gid(&self, index: u32) -> Option<&GidInfo> {
        self.gids.iter().find(|g| g.index == index)
    }

    /// The GID a queue pair uses when none is configured: on Ethernet (RoCE) the first
    /// RoCE v2 IPv4-mapped GID (index 1, `::ffff:127.0.0.1`, for Soft-RoCE on `lo`), else the
    /// first RoCE v2 GID, else the first RoCE v1 GID; on InfiniBand index 0. Falls back to the
    /// first populated entry; `None` only if the table is empty.
    pub fn default_gid(&self) -> Option<&GidInfo> {
        let rank = |g: &GidInfo| -> u8 {
            match (self.link_layer, g.gid_type, g.ipv4().is_some()) {
                (LinkLayer::Ethernet, GidType::RoceV2, true) => 0,
                (LinkLayer::Ethernet, GidType::RoceV2, false) => 1,
                (LinkLayer::Ethernet, GidType::RoceV1, _) => 2,
                (LinkLayer::Ethernet, _, _) => 3,
                (_, _, _) if g.index == 0 => 0,
                _ => 3,
            }
        };
        self.gids.iter().min_by_key(|g| (rank(g), g.index))
    }
}

impl fmt::Display for PortInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "port {}: {}, link layer {}, active MTU ",
            self.port, self.state, self.link_layer
        )?;
        match self.active_mtu {
            Some(mtu) => write!(f, "{mtu}")?,
            None => f.write_str("none")?,
        }
        write!(f, ", LID {}", self.lid)?;
        for gid in &self.gids {
            write!(f, "\n    {gid}")?;
        }
        Ok(())
    }
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        for port in &self.ports {
            write!(f, "\n  {port}")?;
        }
        Ok(())
    }
}

/// Lists every RDMA device with its ports and GIDs.
///
/// Errors say why there is nothing to list: [`RdmaError::NotBuilt`] (no `rdma` feature),
/// [`RdmaError::LibraryMissing`], [`RdmaError::NoKernelSupport`], [`RdmaError::NoDevice`];
/// or which query failed on which device.
pub fn list_devices() -> Result<Vec<DeviceInfo>, RdmaError> {
    #[cfg(feature = "rdma")]
    {
        crate::verbs::context::list_devices()
    }
    #[cfg(not(feature = "rdma"))]
    {
        Err(RdmaError::NotBuilt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gid(index: u32, text: &str, gid_type: GidType) -> GidInfo {
        GidInfo {
            index,
            gid: text.parse().unwrap(),
            gid_type,
            netdev: Some("lo".into()),
        }
    }

    fn rxe_port() -> PortInfo {
        PortInfo {
            port: 1,
            state: PortState::Active,
            active_mtu: Some(Mtu::Mtu1024),
            link_layer: LinkLayer::Ethernet,
            lid: 0,
            gids: vec![
                gid(0, "fe80::1", GidType::RoceV2),
                gid(1, "::ffff:127.0.0.1", GidType::RoceV2),
                gid(2, "::1", GidType::RoceV2),
            ],
        }
    }

    #[test]
    fn default_gid_prefers_roce_v2_ipv4_mapped() {
        let port = rxe_port();
        let chosen = port.default_gid().unwrap();
        assert_eq!(chosen.index, 1);
        assert_eq!(chosen.ipv4(), Some(Ipv4Addr::LOCALHOST));

        let mut v1_only = rxe_port();
        for g in &mut v1_only.gids {
            g.gid_type = GidType::RoceV1;
        }
        assert_eq!(v1_only.default_gid().unwrap().index, 0);

        let ib = PortInfo {
            link_layer: LinkLayer::InfiniBand,
            gids: vec![
                gid(3, "fe80::3", GidType::InfiniBand),
                gid(0, "fe80::9", GidType::InfiniBand),
            ],
            ..rxe_port()
        };
        assert_eq!(ib.default_gid().unwrap().index, 0);

        let empty = PortInfo {
            gids: Vec::new(),
            ..rxe_port()
        };
        assert!(empty.default_gid().is_none());
    }

    #[test]
    fn display_shows_gids_as_addresses() {
        let dev = DeviceInfo {
            name: "rxe0".into(),
            ports: vec![rxe_port()],
        };
        let text = dev.to_string();
        assert!(text.starts_with("rxe0\n  port 1: ACTIVE, link layer Ethernet, active MTU 1024"));
        assert!(
            text.contains("GID[1] ::ffff:127.0.0.1 RoCE v2 (lo)"),
            "{text}"
        );
    }

    #[test]
    fn unknown_codes_do_not_panic() {
        assert_eq!(PortState::from_code(77), PortState::Unknown(77));
        assert_eq!(LinkLayer::from_code(9), LinkLayer::Unknown(9));
        assert_eq!(PortState::from_code(4), PortState::Active);
        assert_eq!(LinkLayer::from_code(2), LinkLayer::Ethernet);
    }

    #[cfg(not(feature = "rdma"))]
    #[test]
    fn without_the_feature_listing_says_so() {
        let err = list_devices().unwrap_err();
        assert_eq!(
            err.to_string(),
            "zcio was built without RDMA support (cargo feature `rdma`)"
        );
    }
}
