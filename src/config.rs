//! Configuration: a TOML file, overridden by command-line flags.
//!
//! Every key, with its default:
//!
//! ```toml
//! transport = "tcp"              # "tcp" or "rdma": which transport carries requests; or a
//!                                # list such as ["rdma", "tcp"]: a client tries them in
//!                                # order (falling back, with a warning, when one is not
//!                                # available here or not offered by the server; never after
//!                                # data moved), a server listens on every one (the first on
//!                                # server.listen, the k-th on its port + k).
//!                                # `transports` is a synonym
//!
//! [server]
//! listen = "127.0.0.1:7700"      # address to listen on (loopback unless told otherwise)
//! export = "/srv/zcio"           # the directory served; nothing outside it is reachable
//! read_only = false              # refuse writes, truncates, unlinks and creates
//! token = ""                     # shared secret; empty = no authentication
//! workers = 4                    # threads doing file I/O, shared by all connections
//! max_connections = 256          # connections beyond this are refused
//! max_connections_per_addr = 128 # connections open from one IP address, every transport
//!                                # together; more are refused like those over
//!                                # max_connections (at least 1; set it to
//!                                # max_connections to have no per-address cap)
//! max_in_flight = 64             # requests in flight per connection (back-pressure)
//! max_open_files = 1024          # open file handles per connection
//! idle_timeout_ms = 300000       # close connections idle this long (0 = never)
//! direct_io = false              # force O_DIRECT on every open
//! token_file = ""                # read the token from this file (first line) instead;
//!                                # the environment variable ZCIO_TOKEN also works (CLI)
//! auth_timeout_ms = 10000        # a connection must finish hello (and, with a token,
//!                                # authentication) this long after it is accepted
//! max_handshakes_per_addr = 32   # transport handshakes in progress from one IP address
//! max_payload_in_flight = "16M"  # request payload bytes one connection may hold in the
//!                                # pool at once; more waits (back-pressure)
//! max_open_files_total = 16384   # open file handles, all connections together
//! umask = 0o022                  # cleared from the mode of every file and directory
//!                                # created (modes are masked to 0o777 first)
//! drain_timeout_ms = 10000       # SIGTERM/SIGINT: how long requests already received may
//!                                # take to finish before connections close anyway
//!
//! [client]
//! connect = "127.0.0.1:7700"     # server address; or one per transport, as zcio serve
//!                                # prints them: "tcp=127.0.0.1:7700 rdma=127.0.0.1:7701"
//! token = ""                     # must match the server's; with a token the client
//!                                # also makes the server prove it knows it
//! token_file = ""                # read the token from this file (first line) instead
//! timeout_ms = 30000             # a request (or connect) taking longer fails the connection
//! keepalive_ms = 60000           # an idle connection pings this often (keep it below the
//!                                # server's idle_timeout_ms; 0 = never); a dead server is
//!                                # noticed within keepalive_ms + timeout_ms
//! reconnect = true               # reconnect when the connection dies, reopen files, retry
//!                                # what is safe to retry
//! reconnect_max_delay_ms = 1000  # backoff between attempts doubles from 10 ms up to this
//! reconnect_give_up_ms = 60000   # stop trying (and fail requests) after this long
//!
//! [limits]
//! max_segments = 256             # payload segments per request
//! max_payload = "1M"             # payload bytes per request
//! max_in_flight = 64             # requests in flight per connection, client side
//!
//! [pool]
//! wait_timeout_ms = 5000         # how long a get waits for a free buffer
//! stripes = 0                    # free-list stripes per class; 0 = one per CPU
//! [[pool.class]]                 # size classes (default: 4K x1024 (64 reserved),
//! size = "4K"                    #   64K x256, 128K x256, 1M x64)
//! count = 1024                   # slots: the bound on this class's memory
//! reserve = 64                   # slots kept for control messages
//! arena_slots = 0                # slots per arena (0 = about 4 MiB arenas)
//!
//! # sections owned by the transports, for example (see zcio_tcp::config, zcio_rdma::config,
//! and `zcio config`, which prints every key of every section with its doc):
//! [tcp]
//! nodelay = true
//! [rdma]
//! device = ""
//! ```
//!
//! An unknown key or a bad value is an error that names the key and the value.
//!
//! The core parses the sections above; every other section belongs to the crate that uses
//! it and is registered with [`section::register`] (see [`section`]): the transports own
//! `[tcp]` and `[rdma]`, their keys, bounds and docs, and [`Config::section`] hands them out
//! typed. The core knows none of their keys.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::limits::{Limits, MAX_HEADER};
use crate::pool::{ClassConfig, PoolConfig};

pub mod section;

pub use section::Sections;
pub use section::{Key, Section};

/// The sections the core parses itself (no registered section may take these names).
pub(crate) const CORE_SECTIONS: &[&str] = &["server", "client", "limits", "pool"];

/// Server settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: String,
    /// The exported directory.
    pub export: PathBuf,
    /// Refuse every modifying operation.
    pub read_only: bool,
    /// Shared secret; empty means none.
    pub token: String,
    /// File I/O worker threads.
    pub workers: usize,
    /// Most connections at once.
    pub max_connections: usize,
    /// Most connections at once from one IP address (all transports together).
    pub max_connections_per_addr: usize,
    /// Most requests in flight per connection.
    pub max_in_flight: usize,
    /// Most open file handles per connection.
    pub max_open_files: usize,
    /// Idle connections are closed after this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Open every file with O_DIRECT.
    pub direct_io: bool,
    /// Longest time from accepting a connection to the end of its hello (and, with a
    /// token, its authentication); `None`: no limit.
    pub auth_timeout: Option<Duration>,
    /// Most transport handshakes in progress from one IP address at once.
    pub max_handshakes_per_addr: usize,
    /// Most request payload bytes one connection holds in the pool at once.
    pub max_payload_in_flight: usize,
    /// Most open file handles, all connections together.
    pub max_open_files_total: usize,
    /// Bits cleared from the mode of every created file and directory.
    pub umask: u32,
    /// Graceful shutdown: how long requests already received may take.
    pub drain_timeout: Duration,
}

/// Client settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientConfig {
    /// Server address.
    pub connect: String,
    /// Shared secret.
    pub token: String,
    /// Request and connect timeout.
    pub timeout: Duration,
    /// An idle connection sends a ping this often (`None`: never).
    pub keepalive: Option<Duration>,
    /// Reconnect automatically when the connection dies.
    pub reconnect: bool,
    /// Longest wait between two reconnect attempts.
    pub reconnect_max_delay: Duration,
    /// Reconnecting gives up after this long.
    pub reconnect_give_up: Duration,
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Transport name (the first of the list).
    pub transport: String,
    /// The transports after `transport` in a list such as `["rdma", "tcp"]`: a client falls
    /// back to them in order, a server listens on them as well. Usually empty.
    pub more_transports: Vec<String>,
    /// Server settings.
    pub server: ServerConfig,
    /// Client settings.
    pub client: ClientConfig,
    /// Per-request limits.
    pub limits: Limits,
    /// The buffer pool.
    pub pool: PoolConfig,
    /// The registered sections (the transports' `[tcp]`, `[rdma]`, ...): see
    /// [`Config::section`].
    pub sections: Sections,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            transport: "tcp".into(),
            more_transports: Vec::new(),
            server: ServerConfig {
                listen: "127.0.0.1:7700".into(),
                export: PathBuf::from("/srv/zcio"),
                read_only: false,
                token: String::new(),
                workers: 4,
                max_connections: 256,
                max_connections_per_addr: 128,
                max_in_flight: 64,
                max_open_files: 1024,
                idle_timeout: Some(Duration::from_secs(300)),
                direct_io: false,
                auth_timeout: Some(Duration::from_secs(10)),
                max_handshakes_per_addr: 32,
                max_payload_in_flight: 16 << 20,
                max_open_files_total: 16384,
                umask: 0o022,
                drain_timeout: Duration::from_secs(10),
            },
            client: ClientConfig {
                connect: "127.0.0.1:7700".into(),
                token: String::new(),
                timeout: Duration::from_secs(30),
                keepalive: Some(Duration::from_secs(60)),
                reconnect: true,
                reconnect_max_delay: Duration::from_secs(1),
                reconnect_give_up: Duration::from_secs(60),
            },
            limits: Limits {
                max_segments: 256,
                max_payload: 1 << 20,
                max_header: MAX_HEADER,
                max_in_flight: 64,
                inline_threshold: 0,
                rdma_payload: false,
            },
            pool: PoolConfig::default(),
            sections: Sections::defaults(),
        }
    }
}

/// `transport`: one name or a list of names.
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum RawTransports {
    One(String),
    List(Vec<String>),
}

/// A size: an integer of bytes or a string such as `"64K"`, `"1M"`, `"2GiB"`.
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum Size {
    Bytes(i64),
    Text(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    transport: Option<RawTransports>,
    transports: Option<RawTransports>,
    server: Option<RawServer>,
    client: Option<RawClient>,
    limits: Option<RawLimits>,
    pool: Option<RawPool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    export: Option<String>,
    read_only: Option<bool>,
    token: Option<String>,
    workers: Option<i64>,
    max_connections: Option<i64>,
    max_connections_per_addr: Option<i64>,
    max_in_flight: Option<i64>,
    max_open_files: Option<i64>,
    idle_timeout_ms: Option<i64>,
    direct_io: Option<bool>,
    token_file: Option<String>,
    auth_timeout_ms: Option<i64>,
    max_handshakes_per_addr: Option<i64>,
    max_payload_in_flight: Option<Size>,
    max_open_files_total: Option<i64>,
    umask: Option<i64>,
    drain_timeout_ms: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawClient {
    connect: Option<String>,
    token: Option<String>,
    timeout_ms: Option<i64>,
    token_file: Option<String>,
    keepalive_ms: Option<i64>,
    reconnect: Option<bool>,
    reconnect_max_delay_ms: Option<i64>,
    reconnect_give_up_ms: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_segments: Option<i64>,
    max_payload: Option<Size>,
    max_in_flight: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPool {
    wait_timeout_ms: Option<i64>,
    stripes: Option<i64>,
    class: Option<Vec<RawClass>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    size: Size,
    count: i64,
    reserve: Option<i64>,
    arena_slots: Option<i64>,
}

/// Parses a size such as `4096`, `"4K"`, `"64KiB"`, `"1M"`, `"1 GiB"`.
pub fn parse_size(key: &str, s: &str) -> Result<usize> {
    parse_size_value(s).map_err(|why| Error::config(key, s, why))
}

/// [`parse_size`] without the key: why it is refused.
fn parse_size_value(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = |why: &str| why.to_string();
    let n: u64 = num
        .parse()
        .map_err(|_| bad("expected a size like 4096, 64K, 1M or 1GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(bad("unknown unit (use B, K, M or G)")),
    };
    let v = n
        .checked_mul(mult)
        .filter(|&v| v <= (1u64 << 40))
        .ok_or_else(|| bad("too large"))?;
    usize::try_from(v).map_err(|_| bad("too large"))
}

fn size(key: &str, v: &Size) -> Result<usize> {
    match v {
        Size::Bytes(n) if *n >= 0 => Ok(*n as usize),
        Size::Bytes(n) => Err(Error::config(key, n, "must not be negative")),
        Size::Text(s) => parse_size(key, s),
    }
}

fn int(key: &str, v: i64, min: i64, max: i64) -> Result<usize> {
    if v < min || v > max {
        return Err(Error::config(key, v, format!("must be {min} ..= {max}")));
    }
    Ok(v as usize)
}

fn addr(key: &str, v: &str) -> Result<String> {
    // Checked by form only: parsing a config never touches the network (names are
    // resolved when connecting or binding).
    let ok = v.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty()
            && p.parse::<u16>().is_ok()
            && h.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']')
            })
    });
    if !ok {
        return Err(Error::config(key, v, "expected HOST:PORT"));
    }
    Ok(v.to_string())
}

/// A token from a file: its first line, without the line end; empty is an error.
fn read_token_file(key: &str, path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("{key}: reading {}", path.display()), e))?;
    let token = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if token.is_empty() {
        return Err(Error::config(
            key,
            path.display(),
            "the file's first line (the token) is empty",
        ));
    }
    Ok(token.to_string())
}

/// `client.connect`: one `HOST:PORT`, or one per transport as `zcio serve` prints them
/// for several (`tcp=HOST:PORT rdma=HOST:PORT`).
fn connect_addrs(v: &str) -> Result<String> {
    if !v.contains('=') {
        return addr("client.connect", v);
    }
    for part in v.split_whitespace() {
        let (name, a) = part.split_once('=').ok_or_else(|| {
            Error::config(
                "client.connect",
                v,
                "expected HOST:PORT or NAME=HOST:PORT ...",
            )
        })?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(Error::config("client.connect", v, "bad transport name"));
        }
        addr("client.connect", a)?;
    }
    Ok(v.to_string())
}

impl ClientConfig {
    /// The address to reach the server at over transport `name`: its own entry when
    /// `connect` names one per transport (`tcp=HOST:PORT rdma=HOST:PORT`), else `connect`;
    /// `None` when `connect` names addresses per transport but not for this one.
    pub fn connect_for(&self, name: &str) -> Option<&str> {
        if !self.connect.contains('=') {
            return Some(&self.connect);
        }
        self.connect
            .split_whitespace()
            .filter_map(|p| p.split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, a)| a)
    }
}

fn ms(v: i64) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(v as u64))
}

impl Config {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Config> {
        Config::from_file_with(path, &[])
    }

    /// Reads a TOML file, then applies `key=value` overrides (as from `--set`).
    pub fn from_file_with(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse_with(&text, &path.display().to_string(), overrides)
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Config> {
        Config::parse_with(text, "<string>", &[])
    }

    /// Parses TOML text and applies `key=value` overrides (dotted keys, TOML values; a
    /// value that is not valid TOML is taken as a string).
    pub fn parse_with(text: &str, origin: &str, overrides: &[String]) -> Result<Config> {
        let mut doc: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| Error::ParseConfig {
                    path: origin.into(),
                    message: e.to_string(),
                })?;
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        // The registered sections are taken out and applied after the core's own keys.
        let mut sections = Sections::defaults();
        let mut given = Vec::new();
        for name in doc.keys().cloned().collect::<Vec<_>>() {
            if sections.knows(&name) {
                given.push((name.clone(), doc.remove(&name).expect("listed")));
            } else if !CORE_SECTIONS.contains(&name.as_str())
                && !matches!(name.as_str(), "transport" | "transports")
            {
                let mut known: Vec<&str> = CORE_SECTIONS.to_vec();
                known.extend(section::registered_names());
                return Err(Error::ParseConfig {
                    path: origin.into(),
                    message: format!(
                        "unknown section or key `{name}` (known sections: {}; a transport's \
                         section is known once the program registered that transport)",
                        known.join(", ")
                    ),
                });
            }
        }
        let raw: RawConfig = RawConfig::deserialize(doc).map_err(|e| Error::ParseConfig {
            path: origin.into(),
            message: e.to_string(),
        })?;
        let mut c = Config::from_raw(raw)?;
        for (name, table) in &given {
            sections.apply(name, table)?;
        }
        c.sections = sections;
        Ok(c)
    }

    /// The registered section `S` (for example the RDMA transport's `[rdma]`): as parsed, or
    /// its defaults.
    pub fn section<S: Section>(&self) -> &S {
        self.sections.get::<S>()
    }

    /// The registered section `S`, to change it.
    pub fn section_mut<S: Section>(&mut self) -> &mut S {
        self.sections.get_mut::<S>()
    }

    fn from_raw(raw: RawConfig) -> Result<Config> {
        let mut c = Config::default();
        let t = match (raw.transport, raw.transports) {
            (Some(_), Some(_)) => {
                return Err(Error::config(
                    "transports",
                    "",
                    "give either transport or transports, not both",
                ))
            }
            (t, None) | (None, t) => t,
        };
        if let Some(t) = t {
            let names = match t {
                RawTransports::One(n) => vec![n],
                RawTransports::List(l) => l,
            };
            if names.is_empty() || names.len() > 8 {
                return Err(Error::config(
                    "transport",
                    format!("{names:?}"),
                    "expected 1 to 8 names",
                ));
            }
            for (i, t) in names.iter().enumerate() {
                if t.is_empty() || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                    return Err(Error::config(
                        "transport",
                        t,
                        "expected a name like tcp or rdma",
                    ));
                }
                if names[..i].contains(t) {
                    return Err(Error::config("transport", t, "named twice in the list"));
                }
            }
            c.transport = names[0].clone();
            c.more_transports = names[1..].to_vec();
        }
        if let Some(s) = raw.server {
            if let Some(v) = s.listen {
                c.server.listen = addr("server.listen", &v)?;
            }
            if let Some(v) = s.export {
                if v.is_empty() {
                    return Err(Error::config("server.export", v, "must not be empty"));
                }
                c.server.export = PathBuf::from(v);
            }
            if let Some(v) = s.read_only {
                c.server.read_only = v;
            }
            if let Some(v) = s.token {
                c.server.token = v;
            }
            if let Some(v) = s.workers {
                c.server.workers = int("server.workers", v, 1, 1024)?;
            }
            if let Some(v) = s.max_connections {
                c.server.max_connections = int("server.max_connections", v, 1, 1 << 20)?;
            }
            if let Some(v) = s.max_connections_per_addr {
                c.server.max_connections_per_addr =
                    int("server.max_connections_per_addr", v, 1, 1 << 20)?;
            }
            if let Some(v) = s.max_in_flight {
                c.server.max_in_flight = int("server.max_in_flight", v, 1, 65536)?;
            }
            if let Some(v) = s.max_open_files {
                c.server.max_open_files = int("server.max_open_files", v, 1, 1 << 20)?;
            }
            if let Some(v) = s.idle_timeout_ms {
                int("server.idle_timeout_ms", v, 0, i64::MAX)?;
                c.server.idle_timeout = ms(v);
            }
            if let Some(v) = s.direct_io {
                c.server.direct_io = v;
            }
            if let Some(v) = s.token_file.filter(|v| !v.is_empty()) {
                c.server.token = read_token_file("server.token_file", Path::new(&v))?;
            }
            if let Some(v) = s.auth_timeout_ms {
                int("server.auth_timeout_ms", v, 0, i64::MAX)?;
                c.server.auth_timeout = ms(v);
            }
            if let Some(v) = s.max_handshakes_per_addr {
                c.server.max_handshakes_per_addr =
                    int("server.max_handshakes_per_addr", v, 1, 1 << 20)?;
            }
            if let Some(v) = &s.max_payload_in_flight {
                let n = size("server.max_payload_in_flight", v)?;
                if n < 4096 {
                    return Err(Error::config(
                        "server.max_payload_in_flight",
                        n,
                        "must be at least 4K",
                    ));
                }
                c.server.max_payload_in_flight = n;
            }
            if let Some(v) = s.max_open_files_total {
                c.server.max_open_files_total = int("server.max_open_files_total", v, 1, 1 << 24)?;
            }
            if let Some(v) = s.umask {
                c.server.umask = int("server.umask", v, 0, 0o777)? as u32;
            }
            if let Some(v) = s.drain_timeout_ms {
                int("server.drain_timeout_ms", v, 0, 86_400_000)?;
                c.server.drain_timeout = Duration::from_millis(v as u64);
            }
        }
        if let Some(s) = raw.client {
            if let Some(v) = s.connect {
                c.client.connect = connect_addrs(&v)?;
            }
            if let Some(v) = s.token {
                c.client.token = v;
            }
            if let Some(v) = s.timeout_ms {
                int("client.timeout_ms", v, 1, 86_400_000)?;
                c.client.timeout = Duration::from_millis(v as u64);
            }
            if let Some(v) = s.token_file.filter(|v| !v.is_empty()) {
                c.client.token = read_token_file("client.token_file", Path::new(&v))?;
            }
            if let Some(v) = s.keepalive_ms {
                int("client.keepalive_ms", v, 0, 86_400_000)?;
                c.client.keepalive = ms(v);
            }
            if let Some(v) = s.reconnect {
                c.client.reconnect = v;
            }
            if let Some(v) = s.reconnect_max_delay_ms {
                int("client.reconnect_max_delay_ms", v, 1, 3_600_000)?;
                c.client.reconnect_max_delay = Duration::from_millis(v as u64);
            }
            if let Some(v) = s.reconnect_give_up_ms {
                int("client.reconnect_give_up_ms", v, 0, 86_400_000)?;
                c.client.reconnect_give_up = Duration::from_millis(v as u64);
            }
        }
        if let Some(l) = raw.limits {
            if let Some(v) = l.max_segments {
                c.limits.max_segments = int("limits.max_segments", v, 1, 4096)?;
            }
            if let Some(v) = &l.max_payload {
                let n = size("limits.max_payload", v)?;
                if !(4096..=(64 << 20)).contains(&n) {
                    return Err(Error::config("limits.max_payload", n, "must be 4K ..= 64M"));
                }
                c.limits.max_payload = n;
            }
            if let Some(v) = l.max_in_flight {
                c.limits.max_in_flight = int("limits.max_in_flight", v, 1, 65536)?;
            }
        }
        if let Some(p) = raw.pool {
            if let Some(v) = p.wait_timeout_ms {
                int("pool.wait_timeout_ms", v, 0, 3_600_000)?;
                c.pool.wait_timeout = Duration::from_millis(v as u64);
            }
            if let Some(v) = p.stripes {
                c.pool.stripes = int("pool.stripes", v, 0, 64)?;
            }
            if let Some(classes) = p.class {
                c.pool.classes = classes
                    .iter()
                    .enumerate()
                    .map(|(i, rc)| {
                        let k = |f: &str| format!("pool.class[{i}].{f}");
                        Ok(ClassConfig {
                            size: size(&k("size"), &rc.size)?,
                            count: int(&k("count"), rc.count, 1, 1 << 24)?,
                            reserve: int(&k("reserve"), rc.reserve.unwrap_or(0), 0, 1 << 24)?,
                            arena_slots: int(
                                &k("arena_slots"),
                                rc.arena_slots.unwrap_or(0),
                                0,
                                1 << 24,
                            )?,
                        })
                    })
                    .collect::<Result<_>>()?;
            }
            c.pool.validate().map_err(|e| match e {
                Error::ConfigValue { key, value, reason } => Error::ConfigValue {
                    key: key.replace("pool.classes", "pool.class"),
                    value,
                    reason,
                },
                e => e,
            })?;
        }
        c.check_pool_fits()?;
        Ok(c)
    }

    /// The largest pool class must hold a whole request payload.
    pub fn check_pool_fits(&self) -> Result<()> {
        let largest = self.pool.classes.iter().map(|c| c.size).max().unwrap_or(0);
        if largest == 0 {
            return Err(Error::config(
                "pool.class",
                "[]",
                "at least one class is needed",
            ));
        }
        Ok(())
    }

    /// Applies one `key=value` override to an already-built configuration.
    pub fn with_override(&self, kv: &str) -> Result<Config> {
        let text = self.to_toml();
        Config::parse_with(&text, "<overrides>", &[kv.to_string()])
    }

    /// The configuration as TOML (every key), with the tokens replaced by `"<redacted>"`
    /// (an empty token stays empty): what `zcio config` prints.
    pub fn to_toml_redacted(&self) -> String {
        let mut c = self.clone();
        for t in [&mut c.server.token, &mut c.client.token] {
            if !t.is_empty() {
                *t = "<redacted>".into();
            }
        }
        c.to_toml()
    }

    /// Every transport named, in order: `transport`, then `more_transports`.
    pub fn transport_list(&self) -> Vec<&str> {
        std::iter::once(self.transport.as_str())
            .chain(self.more_transports.iter().map(String::as_str))
            .collect()
    }

    /// The configuration as TOML (every key, secrets included: see
    /// [`Config::to_toml_redacted`]).
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        let q = |v: &str| toml::Value::String(v.to_string()).to_string();
        if self.more_transports.is_empty() {
            s += &format!("transport = {}\n\n[server]\n", q(&self.transport));
        } else {
            let names: Vec<String> = self.transport_list().iter().map(|n| q(n)).collect();
            s += &format!("transport = [{}]\n\n[server]\n", names.join(", "));
        }
        s += &format!("listen = {}\n", q(&self.server.listen));
        s += &format!("export = {}\n", q(&self.server.export.to_string_lossy()));
        s += &format!("read_only = {}\n", self.server.read_only);
        s += &format!("token = {}\n", q(&self.server.token));
        s += &format!("workers = {}\n", self.server.workers);
        s += &format!("max_connections = {}\n", self.server.max_connections);
        s += &format!(
            "max_connections_per_addr = {}\n",
            self.server.max_connections_per_addr
        );
        s += &format!("max_in_flight = {}\n", self.server.max_in_flight);
        s += &format!("max_open_files = {}\n", self.server.max_open_files);
        s += &format!(
            "idle_timeout_ms = {}\n",
            self.server.idle_timeout.map_or(0, |d| d.as_millis())
        );
        s += &format!("direct_io = {}\n", self.server.direct_io);
        s += &format!(
            "auth_timeout_ms = {}\n",
            self.server.auth_timeout.map_or(0, |d| d.as_millis())
        );
        s += &format!(
            "max_handshakes_per_addr = {}\n",
            self.server.max_handshakes_per_addr
        );
        s += &format!(
            "max_payload_in_flight = {}\n",
            self.server.max_payload_in_flight
        );
        s += &format!(
            "max_open_files_total = {}\n",
            self.server.max_open_files_total
        );
        s += &format!("umask = 0o{:03o}\n", self.server.umask);
        s += &format!(
            "drain_timeout_ms = {}\n\n[client]\n",
            self.server.drain_timeout.as_millis()
        );
        s += &format!("connect = {}\n", q(&self.client.connect));
        s += &format!("token = {}\n", q(&self.client.token));
        s += &format!("timeout_ms = {}\n", self.client.timeout.as_millis());
        s += &format!(
            "keepalive_ms = {}\n",
            self.client.keepalive.map_or(0, |d| d.as_millis())
        );
        s += &format!("reconnect = {}\n", self.client.reconnect);
        s += &format!(
            "reconnect_max_delay_ms = {}\n",
            self.client.reconnect_max_delay.as_millis()
        );
        s += &format!(
            "reconnect_give_up_ms = {}\n\n[limits]\n",
            self.client.reconnect_give_up.as_millis()
        );
        s += &format!("max_segments = {}\n", self.limits.max_segments);
        s += &format!("max_payload = {}\n", self.limits.max_payload);
        s += &format!("max_in_flight = {}\n\n[pool]\n", self.limits.max_in_flight);
        s += &format!("wait_timeout_ms = {}\n", self.pool.wait_timeout.as_millis());
        s += &format!("stripes = {}\n", self.pool.stripes);
        for c in &self.pool.classes {
            s += &format!(
                "[[pool.class]]\nsize = {}\ncount = {}\nreserve = {}\narena_slots = {}\n",
                c.size, c.count, c.reserve, c.arena_slots
            );
        }
        s += &self.sections.to_toml();
        s
    }
}

fn apply_override(doc: &mut toml::Table, kv: &str) -> Result<()> {
    let (key, value) = kv
        .split_once('=')
        .ok_or_else(|| Error::config(kv, "", "an override must look like key=value"))?;
    let key = key.trim();
    let value = value.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) || parts.len() > 2 {
        return Err(Error::config(key, value, "expected `key` or `section.key`"));
    }
    let parsed: toml::Value = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let mut table = doc;
    for p in &parts[..parts.len() - 1] {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| Error::config(key, value, format!("`{p}` is not a section")))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests;
