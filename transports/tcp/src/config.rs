//! The `[tcp]` configuration section: owned here, registered with the core's configuration
//! by [`register`] (which [`crate::register`] calls).
//!
//! ```toml
//! [tcp]
//! nodelay = true     # TCP_NODELAY on every socket
//! sendfile = true    # server: read replies straight from the page cache
//! ```
//!
//! Adding a key: a field here, its default in [`Default`], and one entry in `KEYS`.

use zcio::config::section::{value, Key, Section, Value};
use zcio::Config;

/// TCP transport settings: `[tcp]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TcpConfig {
    /// Set TCP_NODELAY.
    pub nodelay: bool,
    /// Server: send read replies of buffered files with `sendfile(2)` from the page cache
    /// (no user-space copy); `false` reads them into pool buffers first.
    pub sendfile: bool,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            nodelay: true,
            sendfile: true,
        }
    }
}

impl Section for TcpConfig {
    const NAME: &'static str = "tcp";
    const KEYS: &'static [Key<Self>] = &[
        Key {
            name: "nodelay",
            doc: "TCP_NODELAY on every socket",
            get: |c| Value::Boolean(c.nodelay),
            set: |c, v| {
                c.nodelay = value::bool(v)?;
                Ok(())
            },
        },
        Key {
            name: "sendfile",
            doc: "server: send read replies of files not opened O_DIRECT with sendfile(2) \
                  straight from the page cache; false reads them into pool buffers first",
            get: |c| Value::Boolean(c.sendfile),
            set: |c, v| {
                c.sendfile = value::bool(v)?;
                Ok(())
            },
        },
    ];
}

impl TcpConfig {
    /// The `[tcp]` section of `cfg`.
    pub fn of(cfg: &Config) -> &TcpConfig {
        cfg.section::<TcpConfig>()
    }

    /// The `[tcp]` section of `cfg`, to change it.
    pub fn of_mut(cfg: &mut Config) -> &mut TcpConfig {
        cfg.section_mut::<TcpConfig>()
    }
}

/// Registers `[tcp]` with the configuration of this process (idempotent).
pub fn register() {
    zcio::config::section::register::<TcpConfig>();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> zcio::Result<Config> {
        register();
        Config::parse(text)
    }

    #[test]
    fn keys_parse_print_and_round_trip() {
        let c = parse("[tcp]\nnodelay = false\nsendfile = false").unwrap();
        assert_eq!(
            TcpConfig::of(&c),
            &TcpConfig {
                nodelay: false,
                sendfile: false
            }
        );
        let text = c.to_toml();
        assert!(text.contains("[tcp]\n# TCP_NODELAY on every socket\nnodelay = false\n"));
        assert_eq!(Config::parse(&text).unwrap(), c);
        let d = c.with_override("tcp.sendfile=true").unwrap();
        assert!(TcpConfig::of(&d).sendfile && !TcpConfig::of(&d).nodelay);
        assert_eq!(TcpConfig::of(&parse("").unwrap()), &TcpConfig::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        for (text, needles) in [
            (
                "[tcp]\nnodelay = \"yes\"",
                &["`tcp.nodelay`", "`yes`", "true or false"][..],
            ),
            (
                "[tcp]\nno_delay = true",
                &["`tcp.no_delay`", "unknown key", "nodelay"][..],
            ),
            ("tcp = 1", &["`tcp`", "expected a [section]"][..]),
        ] {
            let e = parse(text).expect_err(text).to_string();
            for n in needles {
                assert!(e.contains(n), "{text}: {e}");
            }
        }
    }
}
