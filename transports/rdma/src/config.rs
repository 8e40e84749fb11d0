//! The `[rdma]` configuration section: owned here, registered with the core's configuration
//! by [`register`] (which [`crate::register`] calls, with or without the `rdma` feature, so
//! every build reads and prints the same keys).
//!
//! ```toml
//! [rdma]
//! device = ""                 # empty = first device with an active port
//! port = 1
//! gid_index = -1              # -1 = first RoCE v2 GID of the peer address's family
//! inline_threshold = 128
//! busy_poll = false
//! spin_us = 0
//! credits = 32
//! queue_pairs = 2
//! register_threshold = "256K"
//! client_exposure = "request" # or "arena"
//! ```
//!
//! `zcio config` prints each key with its doc (the `doc` of its entry in `KEYS`).
//! Adding a key: a field of [`RdmaConfig`], its default in [`Default`], and one entry in
//! `KEYS` (name, doc, how to print it, how to check and store it).

use std::time::Duration;

use zcio::config::section::{value, Key, Section, Value};
use zcio::Config;

/// RDMA transport settings: `[rdma]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RdmaConfig {
    /// Device name; `None` picks the first device with an active port.
    pub device: Option<String>,
    /// Port number.
    pub port: u8,
    /// GID index; `None` picks the first RoCE v2 GID of the peer's address family.
    pub gid_index: Option<u32>,
    /// Inline payload threshold in bytes.
    pub inline_threshold: usize,
    /// Busy-poll completions instead of sleeping on the completion channel.
    pub busy_poll: bool,
    /// How long a thread about to block on its own completion first polls the completion
    /// queue itself (zero: not at all).
    pub spin: Duration,
    /// Receive buffers posted per connection (initial credits), shared out among its queue
    /// pairs.
    pub credits: usize,
    /// Queue pairs per connection (1 ..= 8): requests are spread over them.
    pub queue_pairs: usize,
    /// Caller iovec segments at least this long are registered on the fly; shorter ones
    /// are bounced through pool buffers.
    pub register_threshold: usize,
    /// How much of a client's memory the server can reach over RDMA.
    pub client_exposure: ClientExposure,
}

/// How much of a client's memory a server can reach (`rdma.client_exposure`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ClientExposure {
    /// `"request"`: only the buffers of a request in flight, in the direction it needs
    /// (reads: the server may write them; writes: it may read them), through type 2 memory
    /// windows bound per request and invalidated before the request completes. Needs a
    /// device with type 2 memory windows.
    #[default]
    Request,
    /// `"arena"`: every buffer of the client's pool, read and write, for the pool's life
    /// (its arenas are registered with remote access and their rkeys sent with requests).
    Arena,
}

impl ClientExposure {
    /// The configuration value.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientExposure::Request => "request",
            ClientExposure::Arena => "arena",
        }
    }
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            device: None,
            port: 1,
            gid_index: None,
            inline_threshold: 128,
            busy_poll: false,
            spin: Duration::ZERO,
            credits: 32,
            queue_pairs: 2,
            register_threshold: 256 << 10,
            client_exposure: ClientExposure::Request,
        }
    }
}

/// An integer key's value as TOML.
fn int(n: impl TryInto<i64>) -> Value {
    Value::Integer(n.try_into().unwrap_or(i64::MAX))
}

impl Section for RdmaConfig {
    const NAME: &'static str = "rdma";
    const KEYS: &'static [Key<Self>] = &[
        Key {
            name: "device",
            doc: "device name, e.g. \"rxe0\"; empty = the first device with an active port",
            get: |c| Value::String(c.device.clone().unwrap_or_default()),
            set: |c, v| {
                c.device = Some(value::string(v)?).filter(|d| !d.is_empty());
                Ok(())
            },
        },
        Key {
            name: "port",
            doc: "port number on that device (1 ..= 255)",
            get: |c| int(c.port),
            set: |c, v| {
                c.port = value::int(v, 1, 255)? as u8;
                Ok(())
            },
        },
        Key {
            name: "gid_index",
            doc: "GID index (0 ..= 65535); -1 = the first RoCE v2 GID of the peer address's \
                  family",
            get: |c| c.gid_index.map_or(int(-1), int),
            set: |c, v| {
                let n = value::int(v, -1, 65535)?;
                c.gid_index = (n >= 0).then_some(n as u32);
                Ok(())
            },
        },
        Key {
            name: "inline_threshold",
            doc: "payload up to this many bytes (0 ..= 4096) travels in the message, not by \
                  RDMA READ or WRITE: a work request (and for writes a round trip) less, a \
                  copy more on each side, and bigger receive buffers. At 4096, 4 KiB random \
                  writes at iodepth 8 in the rxe guest went 7.3 -> 8.6 MiB/s, but reads 8.6 \
                  -> 7.4 (medians of 4, one boot)",
            get: |c| int(c.inline_threshold),
            set: |c, v| {
                c.inline_threshold = value::size(v, 4096)?;
                Ok(())
            },
        },
        Key {
            name: "busy_poll",
            doc: "spin on the completion queue instead of sleeping",
            get: |c| Value::Boolean(c.busy_poll),
            set: |c, v| {
                c.busy_poll = value::bool(v)?;
                Ok(())
            },
        },
        Key {
            name: "spin_us",
            doc: "a thread about to block on its own request (a client waiting for a reply, \
                  the server waiting for the next request) first polls the completion queue \
                  for up to this long before it sleeps on the completion channel (it takes \
                  its completion itself either way: no thread hand-off; 0 = no polling; up \
                  to 1000000)",
            get: |c| int(c.spin.as_micros()),
            set: |c, v| {
                c.spin = Duration::from_micros(value::int(v, 0, 1_000_000)? as u64);
                Ok(())
            },
        },
        Key {
            name: "credits",
            doc: "receive buffers posted per connection (flow control; 2 ..= 4096), shared \
                  out among its queue pairs; each RDMA connection pins its own ring of these \
                  (about 1 MiB per server connection with the defaults), on top of the pool: \
                  size memlock for server.max_connections",
            get: |c| int(c.credits),
            set: |c, v| {
                c.credits = value::int(v, 2, 4096)? as usize;
                Ok(())
            },
        },
        Key {
            name: "queue_pairs",
            doc: "queue pairs per connection (1 ..= 8), each with its own completion queue \
                  and thread; requests go to the least busy one. The connection offers this \
                  many, the server grants up to its own setting. Soft-RoCE serializes a \
                  queue pair's protocol work, so one is bounded by one core",
            get: |c| int(c.queue_pairs),
            set: |c, v| {
                c.queue_pairs = value::int(v, 1, 8)? as usize;
                Ok(())
            },
        },
        Key {
            name: "register_threshold",
            doc: "caller iovecs at least this big (a size: 4096, \"256K\", \"1M\") are \
                  registered on the fly; smaller ones are bounced through the pool",
            get: |c| int(c.register_threshold),
            set: |c, v| {
                c.register_threshold = value::size(v, 1 << 40)?;
                Ok(())
            },
        },
        Key {
            name: "client_exposure",
            doc: "what of a client's memory the server can reach over RDMA: \"request\" = \
                  only the buffers of a request in flight, in the direction it needs, through \
                  a memory window bound per request and invalidated before the request \
                  completes (needs type 2 memory windows: a device without them is refused at \
                  connect); \"arena\" = every buffer of the client's pool, read and write, \
                  for the pool's life (trusts the server; cheaper: in the rxe guest \
                  \"request\" gave 66-106% of \"arena\"'s bandwidth for 64/128 KiB at \
                  iodepth 1 and 8, docs/RXE.md)",
            get: |c| Value::String(c.client_exposure.as_str().to_owned()),
            set: |c, v| {
                c.client_exposure = match value::string(v)?.as_str() {
                    "request" => ClientExposure::Request,
                    "arena" => ClientExposure::Arena,
                    other => {
                        return Err(format!("must be \"request\" or \"arena\", not {other:?}"))
                    }
                };
                Ok(())
            },
        },
    ];
}

impl RdmaConfig {
    /// The `[rdma]` section of `cfg`.
    pub fn of(cfg: &Config) -> &RdmaConfig {
        cfg.section::<RdmaConfig>()
    }

    /// The `[rdma]` section of `cfg`, to change it.
    pub fn of_mut(cfg: &mut Config) -> &mut RdmaConfig {
        cfg.section_mut::<RdmaConfig>()
    }
}

/// Registers `[rdma]` with the configuration of this process (idempotent).
pub fn register() {
    zcio::config::section::register::<RdmaConfig>();
}

#[cfg(test)]
mod tests;
