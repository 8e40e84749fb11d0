//! The one error type of the `zcio` crate.
//!
//! Each variant is named after what failed, carries the values needed to understand the
//! failure without a debugger, and keeps the OS error (or the transport's own error) as its
//! `source`.

use std::io;
use std::time::Duration;

/// A boxed error from a layer below the core (a transport crate, a registrar).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can fail in the `zcio` crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Mapping an arena of pool memory failed.
    #[error("mapping a {bytes}-byte pool arena failed")]
    MapArena {
        /// Size of the arena that could not be mapped.
        bytes: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// No size class of the pool is large enough for the request.
    #[error("no pool size class holds {size} bytes (largest class is {largest} bytes)")]
    NoSizeClass {
        /// The size asked for.
        size: usize,
        /// The largest class the pool has.
        largest: usize,
    },

    /// The pool stayed empty for the whole wait.
    #[error(
        "pool class {class_size} B exhausted: waited {waited:?}, {in_use}/{total} slots in use \
         ({reserve} reserved for control messages); raise its count in [pool] or lower the \
         iodepth"
    )]
    PoolExhausted {
        /// Slot size of the class that ran dry.
        class_size: usize,
        /// How long the caller waited.
        waited: Duration,
        /// Slots in use when the wait ended.
        in_use: usize,
        /// Slots the class may hold in all.
        total: usize,
        /// Slots kept for control messages.
        reserve: usize,
    },

    /// A memory registrar refused an arena.
    #[error("registering pool arena {arena} ({bytes} bytes) failed")]
    RegisterArena {
        /// Index of the arena within the pool.
        arena: usize,
        /// Size of the arena.
        bytes: usize,
        /// The registrar's error.
        #[source]
        source: BoxError,
    },

    /// More registrars were installed than the pool has key slots for.
    #[error("the pool holds at most {max} memory registrars")]
    TooManyRegistrars {
        /// The limit.
        max: usize,
    },

    /// Reading the configuration file failed.
    #[error("reading config file {path} failed")]
    ReadConfig {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The configuration file is not valid TOML or has an unknown key.
    #[error("config file {path}: {message}")]
    ParseConfig {
        /// The file (or `<string>`).
        path: String,
        /// What the TOML parser said, with the line.
        message: String,
    },

    /// A configuration key has a bad value.
    #[error("config key `{key}` has bad value `{value}`: {reason}")]
    ConfigValue {
        /// The dotted key, e.g. `pool.classes[1].size`.
        key: String,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },

    /// The configuration names a transport this binary does not know.
    #[error("unknown transport `{name}`: this build has {known}")]
    UnknownTransport {
        /// The name asked for.
        name: String,
        /// The names registered, comma separated.
        known: String,
    },

    /// The transport is known but cannot run here.
    #[error("transport `{name}` is unavailable: {reason}; {hint}")]
    TransportUnavailable {
        /// The transport.
        name: String,
        /// Why it cannot run.
        reason: String,
        /// What to do about it.
        hint: String,
    },

    /// A transport failed; its own error is the source.
    #[error("{transport} transport: {what}")]
    Transport {
        /// The transport's name.
        transport: &'static str,
        /// What was being done.
        what: String,
        /// The transport's error.
        #[source]
        source: BoxError,
    },

    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// What was being done (e.g. `connect 127.0.0.1:7700`).
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Bytes from the peer could not be decoded.
    #[error("malformed {what}: {reason}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// What was wrong with it.
        reason: String,
    },

    /// A request exceeds a negotiated or configured limit.
    #[error("{what} is {value}, over the limit of {limit}")]
    LimitExceeded {
        /// The quantity.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },

    /// The server answered a request with an error.
    #[error("server refused {op}: {message} (code {code})")]
    Remote {
        /// The operation.
        op: &'static str,
        /// The error code (an errno value, or one of [`crate::proto::Status`]).
        code: u32,
        /// The server's message.
        message: String,
    },

    /// Authentication failed.
    #[error("authentication failed: {0}")]
    Auth(String),

    /// The connection is gone; pending requests fail with this.
    #[error("connection closed: {0}")]
    ConnectionClosed(String),

    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, the peer {theirs}")]
    Version {
        /// Our version.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },

    /// Waiting for something took too long.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The timeout.
        after: Duration,
    },

    /// A thread of the server ended abnormally (a panic), or a like bug.
    #[error("internal error: {0}")]
    Internal(String),

    /// A caller passed an argument the API cannot honour.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// Builds an [`Error::Io`] from an operation description and an OS error.
    pub fn io(op: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            op: op.into(),
            source,
        }
    }

    /// Builds an [`Error::Decode`].
    pub fn decode(what: &'static str, reason: impl Into<String>) -> Self {
        Error::Decode {
            what,
            reason: reason.into(),
        }
    }

    /// Builds a [`Error::ConfigValue`].
    pub fn config(key: impl Into<String>, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::ConfigValue {
            key: key.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// True when the error means the connection can no longer be used.
    pub fn is_connection_fatal(&self) -> bool {
        matches!(
            self,
            Error::ConnectionClosed(_) | Error::Transport { .. } | Error::Decode { .. }
        )
    }
}

/// The `Result` of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
